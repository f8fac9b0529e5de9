"""Experiment: the weight gradient's bare loop (M = Xᵀ G per [128 × 128] tile over every token) with the teacher tile
as a register operand, written in Gluon so that the schedule is ours: one chained K = BT product per tile (one fence,
one commit), the next tile's codes loaded and decoded while it runs (wait for all but one), TMA S − 1 tiles ahead.
Triton 3.6 instead splits a register-operand product into its k-slices, each with its own fence, commit and wait.

Variants: `ss` bf16 from shared memory (bf16's path), `rs` the same bf16 tile through registers, `fp8` codes
decoded in registers (as the project's kernel decodes them). Each is checked against the fp32 product first.

    PYTHONPATH=. python -m bench.exp_dw_gluon_rs --out $OUT
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from bench.common import append_csv, commit

SS, RS, FP8 = gl.constexpr(0), gl.constexpr(1), gl.constexpr(2)


@gluon.jit
def _fp8_pairs_to_bf16(raw):
    # e4m3 bits to bf16 (value·2^-120 by placing bits, then × 2^120), two codes per instance (kvfuse's decode)
    return gl.inline_asm_elementwise(
        "{ .reg .b32 t, z; mov.b32 t, 0x7B807B80; mov.b32 z, 0x80008000; prmt.b32 $0, $1, $2, 0xC480;"
        " shl.b32 $0, $0, 4; and.b32 $0, $0, 0x87F087F0; fma.rn.bf16x2 $0, $0, t, z; }",
        "=r,r,r", [raw.to(gl.uint32)], dtype=gl.bfloat16, is_pure=True, pack=2)


@gluon.jit
def _issue(x_desc, g_desc, xs, gs, bars, j, layer, T, f0, c0, S: gl.constexpr, BT: gl.constexpr):
    s = j % S
    bar = bars.index(s)
    mbarrier.expect(bar, x_desc.block_type.nbytes + g_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(x_desc, [layer * T + j * BT, f0], bar, xs.index(s))
    tma.async_copy_global_to_shared(g_desc, [layer * T + j * BT, c0], bar, gs.index(s))


@gluon.jit
def _xtg_gluon(x_desc, g_desc, out, T, F, C, MODE: gl.constexpr, S: gl.constexpr, BF: gl.constexpr,
               BC: gl.constexpr, BT: gl.constexpr, WARPS: gl.constexpr):
    pid_c = gl.program_id(0)
    pid_f = gl.program_id(1)
    layer = gl.program_id(2)
    f0 = pid_f * BF
    c0 = pid_c * BC
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                    instr_shape=[16, BC, 16])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
    xs = gl.allocate_shared_memory(x_desc.dtype, [S, BT, BF], x_desc.layout)
    gs = gl.allocate_shared_memory(g_desc.dtype, [S, BT, BC], g_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(S):
        mbarrier.init(bars.index(i), count=1)
    n = T // BT
    for jj in gl.static_range(S - 1):
        _issue(x_desc, g_desc, xs, gs, bars, jj, layer, T, f0, c0, S, BT)
    acc = gl.zeros([BF, BC], gl.float32, acc_l)
    for j in range(n):
        s = j % S
        mbarrier.wait(bars.index(s), (j // S) & 1)
        if MODE == SS:
            a = xs.index(s).permute((1, 0))
        elif MODE == RS:
            a = xs.index(s).permute((1, 0)).load(a_l)
        else:
            a = _fp8_pairs_to_bf16(xs.index(s).permute((1, 0)).load(a_l))
        acc = warpgroup_mma(a, gs.index(s), acc, is_async=True)
        # all but this tile's product done: the previous tile's slot is free for the tile S - 1 ahead
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        if j + S - 1 < n:
            _issue(x_desc, g_desc, xs, gs, bars, j + S - 1, layer, T, f0, c0, S, BT)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    for i in gl.static_range(S):
        mbarrier.invalidate(bars.index(i))
    fr = f0 + gl.arange(0, BF, layout=gl.SliceLayout(1, acc_l))
    cr = c0 + gl.arange(0, BC, layout=gl.SliceLayout(0, acc_l))
    gl.store(out + (layer * F + fr[:, None]) * C + cr[None, :], acc)


# Warp-specialised: a loader warp (TMA), four decoder warps (codes from shared memory, decoded in a vectorised layout,
# stored as bf16 into a ring the tensor cores read), and the default warpgroup issuing shared-memory products only.
@gluon.jit
def _ws_mma(ds, gs, load_ready, load_empty, dec_ready, dec_empty, n, S: gl.constexpr, D: gl.constexpr,
            BF: gl.constexpr, BC: gl.constexpr):
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BC, 16])
    acc = gl.zeros([BF, BC], gl.float32, acc_l)
    for j in range(n):
        mbarrier.wait(dec_ready.index(j % D), (j // D) & 1)
        mbarrier.wait(load_ready.index(j % S), (j // S) & 1)
        acc = warpgroup_mma(ds.index(j % D).permute((1, 0)), gs.index(j % S), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        if j > 0:  # the previous tile's product is done: its decoded tile and its G slot are free
            mbarrier.arrive(dec_empty.index((j - 1) % D))
            mbarrier.arrive(load_empty.index((j - 1) % S))
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    return (acc,)


@gluon.jit
def _ws_load(x_desc, g_desc, xs, gs, load_ready, load_empty, layer, T, f0, c0, n, S: gl.constexpr, BT: gl.constexpr):
    for j in range(n):
        s = j % S
        mbarrier.wait(load_empty.index(s), ((j // S) & 1) ^ 1)
        bar = load_ready.index(s)
        mbarrier.expect(bar, x_desc.block_type.nbytes + g_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(x_desc, [layer * T + j * BT, f0], bar, xs.index(s))
        tma.async_copy_global_to_shared(g_desc, [layer * T + j * BT, c0], bar, gs.index(s))


@gluon.jit
def _ws_decode(xs, ds, load_ready, load_empty, dec_ready, dec_empty, n, S: gl.constexpr, D: gl.constexpr,
               DW: gl.constexpr):
    blk: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [DW, 1], [1, 0])
    for j in range(n):
        s = j % S
        d = j % D
        mbarrier.wait(load_ready.index(s), (j // S) & 1)
        raw = xs.index(s).load(blk)
        gl.thread_barrier()
        mbarrier.arrive(load_empty.index(s))
        xd = _fp8_pairs_to_bf16(raw)
        mbarrier.wait(dec_empty.index(d), ((j // D) & 1) ^ 1)
        ds.index(d).store(xd)
        fence_async_shared()
        gl.thread_barrier()
        mbarrier.arrive(dec_ready.index(d))


@gluon.jit
def _xtg_ws(x_desc, g_desc, out, T, F, C, S: gl.constexpr, D: gl.constexpr, BF: gl.constexpr, BC: gl.constexpr,
            BT: gl.constexpr, DW: gl.constexpr):
    pid_c = gl.program_id(0)
    pid_f = gl.program_id(1)
    layer = gl.program_id(2)
    f0 = pid_f * BF
    c0 = pid_c * BC
    dec_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BT, BF], gl.bfloat16)
    xs = gl.allocate_shared_memory(x_desc.dtype, [S, BT, BF], x_desc.layout)
    gs = gl.allocate_shared_memory(g_desc.dtype, [S, BT, BC], g_desc.layout)
    ds = gl.allocate_shared_memory(gl.bfloat16, [D, BT, BF], dec_l)
    load_ready = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
    load_empty = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
    dec_ready = gl.allocate_shared_memory(gl.int64, [D, 1], mbarrier.MBarrierLayout())
    dec_empty = gl.allocate_shared_memory(gl.int64, [D, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(S):
        mbarrier.init(load_ready.index(i), count=1)
        mbarrier.init(load_empty.index(i), count=2)   # the decoder (codes) and the products (G)
    for i in gl.static_range(D):
        mbarrier.init(dec_ready.index(i), count=1)
        mbarrier.init(dec_empty.index(i), count=1)
    n = T // BT
    (acc,) = gl.warp_specialize([(_ws_mma, (ds, gs, load_ready, load_empty, dec_ready, dec_empty, n, S, D, BF, BC)),
                              (_ws_decode, (xs, ds, load_ready, load_empty, dec_ready, dec_empty, n, S, D, DW)),
                              (_ws_load, (x_desc, g_desc, xs, gs, load_ready, load_empty, layer, T, f0, c0, n, S,
                                          BT))],
                             [DW, 1], [128 if DW == 4 else 96, 40])
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BC, 16])
    fr = f0 + gl.arange(0, BF, layout=gl.SliceLayout(1, acc_l))
    cr = c0 + gl.arange(0, BC, layout=gl.SliceLayout(0, acc_l))
    gl.store(out + (layer * F + fr[:, None]) * C + cr[None, :], acc)


def xtg_ws(x: torch.Tensor, g: torch.Tensor, bf=128, bc=128, bt=64, stages=4, dec=2, dec_warps=4):
    L, T, C = g.shape
    F = x.shape[2]
    x2, g2 = x.reshape(L * T, F), g.reshape(L * T, C)
    x_desc = TensorDescriptor.from_tensor(x2, [bt, bf], gl.NVMMASharedLayout.get_default_for([bt, bf], gl.uint8))
    g_desc = TensorDescriptor.from_tensor(g2, [bt, bc], gl.NVMMASharedLayout.get_default_for([bt, bc], gl.bfloat16))
    out = torch.empty(L, F, C, device=g.device, dtype=torch.float32)
    _xtg_ws[(C // bc, F // bf, L)](x_desc, g_desc, out, T, F, C, S=stages, D=dec, BF=bf, BC=bc, BT=bt,
                                   DW=dec_warps, num_warps=4)
    return out


GL_DTYPE = {torch.uint8: gl.uint8, torch.bfloat16: gl.bfloat16}


def xtg_gluon(x: torch.Tensor, g: torch.Tensor, mode: int, bf=128, bc=128, bt=64, warps=8, stages=4):
    L, T, C = g.shape
    F = x.shape[2]
    x2, g2 = x.reshape(L * T, F), g.reshape(L * T, C)
    x_desc = TensorDescriptor.from_tensor(x2, [bt, bf], gl.NVMMASharedLayout.get_default_for([bt, bf],
                                                                                             GL_DTYPE[x2.dtype]))
    g_desc = TensorDescriptor.from_tensor(g2, [bt, bc], gl.NVMMASharedLayout.get_default_for([bt, bc], gl.bfloat16))
    out = torch.empty(L, F, C, device=g.device, dtype=torch.float32)
    _xtg_gluon[(C // bc, F // bf, L)](x_desc, g_desc, out, T, F, C, MODE=mode, S=stages, BF=bf, BC=bc, BT=bt,
                                      WARPS=warps, num_warps=warps)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--layers", type=int, default=28)
    args = p.parse_args(argv)
    from triton.testing import do_bench
    L, T, F, C = args.layers, args.tokens, 1024, 256
    gen = torch.Generator(device="cuda").manual_seed(0)
    codes = torch.randn(L, T, F, device="cuda", generator=gen).to(torch.float8_e4m3fn)
    g = torch.randn(L, T, C, device="cuda", generator=gen).to(torch.bfloat16)
    decoded = codes.to(torch.bfloat16)
    want = torch.einsum("ltf,ltc->lfc", decoded.float(), g.float())
    u8 = codes.view(torch.uint8)
    variants = [("gluon ss bf16", lambda bt, st: xtg_gluon(decoded, g, SS, bt=bt, stages=st)),
                ("gluon ss bf16 4 warps", lambda bt, st: xtg_gluon(decoded, g, SS, bt=bt, warps=4, stages=st)),
                ("gluon rs fp8", lambda bt, st: xtg_gluon(u8, g, FP8, bt=bt, stages=st)),
                ("gluon ws fp8", lambda bt, st: xtg_ws(u8, g, bt=bt, stages=st)),
                ("gluon ws fp8 4 decoded", lambda bt, st: xtg_ws(u8, g, bt=bt, stages=3, dec=4)),
                ("gluon ws fp8 4 decoded 8 decoder warps", lambda bt, st: xtg_ws(u8, g, bt=bt, stages=3, dec=4,
                                                                                 dec_warps=8))]
    checks = {}
    for name, fn in variants:
        try:
            checks[name] = f"{((fn(64, 4) - want).norm() / want.norm()).item():.2e}"
        except Exception as exc:  # a variant that does not compile is a result: reported, the others still run
            checks[name] = f"{type(exc).__name__}: {str(exc)[-1500:]}"
        print(name, checks[name], flush=True)
    print("relative error against the fp32 product:", checks, flush=True)
    dev = torch.cuda.get_device_name()
    rows = []
    for rnd in range(3):
        for bt, stages in ((64, 4), (64, 3)):
            for name, fn in variants:
                if not checks[name][0].isdigit():
                    continue
                ms = do_bench(lambda: fn(bt, stages), return_mode="median")
                rows.append(dict(device=dev, commit=commit(), round=rnd, tokens=T, layers=L, features=F, columns=C,
                                 teacher=name, tile=f"128x128x{bt}", stages=stages, ms=round(ms, 4),
                                 rel_err=checks[name]))
                print(rnd, name, bt, stages, round(ms, 4), flush=True)
    append_csv(args.out / f"exp_dw_gluon_rs_{dev.replace(' ', '_')}.csv", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
