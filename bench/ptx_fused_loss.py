"""Offline sm_90a report of the fused KV-loss kernels at the bench shape (teachers 4 × 128 and 8 × 128, student
2 × 128, bf16, TMA descriptors, natural layout): every forward config of the autotuner for the key and the value
pass, and the weight-gradient configs for one kind and for keys + values in one launch, with plain, fp8, int8, int4 and
int4d teachers. Registers, spills, stack frame, shared memory, PTX lines, local-memory and SFU sine/cosine instructions,
and the machine instructions per thread of the innermost tensor-core loop (all, and conversions, which issue at a
quarter rate on sm_90).

    PYTHONPATH=<triton 3.6>:. python -m bench.ptx_fused_loss [--only fwd|dw] [--ptxas PATH] [--nvdisasm PATH]
"""
from __future__ import annotations

import argparse
import shutil

import triton
import triton.language as tl

from bench.ptx_report import bundled_tool, compile_sm90
from kvfuse.codecs import LEVELS, PACKED
from kvfuse.kernels import fused_kv_loss as K
from kvfuse.kernels.fused_kv_loss_op import CODEC_CODES, FOLDED

HEADS, DIMS, H_S, D_S = (4, 8), (128, 128), 2, 128
PH = D_S // 2
# element type of a teacher's stored data per codec code (kvfuse.kernels.fused_kv_loss.CODEC_*)
X_TYPE = {0: "bf16", **{code: "u8" if kind in LEVELS else "fp8e4nv" for (kind, _), code in CODEC_CODES.items()}}
PACKED_CODES = {code for (kind, _), code in CODEC_CODES.items() if kind in PACKED}
NAMES = {0: "bf16", **{code: f"{kind}/{axis}" for (kind, axis), code in CODEC_CODES.items()}}  # codes are renumbered
FP8, FP8_TOKEN, INT8, INT4, INT4_TOKEN, INT4D, INT4D_TOKEN = (
    CODEC_CODES[k] for k in (("fp8", "channel"), ("fp8", "token"), ("int8", "channel"), ("int4", "channel"),
                             ("int4", "token"), ("int4d", "channel"), ("int4d", "token")))


def _packed(width: int, codec: int) -> int:
    return width // 2 if codec in PACKED_CODES else width


def fwd_signature(block_t: int, block_k: int, wide: bool, codecs: tuple[int, ...]) -> dict:
    n = len(codecs)
    sig = {f"x{i}": f"tensordesc<{X_TYPE[codecs[i]]}[1, 1, 1, {block_t}, {_packed(block_k, codecs[i])}]>"
           if i < n else "constexpr" for i in range(K.MAX_TEACHERS)}
    sig.update({f"w{i}": f"tensordesc<bf16[1, {block_k}, {PH * (2 if wide else 1)}]>" if i < n else "constexpr"
                for i in range(K.MAX_TEACHERS)})
    sig.update(x_strides=tuple([("i32",) * 4] * n), w_strides=tuple([("i32", "i32")] * n), codec_buf="*fp32",
               codec_offs=tuple([("i32", "i32")] * n), alpha_ptr="*fp32", stride_ab="i32", stride_al="i32",
               stride_an="i32", s=f"tensordesc<bf16[1, 1, 1, {block_t}, {PH}]>", ss0="i32", ss1="i32", ss2="i32",
               ss3="i32", mask_ptr="*i1", pos_ptr="*i64", rot_ptr="*i32", invf_ptr="*fp32", stride_il="i32",
               scaling_ptr="*fp32", coef_mse_ptr="*fp32", coef_cos_ptr="*fp32", sq_ptr="*fp32", cos_ptr="*fp32",
               g=f"tensordesc<bf16[1, 1, {block_t}, {PH}]>", ds=f"tensordesc<bf16[1, 1, 1, {block_t}, {PH}]>",
               B="i32", T="i32", n_t_slots="i32", n_h_slots="i32")
    return {name: sig.get(name, "constexpr") for name in K._fused_kv_fwd_kernel.arg_names}


def fwd_constexprs(cfg: dict, is_key: bool, codecs: tuple[int, ...]) -> dict:
    n = len(codecs)
    return {**{f"x{i}": None for i in range(n, K.MAX_TEACHERS)}, **{f"w{i}": None for i in range(n, K.MAX_TEACHERS)},
            "HEADS": HEADS[:n], "DIMS": DIMS[:n], "CODECS": codecs, "N": n, "H_S": H_S, "D_S": D_S, "PH": PH,
            "ROT": D_S, "IS_KEY": is_key, "COMPUTE_GRAD": True, "DOT_DTYPE": tl.bfloat16, "IEEE": False,
            "USE_DESC": True, "EPI_DESC": True, "NATURAL": True, "W2_OFF": PH, **cfg}


def dw_signature(block_f: int, block_c: int, block_t: int, codec: int, codec_v: int) -> dict:
    sig = {}
    for suffix, c in (("", codec), ("_v", codec_v)):
        sig["x" + suffix] = f"tensordesc<{X_TYPE[c]}[1, 1, 1, {block_t}, {_packed(block_f, c)}]>"
        # FOLDED codecs' side data arrive as bf16 tensors (fused_kv_loss_op.fold_side_data)
        sig["sc" + suffix] = sig["of" + suffix] = "*bf16" if c in FOLDED else "*fp32"
        sig["g" + suffix] = f"tensordesc<bf16[1, 1, {block_t}, {block_c}]>"
        sig["dalpha" + suffix + "_ptr"] = "*fp32"
    for name in ("sx0", "sx1", "sx2", "sx3", "sxv0", "sxv1", "sxv2", "sxv3", "sw0", "sw1", "swv0", "swv1",
                 "stride_ab", "stride_al", "B", "T", "L", "N_FBLK", "N_CBLK", "H_I"):
        sig[name] = "i32"
    sig.update(w_ptr="*bf16", w_v_ptr="*bf16", dw_ptr="*bf16", dw_v_ptr="*bf16", alpha_ptr="*fp32",
               gout_ptr="*fp32")
    return {name: sig.get(name, "constexpr") for name in K._fused_kv_dw_kernel.arg_names}


def _brief(info: dict) -> dict:
    """The report with its loop reduced to instruction and conversion counts per thread and trip."""
    loop = info.pop("loop", None)
    return {**info, "loop_instructions": loop.get("instructions"), "loop_conversions": loop.get("conversions")} \
        if loop is not None else info


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--only", choices=["fwd", "dw"])
    p.add_argument("--ptxas", default=shutil.which("ptxas") or "ptxas")
    p.add_argument("--nvdisasm", default=bundled_tool("nvdisasm"))
    p.add_argument("--arch", default="sm_90a")
    args = p.parse_args(argv)
    print(f"triton {triton.__version__}, {args.arch}; teachers {HEADS} × {DIMS} → student {H_S} × {D_S}, bf16")
    if args.only != "dw":
        for codecs in ((0, 0), (FP8, INT4), (INT8, INT8), (INT4, INT4), (INT4D, INT4D)):
            for config in K._FWD_CONFIGS_GPU:
                cfg = dict(config.kwargs)
                if cfg["HPP"] != 1:     # the natural layout runs one head per program (_prune_fwd)
                    continue
                for is_key in (True, False):
                    sig = fwd_signature(cfg["BLOCK_T"], cfg["BLOCK_K"], cfg["WIDE"], codecs)
                    info = compile_sm90(K._fused_kv_fwd_kernel, sig, fwd_constexprs(cfg, is_key, codecs),
                                        config.num_warps, config.num_stages, args.ptxas, args.arch,
                                        nvdisasm=args.nvdisasm)
                    print(f"fwd {'keys  ' if is_key else 'values'} {'+'.join(NAMES[c] for c in codecs):27s} "
                          f"{cfg['BLOCK_T']:3d} x {cfg['BLOCK_K']:3d} wide={cfg['WIDE']!s:5} / {config.num_warps} "
                          f"warps: {_brief(info)}", flush=True)
    if args.only != "fwd":
        for codec, codec_v, kinds in ((0, 0, 1), (0, 0, 2), (FP8, FP8, 2), (FP8, FP8_TOKEN, 2), (INT8, INT8, 2),
                                      (INT4, INT4_TOKEN, 2), (INT4D, INT4D_TOKEN, 2)):
            for config in K._DW_CONFIGS_GPU:
                cfg = dict(config.kwargs)
                consts = dict(D_I=DIMS[0], C2=2 * H_S * PH, CODEC=codec, CODEC_V=codec_v, KINDS=kinds,
                              DOT_DTYPE=tl.bfloat16, IEEE=False, USE_DESC=True, **cfg)
                sig = dw_signature(cfg["BLOCK_F"], cfg["BLOCK_C"], cfg["BLOCK_T"], codec, codec_v)
                info = compile_sm90(K._fused_kv_dw_kernel, sig, consts, config.num_warps, config.num_stages,
                                    args.ptxas, args.arch, nvdisasm=args.nvdisasm)
                print(f"dw {NAMES[codec]}+{NAMES[codec_v]:13s} kinds {kinds} {cfg['BLOCK_F']:3d} x {cfg['BLOCK_C']:3d} "
                      f"x {cfg['BLOCK_T']:3d} tokens / {config.num_warps} warps: {_brief(info)}", flush=True)


if __name__ == "__main__":
    main()
