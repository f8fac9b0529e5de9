"""One full fused-loss step on one teacher codec inside a CUDA profiler range, for Nsight Compute (GPU).

Question answered: what bounds each kernel (issue slots, a pipe, shared-memory bank conflicts, stalls on which
instruction) for bf16 against compressed teachers, read from the hardware counters instead of guessed from timings.

    ncu --clock-control none --profile-from-start off --set full -k regex:_fused_kv -o $OUT/ncu_fp8 \\
        python3 -m bench.ncu_fused_loss --codec fp8 [--tokens 16384]

(`bash bench/gpu_session.sh ncu`: bf16, fp8 and int4, each report's details page and its weight-gradient kernel's
per-instruction SASS page as CSV). Warm-up steps (compilation, autotuning) run before the range, so the profile holds
the step's four launches: the forward's key and value passes and one weight-gradient launch per teacher.
"""
from __future__ import annotations

import argparse
import sys

import torch

from bench.bench_fused_loss import CODECS, encoded_teachers, make_inputs, triton_steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--codec", choices=CODECS, default="bf16")
    p.add_argument("--tokens", type=int, default=16384)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("ncu_fused_loss needs a CUDA GPU (run it through the device tool)")
    x = make_inputs(args.tokens)
    step = triton_steps(x, *encoded_teachers(x, args.codec))[1]

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
