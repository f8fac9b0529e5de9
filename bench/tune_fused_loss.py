"""Time every tile config of the fused-loss kernels one by one at a bench shape (GPU), to choose the autotune lists.

    PYTHONPATH=. python -m bench.tune_fused_loss --out $OUT [--tokens 16384]

Writes tune_fused_loss_<device>.csv: kernel, pass (key/value, teacher), config, median ms, and the GEMM TFLOP/s.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

from bench.bench_fused_loss import TEACHERS, make_inputs
from bench.common import commit


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokens", type=int, default=16384)
    args = p.parse_args(argv)
    from triton.testing import do_bench

    import kvfuse.kernels.fused_kv_loss as K
    from kvfuse.kernels.fused_kv_loss_op import TeacherStorage, natural_layout
    from kvfuse.loss import pair_layout_adapter
    x = make_inputs(args.tokens)
    sk = x["student_k"].detach()
    L, B, H_s, T, D_s = sk.shape
    dev = sk.device
    natural = natural_layout(D_s, D_s)
    wk = [w.detach() if natural else pair_layout_adapter(w.detach(), (H_s, D_s), D_s) for w in x["w_k"]]
    mask = x["mask"].float().contiguous()
    pos = x["positions"].float().contiguous()
    rot = torch.full((L,), D_s, dtype=torch.int32, device=dev)
    invf = x["inv_freq"].expand(L, -1)
    ones = torch.ones(L, device=dev)
    coef = torch.full((L,), 1e-6, device=dev)
    alpha = x["alpha"].detach()
    sums = torch.zeros(2, L, B, *K.stat_slots(T, H_s), device=dev)
    rows = []
    dev_name = torch.cuda.get_device_name()
    flops_fwd = sum(2 * B * T * w.shape[0] * w.shape[1] * H_s * D_s for w in x["w_k"])

    for is_key in (True, False):
        for cfg in list(K._FWD_CONFIGS_GPU):
            K._fwd_tuned.configs = [cfg]
            K._fwd_tuned.cache.clear()
            K._TUNED.clear()
            try:
                def fwd():
                    return K.fused_kv_loss_forward(sk, x["teacher_k"], wk, alpha, mask, pos, rot, invf, ones, D_s,
                                                   coef, coef, is_key, True, sums)
                fwd()
                ms = do_bench(fwd, return_mode="median")
            except Exception as err:  # a config that does not compile here is reported, not fatal
                ms = float("nan")
                print(f"fwd {cfg}: {type(err).__name__}: {str(err)[:200]}", flush=True)
            rows.append(dict(kernel="fwd", part="key" if is_key else "value", config=str(cfg), ms=round(ms, 4),
                             tflops=round(flops_fwd / (ms * 1e-3) / 1e12, 1)))
            print(rows[-1], flush=True)
    K._fwd_tuned.configs = list(K._FWD_CONFIGS_GPU)
    K._fwd_tuned.cache.clear()
    K._TUNED.clear()
    G, _ = K.fused_kv_loss_forward(sk, x["teacher_k"], wk, alpha, mask, pos, rot, invf, ones, D_s, coef, coef,
                                   True, True, sums)
    g_out = torch.ones(1, device=dev)
    for cfg in list(K._DW_CONFIGS_GPU):
        K._dw_tuned.configs = [cfg]
        K._dw_tuned.cache.clear()
        K._TUNED.clear()
        try:
            def dw():
                return K.fused_kv_loss_backward(K.KindGrad(TeacherStorage.plain(x["teacher_k"]), wk, G), None,
                                                alpha, g_out, True, True)
            dw()
            ms = do_bench(dw, return_mode="median")
        except Exception as err:
            ms = float("nan")
            print(f"dw {cfg}: {type(err).__name__}: {str(err)[:200]}", flush=True)
        rows.append(dict(kernel="dw", part="key, both teachers", config=str(cfg), ms=round(ms, 4),
                         tflops=round(flops_fwd / (ms * 1e-3) / 1e12, 1)))
        print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"tune_fused_loss_{dev_name.replace(' ', '_')}.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["device", "commit", "tokens", "teachers", "kernel", "part", "config", "ms",
                                          "tflops"])
        w.writeheader()
        for r in rows:
            w.writerow(dict(device=dev_name, commit=commit(), tokens=args.tokens, teachers=str(TEACHERS), **r))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
