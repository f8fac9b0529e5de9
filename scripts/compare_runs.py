"""Mean ± std over seeds of the numbers docs/RESULTS.md quotes, one markdown row per group of runs.

    python scripts/compare_runs.py "head-to-head=runs/evidence/zcmp-head-seed0,runs/evidence/zcmp-head-seed1" ...
        [--plot docs/img/zspace_vs_head.png]

Per run: its own training loss on validation, first → last evaluation (relative change; each setup's loss lives in
its own space), the same on the train subset, the final train/val gap, the adapter-free student–teacher KV CKA
(first → last, the one number comparable across setups), validation perplexity, the global gradient norm over the
steps (median and max: spikes mark an unstable setup) and, for routed runs, teacher 0's mean α and router entropy.
--plot draws, per group, the mean ± std over seeds of the validation loss and the KV CKA, each against step 0,
and of the gradient norm per step.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from kvfuse.eval.seeds import mean_std_cell, seed_band


def _events(run: Path, split: str) -> list[dict]:
    return [e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e["split"] == split]


def _alpha0_per_sample(events: list[dict]) -> list[float]:
    """α of teacher 0 for every sample of these router events ([B, N] or [B, L, N]: layers averaged)."""
    rows = [r if not isinstance(r[0], list) else [sum(c) / len(r) for c in zip(*r)] for e in events for r in e["alpha"]]
    return [r[0] for r in rows]


def run_numbers(run: Path) -> dict[str, float]:
    val, train = _events(run, "val"), _events(run, "train")
    if len(val) < 2:
        raise SystemExit(f"{run}: needs at least two validation events, found {len(val)}")
    a, b = val[0], val[-1]
    out = {"val loss %": 100 * (b["kv_loss"] / a["kv_loss"] - 1),
           "train-subset loss %": 100 * (b["train_kv_loss"] / a["train_kv_loss"] - 1),
           "final gap %": 100 * b["gap"],
           "val ppl first": a["ppl"], "val ppl last": b["ppl"]}
    if "cka_mean" in a:
        out["CKA first"], out["CKA last"] = a["cka_mean"], b["cka_mean"]
        out["CKA change"] = b["cka_mean"] - a["cka_mean"]
    norms = [e["grad_norm"] for e in train if e.get("grad_norm") is not None]
    if norms:
        out["grad norm median"], out["grad norm max"] = statistics.median(norms), max(norms)
    routers = _events(run, "router")
    if routers:     # over the samples of the first and the last 4 steps: mean α₀ and its spread (routing or not)
        first, last = _alpha0_per_sample(routers[:4]), _alpha0_per_sample(routers[-4:])
        out["alpha0 first"], out["alpha0 last"] = statistics.mean(first), statistics.mean(last)
        out["alpha0 spread first"], out["alpha0 spread last"] = statistics.pstdev(first), statistics.pstdev(last)
        out["entropy first"], out["entropy last"] = routers[0]["entropy"], routers[-1]["entropy"]
    return out


def _val_series(run: Path, key: str, relative: bool):
    """Validation `key` over steps, as % change from step 0 (relative) or as the difference from step 0."""
    val = _events(run, "val")
    steps, ys = [e["step"] for e in val], [e[key] for e in val]
    return steps, [100 * (y / ys[0] - 1) for y in ys] if relative else [y - ys[0] for y in ys]


def plot(groups: list[tuple[str, list[Path]]], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("kv_loss", True, "val loss vs step 0 (%)")]
    if all(_has_val_key(r, "cka_mean") for _, runs in groups for r in runs):
        panels.append(("cka_mean", False, "student–teacher KV CKA − CKA at step 0 (val)"))
    if all(_grad_norms(r)[0] for _, runs in groups for r in runs):
        panels.append(("grad_norm", None, "gradient norm before clipping (train)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.6), squeeze=False)
    for ax, (key, relative, label) in zip(axes[0], panels):
        for name, runs in groups:
            seed_band(ax, [_grad_norms(r) if key == "grad_norm" else _val_series(r, key, relative) for r in runs],
                      name)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    print(f"figure: {out}", file=sys.stderr)


def _grad_norms(run: Path):
    train = [e for e in _events(run, "train") if e.get("grad_norm") is not None]
    return [e["step"] for e in train], [e["grad_norm"] for e in train]


def _has_val_key(run: Path, key: str) -> bool:
    return any(key in e for e in _events(run, "val"))


def main(argv: list[str]) -> int:
    if not argv:
        raise SystemExit(__doc__)
    out = None
    if "--plot" in argv:
        at = argv.index("--plot")
        out, argv = Path(argv[at + 1]), argv[:at] + argv[at + 2:]
    groups, run_lists = [], []
    for spec in argv:
        label, _, dirs = spec.partition("=")
        runs = [Path(d) for d in dirs.split(",") if d]
        run_lists.append(runs)
        if not runs:
            raise SystemExit(f"group {spec!r}: expected label=dir1,dir2,...")
        numbers = [run_numbers(r) for r in runs]
        for r, n in zip(runs, numbers):
            print(f"  {r}: " + ", ".join(f"{k} {v:.4g}" for k, v in n.items()), file=sys.stderr)
        groups.append((label, numbers))
    columns = [k for k in groups[0][1][0] if all(k in n for _, ns in groups for n in ns)]
    print("| setup (n seeds) | " + " | ".join(columns) + " |")
    print("| --- " * (len(columns) + 1) + "|")
    for label, numbers in groups:
        cells = [mean_std_cell([n[k] for n in numbers]) for k in columns]
        print(f"| {label} ({len(numbers)}) | " + " | ".join(cells) + " |")
    if out is not None:
        plot([(label, runs) for (label, _), runs in zip(groups, run_lists)], out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
