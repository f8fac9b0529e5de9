"""`python -m kvfuse report RUN_DIR`: one self-contained HTML page for a training run.

It reads the run directory the trainer writes (config.yaml, metrics.jsonl, alignment_*.png, layer_map*.png) and
draws: train/val KV-loss curves with the train/val gap, layer × step heatmaps of K- and V-MSE, validation task
metrics, router weights (sample × teacher, and per layer) with router entropy over training when a router ran, the
alignment pictures, and the resolved config. Images are embedded as base64 PNG, so the file travels alone.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a kvfuse run directory?")
    events = []
    with open(path) as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not JSON ({err})") from None
    if not events:
        raise ValueError(f"{path} has no events")
    return events


_png_dir: Path | None = None     # set by build_report(png_dir=...): every figure is also written there as <name>.png


def _png(fig, name: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    if _png_dir is not None:
        (_png_dir / f"{name}.png").write_bytes(buf.getvalue())
    return base64.b64encode(buf.getvalue()).decode()


def _img(b64: str, caption: str) -> str:
    return (f'<figure><img src="data:image/png;base64,{b64}"/><figcaption>{html.escape(caption)}</figcaption>'
            "</figure>")


def _series(events, split, key):
    pts = [(e["step"], e[key]) for e in events if e.get("split") == split and e.get(key) is not None
           and not isinstance(e[key], list)]
    return [p[0] for p in pts], [p[1] for p in pts]


def loss_curves(events) -> str:
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    xs, ys = _series(events, "train", "kv_loss")
    if xs:
        ax.plot(xs, ys, "-", color="0.7", label="train step (annealed layer weights)")
    for key, label in (("train_kv_loss", "train subset, all layers"), ("kv_loss", "val, all layers")):
        xs, ys = _series(events, "val", key)
        if xs:
            ax.plot(xs, ys, "o-", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("KV loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _img(_png(fig, "kv_loss"), "KV-distillation loss. The training steps' loss uses the annealed layer weights (shallow "
                           "layers first); the evaluations weigh every layer equally on a fixed train subset and on "
                           "the validation set, so those two curves are comparable.")


def layer_heatmaps(events, split="train") -> str:
    rows = [e for e in events if e.get("split") == split and isinstance(e.get("k_mse"), list)]
    if not rows:
        return ""
    steps = [e["step"] for e in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, key in zip(axes, ("k_mse", "v_mse")):
        grid = np.array([e[key] for e in rows], dtype=float).T  # [L, steps]
        im = ax.imshow(np.log10(np.maximum(grid, 1e-12)), aspect="auto", origin="lower", cmap="viridis",
                       extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, grid.shape[0] - 0.5))
        ax.set_xlabel("step")
        ax.set_ylabel("student layer")
        ax.set_title(f"{split} {key} (log10)")
        fig.colorbar(im, ax=ax)
    return _img(_png(fig, f"{split}_layer_heatmap"), f"Layer × step heatmaps of per-layer K- and V-MSE ({split}).")


def router_pictures(events) -> str:
    rows = [e for e in events if e.get("split") == "router"]
    if not rows:
        return ""
    # Each step logs its batch's α; the latest α of every sample seen gives the sample × teacher picture.
    latest: dict[str, np.ndarray] = {}
    for event in rows:
        for sample_id, a in zip(event.get("sample_ids") or [], event["alpha"]):
            latest[str(sample_id)] = np.array(a, dtype=float)
    if not latest:
        latest = {str(i): np.array(a, dtype=float) for i, a in enumerate(rows[-1]["alpha"])}
    ids = list(latest)[-40:]
    alpha = np.stack([latest[i] for i in ids])                           # [S, N] or [S, L, N]
    step = rows[-1]["step"]
    parts = []
    if alpha.ndim == 3:
        per_sample = alpha.mean(axis=1)
        fig, ax = plt.subplots(figsize=(6, 3.2))
        im = ax.imshow(alpha.mean(axis=0).T, aspect="auto", origin="lower", cmap="magma", vmin=0, vmax=1)
        ax.set_xlabel("student layer")
        ax.set_ylabel("teacher")
        ax.set_yticks(range(alpha.shape[2]))
        fig.colorbar(im, ax=ax)
        parts.append(_img(_png(fig, "router_alpha_layers"), f"Router weight per layer and teacher (mean over samples), up to step {step}."))
    else:
        per_sample = alpha
    fig, ax = plt.subplots(figsize=(6, max(2.5, 0.22 * per_sample.shape[0])))
    im = ax.imshow(per_sample, aspect="auto", cmap="magma", vmin=0, vmax=1)
    ax.set_xlabel("teacher")
    ax.set_xticks(range(per_sample.shape[1]))
    ax.set_ylabel("sample")
    ax.set_yticks(range(len(ids)), ids, fontsize=6)
    fig.colorbar(im, ax=ax)
    parts.append(_img(_png(fig, "router_alpha"), f"Router weights α (sample × teacher): each sample's latest α, up to step {step}."))
    xs = [e["step"] for e in rows if "entropy" in e]
    if xs:
        fig, ax = plt.subplots(figsize=(6, 2.8))
        ax.plot(xs, [e["entropy"] for e in rows if "entropy" in e], "o-")
        ax.set_xlabel("step")
        ax.set_ylabel("mean router entropy (nats)")
        ax.grid(alpha=0.3)
        parts.append(_img(_png(fig, "router_entropy"), "Router entropy over training (collapse onto one teacher shows as → 0)."))
    return "".join(parts)


def cka_picture(events) -> str:
    rows = [e for e in events if e.get("split") == "val" and isinstance(e.get("cka"), list)]
    if not rows:
        return ""
    first, last = rows[0], rows[-1]
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    for i, (a, b) in enumerate(zip(first["cka"], last["cka"])):
        line, = ax.plot(range(len(a)), a, "--", alpha=0.6, label=f"teacher {i}, step {first['step']}")
        ax.plot(range(len(b)), b, "o-", color=line.get_color(), label=f"teacher {i}, step {last['step']}")
    ax.set_xlabel("student layer")
    ax.set_ylabel("linear CKA, student vs teacher K|V")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _img(_png(fig, "cka"), "Linear CKA between the student's K|V and each aligned teacher's on the validation tokens "
                           "(adapter-free, so comparable across runs, routers and Z space).")


def val_table(events) -> str:
    rows = [e for e in events if e.get("split") == "val"]
    if not rows:
        return "<p>No validation events.</p>"
    keys = [k for k in ("kv_loss", "train_kv_loss", "gap", "cka_mean", "ce", "ppl", "accuracy", "rouge_l", "bleu")
            if any(k in e for e in rows)]
    head = "".join(f"<th>{k}</th>" for k in ["step"] + keys)
    body = []
    for e in rows:
        cells = "".join(f"<td>{_fmt(e.get(k))}</td>" for k in keys)
        body.append(f"<tr><td>{e['step']}</td>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def build_report(run_dir: str | Path, out: str | Path | None = None, png_dir: str | Path | None = None) -> Path:
    """Write the run's HTML report (default RUN_DIR/report.html); with `png_dir`, also each figure as a PNG file."""
    global _png_dir
    if png_dir is not None:
        Path(png_dir).mkdir(parents=True, exist_ok=True)
    _png_dir = Path(png_dir) if png_dir is not None else None
    try:
        return _build_report(Path(run_dir), out)
    finally:
        _png_dir = None


def _build_report(run_dir: Path, out: str | Path | None) -> Path:
    events = read_metrics(run_dir)
    config_path = run_dir / "config.yaml"
    config_text = config_path.read_text() if config_path.exists() else "(no config.yaml)"
    sections = [
        "<h2>KV loss</h2>", loss_curves(events), layer_heatmaps(events, "train"), layer_heatmaps(events, "val"),
        "<h2>Validation</h2>", val_table(events), cka_picture(events),
    ]
    router = router_pictures(events)
    if router:
        sections += ["<h2>Router</h2>", router]
    pictures = sorted(run_dir.glob("*.png"))
    if pictures:
        sections.append("<h2>Pictures</h2>")
        sections += [_img(base64.b64encode(p.read_bytes()).decode(), p.stem.replace("_", " ")) for p in pictures]
    sections += ["<h2>Config</h2>", f"<pre>{html.escape(config_text)}</pre>"]
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>kvfuse run report</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto}img{max-width:100%}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
            "figcaption{color:#555;font-size:90%}</style></head><body>"
            f"<h1>kvfuse run: {html.escape(str(run_dir))}</h1>{''.join(sections)}</body></html>")
    out_path = Path(out) if out else run_dir / "report.html"
    out_path.write_text(page)
    return out_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run directory written by train/main.py")
    parser.add_argument("--out", default=None, help="output HTML file (default RUN_DIR/report.html)")
    parser.add_argument("--png_dir", default=None, help="also write every figure there as PNG (for docs)")


def run(args: argparse.Namespace) -> int:
    path = build_report(args.run_dir, args.out, args.png_dir)
    print(f"report written to {path}" + (f"; figures in {args.png_dir}" if args.png_dir else ""))
    return 0
