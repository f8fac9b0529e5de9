"""Experiment: is the fp8 weight gradient's loop bound by its byte gathers from shared memory?

The weight gradient's product is Xᵀ G over tokens. Its A operand (features × tokens) comes from registers, and a
thread's register pair holds two consecutive tokens of one feature; the store keeps codes [tokens, features], so
each code is one single-byte shared-memory load (bench/NOTES.md "Compressed teachers"). If the loop is bound by
those loads, a layout that stores tokens 2j and 2j + 1 of a feature side by side (one 16-bit load per register
pair) should bring it toward bf16's time. This times the bare loop, M = Xᵀ G per [128 × 128] tile over every
token (one kind, one 8 × 128 teacher, 28 layers), for bf16 teachers, fp8 codes as stored now, and fp8 codes paired
along tokens — the last on the same bytes reinterpreted (the timing's question is the load pattern, not the
values; a check of the paired decode on a properly paired tensor runs first).

    PYTHONPATH=. python -m bench.exp_dw_pairs --out $OUT [--tokens 16384]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from bench.common import append_csv, commit
from kvfuse.kernels.fused_kv_loss import _fp8_to_bf16

PLAIN, BYTES, PAIRS, REGS = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)
SYNC = tl.constexpr(4)  # added to a mode: the product is used in its own iteration, so triton issues it whole


@triton.jit
def _pair_to_bf16(raw):
    # a 16-bit word holding the codes of tokens 2j (low byte) and 2j + 1: the bf16 bits of value·2^-120 of both,
    # in one 32-bit register, then one multiply by 2^120 (as _fp8_to_bf16 unscaled)
    return tl.inline_asm_elementwise(
        "{ .reg .b32 r, t, z; mov.b32 t, 0x7B807B80; mov.b32 z, 0x80008000; cvt.u32.u16 r, $1;"
        " prmt.b32 $0, r, 0, 0x9180; shl.b32 $0, $0, 4; and.b32 $0, $0, 0x87F087F0; fma.rn.bf16x2 $0, $0, t, z; }",
        "=r,h", [raw], dtype=tl.uint32, is_pure=True, pack=1)


@triton.jit
def _xtg_kernel(x, g, out, T, MODE_: tl.constexpr, BF: tl.constexpr, BC: tl.constexpr, BT: tl.constexpr):
    MODE: tl.constexpr = MODE_ % SYNC
    pid_c = tl.program_id(0)
    pid_f = tl.program_id(1)
    layer = tl.program_id(2)
    acc = tl.zeros([BF, BC], dtype=tl.float32)
    for t0 in range(0, T, BT):
        if MODE == PLAIN:
            xt = tl.trans(x.load([layer, t0, pid_f * BF]).reshape(BT, BF))
        elif MODE == REGS:  # bf16 through registers unchanged: the register-operand path without a decode
            xt = tl.trans(tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x.load([layer, t0, pid_f * BF]).reshape(BT, BF)],
                                                    dtype=tl.bfloat16, is_pure=True, pack=2))
        elif MODE == BYTES:
            xt = tl.trans(_fp8_to_bf16(x.load([layer, t0, pid_f * BF]).reshape(BT, BF), None, False))
        else:
            w = _pair_to_bf16(x.load([layer, t0 // 2, pid_f * BF]).reshape(BT // 2, BF))
            lo = (w & 0xFFFF).to(tl.uint16).to(tl.bfloat16, bitcast=True)
            hi = (w >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
            xt = tl.trans(tl.join(lo, hi).permute(0, 2, 1).reshape(BT, BF))
        acc = tl.dot(xt, g.load([layer, t0, pid_c * BC]).reshape(BT, BC), acc)
        if MODE_ >= SYNC:
            acc = tl.where(t0 < T, acc, 0.0)
    f = pid_f * BF + tl.arange(0, BF)
    c = pid_c * BC + tl.arange(0, BC)
    tl.store(out + (layer * tl.num_programs(1) * BF + f[:, None]) * (tl.num_programs(0) * BC) + c[None, :], acc)


def xtg(x: torch.Tensor, g: torch.Tensor, mode: int, bf=128, bc=128, bt=64, warps=8, stages=4) -> torch.Tensor:
    """M[l] = X[l]ᵀ G[l] in fp32: x [L, T, F] (bf16, fp8 codes, or uint16 token pairs [L, T/2, F]), g [L, T, C]."""
    L, T, C = g.shape
    F = x.shape[2]
    box = [1, bt // 2 if mode == PAIRS else bt, bf]
    out = torch.empty(L, F, C, device=g.device, dtype=torch.float32)
    _xtg_kernel[(C // bc, F // bf, L)](TensorDescriptor.from_tensor(x, box), TensorDescriptor.from_tensor(g, [1, bt, bc]),
                                       out, T, MODE_=mode, BF=bf, BC=bc, BT=bt, num_warps=warps, num_stages=stages)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--features", type=int, default=1024)
    p.add_argument("--columns", type=int, default=256)
    p.add_argument("--no_pairs", action="store_true", help="time bf16 and the stored fp8 layout only")
    args = p.parse_args(argv)
    from triton.testing import do_bench
    L, T, F, C = args.layers, args.tokens, args.features, args.columns
    gen = torch.Generator(device="cuda").manual_seed(0)
    xf = torch.randn(L, T, F, device="cuda", generator=gen)
    g = torch.randn(L, T, C, device="cuda", generator=gen).to(torch.bfloat16)
    codes = xf.to(torch.float8_e4m3fn)
    decoded = codes.to(torch.bfloat16)
    want = torch.einsum("ltf,ltc->lfc", decoded.float(), g.float())
    # the paired layout, built properly: [L, T/2, F, 2] bytes as uint16 [L, T/2, F]
    paired = codes.view(torch.uint8).reshape(L, T // 2, 2, F).transpose(2, 3).contiguous().view(torch.uint16)
    paired = paired.reshape(L, T // 2, F)
    checks = {name: (xtg(x, g, mode) - want).norm().item() / want.norm().item()
              for name, x, mode in (("bf16", decoded, PLAIN), ("bf16 registers", decoded, REGS), ("fp8 bytes", codes, BYTES),
                                    ("fp8 pairs", paired, PAIRS), ("bf16 sync", decoded, PLAIN + SYNC),
                                    ("bf16 registers sync", decoded, REGS + SYNC), ("fp8 bytes sync", codes, BYTES + SYNC))}
    print("relative error against the fp32 product of the decoded codes:", checks, flush=True)
    reinterpreted = codes.view(torch.uint16).reshape(L, T // 2, F)  # same bytes as `codes`, read as pairs
    dev = torch.cuda.get_device_name()
    variants = [("bf16", decoded, PLAIN), ("bf16 registers", decoded, REGS), ("fp8 bytes", codes, BYTES),
                ("fp8 pairs", reinterpreted, PAIRS), ("bf16 sync", decoded, PLAIN + SYNC),
                ("bf16 registers sync", decoded, REGS + SYNC), ("fp8 bytes sync", codes, BYTES + SYNC)]
    if args.no_pairs:
        variants = [v for v in variants if "pairs" not in v[0]]
    tiles = [(128, 128, 64, 8, 4), (128, 128, 128, 8, 3)] if args.no_pairs else \
        [(128, 128, 64, 8, 4), (128, 128, 64, 16, 4), (128, 256, 64, 16, 3), (256, 128, 64, 16, 3), (128, 128, 128, 16, 3)]
    rows = []
    for rnd in range(3):
        for bf, bc, bt, warps, stages in tiles:
            for name, x, mode in variants:
                try:
                    ms = do_bench(lambda: xtg(x, g, mode, bf, bc, bt, warps, stages), return_mode="median")
                    err = ""
                except Exception as exc:  # a tile that does not fit: recorded, the others still run
                    ms, err = float("nan"), f"{type(exc).__name__}: {str(exc)[:120]}"
                rows.append(dict(device=dev, commit=commit(), round=rnd, tokens=T, layers=L, features=F, columns=C,
                                 teacher=name, tile=f"{bf}x{bc}x{bt}", warps=warps, stages=stages,
                                 ms=round(ms, 4), rel_err=f"{checks[name]:.2e}", error=err))
                print(rnd, name, f"{bf}x{bc}x{bt}/{warps}/{stages}", round(ms, 4), err, flush=True)
    append_csv(args.out / f"exp_dw_pairs_{dev.replace(' ', '_')}.csv", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
