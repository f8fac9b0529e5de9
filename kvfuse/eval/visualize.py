"""Pictures of the alignment: the time alignment matrix A (token text on both axes) and the layer map M.

Matplotlib's Agg backend is selected through the object API (no pyplot state), so this works headless and
inside training processes. Long sequences keep every cell but label every k-th token so labels stay legible.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

MAX_LABELS = 80
MAX_INCHES = 40.0


def _dense(m) -> np.ndarray:
    if isinstance(m, torch.Tensor):
        if m.layout != torch.strided:
            m = m.to_dense()
        return m.detach().float().cpu().numpy()
    return np.asarray(m, dtype=np.float32)


def _label(token: str) -> str:
    # Make whitespace visible (leading spaces matter for alignment) and keep labels one line and short.
    text = token.replace("\n", "\u21b5").replace("\t", "\u21e5").replace(" ", "\u00b7")
    return text if len(text) <= 14 else text[:13] + "\u2026"


def _ticks(n: int) -> np.ndarray:
    step = max(1, int(np.ceil(n / MAX_LABELS)))
    return np.arange(0, n, step)


def _save(fig: Figure, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight")
    return path


def plot_alignment(A, student_tokens: Sequence[str], teacher_tokens: Sequence[str], path, title: str | None = None) -> str:
    """Heatmap of `A [T_s, T_t]` (sparse or dense): rows = student tokens, columns = teacher tokens. Returns path."""
    a = _dense(A)
    if a.ndim != 2:
        raise ValueError(f"alignment matrix must be 2-D, got shape {a.shape}")
    if len(student_tokens) != a.shape[0] or len(teacher_tokens) != a.shape[1]:
        raise ValueError(
            f"A is {a.shape[0]}x{a.shape[1]} but got {len(student_tokens)} student and {len(teacher_tokens)} teacher tokens"
        )
    n_s, n_t = a.shape
    width = min(MAX_INCHES, 3.0 + 0.18 * min(n_t, MAX_LABELS * 2))
    height = min(MAX_INCHES, 2.5 + 0.18 * min(n_s, MAX_LABELS * 2))
    fig = Figure(figsize=(width, height))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(a, cmap="viridis", vmin=0.0, vmax=max(1e-12, float(a.max())), aspect="auto", interpolation="nearest")
    rows, cols = _ticks(n_s), _ticks(n_t)
    ax.set_yticks(rows, [_label(student_tokens[i]) for i in rows], fontsize=7)
    ax.set_xticks(cols, [_label(teacher_tokens[i]) for i in cols], fontsize=7, rotation=90)
    ax.set_xlabel(f"teacher tokens (T_t = {n_t})")
    ax.set_ylabel(f"student tokens (T_s = {n_s})")
    ax.set_title(title or "time alignment matrix A (IoU, row-normalised)")
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02)
    return _save(fig, path)


def plot_layer_map(M, path, title: str | None = None) -> str:
    """Heatmap of the layer map `M [L_s, L_t]` with each non-zero weight written in its cell. Returns path."""
    m = _dense(M)
    if m.ndim != 2:
        raise ValueError(f"layer map must be 2-D, got shape {m.shape}")
    n_s, n_t = m.shape
    fig = Figure(figsize=(min(MAX_INCHES, 2.5 + 0.35 * n_t), min(MAX_INCHES, 2.0 + 0.35 * n_s)))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(m, cmap="magma_r", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    if n_s * n_t <= 4096:
        for i, j in zip(*np.nonzero(m)):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if m[i, j] > 0.5 else "black")
    ax.set_xticks(_ticks(n_t))
    ax.set_yticks(_ticks(n_s))
    ax.set_xlabel(f"teacher layer (L_t = {n_t})")
    ax.set_ylabel(f"student layer (L_s = {n_s})")
    ax.set_title(title or "layer map M (row-stochastic)")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    return _save(fig, path)


def plot_embedding(points, sources: Sequence[str], samples: Sequence[str], path, title: str | None = None,
                   seed: int = 0) -> str:
    """2-D map of `points [n, d]` (UMAP when installed, else t-SNE), drawn twice: coloured by source (student /
    teacher i) and by sample. Returns path."""
    x = _dense(points)
    if x.ndim != 2 or len(x) != len(sources) or len(x) != len(samples) or len(x) < 5:
        raise ValueError(f"plot_embedding needs points [n >= 5, d] with n sources and samples; got {x.shape}, "
                         f"{len(sources)}, {len(samples)}")
    try:
        import umap  # optional: the plan's preferred map

        xy = umap.UMAP(random_state=seed).fit_transform(x)
        method = "UMAP"
    except ImportError:
        from sklearn.manifold import TSNE

        xy = TSNE(n_components=2, perplexity=min(30.0, (len(x) - 1) / 3), random_state=seed,
                  init="pca").fit_transform(x)
        method = "t-SNE"
    fig = Figure(figsize=(12, 5))
    for k, (labels, name) in enumerate(((sources, "source"), (samples, "sample"))):
        ax = fig.add_subplot(1, 2, k + 1)
        for label in sorted(set(labels)):
            sel = np.array([lab == label for lab in labels])
            ax.scatter(xy[sel, 0], xy[sel, 1], s=6, alpha=0.7, label=label)
        ax.set_title(f"{method} of Z, coloured by {name}")
        if len(set(labels)) <= 12:
            ax.legend(fontsize=7, markerscale=2)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
