"""Offline sm_90a register report of the attention-KL kernels: compile each (variant, tile) with the installed
triton for sm_90 (no GPU needed), run ptxas -v on the PTX, print registers, spill bytes and shared memory.

    PYTHONPATH=. python -m bench.ptx_attention_kl [--only bwd|fwd] [--ptxas PATH]
"""
from __future__ import annotations

import argparse
import shutil

import triton
import triton.language as tl

from bench.ptx_report import compile_sm90
from kvfuse.kernels import attention_kl as K

D = 128


def _strides(prefix, names):
    return {f"s{prefix}{n}": "i32" for n in names}


def bwd_signature(q_tma: int, dq_tma: bool, block_m: int) -> dict:
    q_desc = {1: f"tensordesc<bf16[1, 1, {block_m}, {D}]>", 2: f"tensordesc<bf16[{block_m}, {D}]>"}
    sig = {"q_ptr": q_desc.get(int(q_tma), "*bf16"), "sqb": "i32", "sqh": "i32",
           "sqt": "i32", "sqd": "constexpr",
           "ks_ptr": "*bf16", "sksb": "i32", "sksh": "i32", "skst": "i32", "sksd": "constexpr",
           "kf_ptr": "*bf16", "skfb": "i32", "skfh": "i32", "skft": "i32", "skfd": "constexpr",
           "mask_ptr": "*i8", "dkl_ptr": "*fp32", "stats_ptr": "*fp32",
           "dq_ptr": f"tensordesc<fp32[1, {D}, {block_m}]>" if dq_tma else "*fp32",
           "dks_ptr": "*fp32", "dkf_ptr": "*fp32", "H": "i32", "H_KV": "i32", "T": "i32", "GROUP": "i32",
           "SPLIT": "i32", "N_ROWS": "i32", "scale": "fp32", "T_BUCKET": "i32"}
    for k in ("D", "BLOCK_D", "DOT_DTYPE", "IEEE", "ATOMIC_DQ", "BLOCK_M", "BLOCK_N", "Q_TMA", "DQ_TMA", "LEAN"):
        sig[k] = "constexpr"
    return sig


def fwd_signature(k_tma: int = 0, block_n: int = 64) -> dict:
    k = {0: "*bf16", 2: f"tensordesc<bf16[{block_n}, {D}]>", 1: f"tensordesc<bf16[1, 1, {block_n}, {D}]>"}[k_tma]
    sig = {"q_ptr": "*bf16", "sqb": "i32", "sqh": "i32", "sqt": "i32", "sqd": "constexpr",
           "ks_ptr": k, "sksb": "i32", "sksh": "i32", "skst": "i32", "sksd": "constexpr",
           "kf_ptr": k, "skfb": "i32", "skfh": "i32", "skft": "i32", "skfd": "constexpr",
           "mask_ptr": "*i8", "kl_ptr": "*fp32", "stats_ptr": "*fp32",
           "H": "i32", "T": "i32", "GROUP": "i32", "N_ROWS": "i32", "scale": "fp32", "T_BUCKET": "i32"}
    for name in ("D", "BLOCK_D", "DOT_DTYPE", "IEEE", "BLOCK_M", "BLOCK_N", "K_TMA"):
        sig[name] = "constexpr"
    return sig


# Arguments the launch specialises as multiples of 16 at the bench shape (T = 4k..64k, 12/2 heads, D = 128):
# every pointer, the strides but the unit ones, T, N_ROWS, T_BUCKET (H, H_KV, GROUP, SPLIT are not).
_DIV16 = frozenset({"sqb", "sqh", "sqt", "sksb", "sksh", "skst", "skfb", "skfh", "skft", "T", "N_ROWS",
                    "T_BUCKET"})


def compile_one(fn, sig, consts, warps, stages, ptxas, arch):
    return compile_sm90(fn, sig, consts, warps, stages, ptxas, arch, _DIV16)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--only", choices=["bwd", "fwd"])
    p.add_argument("--ptxas", default=shutil.which("ptxas") or "ptxas")
    p.add_argument("--arch", default="sm_90a")
    p.add_argument("--variants", nargs="+", default=list(K.BWD_VARIANTS) + ["tma-4d"],
                   help="tma: q through a 2-D row descriptor (contiguous q); tma-4d: through a 4-D one")
    p.add_argument("--all-tiles", action="store_true", help="also the tiles the autotuner lists leave out")
    args = p.parse_args(argv)
    print(f"triton {triton.__version__}, {args.arch}, D = {D}, bf16")
    if args.only != "fwd":
        for variant in args.variants:
            q_tma, dq_tma, lean = K.BWD_VARIANTS[variant.removesuffix("-4d")]
            q_tma = (1 if variant.endswith("-4d") else 2) if q_tma else 0
            tiles = [(32, 128, 8, 2), (64, 64, 8, 2), (32, 64, 8, 2), (16, 64, 4, 2)] if variant == "ptr" \
                else K._VARIANT_BWD["bwd_" + variant.removesuffix("-4d")]
            if args.all_tiles:
                tiles = sorted(set(tiles) | {(32, 128, 8, 1), (32, 128, 8, 2), (32, 128, 8, 3), (64, 128, 8, 2),
                                             (64, 64, 8, 2), (32, 64, 8, 2), (32, 64, 8, 3), (64, 64, 4, 2)})
            for m, n, w, s in tiles:
                consts = dict(sqd=1, sksd=1, skfd=1, D=D, BLOCK_D=D, DOT_DTYPE=tl.bfloat16, IEEE=False,
                              ATOMIC_DQ=True, BLOCK_M=m, BLOCK_N=n, Q_TMA=q_tma, DQ_TMA=dq_tma, LEAN=lean)
                try:
                    info = compile_one(K._attention_kl_bwd_kernel, bwd_signature(q_tma, dq_tma, m), consts, w, s,
                                       args.ptxas, args.arch)
                except Exception as err:  # noqa: BLE001 - reported, the table goes on
                    info = f"FAILED {type(err).__name__}: {str(err)[:400]}"
                print(f"bwd {variant:7s} {m:3d} x {n:3d} / {w} warps, {s} stages: {info}", flush=True)
    if args.only != "bwd":
        for k_tma, tiles in ((0, [(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 3)]), (2, K._TMA_FWD),
                             (1, K._TMA_FWD[:1])):
            for m, n, w, s in tiles:
                consts = dict(sqd=1, sksd=1, skfd=1, D=D, BLOCK_D=D, DOT_DTYPE=tl.bfloat16, IEEE=False,
                              BLOCK_M=m, BLOCK_N=n, K_TMA=k_tma)
                info = compile_one(K._attention_kl_fwd_kernel, fwd_signature(k_tma, n), consts, w, s, args.ptxas,
                                   args.arch)
                name = {0: "ptr", 2: "tma", 1: "tma-4d"}[k_tma]
                print(f"fwd {name:7s} {m:3d} x {n:3d} / {w} warps, {s} stages: {info}", flush=True)


if __name__ == "__main__":
    main()
