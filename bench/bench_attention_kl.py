"""Attention KL (the γ term): materialised torch reference vs torch.compile of it vs the O(T) Triton kernel, on a GPU.

Question answered: for one Qwen2.5-1.5B-like student layer (B = 1, 12 query heads, 2 KV heads, D = 128, bf16),
how much faster and smaller is the Triton forward + backward than the reference, how close to the FLOP floor
(minimal matmul FLOPs over the bf16 matmul rate measured in this run), and what is the largest T each one fits.

    PYTHONPATH=. python -m bench.bench_attention_kl --out $OUT               # GPU: check + time, CSV + log
    python -m bench.bench_attention_kl --plot bench/results/attention_kl_<dev>.csv   # anywhere: the plot

"full" = loss + gradients to q_s, k_s, k_f; "fwd" = the loss alone (autograd graph recorded, as in training).
Peak memory is the allocator's peak during one full call minus what was allocated before it (inputs).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import math
import sys
import time
from pathlib import Path

import torch


from bench.common import commit
from kvfuse.attention import _attention_kl_triton, attention_kl_reference
from kvfuse.kernels import attention_kl as kernels

HEADS, KV_HEADS, DIM = 12, 2, 128
SEQS = [1024, 4096, 16384, 32768]
TRITON_ONLY_SEQS = [65536]
VARIANTS = ("eager", "compile", "triton")
# One-pass backward variants timed next to the default kernel ("triton" = kernels.BWD_VARIANT's default, "lean"):
# rows named triton-<variant>; "det" = the deterministic two-kernel backward (∂q from the query-major kernel, no
# atomics), which splits the atomics' cost from the rest in one run.
TRITON_VARIANTS = ("ptr", "lean", "tma_dq", "tma", "det")
DEVICE = "cuda"  # a CPU smoke test of this script's logic may set "cpu" (with TRITON_INTERPRET=1)



def make_inputs(T: int, dtype=torch.bfloat16, seed: int = 0, B: int = 1, H: int = HEADS, H_kv: int = KV_HEADS,
                D: int = DIM):
    """Random student queries/keys and fused keys near the student keys, ~3 % right padding."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, device=DEVICE, generator=g)  # noqa: E731
    q = rnd(B, H, T, D).to(dtype).requires_grad_()
    k_s = rnd(B, H_kv, T, D)
    k_f = (k_s + 0.5 * rnd(B, H_kv, T, D)).to(dtype).requires_grad_()
    k_s = k_s.to(dtype).requires_grad_()
    valid = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    valid[:, T - T // 32:] = False
    return q, k_s, k_f, valid


def min_flops(valid: torch.Tensor, H: int, D: int) -> tuple[float, float]:
    """Matmul FLOPs an exact method cannot avoid: forward s and f (2 products over the allowed pairs), backward
    recomputes s and f once and forms ∂q (2 products) and ∂k_s, ∂k_f (2 products): 2 and 8 products in all."""
    v = valid.double()
    pairs = float((v * v.cumsum(1)).sum())  # Σ over valid queries i of the valid keys j ≤ i
    unit = 2.0 * pairs * D * H
    return 2 * unit, 8 * unit


def matmul_peak() -> float:
    from triton.testing import do_bench
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, return_mode="median")
    return 2 * 8192 ** 3 / (ms * 1e-3)


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def check(log) -> float:
    """Triton vs the reference on fresh inputs: fp32 at odd shapes (ieee products, 1e-4), once more with
    torch.use_deterministic_algorithms(True) (the atomic-free backward), and bf16 at the bench shape (2e-2).
    Returns the worst error over loss and gradients, each divided by its tolerance."""
    worst = 0.0
    # One fp32 shape only: each new D recompiles the fp32 kernels (other D and GQA groups are covered by the CPU
    # tests under the interpreter).  The deterministic case runs in fp32: one fixed tile per kernel, so it
    # compiles two kernels where bf16 would autotune six.
    fp32 = dict(T=333, B=2, H=12, H_kv=4, D=128)
    cases = [("fp32", torch.float32, 1e-4, fp32, False), ("fp32 deterministic", torch.float32, 1e-4, fp32, True),
             ("bf16", torch.bfloat16, 2e-2, dict(T=2048), False)]
    for name, dtype, tol, shape, deterministic in cases:
        q, k_s, k_f, valid = make_inputs(dtype=dtype, seed=shape["T"], **shape)
        valid[0, :5] = False  # left padding too
        scale = 1 / math.sqrt(q.shape[-1])
        res = {}
        for impl in ("ref", "triton"):
            fn = attention_kl_reference if impl == "ref" else _attention_kl_triton
            torch.use_deterministic_algorithms(deterministic and impl == "triton")
            loss = fn(q, k_s, k_f, valid, scale)
            res[impl] = (loss, *torch.autograd.grad(loss, (q, k_s, k_f)))
            torch.use_deterministic_algorithms(False)
        errs = [rel(a, b) for a, b in zip(res["triton"], res["ref"])]
        finite = all(bool(torch.isfinite(x).all()) for x in res["triton"])
        log(f"check {name} {shape}: rel err loss {errs[0]:.2e}, dq {errs[1]:.2e}, dk_s {errs[2]:.2e}, "
            f"dk_f {errs[3]:.2e}; finite {finite}")
        worst = max(worst, max(errs) / tol, 0.0 if finite else math.inf)
        del q, k_s, k_f, res
    return worst


class bwd_variant:
    """Context: the one-pass backward runs `variant` ("ptr" | "lean" | "tma_dq" | "tma", kernels.BWD_VARIANTS) or, for
    "det", the deterministic two-kernel path; "tma" also switches the forward to TMA key tiles
    (kernels.FWD_VARIANT), so its fwd rows time the forward variant and full − fwd the backward one."""

    def __init__(self, variant: str):
        self.variant = variant

    def __enter__(self):
        self.saved = kernels.BWD_VARIANT, kernels.FWD_VARIANT, torch.are_deterministic_algorithms_enabled()
        kernels.BWD_VARIANT = "ptr" if self.variant == "det" else self.variant
        kernels.FWD_VARIANT = "tma" if self.variant == "tma" else "ptr"
        torch.use_deterministic_algorithms(self.variant == "det")

    def __exit__(self, *exc):
        kernels.BWD_VARIANT, kernels.FWD_VARIANT = self.saved[:2]
        torch.use_deterministic_algorithms(self.saved[2])


def check_variants(log, variants, shapes=(dict(T=2048), dict(T=333, B=2, H=12, H_kv=4, D=128))) -> list[str]:
    """Every variant, bf16: at the bench shape (T = 2048) and at an odd padded one (T = 333, 12/4 heads, B = 2,
    left padding: ∂qᵀ's rows padded to a multiple of 4, partial tiles) against the reference and against the
    default kernels' results (2e-2 each: the default kernels themselves are ≈ 4e-3 from the reference at 2048).
    Returns the variants that passed; one that fails or raises (e.g. does not compile) is logged and left out of
    the timings, and the others still run."""
    failed = set()
    for shape in shapes:
        q, k_s, k_f, valid = make_inputs(seed=shape["T"] + 1, **shape)
        valid[0, :5] = False
        scale = 1 / math.sqrt(q.shape[-1])
        loss = attention_kl_reference(q, k_s, k_f, valid, scale)
        ref = (loss, *torch.autograd.grad(loss, (q, k_s, k_f)))
        loss = _attention_kl_triton(q, k_s, k_f, valid, scale)
        base = (loss, *torch.autograd.grad(loss, (q, k_s, k_f)))
        for v in variants:
            if v in failed:
                continue
            try:
                with bwd_variant(v):
                    loss = _attention_kl_triton(q, k_s, k_f, valid, scale)
                    got = (loss, *torch.autograd.grad(loss, (q, k_s, k_f)))
            except Exception as err:  # noqa: BLE001 - a broken variant must not cost the other rows
                log(f"check bf16 variant {v} {shape}: FAILED, {type(err).__name__}: {str(err)[:400]}")
                failed.add(v)
                continue
            errs = [rel(a, b) for a, b in zip(got, ref)]
            same = [rel(a, b) for a, b in zip(got, base)]
            finite = all(bool(torch.isfinite(x).all()) for x in got)
            ok = finite and max(errs + same) <= 2e-2
            log(f"check bf16 variant {v} {shape}: rel err vs reference loss {errs[0]:.2e}, dq {errs[1]:.2e}, "
                f"dk_s {errs[2]:.2e}, dk_f {errs[3]:.2e}; vs default kernels loss {same[0]:.2e}, dq {same[1]:.2e}, "
                f"dk_s {same[2]:.2e}, dk_f {same[3]:.2e}; finite {finite}: {'passed' if ok else 'FAILED'}")
            if not ok:
                failed.add(v)
        del q, k_s, k_f, ref, base
    return [v for v in variants if v not in failed]


def chosen_configs(variant: str) -> str:
    """The tiles the autotuners last launched for this Triton variant (forward; backward)."""
    def fmt(tuner):
        c = getattr(tuner, "best_config", None)
        return f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}/{c.num_warps}w/{c.num_stages}s" if c else "-"
    names = {"triton": ["fwd", "bwd"], "triton-lean": ["fwd", "bwd_lean"], "triton-tma_dq": ["fwd", "bwd_tma_dq"],
             "triton-tma": ["fwd_tma", "bwd_tma"], "triton-det": ["fwd", "dq", "bwd"]}.get(variant)
    if names is None:
        return ""
    return "; ".join(f"{n} {fmt(kernels._TUNED[n][0])}" for n in names)


def check_compiled(log, T: int = 2048) -> bool:
    """torch.compile(fullgraph=True) with Inductor of the Triton loss, bf16: no graph break, and the compiled loss
    and gradients equal eager's (the same kernels run; only ∂q's atomic summation order differs)."""
    q, k_s, k_f, valid = make_inputs(T, seed=7)
    scale = 1 / math.sqrt(DIM)
    breaks = torch._dynamo.explain(_attention_kl_triton)(q, k_s, k_f, valid, scale).graph_break_count
    torch._dynamo.reset()
    res = {}
    for name, fn in (("eager", _attention_kl_triton),
                     ("compiled", torch.compile(_attention_kl_triton, fullgraph=True))):
        loss = fn(q, k_s, k_f, valid, scale)
        res[name] = (loss, *torch.autograd.grad(loss, (q, k_s, k_f)))
    errs = [rel(a, b) for a, b in zip(res["compiled"], res["eager"])]
    ok = breaks == 0 and max(errs) <= 1e-2
    log(f"check torch.compile(fullgraph=True), Inductor: graph breaks {breaks}; rel err vs eager loss {errs[0]:.2e}, "
        f"dq {errs[1]:.2e}, dk_s {errs[2]:.2e}, dk_f {errs[3]:.2e}: {'passed' if ok else 'FAILED'}")
    return ok


def bench_one(variant: str, T: int, peak: float, impls, log):
    from triton.testing import do_bench
    q, k_s, k_f, valid = make_inputs(T, seed=T)
    scale = 1 / math.sqrt(DIM)
    impl = impls[variant.split("-")[0]]
    fwd = lambda: impl(q, k_s, k_f, valid, scale)  # noqa: E731
    full = lambda: torch.autograd.grad(impl(q, k_s, k_f, valid, scale), (q, k_s, k_f))  # noqa: E731
    context = bwd_variant(variant.split("-")[1] if "-" in variant else "ptr")
    context.__enter__()
    f_fwd, f_full = min_flops(valid, HEADS, DIM)
    base = dict(variant=variant, T=T, gflop_fwd=round(f_fwd / 1e9, 1), gflop_full=round(f_full / 1e9, 1))
    failure = None
    try:
        full()  # warm-up: compilation and autotuning stay out of the numbers
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        full()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before
        long = T >= 32768  # long cases: fewer repeats keep the run inside its device budget
        kw = dict(warmup=5, rep=30) if long else {}
        t_fwd = do_bench(fwd, return_mode="median", **kw)
        t_full = do_bench(full, return_mode="median", **kw)
    except torch.OutOfMemoryError:
        failure = "OOM"
    except Exception as err:  # noqa: BLE001 - recorded in the CSV and the log, and the other cases still run
        failure = "ERROR"
        log(f"  {variant} T={T} failed: {type(err).__name__}: {str(err)[:300]}")
    finally:
        context.__exit__(None, None, None)
    if failure:
        # Free outside the except block: the traceback there still holds the failed call's tensors.
        del q, k_s, k_f, valid
        gc.collect()
        torch.cuda.empty_cache()
        return [dict(base, mode=m, ms=failure) for m in ("fwd", "full")]
    rows = []
    for mode, ms, fl in (("fwd", t_fwd, f_fwd), ("full", t_full, f_full)):
        floor = fl / peak * 1e3
        rows.append(dict(base, mode=mode, config=chosen_configs(variant), ms=round(ms, 4),
                         peak_extra_mib=round(extra / 2 ** 20, 1),
                         tflops=round(fl / (ms * 1e-3) / 1e12, 1), floor_ms=round(floor, 4),
                         pct_floor=round(100 * floor / ms, 1)))
    del q, k_s, k_f, valid
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def run(out_dir: Path, seqs, variants, extra_seqs, triton_variants=()) -> bool:
    """Checks, timings, the compiled check (after the timings, so that a failure there keeps them); True when
    every check passed."""
    import triton
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.cuda.get_device_name()
    tag = dev.replace(" ", "_").replace("/", "_")
    logf = open(out_dir / f"attention_kl_{tag}.log", "w")

    start = time.perf_counter()

    def log(msg):
        msg = f"[{time.perf_counter() - start:6.1f}s] {msg}" if msg and not msg.startswith("\n") else msg
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    sha = commit()
    log(f"device {dev}; torch {torch.__version__}; triton {triton.__version__}; commit {sha}; "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}")
    worst = check(log)
    if worst > 1.0:
        log(f"CORRECTNESS FAILED (worst error / tolerance = {worst:.2f}): not timing")
        sys.exit(1)
    log("correctness passed (default kernels)")
    variants_ok = True
    if triton_variants and "triton" in variants:
        passed = check_variants(log, triton_variants)
        if passed != list(triton_variants):
            log(f"VARIANTS FAILED, not timed: {sorted(set(triton_variants) - set(passed))}")
            variants_ok = False
        triton_variants = passed
    peak = matmul_peak()
    log(f"ceiling: bf16 matmul (8192^3) {peak / 1e12:.0f} TFLOP/s")
    # dynamic=True: one compilation serves every T (a static compile per T would cost ~4x the compile time).
    impls = {"eager": attention_kl_reference, "triton": _attention_kl_triton,
             "compile": torch.compile(attention_kl_reference, dynamic=True)}
    path = out_dir / f"attention_kl_{tag}.csv"
    fields = ["device", "commit", "dtype", "B", "H_q", "H_kv", "D", "variant", "config", "T", "mode", "ms",
              "peak_extra_mib",
              "gflop_fwd", "gflop_full", "tflops", "floor_ms", "pct_floor", "mm_tflops"]
    rows = []
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        # Triton first at each T: if the run is cut short, the kernel's numbers are already written.
        tv = [f"triton-{v}" for v in triton_variants] if "triton" in variants else []
        order = sorted(variants, key=lambda v: v != "triton")
        order = order[:1] + tv + order[1:] if "triton" in variants else order
        cases = [(v, T) for T in seqs for v in order] + [(v, T) for T in extra_seqs for v in ["triton", *tv]
                                                         if "triton" in variants and T not in seqs]
        for variant, T in cases:
            r = bench_one(variant, T, peak, impls, log)
            for row in r:
                log("  " + ", ".join(f"{k}={v}" for k, v in row.items()))
                w.writerow(dict(device=dev, commit=sha, dtype="bf16", B=1, H_q=HEADS, H_kv=KV_HEADS, D=DIM,
                                mm_tflops=round(peak / 1e12, 1), **row))
                f.flush()
            rows += r
    for name, (tuner, _) in kernels._TUNED.items():
        for key, cfg in tuner.cache.items():
            log(f"autotuned {name} {key[:5]}: {cfg}")
    by = {(r["variant"], r["T"], r["mode"]): r for r in rows}
    num = lambda v: isinstance(v, float)  # noqa: E731
    log("\n    T  mode  eager_ms compile_ms triton_ms  x_eager x_compile %floor  peakMiB(eager/compile/triton)")
    all_seqs = sorted(set(seqs) | set(extra_seqs))
    for T in all_seqs:
        for mode in ("fwd", "full"):
            e, c, t = (by.get((v, T, mode), {}) for v in VARIANTS)
            ms = [r.get("ms", "-") for r in (e, c, t)]
            xe = f"{ms[0] / ms[2]:.1f}" if num(ms[0]) and num(ms[2]) else "-"
            xc = f"{ms[1] / ms[2]:.1f}" if num(ms[1]) and num(ms[2]) else "-"
            mem = "/".join(str(r.get("peak_extra_mib", "-")) for r in (e, c, t))
            log(f"{T:>6} {mode:>4} {ms[0]!s:>9} {ms[1]!s:>10} {ms[2]!s:>9} {xe:>8} {xc:>9} "
                f"{t.get('pct_floor', '-')!s:>6}  {mem}")
    log("\n    T  variant          full_ms  %floor  bwd_ms(full-fwd)  config")
    for T in all_seqs:
        for v in ["triton"] + [f"triton-{x}" for x in triton_variants]:
            r, rf = by.get((v, T, "full"), {}), by.get((v, T, "fwd"), {})
            bwd = f"{r['ms'] - rf['ms']:.3f}" if num(r.get("ms")) and num(rf.get("ms")) else "-"
            log(f"{T:>6} {v:<16} {r.get('ms', '-')!s:>8} {r.get('pct_floor', '-')!s:>7} {bwd:>16}  "
                f"{r.get('config', '')}")
    for v in VARIANTS:
        fits = [T for T in all_seqs if num(by.get((v, T, "full"), {}).get("ms"))]
        log(f"largest T measured that fits, {v}: {max(fits) if fits else 'none'}")
    compiled_ok = check_compiled(log)
    logf.close()
    return compiled_ok and variants_ok


def plot(csv_path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in csv.DictReader(open(csv_path)) if r["mode"] == "full"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    names = ["eager", "compile", "triton"]
    names += sorted({r["variant"] for r in rows} - set(names))
    for variant, marker in zip(names, "os^vD<>p*"):
        ok = sorted((int(r["T"]), float(r["ms"]), float(r["peak_extra_mib"])) for r in rows
                    if r["variant"] == variant and r["ms"] != "OOM")
        if ok:
            ax_t.plot([p[0] for p in ok], [p[1] for p in ok], marker=marker, label=variant)
            ax_m.plot([p[0] for p in ok], [p[2] for p in ok], marker=marker, label=variant)
        oom = sorted(int(r["T"]) for r in rows if r["variant"] == variant and r["ms"] == "OOM")
        for T in oom:
            ax_m.annotate(f"{variant} OOM", (T, 1), rotation=90, fontsize=7)
    floor = sorted({(int(r["T"]), float(r["floor_ms"])) for r in rows if r["ms"] != "OOM"})
    ax_t.plot(*zip(*floor), "k--", label="FLOP floor")
    for ax, label in ((ax_t, "forward + backward ms (median)"), (ax_m, "peak extra memory, MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T (tokens)")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"attention KL, B=1, 12 q heads / 2 KV heads, D=128, bf16 — {rows[0]['device']} "
                 f"(commit {rows[0]['commit']})")
    fig.tight_layout()
    out = csv_path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--seqs", type=int, nargs="+", default=SEQS)
    p.add_argument("--triton-only-seqs", type=int, nargs="*", default=TRITON_ONLY_SEQS)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--triton-variants", nargs="*", default=["ptr", "tma_dq", "tma"], choices=TRITON_VARIANTS,
                   help="backward variants timed as extra rows triton-<variant> (checked first); det = the "
                        "deterministic two-kernel backward (compiles 6 more kernels, ~40 s)")
    p.add_argument("--plot", type=Path, help="only draw the plot for this CSV")
    args = p.parse_args(argv)
    if args.plot:
        print(plot(args.plot))
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention_kl needs a CUDA GPU (run it through the device tool)")
    return 0 if run(args.out, args.seqs, args.variants, args.triton_only_seqs, args.triton_variants) else 1


if __name__ == "__main__":
    sys.exit(main())
