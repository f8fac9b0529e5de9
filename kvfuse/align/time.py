"""Time alignment: student tokens × teacher tokens over the shared segments, K' = A·K_pre, pad + mask.

Every model renders the same shared segments (question, rationale) inside its own prompt and chat template.
Token char spans are mapped into one coordinate system, the shared segments' characters concatenated in
order; tokens that touch no shared character (prompts, template and special tokens) are masked out and get
neither rows nor columns in A. A token straddling a segment edge keeps only its part inside the segments.
A is then built on the shared tokens with `kvfuse.align.tokens.alignment_matrix` (IoU, thresholded,
row-normalised) and placed back at the full token indices: `A [T_s, T_t]` sparse CSR.

`apply_alignment(A, x)` mixes teacher time steps into student time steps along axis −2 of pre-RoPE keys or
values. Batching pads on the right with zeros and a False mask; nothing is ever truncated.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch


def _as_spans(spans, name: str) -> np.ndarray:
    arr = spans.detach().cpu().numpy() if isinstance(spans, torch.Tensor) else np.asarray(spans)
    if arr.size == 0:
        arr = arr.reshape(0, 2)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{name} must be [T, 2] (start, end) char offsets, got shape {arr.shape}")
    arr = arr.astype(np.int64)
    if (arr[:, 1] < arr[:, 0]).any():
        bad = int(np.nonzero(arr[:, 1] < arr[:, 0])[0][0])
        raise ValueError(f"{name}: token {bad} has end < start ({arr[bad].tolist()})")
    return arr


def _as_segments(segments, name: str) -> np.ndarray:
    seg = np.asarray(segments, dtype=np.int64).reshape(-1, 2) if len(segments) else np.zeros((0, 2), np.int64)
    if len(seg) == 0:
        raise ValueError(f"{name}: no shared segments given")
    if (seg[:, 1] <= seg[:, 0]).any():
        raise ValueError(f"{name}: every segment needs start < end, got {seg.tolist()}")
    if (seg[1:, 0] < seg[:-1, 1]).any():
        raise ValueError(f"{name}: segments must be in order and not overlap, got {seg.tolist()}")
    return seg


def shared_text(text: str, segments) -> str:
    """The shared segments' characters, concatenated: the common coordinate system."""
    seg = _as_segments(segments, "segments")
    if seg[-1, 1] > len(text):
        raise ValueError(f"segment {seg[-1].tolist()} runs past the text's end ({len(text)} chars)")
    return "".join(text[a:b] for a, b in seg)


def to_shared_coords(spans, segments) -> tuple[np.ndarray, np.ndarray]:
    """Map token spans `[T, 2]` of a rendered text into shared-segment coordinates.

    Returns (shared_spans `[T, 2]` int64, mask `[T]` bool). Masked tokens get span (0, 0).
    """
    sp = _as_spans(spans, "spans")
    seg = _as_segments(segments, "segments")
    offsets = np.concatenate([[0], np.cumsum(seg[:, 1] - seg[:, 0])[:-1]])
    a, b = sp[:, :1], sp[:, 1:]
    lo = np.maximum(a, seg[None, :, 0])
    hi = np.minimum(b, seg[None, :, 1])
    touches = hi > lo                                     # [T, K]
    shift = (offsets - seg[:, 0])[None, :]
    big = np.iinfo(np.int64).max
    start = np.where(touches, lo + shift, big).min(axis=1)
    end = np.where(touches, hi + shift, -1).max(axis=1)
    mask = touches.any(axis=1)
    out = np.zeros_like(sp)
    out[mask, 0] = start[mask]
    out[mask, 1] = end[mask]
    return out, mask


def _scatter_csr(sub: torch.Tensor, rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    coo = (sub.to_sparse_coo() if sub.layout != torch.strided else sub.to_sparse()).coalesce()
    idx = coo.indices()
    r = torch.as_tensor(rows, dtype=torch.int64)[idx[0]]
    c = torch.as_tensor(cols, dtype=torch.int64)[idx[1]]
    full = torch.sparse_coo_tensor(torch.stack([r, c]), coo.values(), size=shape, check_invariants=True).coalesce()
    with warnings.catch_warnings():
        # torch repeats its "CSR support is in beta" notice for every sample; the CSR ops used here are stable.
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return full.to_sparse_csr()


def time_alignment(
    student_spans, student_segments, teacher_spans, teacher_segments,
    student_text: str | None = None, teacher_text: str | None = None, **alignment_kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Alignment matrix `A [T_s, T_t]` (sparse CSR float32) and the student mask `[T_s]` bool.

    spans: each model's token char offsets in its own rendered text; segments: the shared segments' char
    ranges in that text, in order. Given the texts, the shared characters must be identical across the two
    models (a wrong segment is an error here, not a silently shifted alignment); without them the total
    lengths must agree. The mask is True for student tokens inside the shared segments whose row of A is
    non-empty. Extra keyword arguments go to `kvfuse.align.tokens.alignment_matrix`.
    """
    from kvfuse.align.tokens import alignment_matrix

    s_spans, s_mask = to_shared_coords(student_spans, student_segments)
    t_spans, t_mask = to_shared_coords(teacher_spans, teacher_segments)
    s_seg = _as_segments(student_segments, "student_segments")
    t_seg = _as_segments(teacher_segments, "teacher_segments")
    if student_text is not None and teacher_text is not None:
        s_shared, t_shared = shared_text(student_text, s_seg), shared_text(teacher_text, t_seg)
        if s_shared != t_shared:
            first = next((i for i, (x, y) in enumerate(zip(s_shared, t_shared)) if x != y), min(len(s_shared), len(t_shared)))
            raise ValueError(
                f"shared segments differ between student and teacher at shared char {first}: "
                f"{s_shared[first:first + 20]!r} vs {t_shared[first:first + 20]!r}"
            )
    elif (s_seg[:, 1] - s_seg[:, 0]).sum() != (t_seg[:, 1] - t_seg[:, 0]).sum():
        raise ValueError(
            f"shared segments have {(s_seg[:, 1] - s_seg[:, 0]).sum()} student chars but "
            f"{(t_seg[:, 1] - t_seg[:, 0]).sum()} teacher chars"
        )
    rows, cols = np.nonzero(s_mask)[0], np.nonzero(t_mask)[0]
    shape = (len(s_spans), len(t_spans))
    if len(rows) == 0 or len(cols) == 0:
        empty = torch.sparse_coo_tensor(torch.zeros(2, 0, dtype=torch.int64), torch.zeros(0), size=shape, check_invariants=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
            return empty.to_sparse_csr(), torch.zeros(shape[0], dtype=torch.bool)
    sub = alignment_matrix(s_spans[rows], t_spans[cols], **alignment_kwargs)
    if tuple(sub.shape) != (len(rows), len(cols)):
        raise RuntimeError(f"alignment_matrix returned shape {tuple(sub.shape)}, expected {(len(rows), len(cols))}")
    A = _scatter_csr(sub.float(), rows, cols, shape)
    nonempty = (A.crow_indices()[1:] - A.crow_indices()[:-1]) > 0
    return A, torch.as_tensor(s_mask) & nonempty


def apply_alignment(A: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`x [..., T_t, D]` → `[..., T_s, D]`, out[..., s, :] = Σ_t A[s, t] x[..., t, :] (sparse CSR or dense A).

    Computed in float32 (float64 stays float64) and returned in x's dtype. Use it on pre-RoPE keys and on
    values only: mixing post-RoPE keys of different positions would mix phases.
    """
    if A.dim() != 2:
        raise ValueError(f"alignment matrix A must be 2-D [T_s, T_t], got shape {tuple(A.shape)}")
    if x.dim() < 2:
        raise ValueError(f"x must be [..., T_t, D], got shape {tuple(x.shape)}")
    t_s, t_t = A.shape
    if x.shape[-2] != t_t:
        raise ValueError(f"A has T_t={t_t} columns but x has {x.shape[-2]} time steps (shape {tuple(x.shape)})")
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    lead = x.shape[:-2]
    flat = x.to(compute).movedim(-2, 0).reshape(t_t, -1)
    mat = A.to(device=x.device, dtype=compute, non_blocking=True)    # from the host: no wait for x's producers
    out = (mat @ flat) if mat.layout == torch.strided else torch.sparse.mm(mat, flat)
    return out.reshape(t_s, *lead, x.shape[-1]).movedim(0, -2).to(x.dtype)


def pick_bucket(length: int, buckets: Sequence[int], sample: int | str = 0) -> int:
    """Smallest bucket ≥ length; a length above every bucket is an error (never truncated)."""
    fitting = [b for b in sorted(buckets) if b >= length]
    if not fitting:
        raise ValueError(f"sample {sample}: length {length} exceeds the largest bucket {max(buckets)}")
    return fitting[0]


def pad_aligned(
    xs: Sequence[torch.Tensor], masks: Sequence[torch.Tensor] | None = None,
    max_len: int | None = None, buckets: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-sample `[..., T_i, D]` tensors into `[B, ..., T, D]` padded on the right, plus `mask [B, T]`.

    T is the longest T_i, or the smallest bucket that holds it, or `max_len` when given (then every T_i must
    fit: an over-long sample is a ValueError naming the sample and its length). masks: per-sample `[T_i]` bool
    (default all True); padding is False.
    """
    if not xs:
        raise ValueError("pad_aligned: empty batch")
    lead, depth = xs[0].shape[:-2], xs[0].shape[-1]
    for i, x in enumerate(xs):
        if x.dim() < 2 or x.shape[:-2] != lead or x.shape[-1] != depth:
            raise ValueError(f"sample {i} has shape {tuple(x.shape)}; sample 0 has {tuple(xs[0].shape)} (only T may differ)")
    lengths = [x.shape[-2] for x in xs]
    longest = max(lengths)
    if max_len is not None:
        for i, n in enumerate(lengths):
            if n > max_len:
                raise ValueError(f"sample {i}: length {n} exceeds max_len {max_len} (refusing to truncate)")
        target = max_len
    elif buckets is not None:
        target = pick_bucket(longest, buckets, sample=int(np.argmax(lengths)))
    else:
        target = longest
    out = xs[0].new_zeros((len(xs), *lead, target, depth))
    mask = torch.zeros(len(xs), target, dtype=torch.bool, device=xs[0].device)
    for i, x in enumerate(xs):
        out[i, ..., : lengths[i], :] = x
        if masks is None:
            mask[i, : lengths[i]] = True
        else:
            if masks[i].shape != (lengths[i],):
                raise ValueError(f"sample {i}: mask shape {tuple(masks[i].shape)} != ({lengths[i]},)")
            mask[i, : lengths[i]] = masks[i].to(mask.device, torch.bool)
    return out, mask
