"""Fused KV-distillation loss: eager torch vs torch.compile vs Triton (forward, backward, full), on a GPU.

Question answered: how close does the fused kernel get to the floor max(bytes/copy-bw, FLOPs/matmul-peak),
both ceilings measured in this run, and how does it compare with the torch reference eager and compiled.

    PYTHONPATH=. python -m bench.bench_fused_loss --out bench/results          # GPU: check + time, CSV
    python -m bench.bench_fused_loss --plot bench/results/fused_loss_<dev>.csv  # anywhere: the plot

Shapes: teachers Qwen2.5-7B-like (4 KV heads x 128) and Llama-3.1-8B-like (8 x 128), student
Qwen2.5-1.5B-like (2 x 128), 28 student layers, bf16, B*T in {4k, 16k, 64k} (T = 4096, ~6 % right padding).
"backward" is full minus forward: the Triton backward consumes buffers written by its forward, so it is
not re-runnable on its own (and eager/compiled backward are timed the same way for a like-for-like number).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import sys
from pathlib import Path

import torch


from bench.common import append_csv, commit, rotated
from kvfuse.loss import _torch_loss, _triton_loss, kv_distill_loss

TEACHERS = [(4, 128), (8, 128)]
# The same question with a third teacher (Mistral-7B-like KV: 8 x 128).
TEACHERS_3 = [(4, 128), (8, 128), (8, 128)]
STUDENT = (2, 128)
LAYERS = 28
TOKENS = [4096, 16384, 65536]
SEQ = 4096



def make_inputs(tokens: int, dtype=torch.bfloat16, seed: int = 0, T: int = SEQ, teachers=TEACHERS,
                student=STUDENT, L: int = LAYERS):
    g = torch.Generator(device="cuda").manual_seed(seed)
    B = tokens // T
    H_s, D_s = student
    dev = "cuda"

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device=dev, generator=g) * scale).to(dtype)

    tk = [rnd(L, B, h, T, d) for h, d in teachers]
    tv = [rnd(L, B, h, T, d) for h, d in teachers]
    wk = [rnd(L, h * d, H_s * D_s, scale=(h * d) ** -0.5).requires_grad_() for h, d in teachers]
    wv = [rnd(L, h * d, H_s * D_s, scale=(h * d) ** -0.5).requires_grad_() for h, d in teachers]
    sk = rnd(L, B, H_s, T, D_s).requires_grad_()
    sv = rnd(L, B, H_s, T, D_s).requires_grad_()
    alpha = torch.rand(B, L, len(teachers), device=dev, generator=g).softmax(-1).requires_grad_()
    mask = torch.ones(B, T, dtype=torch.bool, device=dev)
    mask[:, T - T // 16:] = False
    positions = torch.arange(T, device=dev).expand(B, T).contiguous()
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, D_s, 2, device=dev, dtype=torch.float32) / D_s))
    return dict(student_k=sk, student_v=sv, teacher_k=tk, teacher_v=tv, w_k=wk, w_v=wv, alpha=alpha, mask=mask,
                positions=positions, inv_freq=inv_freq, scaling=torch.ones(L, device=dev), rot=(D_s,) * L)


def _params(x):
    return [x["student_k"], x["student_v"], x["alpha"], *x["w_k"], *x["w_v"]]


def _call(impl, x):
    """The backend functions behind kv_distill_loss, without its validation (what a trainer's step runs)."""
    return impl(x["student_k"], x["student_v"], x["teacher_k"], x["teacher_v"], x["w_k"], x["w_v"], x["alpha"],
                x["mask"], x["positions"], x["inv_freq"], x["scaling"], x["rot"], 1.0, 1.0, 0.1, None)


def _api_args(x):
    return {k: v for k, v in x.items() if k not in ("scaling", "rot")}


CODECS = ("bf16", "fp8", "fp8_f32", "fp8_token", "fp8z", "int8", "int8_f32", "int4", "int4d", "lowrank")


def encoded_teachers(x: dict, codec: str) -> tuple[list, list]:
    """The inputs' teacher keys and values as a store of `codec` holds them (`store_axis`); fp8_f32, int8_f32: fp8
    and int8 with float32 per-channel side data, as stores written before the bf16 side data; fp8_token: values per
    token, as fp8 stores written before 26a4f1e; lowrank: an orthonormal random basis of rank min(256, F/2) of F =
    H·D, bf16 coefficients."""
    from kvfuse.codecs import LowRankKV, QuantizedKV, encode, store_axis
    if codec == "bf16":
        return x["teacher_k"], x["teacher_v"]
    if codec == "lowrank":
        def low_rank(t):
            L, B, H, T, D = t.shape
            r = min(256, H * D // 2)
            basis = torch.linalg.qr(torch.randn(L, H * D, r, device=t.device))[0].transpose(1, 2).contiguous()
            z = (t.float().transpose(2, 3).flatten(3) @ basis.transpose(1, 2).unsqueeze(1)).to(t.dtype)
            return LowRankKV(z.unsqueeze(2), basis, H, D)
        return [low_rank(t) for t in x["teacher_k"]], [low_rank(t) for t in x["teacher_v"]]
    if codec in ("fp8_f32", "int8_f32"):  # the same codes and side data, whose dtype selects the kernels' fp32 path
        def f32(t):
            return None if t is None else t.to(torch.float32)
        return tuple([QuantizedKV(q.kind, q.axis, q.data, f32(q.scale), f32(q.offset)) for q in qs]
                     for qs in encoded_teachers(x, codec.removesuffix("_f32")))
    kind = codec.removesuffix("_token")
    m = x["mask"][:, None, :]

    def axis(kv):
        return "token" if codec == "fp8_token" and kv == "v" else store_axis(kv, kind)
    return tuple([encode(t, kind, axis(kv), m) for t in x["teacher_" + kv]] for kv in ("k", "v"))


def triton_steps(x: dict, teacher_k: list, teacher_v: list):
    """(fwd, full) of the Triton loss on the inputs with these teachers (plain or as `encoded_teachers` stores them),
    without validation: fwd returns the loss, full the gradients of every parameter (`_params`)."""
    args = dict(_api_args(x), teacher_k=teacher_k, teacher_v=teacher_v)
    params = _params(x)

    def fwd():
        return kv_distill_loss(**args, backend="triton", check_finite=False)[0]

    def full():
        return torch.autograd.grad(fwd(), params)
    return fwd, full


def minimal_bytes_flops(x, mode: str) -> tuple[int, int]:
    """Fewest bytes (each input read once, each output written once) and the GEMM FLOPs of one call."""
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    teach = sum(size(t) for t in x["teacher_k"] + x["teacher_v"])
    stud = size(x["student_k"]) + size(x["student_v"])
    w = sum(size(t) for t in x["w_k"] + x["w_v"])
    tokens = x["student_k"].shape[1] * x["student_k"].shape[3]
    gemm = sum(2 * tokens * t.shape[0] * t.shape[1] * t.shape[2] for t in x["w_k"] + x["w_v"])
    if mode == "fwd":
        return teach + stud + w, gemm
    if mode == "bwd":  # re-read what the gradients need, write student and adapter gradients
        return teach + 2 * stud + 2 * w, gemm
    return teach + 2 * stud + 2 * w, 2 * gemm


def ceilings():
    from triton.testing import do_bench
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), return_mode="median")
    bw = 2 * n / (ms * 1e-3)
    del a, b
    m = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: m @ k, return_mode="median")
    flops = 2 * 8192 ** 3 / (ms * 1e-3)
    return bw, flops


def rel(a, b):
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check(tokens: int, log) -> float:
    """Triton vs the torch reference on fresh bf16 inputs at a bench shape; returns the worst relative error."""
    x = make_inputs(tokens, seed=1234 + tokens)
    ref32 = {k: ([t.detach().float().requires_grad_(t.requires_grad) for t in v] if isinstance(v, list)
                 else (v.detach().float().requires_grad_(v.requires_grad)
                       if isinstance(v, torch.Tensor) and v.is_floating_point() else v))
             for k, v in x.items()}
    out = {}
    for name, impl, inp in (("torch-fp32", _torch_loss, ref32), ("triton", _triton_loss, x)):
        loss = _call(impl, inp)[0]
        grads = torch.autograd.grad(loss, _params(inp))
        out[name] = (loss.detach(), [g.detach() for g in grads])
        del loss, grads
    worst = rel(out["triton"][0], out["torch-fp32"][0])
    names = ["student_k", "student_v", "alpha"] + [f"w_k[{i}]" for i in range(len(TEACHERS))] + \
        [f"w_v[{i}]" for i in range(len(TEACHERS))]
    log(f"check tokens={tokens}: loss rel err {worst:.2e}")
    for n_, a, b in zip(names, out["triton"][1], out["torch-fp32"][1]):
        e = rel(a, b)
        worst = max(worst, e)
        log(f"  grad {n_}: rel err {e:.2e}")
    return worst


def check_small_fp32(log) -> float:
    """Odd shapes in fp32 on the GPU ('ieee' products): the 1e-4 contract, through the TMA paths (aligned heads)
    and the pointer paths (a 6-dim teacher head: 24-byte rows, no TMA; D_s = 16: padded pairs)."""
    worst = 0.0
    for seed, heads, student in ((7, [(3, 8), (1, 32), (2, 16)], (2, 16)), (8, [(2, 6), (1, 32)], (2, 32))):
        torch.manual_seed(seed)
        x = make_inputs(2 * 37, dtype=torch.float32, seed=seed, T=37, teachers=heads, student=student, L=2)
        x["mask"][0, :5] = False
        losses, grads = [], []
        for impl in (_torch_loss, _triton_loss):
            loss = _call(impl, x)[0]
            losses.append(loss.detach())
            grads.append(torch.autograd.grad(loss, _params(x)))
        err = max([rel(losses[1], losses[0])] + [rel(b, a) for a, b in zip(*grads)])
        log(f"check fp32 odd shapes {heads} -> {student}: worst rel err {err:.2e}")
        worst = max(worst, err)
    return worst


def bench_one(variant: str, tokens: int, bw: float, peak: float, teachers=TEACHERS):
    from triton.testing import do_bench
    x = make_inputs(tokens, teachers=teachers)
    impl = {"eager": _torch_loss, "compile": COMPILED, "triton": _triton_loss, "triton_compile": TRITON_COMPILED,
            "compile_graphs": COMPILED_GRAPHS, "triton_graphs": TRITON_GRAPHS}[variant]
    params = _params(x)
    fwd, full = _steps(impl, x, params, variant in GRAPHED)

    rows = []
    torch.cuda.synchronize()
    try:
        full()  # warm-up: compilation and autotuning stay out of the numbers
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        full()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        t_fwd = do_bench(fwd, return_mode="median")
        t_full = do_bench(full, return_mode="median")
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return [dict(variant=variant, tokens=tokens, teachers=len(teachers), mode=m, ms="oom")
                for m in ("fwd", "bwd", "full")]
    for mode, ms in (("fwd", t_fwd), ("bwd", t_full - t_fwd), ("full", t_full)):
        nbytes, flops = minimal_bytes_flops(x, mode)
        floor = max(nbytes / bw, flops / peak) * 1e3
        rows.append(dict(variant=variant, tokens=tokens, teachers=len(teachers), mode=mode, ms=round(ms, 4),
                         peak_extra_mib=round(extra / 2 ** 20, 1), min_bytes=nbytes, gflop=round(flops / 1e9, 1),
                         achieved_tbps=round(nbytes / (ms * 1e-3) / 1e12, 3),
                         achieved_tflops=round(flops / (ms * 1e-3) / 1e12, 1), floor_ms=round(floor, 4),
                         pct_roofline=round(100 * floor / ms, 1)))
    del x, params
    torch.cuda.empty_cache()
    return rows


COMPILED = None
TRITON_COMPILED = None  # the Triton backend inside torch.compile, as a compiled trainer runs it
# Both under torch.compile(mode="reduce-overhead"), as a trainer that replays its step as CUDA graphs runs them:
# the host's launch work leaves the step (the teachers and other non-static inputs are copied into the graph's
# buffers on every replay, in both).
COMPILED_GRAPHS = None
TRITON_GRAPHS = None
GRAPHED = ("compile_graphs", "triton_graphs")


def _steps(impl, x, params, graphed: bool, with_loss: bool = False):
    """(forward, forward + backward) of one variant; a graphed variant marks each call as a new step, as a training
    loop does, so every call replays the recorded graphs. with_loss: the full step returns (loss, gradients)."""
    begin = torch.compiler.cudagraph_mark_step_begin if graphed else (lambda: None)

    def fwd():
        begin()
        return _call(impl, x)[0]

    def full():
        begin()
        loss = _call(impl, x)[0]
        grads = torch.autograd.grad(loss, params)
        return (loss, grads) if with_loss else grads
    return fwd, full


def check_graphs(tokens: int, log) -> float:
    """The Triton loss replayed from CUDA graphs (torch.compile, mode="reduce-overhead") against eager Triton:
    loss and gradients of a replay after warm-up and recording, on inputs changed in place since the recording (so
    the replay must read them afresh). Raises if inductor skipped the graphs (then nothing would be replayed)."""
    from torch._dynamo.utils import counters
    x = make_inputs(tokens, seed=99)
    params = _params(x)

    def loss_and_grads(full):
        loss, grads = full()
        return [t.detach().clone() for t in (loss, *grads)]
    skips = counters["inductor"]["cudagraph_skips"]
    replay = _steps(TRITON_GRAPHS, x, params, True, with_loss=True)[1]
    for _ in range(2):  # warm-up, recording
        loss_and_grads(replay)
    with torch.no_grad():
        x["student_k"].mul_(0.5)
        x["teacher_v"][1].mul_(-1.0)
    want = loss_and_grads(_steps(_triton_loss, x, params, False, with_loss=True)[1])
    got = loss_and_grads(replay)
    if counters["inductor"]["cudagraph_skips"] != skips:
        raise RuntimeError("inductor skipped the CUDA graphs of the Triton loss (see its log): nothing to replay")
    worst = max(rel(a, b) for a, b in zip(got, want))
    log(f"check CUDA graphs tokens={tokens}: replayed Triton loss and gradients vs eager Triton, worst rel err "
        f"{worst:.2e}")
    return worst


def run(out_dir: Path, tokens_list, variants, three_teacher_tokens) -> None:
    global COMPILED, TRITON_COMPILED, COMPILED_GRAPHS, TRITON_GRAPHS
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.cuda.get_device_name()
    tag = dev.replace(" ", "_").replace("/", "_")
    logf = open(out_dir / f"fused_loss_{tag}.log", "w")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    import triton
    log(f"device {dev}; torch {torch.__version__}; triton {triton.__version__}; commit {commit()}; "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}")
    w32 = check_small_fp32(log)
    wbf = check(4096, log)
    if w32 > 1e-4 or wbf > 2e-2:
        log(f"CORRECTNESS FAILED (fp32 {w32:.2e} > 1e-4 or bf16 {wbf:.2e} > 2e-2): not timing")
        sys.exit(1)
    # The public entry (validation + finite check) once at a bench shape, so its cost is visible too.
    x = make_inputs(16384)
    from triton.testing import do_bench
    api = _api_args(x)
    t_api = do_bench(lambda: kv_distill_loss(**api, backend="triton", check_finite=True)[0], return_mode="median")
    t_api_nocheck = do_bench(lambda: kv_distill_loss(**api, backend="triton", check_finite=False)[0],
                             return_mode="median")
    log(f"kv_distill_loss fwd 16k (validation + finite check): {t_api:.3f} ms; check_finite=False: "
        f"{t_api_nocheck:.3f} ms")
    del x
    torch.cuda.empty_cache()
    bw, peak = ceilings()
    log(f"ceilings: copy {bw / 1e12:.2f} TB/s, bf16 matmul {peak / 1e12:.0f} TFLOP/s")
    COMPILED = torch.compile(_torch_loss, dynamic=False)
    TRITON_COMPILED = torch.compile(_triton_loss, dynamic=False, fullgraph=True)
    COMPILED_GRAPHS = torch.compile(_torch_loss, dynamic=False, mode="reduce-overhead")
    TRITON_GRAPHS = torch.compile(_triton_loss, dynamic=False, fullgraph=True, mode="reduce-overhead")
    if any(v in GRAPHED for v in variants) and check_graphs(4096, log) > 1e-5:
        log("CUDA GRAPHS FAILED: the replayed Triton loss differs from eager Triton; not timing")
        sys.exit(1)
    rows = []
    cases = [(t, TEACHERS) for t in tokens_list] + [(t, TEACHERS_3) for t in three_teacher_tokens]
    for tokens, teachers in cases:
        for variant in variants:
            r = bench_one(variant, tokens, bw, peak, teachers)
            rows += r
            for row in r:
                log("  " + ", ".join(f"{k}={v}" for k, v in row.items()))
    import kvfuse.kernels.fused_kv_loss as ops
    for name, tuner in (("fwd", ops._fwd_tuned), ("dw", ops._dw_tuned)):
        for key, cfg in tuner.cache.items():
            log(f"autotuned {name} {key[:6]}: {cfg}")
    sha = commit()
    path = out_dir / f"fused_loss_{tag}.csv"
    fields = ["device", "commit", "dtype", "variant", "tokens", "teachers", "mode", "ms", "peak_extra_mib", "min_bytes",
              "gflop", "achieved_tbps", "achieved_tflops", "floor_ms", "pct_roofline", "copy_tbps", "mm_tflops"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for row in rows:
            w.writerow(dict(device=dev, commit=sha, dtype="bf16", copy_tbps=round(bw / 1e12, 3),
                            mm_tflops=round(peak / 1e12, 1), **row))
    log("\nteachers tokens mode  eager_ms compile_ms triton_ms  x_eager x_compile  %roof  "
        "peakMiB(eager/compile/triton)  triton_compile_ms x_compile")
    by = {(r["variant"], r["tokens"], r["teachers"], r["mode"]): r for r in rows}
    for tokens, teachers in cases:
        for mode in ("fwd", "bwd", "full"):
            e, c, t = (by.get((v, tokens, len(teachers), mode), {}) for v in ("eager", "compile", "triton"))
            ms = [r.get("ms", "-") for r in (e, c, t)]
            num = lambda v: isinstance(v, float)  # noqa: E731
            xe = f"{ms[0] / ms[2]:.2f}" if num(ms[0]) and num(ms[2]) else "-"
            xc = f"{ms[1] / ms[2]:.2f}" if num(ms[1]) and num(ms[2]) else "-"
            mem = "/".join(str(r.get("peak_extra_mib", "-")) for r in (e, c, t))
            tc = by.get(("triton_compile", tokens, len(teachers), mode), {}).get("ms", "-")
            xtc = f"{ms[1] / tc:.2f}" if num(ms[1]) and num(tc) else "-"
            log(f"{len(teachers):>8} {tokens:>6} {mode:>5} {ms[0]!s:>9} {ms[1]!s:>10} {ms[2]!s:>9} {xe:>8} {xc:>9} "
                f"{t.get('pct_roofline', '-')!s:>6}  {mem}  {tc!s:>9} {xtc:>6}")
    if any(v in GRAPHED for v in variants):
        log("\nCUDA graphs (reduce-overhead): teachers tokens mode  compile_graphs_ms triton_graphs_ms  x  "
            "(x against plain compile)")
        for tokens, teachers in cases:
            for mode in ("fwd", "bwd", "full"):
                c, cg, tg = (by.get((v, tokens, len(teachers), mode), {}).get("ms", "-")
                             for v in ("compile", "compile_graphs", "triton_graphs"))
                num = lambda v: isinstance(v, float)  # noqa: E731
                xg = f"{cg / tg:.2f}" if num(cg) and num(tg) else "-"
                xc = f"{c / tg:.2f}" if num(c) and num(tg) else "-"
                log(f"{len(teachers):>8} {tokens:>6} {mode:>5} {cg!s:>17} {tg!s:>16} {xg:>5}  ({xc})")
    logf.close()


def plot(csv_path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in csv.DictReader(open(csv_path)) if r["ms"] != "oom" and r.get("teachers", "2") == "2"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, mode in zip(axes, ("fwd", "bwd", "full")):
        for variant, marker in (("eager", "o"), ("compile", "s"), ("triton", "^"), ("triton_compile", "v"),
                                ("compile_graphs", "D"), ("triton_graphs", "x")):
            pts = sorted((int(r["tokens"]), float(r["ms"])) for r in rows
                         if r["variant"] == variant and r["mode"] == mode)
            if pts:
                ax.plot(*zip(*pts), marker=marker, label=variant)
        floor = sorted({(int(r["tokens"]), float(r["floor_ms"])) for r in rows if r["mode"] == mode})
        if floor:
            ax.plot(*zip(*floor), "k--", label="floor")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("B*T tokens")
        ax.set_ylabel("ms (median)")
        ax.set_title(mode)
        ax.legend()
    fig.suptitle(f"fused KV loss, 28 layers, teachers 4x128 + 8x128 -> student 2x128, bf16 — "
                 f"{rows[0]['device']} (commit {rows[0]['commit']})")
    fig.tight_layout()
    out = csv_path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    return out


def kernel_family(name: str) -> str:
    """fwd (both passes of the forward kernel), dw (the weight-gradient kernel) or other (reductions, copies)."""
    return "fwd" if "_fused_kv_fwd" in name else "dw" if "_fused_kv_dw" in name else "other"


def kernel_ms(step, steps: int = 10) -> dict[str, float]:
    """GPU time of one step by kernel family, from torch.profiler's device events (ms per step): what each kernel
    takes without the host's issue time or do_bench's cache flush between steps."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    parts = dict(fwd=0.0, dw=0.0, other=0.0)
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            parts[kernel_family(e.name)] += e.time_range.elapsed_us() / 1e3 / steps
    if not parts["fwd"] or not parts["dw"]:
        raise RuntimeError(f"the profile holds no fused-loss kernel: {sorted({e.name for e in prof.events()})[:20]}")
    return parts


def paired_ratios(rows: list[dict], column: str, base: str = "bf16") -> dict[str, list[float]]:
    """Per codec, column / the same round's base value, one ratio per round."""
    base_of = {r["round"]: r[column] for r in rows if r["codec"] == base}
    out: dict[str, list[float]] = {}
    for r in rows:
        if r["codec"] != base:
            out.setdefault(r["codec"], []).append(r[column] / base_of[r["round"]])
    return out


def codec_baselines(x: dict, variants: dict, baseline_names, log=print) -> list[dict]:
    """The torch reference on each named codec's teachers, eager and under torch.compile (the explicit decode in
    the traced graph, so inductor may fuse it): fwd and full ms, a row per codec and variant."""
    from triton.testing import do_bench
    params = _params(x)
    rows = []
    for name in baseline_names:
        tk, tv = variants[name]
        args = dict(_api_args(x), teacher_k=tk, teacher_v=tv)

        def reference():
            return kv_distill_loss(**args, backend="torch", check_finite=False)[0]
        for variant, fwd in (("eager", reference), ("compile", torch.compile(reference, dynamic=False))):
            def full():
                return torch.autograd.grad(fwd(), params)
            full()  # compilation stays out of the numbers
            rows.append(dict(device=torch.cuda.get_device_name(), commit=commit(), tokens=x["mask"].numel(),
                             codec=name, variant=variant, fwd_ms=round(do_bench(fwd, return_mode="median"), 4),
                             full_ms=round(do_bench(full, return_mode="median"), 4)))
            log("  " + ", ".join(f"{k}={v}" for k, v in rows[-1].items()))
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    return rows


def bench_codecs(out_dir: Path, tokens: int, names=("fp8", "fp8z", "int8", "int4", "int4d", "lowrank"), rounds: int = 1,
                 log=print, baselines=()) -> Path:
    """The Triton loss reading the teachers as bf16, fp8, int8, int4, int4d (grouped as a store encodes them,
    `store_axis`) and low rank (r = min(256, F/2) of F = 512 / 1024, bf16 coefficients): fwd and full ms, each
    kernel family's GPU time (`kernel_ms`), teacher bytes per token, the loss's relative difference from bf16,
    and the gradients' largest relative difference from the same kernels on the explicitly decoded teachers
    (bf16; ≈ 1e-3 is bf16 rounding, a wrong decode is percents) — one CSV, a row per codec and round. Rounds time
    every codec in an order rotated each round (`rotated`); each codec is compared with bf16 of its own round.
    baselines: codecs whose torch reference is timed too, eager and compiled (`codec_baselines`), into a CSV of its
    own, with the Triton full step's median over the rounds beside it."""
    import statistics

    from triton.testing import do_bench

    from kvfuse.codecs import decode
    import kvfuse.kernels.fused_kv_loss as ops
    x = make_inputs(tokens)
    variants = {("lowrank256" if c == "lowrank" else c): encoded_teachers(x, c) for c in ("bf16", *names)}
    steps, checks = {}, {}
    ref = None
    for name, (tk, tv) in variants.items():  # checks, compilation and autotuning, before any timing
        fwd, full = triton_steps(x, tk, tv)
        tuned_before = {t: set(tuner.cache) for t, tuner in (("fwd", ops._fwd_tuned), ("dw", ops._dw_tuned))}
        grads = full()
        loss = fwd().item()
        ref = loss if ref is None else ref
        for t, tuner in (("fwd", ops._fwd_tuned), ("dw", ops._dw_tuned)):
            for key in set(tuner.cache) - tuned_before[t]:
                log(f"  {name}: autotuned {t} -> {tuner.cache[key]}")
        want = triton_steps(x, [decode(t, torch.bfloat16) for t in tk], [decode(t, torch.bfloat16) for t in tv])[1]()
        grad_diff = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(grads, want))
        del want, grads
        if grad_diff > 1e-2:
            log(f"  WRONG: {name} gradients differ from the decoded teachers' by {grad_diff:.2e}")
        nbytes = sum(t.nbytes for t in tk + tv)  # a compressed entry counts its codes and scales
        steps[name] = fwd, full
        checks[name] = dict(teacher_bytes_per_token=round(nbytes / tokens / LAYERS, 1), loss=loss,
                            loss_rel_diff_vs_bf16=abs(loss - ref) / abs(ref), grad_rel_diff_vs_decoded=grad_diff)
    rows = []
    for r in range(rounds):
        for name in rotated(list(variants), r):
            fwd, full = steps[name]
            gpu = kernel_ms(full)
            rows.append(dict(device=torch.cuda.get_device_name(), commit=commit(), tokens=tokens, codec=name,
                             round=r, fwd_ms=round(do_bench(fwd, return_mode="median"), 4),
                             full_ms=round(do_bench(full, return_mode="median"), 4),
                             **{f"gpu_{k}_ms": round(v, 4) for k, v in gpu.items()}, **checks[name]))
            log("  " + ", ".join(f"{k}={v}" for k, v in rows[-1].items()))
    if rounds > 1:
        log(f"over {rounds} rounds, against the same round's bf16: median [min, max]")
        for column in ("full_ms", "fwd_ms", "gpu_fwd_ms", "gpu_dw_ms", "gpu_other_ms"):
            for name, ratios in paired_ratios(rows, column).items():
                log(f"  {column:13s} {name:11s} {statistics.median(ratios):.3f}x [{min(ratios):.3f}, "
                    f"{max(ratios):.3f}]")
    tag = torch.cuda.get_device_name().replace(' ', '_')
    if baselines:
        base_rows = codec_baselines(x, variants, baselines, log)
        for r in base_rows:
            triton_full = statistics.median(t["full_ms"] for t in rows if t["codec"] == r["codec"])
            r.update(triton_full_ms=round(triton_full, 4), triton_speedup=round(r["full_ms"] / triton_full, 2))
            log(f"  {r['codec']:6s} {r['variant']:7s} full {r['full_ms']:8.3f} ms: Triton {triton_full:.3f} ms, "
                f"{r['triton_speedup']:.2f}x")
        append_csv(out_dir / f"fused_loss_codec_baselines_{tag}.csv", base_rows)
    # appended: runs repeated in one call (an A/B, the spread between runs) all keep their rows, told apart by commit
    # and round
    return append_csv(out_dir / f"fused_loss_codecs_{tag}.csv", rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--tokens", type=int, nargs="*", default=TOKENS)
    p.add_argument("--tokens3", type=int, nargs="*", default=TOKENS,
                   help="token counts for the three-teacher case (none: skip it)")
    p.add_argument("--variants", nargs="+", default=["eager", "compile", "triton", "triton_compile"],
                   choices=["eager", "compile", "triton", "triton_compile", *GRAPHED])
    p.add_argument("--plot", type=Path, help="only draw the plot for this CSV")
    p.add_argument("--codecs", type=int, metavar="TOKENS",
                   help="only time the Triton loss on bf16 / fp8 / int4 / low-rank teachers at this many tokens")
    p.add_argument("--codec_names", nargs="+", default=["fp8", "fp8z", "int8", "int4", "int4d", "lowrank"],
                   choices=[c for c in CODECS if c != "bf16"], help="with --codecs: the codecs timed beside bf16")
    p.add_argument("--rounds", type=int, default=1,
                   help="with --codecs: time every codec this many times, interleaved (order rotated each round)")
    p.add_argument("--baselines", nargs="*", default=[], choices=[c for c in CODECS if c != "lowrank"],
                   help="with --codecs: also time the torch reference on these codecs' teachers, eager and compiled")
    args = p.parse_args(argv)
    if args.plot:
        print(plot(args.plot))
        return 0
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    if not torch.cuda.is_available():
        raise SystemExit("bench_fused_loss needs a CUDA GPU (run it through the device tool)")
    if args.codecs:
        missing = sorted(set(args.baselines) - {"bf16", *args.codec_names})
        if missing:
            p.error(f"--baselines {missing} are not timed: add them to --codec_names")
        print(bench_codecs(args.out, args.codecs, args.codec_names, args.rounds, baselines=args.baselines))
        return 0
    run(args.out, args.tokens, args.variants, args.tokens3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
