"""Time every tile config and stage count of the fused-loss kernels per teacher codec at a bench shape (GPU), to
choose the autotune lists.

    PYTHONPATH=. python -m bench.tune_fused_loss --out $OUT --codec fp8 [--tokens 16384] [--dw_stages 3 4]

The step first runs autotuned as usual (its picks are logged). Then each variant of one kernel is forced through the
autotuner's prune hook (`bench.check_configs.forced`: the project's rules still apply, and a variant they change or
leave out says so in `ran`), the other kernel keeping its autotuned picks, and the full step (both forward passes
and the weight gradient) is timed on the GPU by kernel family (`bench.bench_fused_loss.kernel_ms`): `gpu_ms` is the
variant's own family, both teachers and both kinds. `--warm` only compiles each variant (rows without times), so
that several codecs can compile in parallel processes and then be timed one after another from triton's cache.
Appends to tune_fused_loss_<device>.csv.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from triton.runtime.errors import OutOfResources

from bench.bench_fused_loss import CODECS, SEQ, encoded_teachers, kernel_ms, make_inputs, triton_steps
from bench.check_configs import _PROJECT_PRUNE, forced, variants
from bench.common import append_csv, commit
from kvfuse.kernels import fused_kv_loss as fk


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--codec", choices=CODECS, default="bf16", help="the teachers' storage (bench_fused_loss)")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--seq", type=int, default=SEQ, help="tokens per batch row (tokens // seq rows)")
    p.add_argument("--kernels", nargs="+", choices=["fwd", "dw"], default=["fwd", "dw"])
    p.add_argument("--fwd_stages", type=int, nargs="*", default=[], help="stage counts to try beside each listed")
    p.add_argument("--dw_stages", type=int, nargs="*", default=[], help="stage counts to try beside each listed")
    p.add_argument("--warm", action="store_true", help="compile every variant, time nothing")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("tune_fused_loss needs a CUDA GPU (run it through the device tool)")
    x = make_inputs(args.tokens, T=args.seq)
    full = triton_steps(x, *encoded_teachers(x, args.codec))[1]

    dev = torch.cuda.get_device_name()
    base = dict(device=dev, commit=commit(), tokens=args.tokens, seq=args.seq, codec=args.codec)
    tuned = {"fwd": fk._fwd_tuned, "dw": fk._dw_tuned}
    picks = {}
    if args.warm:
        full()
    gpu = {} if args.warm else kernel_ms(full)
    rows = [dict(base, kernel="autotuned", config="", **{f"gpu_{k}_ms": round(v, 4) for k, v in gpu.items()})]
    for kernel, t in tuned.items():
        picks[kernel] = dict(t.cache)
        for key, cfg in t.cache.items():
            print(f"{args.codec}: autotuned {kernel} -> {cfg}", flush=True)
    for kernel in args.kernels:
        stages = args.fwd_stages if kernel == "fwd" else args.dw_stages
        configs = fk._FWD_CONFIGS_GPU if kernel == "fwd" else fk._DW_CONFIGS_GPU
        for cfg in variants(configs, stages):
            ran = forced(tuned[kernel], cfg, raw=False)
            row = dict(base, kernel=kernel, config=str(cfg.kwargs), warps=cfg.num_warps, stages=cfg.num_stages)
            try:
                if args.warm:
                    full()
                    torch.cuda.synchronize()
                else:
                    gpu = kernel_ms(full)
                    row.update(gpu_ms=round(gpu[kernel], 4), **{f"gpu_{k}_ms": round(v, 4) for k, v in gpu.items()})
            except OutOfResources as e:  # a stage count too deep for this GPU is a row, not the end of the sweep
                row["error"] = f"OutOfResources: {str(e).splitlines()[0][:120]}"
            c = ran.get("config")
            row["ran"] = ("pruned" if c is None else "as asked" if c.num_stages == cfg.num_stages
                          else f"{c.num_stages} stages")
            rows.append(row)
            print(row, flush=True)
        # back to the project's rule and the autotuned picks before the other kernel's sweep
        tuned[kernel].early_config_prune = _PROJECT_PRUNE[id(tuned[kernel])]
        tuned[kernel].cache.clear()
        tuned[kernel].cache.update(picks[kernel])
        fk._TUNED.clear()
    path = append_csv(args.out / f"tune_fused_loss_{dev.replace(' ', '_')}.csv", rows)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
