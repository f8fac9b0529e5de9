"""Tables and seed-band figures of the GPU-scale runs (bench/gpu_scale.py), and the "GPU scale" section of
docs/RESULTS.md filled from them.

    python -m bench.gpu_scale_report ROOT [--img docs/img] [--results docs/RESULTS.md]

ROOT holds `runs/<setup>-seed<s>/{eval.json, metrics.jsonl}` (the runner's root, or the unpacked tar files of
`python -m bench.gpu_scale collect`). One table per question, one row per setup: mean ± std over its seeds of GSM8K
accuracy (all 1319 test items, and the items no training template came from), the rationale perplexity on the
held-out items, the KV CKA to each teacher, the train/val gap of the rationale CE, training tokens, tokens/s and GPU
memory — with the exact trainer command of the row. Figures: per question, validation perplexity and KV CKA against
training tokens, mean ± std over seeds, into `--img`. With `--results`, the text between the section's markers in
that file is replaced (nothing else is touched); without runs the section says so and claims nothing.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from kvfuse.eval.seeds import mean_std_cell, seed_band

BEGIN, END = "<!-- gpu-scale:begin -->", "<!-- gpu-scale:end -->"
# (title, file stem, setups in row order): the plan's questions (docs/PLAN.md §4, §7; issue 17)
QUESTIONS = (
    ("Does KV distillation beat plain fine-tuning at equal tokens?", "baseline",
     ("ce_only", "sft_plus_kv", "kv_fused", "kv_only")),
    ("Single teacher vs two fused (Phase 1 teachers, CE + KV)", "single_vs_multi", ("kv_single", "kv_fused")),
    ("Cross pair SmolLM2 + Gemma3-270M → SmolLM2: fixed vs learnable router (CE + KV)", "router",
     ("cross_fixed", "cross_learnable")),
    ("Separating the signals: CE only, KV only, both", "signals", ("ce_only", "kv_only", "kv_fused", "sft_plus_kv")),
)
NOT_RUN = ("No GPU-scale run has been made yet: this section holds no results. It is filled by "
           "`python -m bench.gpu_scale_report ROOT --results docs/RESULTS.md` from the runs of "
           "`python -m bench.gpu_scale run` (bench/NOTES.md, \"GPU-scale session\", gives the device calls).")


def load_runs(root: Path) -> dict[str, list[dict]]:
    """eval.json of every finished run, by setup, seeds in order."""
    by_setup: dict[str, list[dict]] = {}
    for path in sorted((root / "runs").glob("*/eval.json")):
        result = json.loads(path.read_text())
        if "setup" not in result:
            continue        # a model scored alone (the untrained student), not a setup of the matrix
        by_setup.setdefault(result["setup"], []).append(result)
    for results in by_setup.values():
        results.sort(key=lambda r: r["seed"])
    return by_setup


def _cell(results: list[dict], get, digits: int = 4) -> str:
    values = [v for v in (get(r) for r in results) if v is not None]
    return mean_std_cell(values, digits) if values else "–"


def _last(key):
    return lambda r: r.get("last_eval", {}).get(key)


def teacher_labels(config: dict) -> list[str]:
    """Short names of a run's teachers in order: the prompt alone when the student's own model teaches under
    several prompts (Phase 1), else model and prompt."""
    prompts = config.get("teacher_prompts") or []
    teachers = config.get("teachers") or []
    if not teachers:
        return list(prompts)
    prompts = prompts * len(teachers) if len(prompts) == 1 else prompts
    return [f"{t.split('-')[0]} {p}" for t, p in zip(teachers, prompts)]


def _cka_cell(results: list[dict]) -> str:
    labels = teacher_labels(results[0].get("config", {}))
    per_teacher = [r.get("last_eval", {}).get("cka_per_teacher") or [] for r in results]
    cells = []
    for i, label in enumerate(labels):
        values = [p[i] for p in per_teacher if len(p) > i]
        if values:
            cells.append(f"{label}: {mean_std_cell(values)}")
    return "; ".join(cells) or "–"


def table(results_by_setup: dict[str, list[dict]], setups: tuple[str, ...]) -> str:
    head = ["setup (seeds)", "GSM8K acc, 1319", "GSM8K acc, clean", "val ppl (held-out rationales)",
            "KV CKA to each teacher", "CE gap (val − train) / train", "training tokens (M)", "tokens/s (supervised)",
            "GPU memory (GB)"]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    commands = []
    for setup in setups:
        results = results_by_setup.get(setup, [])
        if not results:
            rows.append(f"| {setup} (0) | not run |" + " |" * (len(head) - 2))
            continue
        cells = [f"{setup} ({len(results)})", _cell(results, lambda r: r["gsm8k"]["accuracy"], 3),
                 _cell(results, lambda r: r["gsm8k"].get("accuracy_clean"), 3), _cell(results, _last("val_ppl")),
                 _cka_cell(results), _cell(results, _last("ce_gap"), 3),
                 _cell(results, lambda r: r.get("train_tokens", 0) / 1e6, 4),
                 _cell(results, lambda r: r.get("supervised_tokens_per_s"), 3),
                 _cell(results, lambda r: r.get("gpu_mem_gb"), 3)]
        rows.append("| " + " | ".join(cells) + " |")
        seeds = " ".join(str(r["seed"]) for r in results)
        command = re.sub(r"--seed \d+", "--seed S", results[0]["command"]).replace(
            f"{setup}-seed{results[0]['seed']}", f"{setup}-seedS")
        commands.append(f"- {setup}: {results[0].get('summary', '')}; S ∈ {{{seeds}}}:  \n  `{command}`")
    return "\n".join(rows) + "\n\n" + "\n".join(commands)


def _change(key: str, relative: bool):
    """first → last evaluation of `key`: in % (relative) or as a difference; None without both."""
    def get(r: dict):
        first, last = r.get("first_eval", {}).get(key), r.get("last_eval", {}).get(key)
        if first is None or last is None:
            return None
        return 100 * (last / first - 1) if relative else last - first
    return get


def train_val_table(results_by_setup: dict[str, list[dict]]) -> str:
    """PLAN §7, "train and val both fall, gap ≤ 2–3 %", per setup: the rationale perplexity on the held-out items
    and on as many training items, first → last evaluation, the final CE gap and the change of KV CKA."""
    rows = ["| setup (seeds) | val ppl change % | train ppl change % | final CE gap % | KV CKA change |",
            "| --- | --- | --- | --- | --- |"]
    for setup, results in results_by_setup.items():
        gap = _cell(results, lambda r: 100 * r["last_eval"]["ce_gap"] if "ce_gap" in r.get("last_eval", {})
                    else None, 3)
        rows.append(f"| {setup} ({len(results)}) | {_cell(results, _change('val_ppl', True), 3)} | "
                    f"{_cell(results, _change('train_ppl', True), 3)} | {gap} | "
                    f"{_cell(results, _change('cka_mean', False), 3)} |")
    return "\n".join(rows)


def figure(results_by_setup: dict[str, list[dict]], setups: tuple[str, ...], title: str, out: Path) -> Path | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [s for s in setups if any(r.get("curve") for r in results_by_setup.get(s, []))]
    if not present:
        return None
    panels = (("val_ppl", "rationale perplexity, held-out items"), ("cka_mean", "KV CKA to the teachers (mean)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.8), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for setup in present:
            series = [([p["tokens"] / 1e6 for p in r["curve"]], [p[key] for p in r["curve"]])
                      for r in results_by_setup[setup] if r.get("curve")]
            seed_band(ax, series, setup)
        ax.set_xlabel("training tokens (M)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def section(root: Path | None, img: Path, link_prefix: str = "img") -> str:
    """The markdown of the "GPU scale" section (between the markers)."""
    results = load_runs(root) if root is not None else {}
    if not results:
        return NOT_RUN
    base = _base_accuracy(root)
    parts = ["Every number below comes from `python -m bench.gpu_scale run` on one H200 GPU per run (bf16, fused "
             "Triton KV loss, ZeRO-3 through the trainer's single-process path); each row is mean ± std over the "
             "seeds it names. "
             "GSM8K accuracy: greedy, final number extracted as the trainer does, all 1319 test items and the "
             "\"clean\" ones no gsm_symbolic template was written from."
             + (f" The untrained student scores {base:.3f} on all 1319." if base is not None else "")]
    for title, stem, setups in QUESTIONS:
        parts.append(f"### {title}\n\n{table(results, setups)}")
        png = figure(results, setups, title, img / f"gpu_scale_{stem}.png")
        if png is not None:
            parts.append(f"![{title}]({link_prefix}/{png.name})")
    parts.append("### PLAN §7 at this scale: do train and val fall together?\n\n" + train_val_table(results))
    parts.append("The reading of these tables is written by hand below this generated part (\"no difference\" "
                 "where the seed bands overlap).")
    return "\n\n".join(parts)


def _base_accuracy(root: Path) -> float | None:
    path = root / "runs" / "base" / "eval.json"
    return json.loads(path.read_text())["gsm8k"]["accuracy"] if path.is_file() else None


def write_section(results_md: Path, text: str) -> None:
    doc = results_md.read_text()
    if doc.count(BEGIN) != 1 or doc.count(END) != 1 or doc.index(BEGIN) > doc.index(END):
        raise SystemExit(f"{results_md} needs exactly one {BEGIN} … {END} pair")
    start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    results_md.write_text(doc[:start] + "\n" + text + "\n" + doc[end:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="the runner's root (holds runs/)")
    parser.add_argument("--img", type=Path, default=Path("docs/img"), help="where the figures go")
    parser.add_argument("--results", type=Path, default=None, help="fill this file's GPU-scale section")
    args = parser.parse_args(argv)
    text = section(args.root, args.img)
    if args.results is not None:
        write_section(args.results, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
