"""Where one fused-loss step spends its time on the host and on the GPU (GPU; writes text reports).

    PYTHONPATH=. python -m bench.profile_fused_loss --out $OUT [--tokens 4096] [--compiled] [--teachers 3] [--fwd]

Host: the wall time of a forward + backward issued without synchronising (the GPU runs behind), its cProfile
split by function; GPU: every kernel of one step from torch.profiler, with its time. At small batches the step is
bound by whichever is longer, so the two numbers say which side to shorten.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from pathlib import Path

import torch

from bench.bench_fused_loss import TEACHERS, TEACHERS_3, _call, _params, make_inputs
from kvfuse.loss import _triton_loss


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--compiled", action="store_true", help="torch.compile the Triton-backend call first")
    p.add_argument("--teachers", type=int, choices=(2, 3), default=2, help="the bench's two or three teachers")
    p.add_argument("--fwd", action="store_true", help="the forward alone (inputs still require gradients)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    x = make_inputs(args.tokens, teachers=TEACHERS if args.teachers == 2 else TEACHERS_3)
    params = _params(x)
    impl = torch.compile(_triton_loss, fullgraph=True) if args.compiled else _triton_loss

    def step(fn=impl):
        loss = _call(fn, x)[0]
        return loss if args.fwd else torch.autograd.grad(loss, params)

    def host_time(fn) -> tuple[float, float]:
        """(host issue, wall) seconds a step, the GPU left to run behind until the end."""
        for _ in range(3):
            step(fn)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(fn)
        host = (time.perf_counter() - t0) / args.steps
        torch.cuda.synchronize()
        return host, (time.perf_counter() - t0) / args.steps

    host, wall = host_time(impl)
    tag = f"{args.tokens}{'_compiled' if args.compiled else ''}_t{args.teachers}{'_fwd' if args.fwd else ''}"
    lines = [f"tokens {args.tokens} teachers {args.teachers} compiled {args.compiled} fwd only {args.fwd}: "
             f"host issue {host * 1e3:.3f} ms/step, wall with sync {wall * 1e3:.3f} ms/step"]
    if args.compiled:  # the same eager step in this process, after compiling: is the host itself slower now?
        host, wall = host_time(_triton_loss)
        lines[0] += f"; eager after compiling: host issue {host * 1e3:.3f} ms/step, wall {wall * 1e3:.3f}"

    prof = cProfile.Profile()
    torch.cuda.synchronize()
    prof.enable()
    for _ in range(args.steps):
        step()
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(35)
    lines.append(buf.getvalue())

    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as tp:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    lines.append(tp.key_averages().table(sort_by="cuda_time_total", row_limit=40))
    text = "\n".join(lines)
    (args.out / f"profile_fused_loss_{tag}.txt").write_text(text)
    print(lines[0], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
