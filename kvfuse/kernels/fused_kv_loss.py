"""Fused multi-teacher KV-distillation loss: adapter projections, student RoPE, α-fusion, masked MSE + cosine.

Notation (one student layer l, batch row b, token t; kvfuse.loss holds the readable reference):
    X_i(t)   teacher i's aligned pre-RoPE keys (or values), head hi, dim d: feature f = hi·D_i + d, F_i = H_i·D_i
    W_i      adapter w[i][l], [F_i, C'] in the *pair layout* below
    P(t)     = Σ_i α_i X_i(t) W_i                    the fused projection, [C']
    K_f(t)   = R_t P(t)                              RoPE at the student position (identity for values)
R_t is linear and the same for every teacher, so the kernel fuses first and rotates once.

Pair layout.  RoPE rotates dim pairs (d1, d2) of each student head: (j, j + r/2) for j < r/2 with rotary dim r,
while the other D_s − r dims pass through. kvfuse.loss lays the adapter's columns out as
    column (half η, head h, pair j) = η·H_s·PH + h·PH + j,      PH = next power of two ≥ D_s/2,
(pairs j ≥ D_s/2 are zero padding), with per-layer tables dim1/dim2 (the student dims of each pair), freq (0 for
pass-through pairs) and scale (attention_scaling, 1 for pass-through pairs). Then the two members of every pair
sit in two accumulators p1 = P[:, η=0 block], p2 = P[:, η=1 block] at the same column, rotate_half is a swap of
accumulators, and partial rotary, NoPE layers (freq 0, scale 1) and per-layer scalings cost nothing extra.
In the standard case (full rotary, D_s/2 a power of two ≥ 16: fused_kv_loss_op.natural_layout) the pair layout's
blocks (η, h) are simply the halves of head h, so the kernels read the adapters in their own column order (column
h·D_s + η·D_s/2 + j) and write G in it: no permuted copy of W, and ∂W comes out in W's layout.

Compressed teachers (CODECS, kvfuse.codecs).  A teacher may arrive as fp8 codes, int8 codes or packed int4 bytes
with scales (and fp8z / int8 / int4 offsets) per (layer, row, head) and channel — or per token; `_x_tile` decodes
each [tokens × dims] tile in registers right after its load, so no decoded copy of the teacher exists in memory. The
forward kernel finds every teacher's scales and offsets in one flat fp32 buffer (`codec_buf`, element offsets
`codec_offs`); per-channel fp8, fp8z and int8 side data arrive folded (fused_kv_loss_op.fold_side_data) for a decode
of one bf16 multiply or FMA per two codes with bf16 products.

α.  α_i is one scalar per program (one b, one l), so it is applied to the accumulator, not to the operands:
    acc ← acc · (α_prev / α_i) + X_i W_i  for each teacher with α_i ≠ 0, and finally acc ← acc · α_last,
which leaves X and W straight from memory to the tensor cores (a teacher with α_i = 0 is skipped entirely).

The loss is linear in its per-(token, head) terms, so its gradient w.r.t. P and the student tensors is known in
the forward up to the upstream scalar g: the forward writes G = ∂L/∂P (pair layout) and ∂L/∂S. The backward then
only needs the weight-gradient GEMM
    M_i(b) = Σ_t X_i(b, t)ᵀ G(b, t)        [F_i, C']
    ∂L/∂W_i = g Σ_b α_i(b) M_i(b),         ∂L/∂α_i(b) = g <W_i, M_i(b)>      (Frobenius product)
so no projected teacher tensor is ever stored and no GEMM is recomputed.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from triton.language.extra import libdevice
from triton.tools.tensor_descriptor import TensorDescriptor

from kvfuse.kernels import fused_kv_loss_op
from kvfuse.kernels.fused_kv_loss_op import (CODEC_CODES, MAX_TEACHERS, TeacherStorage, natural_layout,
                                             operand_dtypes, pair_width)
from kvfuse.kernels.utils import autotune_configs, cdiv, dot_dtype, interpreting

# Teacher storage, one code per teacher (fused_kv_loss_op.CODEC_CODES, kvfuse.codecs): plain tensor, fp8, int8 or
# int4 with per-channel or per-token scales (and offsets for int8 and int4).
CODEC_PLAIN = tl.constexpr(0)
CODEC_FP8_CHANNEL = tl.constexpr(CODEC_CODES["fp8", "channel"])
CODEC_FP8_TOKEN = tl.constexpr(CODEC_CODES["fp8", "token"])
CODEC_FP8_CHANNEL_F32 = tl.constexpr(CODEC_CODES["fp8", "channel/f32"])  # float32 scales (stores written before)
CODEC_FP8Z_CHANNEL = tl.constexpr(CODEC_CODES["fp8z", "channel"])  # fp8 with a zero point (offset) per channel
CODEC_INT8_CHANNEL = tl.constexpr(CODEC_CODES["int8", "channel"])  # from here on: integer codes with offsets
CODEC_INT8_CHANNEL_F32 = tl.constexpr(CODEC_CODES["int8", "channel/f32"])  # float32 side data (stores written before)
CODEC_INT4_CHANNEL = tl.constexpr(CODEC_CODES["int4", "channel"])  # from here on: two codes per byte
CODEC_INT4D_CHANNEL = tl.constexpr(CODEC_CODES["int4d", "channel"])  # int4, dithered: the two largest codes
DITHER_T = tl.constexpr(fused_kv_loss_op.DITHER_T)
DITHER_M1 = tl.constexpr(fused_kv_loss_op.DITHER_M1)
DITHER_M2 = tl.constexpr(fused_kv_loss_op.DITHER_M2)
# Folded side data (fused_kv_loss_op.FOLD_EXP): the bits decodes' results are the value times 2^-8 (fp8, fp8z) or
# 2^-21 (int8); the fp32 decode multiplies a folded scale and offset back out
FP8_FOLD_GAIN = tl.constexpr(2.0 ** (120 - fused_kv_loss_op.FOLD_EXP))
INT8_FOLD_GAIN = tl.constexpr(2.0 ** (133 - fused_kv_loss_op.FOLD_EXP))
SCALE_UNFOLD = tl.constexpr(2.0 ** -fused_kv_loss_op.FOLD_EXP)
FP8_OFFSET_UNFOLD = tl.constexpr(2.0 ** -fused_kv_loss_op.FP8_OFFSET_EXP)
OFFSET_UNFOLD = tl.constexpr(2.0 ** -fused_kv_loss_op.INT8_OFFSET_EXP)

# RoPE angles are reduced to [−π, π] with 2π split in two fp32 constants (Cody–Waite), then go to the SFU's
# approximate sine and cosine; the interpreter has no libdevice, so it takes tl.sin/tl.cos of the reduced angle.
FAST_TRIG = tl.constexpr(not interpreting())
ASM_DECODE = tl.constexpr(not interpreting())  # inline PTX (_fp8_to_bf16, _int8_to_bf16) has no interpreter
INV_TWO_PI = tl.constexpr(0.15915494309189535)
TWO_PI_HI = tl.constexpr(6.2831854820251465)  # float32(2π)
TWO_PI_LO = tl.constexpr(-1.7484555314695172e-07)  # 2π − TWO_PI_HI


@triton.jit
def _per_head(x, BLOCK_T: tl.constexpr, HPP: tl.constexpr, PH: tl.constexpr):
    """[BLOCK_T, HPP·PH] -> [BLOCK_T, HPP]: sums over each head's pair columns."""
    if HPP == 1:
        return tl.sum(x, axis=1)[:, None]
    else:
        return tl.sum(tl.reshape(x, (BLOCK_T, HPP, PH)), axis=2)


@triton.jit
def _to_columns(y, BLOCK_T: tl.constexpr, HPP: tl.constexpr, PH: tl.constexpr):
    """[BLOCK_T, HPP] -> something that broadcasts against [BLOCK_T, HPP·PH] (each head's value on its columns)."""
    if HPP == 1:
        return y
    else:
        return tl.reshape(tl.broadcast_to(y[:, :, None], (BLOCK_T, HPP, PH)), (BLOCK_T, HPP * PH))


@triton.jit
def _pair_dims(l, j, rot_ptr, invf_ptr, stride_il, scaling_ptr, D_S: tl.constexpr, ROT: tl.constexpr,
               IS_KEY: tl.constexpr):
    """For pair column j of a head in layer l: its two student dims (−1: padding), and RoPE frequency and scale.

    ROT is the rotary dim that fixes the pairing; a layer whose rot_ptr entry is 0 (NoPE) gets frequency 0 and
    scale 1, i.e. the identity."""
    HALF_D: tl.constexpr = D_S // 2
    R2: tl.constexpr = ROT // 2
    valid = j < HALF_D
    if ROT == D_S:
        d1 = j
        d2 = j + HALF_D
    else:
        rotated = j < R2
        d1 = tl.where(rotated, j, ROT + j - R2)
        d2 = tl.where(rotated, j + R2, ROT + (D_S - ROT) // 2 + j - R2)
    d1 = tl.where(valid, d1, -1)
    d2 = tl.where(valid, d2, -1)
    if IS_KEY:
        turn = (j < R2) & (tl.load(rot_ptr + l) != 0)
        # Clamped index instead of a masked load: inv_freq holds at least R2 entries per layer.
        freq = tl.where(turn, tl.load(invf_ptr + l * stride_il + tl.minimum(j, R2 - 1)), 0.0)
        scale = tl.where(turn, tl.load(scaling_ptr + l), tl.where(valid, 1.0, 0.0))
    else:
        freq = j * 0.0
        scale = tl.where(valid, 1.0, 0.0)
    return d1, d2, freq, scale


@triton.jit
def _reduce_angle(ang):
    """ang − 2πk in [−π, π] (k the nearest integer to ang/2π). Each fma rounds once, so the result is within
    ≈ 2e-7 of the exact remainder of the fp32 angle for |ang| < 2^24·π."""
    k = tl.floor(ang * INV_TWO_PI + 0.5)
    r = tl.fma(-k, TWO_PI_HI, ang)
    return tl.fma(-k, TWO_PI_LO, r)


@triton.jit
def _rope_cos_sin(ang):
    """(cos, sin) of fp32 angles: the SFU's sin.approx/cos.approx (≈ 2^-21 absolute error on [−π, π]) of the
    reduced angle, far below the bf16 rounding the student applies to its own cos/sin tables. libdevice's
    sinf/cosf carry a Payne–Hanek slow path that made the key pass four times the code of the value pass, with a
    stack frame (bench/NOTES.md)."""
    r = _reduce_angle(ang)
    if FAST_TRIG:
        return libdevice.fast_cosf(r), libdevice.fast_sinf(r)
    else:
        return tl.cos(r), tl.sin(r)


@triton.jit
def _fp8_to_bf16(raw, s, SCALED: tl.constexpr, o=None, OFFSET: tl.constexpr = False):
    """e4m3 codes to bf16, exact, on full-rate integer and half-precision pipes instead of the conversion unit (a
    quarter of their rate on sm_90, bench/NOTES.md "Compressed teachers"): the sign at bit 15 and the seven exponent
    and mantissa bits at bits 10..4 make the bf16 of value·2^-120 (codes of exponent 0, zeros and subnormals, become
    bf16 subnormals, which bf16 arithmetic keeps). Unscaled, one multiply by 2^120 restores the value. SCALED, one
    multiply by s (bf16 scale·2^FOLD_EXP) makes value·scale·2^(FOLD_EXP − 120), rounded once as the fp32
    product value·scale (exact: 4 by 8 significant bits) rounds to bf16, while that stays a normal bf16
    (|value·scale| ≥ 2^-118). OFFSET (fp8z), the same FMA adds o (offset·2^(FOLD_EXP − 120)): (value·scale +
    offset)·2^(FOLD_EXP − 120), rounded once."""
    if ASM_DECODE:
        # two codes per instance: prmt sign-extends each byte into a 16-bit half, then shift, mask, multiply
        if OFFSET:
            return tl.inline_asm_elementwise(
                "{ .reg .b32 r; cvt.u32.u16 r, $1;"
                " prmt.b32 $0, r, 0, 0x9180; shl.b32 $0, $0, 4; and.b32 $0, $0, 0x87F087F0;"
                " fma.rn.bf16x2 $0, $0, $2, $3; }",
                "=r,h,r,r", [raw.to(tl.uint8, bitcast=True), s, o], dtype=tl.bfloat16, is_pure=True, pack=2)
        elif SCALED:
            return tl.inline_asm_elementwise(
                "{ .reg .b32 r, z; mov.b32 z, 0x80008000; cvt.u32.u16 r, $1;"
                " prmt.b32 $0, r, 0, 0x9180; shl.b32 $0, $0, 4; and.b32 $0, $0, 0x87F087F0;"
                " fma.rn.bf16x2 $0, $0, $2, z; }",
                "=r,h,r", [raw.to(tl.uint8, bitcast=True), s], dtype=tl.bfloat16, is_pure=True, pack=2)
        else:
            return tl.inline_asm_elementwise(
                "{ .reg .b32 t, z; mov.b32 t, 0x7B807B80; mov.b32 z, 0x80008000; prmt.b32 $0, $1, $2, 0xC480;"
                " shl.b32 $0, $0, 4; and.b32 $0, $0, 0x87F087F0; fma.rn.bf16x2 $0, $0, t, z; }",
                "=r,r,r", [raw.to(tl.uint8, bitcast=True).to(tl.uint32)], dtype=tl.bfloat16, is_pure=True, pack=2)
    else:  # the same bits, spelled in Triton for the interpreter
        b = raw.to(tl.int8, bitcast=True).to(tl.int32)
        x = ((b << 20) & -2014314496).to(tl.float32, bitcast=True)  # 0x87F00000 as int32: the bf16 bits, in fp32
        if OFFSET:
            x = x * s.to(tl.float32) + o.to(tl.float32)
        elif SCALED:
            x = x * s.to(tl.float32)
        else:
            x = x * 1.329227995784916e36  # 2^120
        return _round_to_bf16(x)


@triton.jit
def _round_to_bf16(x):
    # fp32 to bf16 rounding to nearest even, in integers: the interpreter's float-to-bf16 cast truncates
    u = x.to(tl.uint32, bitcast=True)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _int8_to_bf16(raw, s, o):
    """int8 codes to bf16, exact, with no conversion: the byte q as the bf16 bits 0x00qq is q·2^-133 (a subnormal
    below 128; from 128 on the code's top bit is the exponent's lowest, and both binades step by 2^-133), so one bf16
    FMA by s (scale·2^FOLD_EXP) plus o (offset·2^(FOLD_EXP − 133)) makes (q·scale + offset)·2^-21, rounded once —
    as the fp32 decode rounds q·scale + offset (q·scale is exact in fp32) while that stays a normal bf16 (|x| ≥
    2^-105). Per two codes: one byte permute and one FMA, where the fp32 decode takes two ORs, two adds, two FMAs
    and a conversion."""
    if ASM_DECODE:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 r; cvt.u32.u16 r, $1; prmt.b32 r, r, 0, 0x4140; fma.rn.bf16x2 $0, r, $2, $3; }",
            "=r,h,r,r", [raw, s, o], dtype=tl.bfloat16, is_pure=True, pack=2)
    else:  # the same value in fp32, rounded as the FMA rounds; 2^-133 as 2^-120 · 2^-13 (fp32 constants stay normal)
        q = (raw.to(tl.uint32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        return _round_to_bf16(q * (s.to(tl.float32) * 7.52316384526264e-37 * 1.220703125e-4) + o.to(tl.float32))


@triton.jit
def _bf16_side(p, grp, d, D_I: tl.constexpr):
    # per-channel bf16 side data of group grp (a FOLDED codec's), whether p points at a bf16 tensor or into the
    # forward's fp32 codec buffer (which holds it as bf16 pairs); channels past D_i load 0
    return tl.load(p.to(tl.pointer_type(tl.bfloat16)) + grp * D_I + d, mask=d < D_I, other=0.0)


@triton.jit
def _decode(raw, sc, of, grp, t, t_ok, d, T, D_I: tl.constexpr, CODEC: tl.constexpr, BLOCK_T: tl.constexpr,
            BLOCK_K: tl.constexpr):
    """A compressed teacher tile in registers, fp32 [BLOCK_T, BLOCK_K] (kvfuse.codecs holds the layout and the
    reference decode). raw: fp8 or int8 codes [BLOCK_T, BLOCK_K], or int4 bytes [BLOCK_T, BLOCK_K/2] (even channel
    in the low nibble); grp = (l·B + b)·H_i + head indexes the scales: [.., D_i] per channel or [.., T] per token."""
    if CODEC >= CODEC_INT8_CHANNEL:
        # float(code) as (2^23 + code) - 2^23: an OR and an add on full-rate pipes, exact, where the int-to-float
        # conversion runs at a quarter of their rate on sm_90 and its results wait on a scoreboard (the weight
        # gradient's loop stalled on them: bench/NOTES.md "Compressed teachers")
        q = raw.to(tl.uint32)
        if CODEC >= CODEC_INT4_CHANNEL:
            q = tl.join(q & 0xF, q >> 4).reshape(BLOCK_T, BLOCK_K)
        q = (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    else:
        q = raw.to(tl.float32)
    FP8_CH: tl.constexpr = CODEC == CODEC_FP8_CHANNEL or CODEC == CODEC_FP8_CHANNEL_F32
    OFFSETS: tl.constexpr = CODEC >= CODEC_INT8_CHANNEL or CODEC == CODEC_FP8Z_CHANNEL
    PER_CHANNEL: tl.constexpr = (FP8_CH or CODEC == CODEC_FP8Z_CHANNEL or CODEC == CODEC_INT8_CHANNEL
                                 or CODEC == CODEC_INT8_CHANNEL_F32 or CODEC == CODEC_INT4_CHANNEL
                                 or CODEC == CODEC_INT4D_CHANNEL)
    FOLDED: tl.constexpr = (CODEC == CODEC_FP8_CHANNEL or CODEC == CODEC_FP8Z_CHANNEL
                            or CODEC == CODEC_INT8_CHANNEL)  # bf16 side data, folded
    if FOLDED:
        sv = (_bf16_side(sc, grp, d, D_I).to(tl.float32) * SCALE_UNFOLD)[None, :]
        if CODEC == CODEC_FP8Z_CHANNEL:
            ov = (_bf16_side(of, grp, d, D_I).to(tl.float32) * FP8_OFFSET_UNFOLD)[None, :]
        elif not FP8_CH:
            ov = (_bf16_side(of, grp, d, D_I).to(tl.float32) * OFFSET_UNFOLD)[None, :]
    elif PER_CHANNEL:
        d_ok = d < D_I
        sv = tl.load(sc + grp * D_I + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        if not FP8_CH:
            ov = tl.load(of + grp * D_I + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    else:
        sv = tl.load(sc + grp * T + t, mask=t_ok, other=0.0).to(tl.float32)[:, None]
        if CODEC != CODEC_FP8_TOKEN:
            ov = tl.load(of + grp * T + t, mask=t_ok, other=0.0).to(tl.float32)[:, None]
    if CODEC >= CODEC_INT4D_CHANNEL:
        # kvfuse.codecs.int4_dither: lowbias32 of (t·DITHER_T + d) xor the scale's fp32 bits, in uint32 (wrapping
        # products, logical shifts), its top 24 bits exact in fp32
        h = ((t.to(tl.uint32) * DITHER_T)[:, None] + d.to(tl.uint32)[None, :]) ^ sv.to(tl.uint32, bitcast=True)
        h = (h ^ (h >> 16)) * DITHER_M1
        h = (h ^ (h >> 15)) * DITHER_M2
        h = h ^ (h >> 16)
        q = q - ((h >> 8).to(tl.float32) * (1.0 / 16777216.0) - 0.5)
    if OFFSETS:
        return q * sv + ov
    else:
        return q * sv


@triton.jit
def _x_tile(x, sc, of, sx0, sx1, sx2, sx3, l, b, hi, t0, d0, B, T, H_I, D_I: tl.constexpr, CODEC: tl.constexpr,
            USE_DESC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, UNSCALED: tl.constexpr = False,
            FOLD: tl.constexpr = False):
    """Teacher tile [BLOCK_T tokens from t0, BLOCK_K dims from d0] of head hi: as stored for a plain teacher,
    decoded to fp32 for a compressed one — with FOLD (bf16 products), per-channel fp8, fp8z and int8 with bf16 side
    data to bf16 times 2^-8 (fp8, fp8z) or 2^-21 (int8) from their folded side data (fused_kv_loss_op.fold_side_data).
    With USE_DESC, x is a TMA descriptor (for int4 over the packed bytes)."""
    PACK: tl.constexpr = 2 if CODEC >= CODEC_INT4_CHANNEL else 1
    W: tl.constexpr = BLOCK_K // PACK
    t = t0 + tl.arange(0, BLOCK_T)
    t_ok = t < T
    if USE_DESC:
        raw = x.load([l, b, hi, t0, d0 // PACK]).reshape(BLOCK_T, W)
    else:
        e = d0 // PACK + tl.arange(0, W)
        tile = x + l * sx0 + b * sx1 + hi * sx2 + t[:, None] * sx3 + e[None, :]
        ok = t_ok[:, None] & (e < D_I // PACK)[None, :]
        if CODEC != CODEC_PLAIN:
            raw = tl.load(tile, mask=ok)  # no `other`: fp8 has no integer zero to cast; zeroed after decoding
        elif D_I % BLOCK_K == 0:
            raw = tl.load(tile, mask=t_ok[:, None], other=0)
        else:
            raw = tl.load(tile, mask=ok, other=0)
    if CODEC == CODEC_PLAIN:
        return raw
    else:
        d = d0 + tl.arange(0, BLOCK_K)
        grp = (l.to(tl.int64) * B + b) * H_I + hi
        if UNSCALED:  # per-channel fp8 codes for a caller that scales the product's rows instead (_dw_tile)
            xd = _fp8_to_bf16(raw, None, False)
        elif CODEC == CODEC_FP8_CHANNEL and FOLD:
            # code·scale·2^-8 rounded once to bf16, as the fp32 decode rounds code·scale: sc holds bf16 values
            # scale·2^FOLD_EXP, and the caller's α carries the 2^8 back
            sv = _bf16_side(sc, grp, d, D_I)
            xd = _fp8_to_bf16(raw, tl.broadcast_to(sv[None, :], [BLOCK_T, BLOCK_K]), True)
        elif CODEC == CODEC_FP8Z_CHANNEL and FOLD:
            # (code·scale + offset)·2^-8 rounded once to bf16, as for fp8 with the offset in the same FMA
            sv = _bf16_side(sc, grp, d, D_I)
            ov = _bf16_side(of, grp, d, D_I)
            xd = _fp8_to_bf16(raw, tl.broadcast_to(sv[None, :], [BLOCK_T, BLOCK_K]), True,
                              tl.broadcast_to(ov[None, :], [BLOCK_T, BLOCK_K]), True)
        elif CODEC == CODEC_INT8_CHANNEL and FOLD:
            # (code·scale + offset)·2^-21 rounded once to bf16; the caller's α (or accumulator) carries the 2^21 back
            sv = _bf16_side(sc, grp, d, D_I)
            ov = _bf16_side(of, grp, d, D_I)
            xd = _int8_to_bf16(raw, tl.broadcast_to(sv[None, :], [BLOCK_T, BLOCK_K]),
                               tl.broadcast_to(ov[None, :], [BLOCK_T, BLOCK_K]))
        else:
            xd = _decode(raw, sc, of, grp, t, t_ok, d, T, D_I, CODEC, BLOCK_T, BLOCK_K)
        if not USE_DESC:
            xd = tl.where(t_ok[:, None] & (d < D_I)[None, :], xd, 0.0)
        elif D_I % BLOCK_K != 0:
            # a chunk that overhangs the head: the box's zero-filled dims past D_i must decode to 0, as the product
            # pairs them with the next head's adapter rows, and a per-token offset would make them its value
            xd = tl.where((d < D_I)[None, :], xd, 0.0)
        return xd


@triton.jit
def _w_tile(w, sw0, sw1, l, row0, col0, D_I: tl.constexpr, USE_DESC: tl.constexpr, BLOCK_K: tl.constexpr,
            WIDTH: tl.constexpr):
    """Adapter tile: rows [row0, row0 + BLOCK_K) of layer l (one head's, row0 = hi·D_i + d0), WIDTH columns from
    col0; rows past the head's D_i arrive as zeros."""
    if USE_DESC:
        return w.load([l, row0, col0]).reshape(BLOCK_K, WIDTH)
    else:
        d = row0 % D_I + tl.arange(0, BLOCK_K)
        tile = w + l * sw0 + (row0 + tl.arange(0, BLOCK_K))[:, None] * sw1 + (col0 + tl.arange(0, WIDTH))[None, :]
        if D_I % BLOCK_K == 0:
            return tl.load(tile)
        else:
            return tl.load(tile, mask=(d < D_I)[:, None], other=0.0)


@triton.jit
def _project_teacher(p1, p2, x, sc, of, sx0, sx1, sx2, sx3, w, sw0, sw1, l, b, t0, col0, B, T,
                     W2_OFF: tl.constexpr, H_I: tl.constexpr, D_I: tl.constexpr, CODEC: tl.constexpr,
                     DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, USE_DESC: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_K: tl.constexpr, CB: tl.constexpr, WIDE: tl.constexpr):
    # K-loop over one teacher's features in chunks that never cross a head: the X tile is a box of one head's
    # [T, D_i] block (`_x_tile`, decoded in registers for a compressed teacher), the W tiles row blocks of the
    # adapter. With USE_DESC, x and w are TMA tensor descriptors ([L, B, H_i, T, D_i] and [L, F_i, C']): no
    # per-element addresses in registers, out-of-range rows and dims arrive as zeros. Otherwise plain pointers
    # (any alignment), unmasked along the contiguous axis when BLOCK_K divides D_i so loads stay 16-byte vectors.
    # WIDE (natural layout: a head's two column blocks are adjacent): one [BLOCK_K, 2·CB] W tile and one product
    # of N = 2·CB into p1 (p2 untouched), so each X tile feeds the tensor cores once instead of twice.
    CHUNKS: tl.constexpr = (D_I + BLOCK_K - 1) // BLOCK_K
    for kk in range(0, H_I * CHUNKS):
        hi = kk // CHUNKS
        d0 = (kk % CHUNKS) * BLOCK_K
        xt = _x_tile(x, sc, of, sx0, sx1, sx2, sx3, l, b, hi, t0, d0, B, T, H_I, D_I, CODEC, USE_DESC, BLOCK_T,
                     BLOCK_K, False, DOT_DTYPE == tl.bfloat16).to(DOT_DTYPE)
        if WIDE:
            wt = _w_tile(w, sw0, sw1, l, hi * D_I + d0, col0, D_I, USE_DESC, BLOCK_K, 2 * CB).to(DOT_DTYPE)
            if IEEE:
                p1 = tl.dot(xt, wt, p1, input_precision="ieee")
            else:
                p1 = tl.dot(xt, wt, p1)
        else:
            w1 = _w_tile(w, sw0, sw1, l, hi * D_I + d0, col0, D_I, USE_DESC, BLOCK_K, CB).to(DOT_DTYPE)
            w2 = _w_tile(w, sw0, sw1, l, hi * D_I + d0, col0 + W2_OFF, D_I, USE_DESC, BLOCK_K, CB).to(DOT_DTYPE)
            if IEEE:
                p1 = tl.dot(xt, w1, p1, input_precision="ieee")
                p2 = tl.dot(xt, w2, p2, input_precision="ieee")
            else:
                p1 = tl.dot(xt, w1, p1)
                p2 = tl.dot(xt, w2, p2)
    return p1, p2


@triton.jit
def _pick(i: tl.constexpr, a0, a1, a2, a3, a4, a5, a6, a7):
    # Per-teacher tensors travel as eight separate arguments rather than a tuple: triton 3.6's launcher cannot
    # expand TMA descriptors nested in tuples. i is a compile-time index, so this selection costs nothing.
    if i == 0:
        return a0
    elif i == 1:
        return a1
    elif i == 2:
        return a2
    elif i == 3:
        return a3
    elif i == 4:
        return a4
    elif i == 5:
        return a5
    elif i == 6:
        return a6
    else:
        return a7


@triton.jit
def _fused_kv_fwd_kernel(
    x0, x1, x2, x3, x4, x5, x6, x7, w0, w1, w2, w3, w4, w5, w6, w7, x_strides, w_strides, codec_buf, codec_offs,
    HEADS: tl.constexpr, DIMS: tl.constexpr, CODECS: tl.constexpr, N: tl.constexpr,
    alpha_ptr, stride_ab, stride_al, stride_an,
    s, ss0, ss1, ss2, ss3,
    mask_ptr, pos_ptr, rot_ptr, invf_ptr, stride_il, scaling_ptr,
    coef_mse_ptr, coef_cos_ptr,
    sq_ptr, cos_ptr, g, ds,
    B, T, n_t_slots, n_h_slots,
    H_S: tl.constexpr, D_S: tl.constexpr, PH: tl.constexpr, ROT: tl.constexpr,
    IS_KEY: tl.constexpr, COMPUTE_GRAD: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
    USE_DESC: tl.constexpr, EPI_DESC: tl.constexpr, NATURAL: tl.constexpr, W2_OFF: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, HPP: tl.constexpr, WIDE: tl.constexpr,
):
    # One program: token tile × HPP student heads × (layer l, batch row b). Consecutive programs share (l, b),
    # so a layer's adapters stay in L2 while its token tiles stream through. With EPI_DESC (standard pairs, one
    # head per program) S, ∂L/∂S and G move as TMA boxes too, so no [tile × columns] address tensor ever lives in
    # registers; otherwise s, g, ds are pointers (any pairing, any alignment).
    #   forward   p     = Σ_i α_i X_i W_i[:, cols]                      (fp32 accumulation, α on the accumulator)
    #             k     = R p:  k1 = s(p1 cos − p2 sin), k2 = s(p2 cos + p1 sin)
    #             sq    = Σ (S − k)²,   cs = <S, k> / max(|S||k|, 1e-8)   per (token, head)
    # With cm = 2 λ c_l / (n H_s D_s), cc = β c_l / (2 n H_s) and c_l = w_l / Σ w (∂L/∂cs = −cc·m):
    #   ∂L/∂k = m (−cm (S − k) − cc ∂cs/∂k),   ∂L/∂S = m (cm (S − k) − cc ∂cs/∂S)
    #   ∂cs/∂k = S/den − cs·k/|k|²,  ∂cs/∂S = k/den − cs·S/|S|²   (den = |S||k|; below 1e-8 only S/1e-8, k/1e-8)
    #   G = Rᵀ ∂L/∂k:  G1 = s(g1 cos + g2 sin),  G2 = s(g2 cos − g1 sin)
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_lb = tl.program_id(2)
    l32 = pid_lb // B
    b32 = pid_lb % B
    l = l32.to(tl.int64)
    b = b32.to(tl.int64)
    CB: tl.constexpr = HPP * PH
    HALF_COLS: tl.constexpr = H_S * PH

    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    c = tl.arange(0, CB)
    col0 = pid_h * CB * (1 + NATURAL)  # natural layout: head h's columns start at h·D_s = h·2·PH
    col = col0 + c
    j = c % PH
    h = (pid_h * HPP + c // PH).to(tl.int64)

    # WIDE: p1 holds both column blocks [BLOCK_T, 2·CB] until the split below; p2 stays an unused zero tile (the
    # compiler drops it).
    p1 = tl.zeros([BLOCK_T, CB * (1 + WIDE)], dtype=tl.float32)
    p2 = tl.zeros([BLOCK_T, CB], dtype=tl.float32)
    a_base = alpha_ptr + b * stride_ab + l * stride_al
    a_prev = tl.load(a_base).to(tl.float32) * 0.0 + 1.0
    for i in tl.static_range(N):
        a_i = tl.load(a_base + i * stride_an).to(tl.float32)
        if (CODECS[i] == CODEC_FP8_CHANNEL or CODECS[i] == CODEC_FP8Z_CHANNEL) and DOT_DTYPE == tl.bfloat16:
            a_i = a_i * FP8_FOLD_GAIN  # its tiles decode to value·2^-8 (`_x_tile`)
        if CODECS[i] == CODEC_INT8_CHANNEL and DOT_DTYPE == tl.bfloat16:
            a_i = a_i * INT8_FOLD_GAIN  # its tiles decode to value·2^-21
        if a_i != 0.0:
            r = a_prev / a_i
            p1 = p1 * r
            p2 = p2 * r
            sx = x_strides[i]
            # a compressed teacher's scales and offsets: two runs of one flat fp32 buffer (codec_offs[i])
            p1, p2 = _project_teacher(
                p1, p2, _pick(i, x0, x1, x2, x3, x4, x5, x6, x7), codec_buf + codec_offs[i][0],
                codec_buf + codec_offs[i][1], sx[0], sx[1], sx[2], sx[3],
                _pick(i, w0, w1, w2, w3, w4, w5, w6, w7), w_strides[i][0], w_strides[i][1],
                l32 if USE_DESC else l, b32 if USE_DESC else b, pid_t * BLOCK_T, col0, B, T, W2_OFF, HEADS[i],
                DIMS[i], CODECS[i], DOT_DTYPE, IEEE, USE_DESC, BLOCK_T, BLOCK_K, CB, WIDE)
            a_prev = a_i
    p1 = p1 * a_prev
    p2 = p2 * a_prev
    if WIDE:
        p1, p2 = tl.split(tl.permute(tl.reshape(p1, (BLOCK_T, 2, CB)), (0, 2, 1)))

    d1, d2, freq, scale = _pair_dims(l, j, rot_ptr, invf_ptr, stride_il, scaling_ptr, D_S, ROT, IS_KEY)
    if IS_KEY:
        pos = tl.load(pos_ptr + b * T + t, mask=t_ok, other=0).to(tl.float32)
        ang = pos[:, None] * freq[None, :]
        cos_a, sin_a = _rope_cos_sin(ang)
        cos_a = cos_a * scale[None, :]
        sin_a = sin_a * scale[None, :]
        k1 = p1 * cos_a - p2 * sin_a
        k2 = p2 * cos_a + p1 * sin_a
    else:
        k1 = p1
        k2 = p2

    HALF_D: tl.constexpr = D_S // 2
    tc_ok = t_ok[:, None] & (d1 >= 0)[None, :]
    if EPI_DESC:
        # Standard pairs, one head per program: the two halves of the head are two boxes of S (and of ∂L/∂S).
        s1 = s.load([l32, b32, pid_h, pid_t * BLOCK_T, 0]).reshape(BLOCK_T, CB).to(tl.float32)
        s2 = s.load([l32, b32, pid_h, pid_t * BLOCK_T, HALF_D]).reshape(BLOCK_T, CB).to(tl.float32)
    else:
        s_base = s + l * ss0 + b * ss1 + h[None, :] * ss2 + t[:, None] * ss3
        s1 = tl.load(s_base + d1[None, :], mask=tc_ok, other=0.0).to(tl.float32)
        s2 = tl.load(s_base + d2[None, :], mask=tc_ok, other=0.0).to(tl.float32)
    m = tl.load(mask_ptr + b * T + t, mask=t_ok, other=0).to(tl.float32)

    sq = tl.sum(tl.sum((s1 - k1) * (s1 - k1) + (s2 - k2) * (s2 - k2), axis=1) * m, axis=0)
    sk = _per_head(s1 * k1 + s2 * k2, BLOCK_T, HPP, PH)
    ss = _per_head(s1 * s1 + s2 * s2, BLOCK_T, HPP, PH)
    kk = _per_head(k1 * k1 + k2 * k2, BLOCK_T, HPP, PH)
    den_raw = tl.sqrt(ss) * tl.sqrt(kk)
    big = den_raw > 1e-8
    den = tl.where(big, den_raw, 1e-8)
    cs = sk / den
    out = (pid_lb * n_t_slots + pid_t) * n_h_slots + pid_h
    tl.store(sq_ptr + out, sq)
    tl.store(cos_ptr + out, tl.sum(tl.sum(cs, axis=1) * m, axis=0))

    if COMPUTE_GRAD:
        # Both gradients are per-(token, head) combinations of S and k, so no difference tensor stays live:
        #   ∂L/∂k = m((cm + cc·cs/|k|²) k − (cm + cc/den) S),   ∂L/∂S = m((cm + cc·cs/|S|²) S − (cm + cc/den) k)
        # (where den was clamped the reference's clamp passes no gradient through |S||k|: the cs/|·|² terms drop).
        cm = tl.load(coef_mse_ptr + l)
        cc = tl.load(coef_cos_ptr + l)
        mh = m[:, None]
        both = _to_columns(mh * (cm + cc / den), BLOCK_T, HPP, PH)
        on_k = _to_columns(mh * (cm + cc * tl.where(big, cs / tl.where(big, kk, 1.0), 0.0)), BLOCK_T, HPP, PH)
        on_s = _to_columns(mh * (cm + cc * tl.where(big, cs / tl.where(big, ss, 1.0), 0.0)), BLOCK_T, HPP, PH)
        if EPI_DESC:
            ds_ty: tl.constexpr = ds.dtype
            g_ty: tl.constexpr = g.dtype
        else:
            ds_ty: tl.constexpr = ds.dtype.element_ty
            g_ty: tl.constexpr = g.dtype.element_ty
        f1 = (on_s * s1 - both * k1).to(ds_ty)
        f2 = (on_s * s2 - both * k2).to(ds_ty)
        g1 = on_k * k1 - both * s1
        g2 = on_k * k2 - both * s2
        if IS_KEY:
            r1 = g1 * cos_a + g2 * sin_a
            r2 = g2 * cos_a - g1 * sin_a
        else:
            r1 = g1
            r2 = g2
        r1 = r1.to(g_ty)
        r2 = r2.to(g_ty)
        if EPI_DESC:
            ds.store([l32, b32, pid_h, pid_t * BLOCK_T, 0], f1.reshape(1, 1, 1, BLOCK_T, CB))
            ds.store([l32, b32, pid_h, pid_t * BLOCK_T, HALF_D], f2.reshape(1, 1, 1, BLOCK_T, CB))
            g.store([l32, b32, pid_t * BLOCK_T, col0], r1.reshape(1, 1, BLOCK_T, CB))
            g.store([l32, b32, pid_t * BLOCK_T, col0 + W2_OFF], r2.reshape(1, 1, BLOCK_T, CB))
        else:
            g_rows = g + ((l * B + b) * T + t[:, None]) * (2 * HALF_COLS) + col[None, :]
            tl.store(g_rows, r1, mask=t_ok[:, None])
            tl.store(g_rows + W2_OFF, r2, mask=t_ok[:, None])
            ds_base = ds + (((l * B + b) * H_S + h[None, :]) * T + t[:, None]) * D_S
            tl.store(ds_base + d1[None, :], f1, mask=tc_ok)
            tl.store(ds_base + d2[None, :], f2, mask=tc_ok)


@triton.jit
def _dw_tile(x, sc, of, sx0, sx1, sx2, sx3, w_ptr, sw0, sw1, g, dw_ptr, dalpha_ptr, alpha_ptr, stride_ab, stride_al,
             g_out, l32, B, T, N_FBLK, N_CBLK, H_I, D_I: tl.constexpr, C2: tl.constexpr, CODEC: tl.constexpr,
             DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, USE_DESC: tl.constexpr, BLOCK_F: tl.constexpr,
             BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
    # Adapter tile W_i[l][f-block, c-block] (pair layout), the f-block inside one teacher head so the X tile is a
    # box of that head's [T, D_i] block. For each batch row b:
    #   M(b)    = Σ_t X_i(b, t)[f]ᵀ G(b, t)[c]            (fp32 accumulation over the T axis)
    #   ∂α_i(b) += g Σ_{f,c} W[f, c] M(b)[f, c]           (partial over this tile, stored in its own slot)
    #   ∂W[f, c] = g Σ_b α_i(b) M(b)[f, c]
    # G already carries the mask (zero on padded tokens and padding columns), so those contribute nothing; with
    # USE_DESC, x [L, B, H_i, T, D_i] and g [L, B, T, C'] are TMA descriptors (rows past T arrive as zeros).
    FP8_CH: tl.constexpr = CODEC == CODEC_FP8_CHANNEL or CODEC == CODEC_FP8_CHANNEL_F32
    INT8_FOLD: tl.constexpr = CODEC == CODEC_INT8_CHANNEL and DOT_DTYPE == tl.bfloat16
    FP8Z_FOLD: tl.constexpr = CODEC == CODEC_FP8Z_CHANNEL and DOT_DTYPE == tl.bfloat16
    pid_c = tl.program_id(0)
    pid_f = tl.program_id(1)
    l = l32.to(tl.int64)
    CHUNKS: tl.constexpr = (D_I + BLOCK_F - 1) // BLOCK_F
    hi = pid_f // CHUNKS
    d0 = (pid_f % CHUNKS) * BLOCK_F
    d = d0 + tl.arange(0, BLOCK_F)
    f = hi * D_I + d
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    d_ok = d < D_I
    c_ok = c < C2
    fc_ok = d_ok[:, None] & c_ok[None, :]
    w_off = l * sw0 + f[:, None] * sw1 + c[None, :]

    dw = tl.zeros([BLOCK_F, BLOCK_C], dtype=tl.float32)
    for bb in range(0, B):
        mb = tl.zeros([BLOCK_F, BLOCK_C], dtype=tl.float32)
        if not USE_DESC:
            x_base = x + l * sx0 + bb * sx1 + hi * sx2 + d[:, None]
            g_base = g + (l * B + bb) * T * C2 + c[None, :]
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            t_ok = t < T
            if CODEC != CODEC_PLAIN:
                xt = tl.trans(_x_tile(x, sc, of, sx0, sx1, sx2, sx3, l32 if USE_DESC else l, bb, hi, t0, d0, B, T,
                                      H_I, D_I, CODEC, USE_DESC, BLOCK_T, BLOCK_F, FP8_CH, INT8_FOLD or FP8Z_FOLD))
            elif USE_DESC:
                xt = tl.trans(x.load([l32, bb, hi, t0, d0]).reshape(BLOCK_T, BLOCK_F))
            elif D_I % BLOCK_F == 0:
                xt = tl.load(x_base + t[None, :] * sx3, mask=t_ok[None, :], other=0.0)
            else:
                xt = tl.load(x_base + t[None, :] * sx3, mask=d_ok[:, None] & t_ok[None, :], other=0.0)
            if USE_DESC:
                gt = g.load([l32, bb, t0, pid_c * BLOCK_C]).reshape(BLOCK_T, BLOCK_C)
            else:
                if C2 % BLOCK_C == 0:
                    gt = tl.load(g_base + t[:, None] * C2, mask=t_ok[:, None], other=0.0)
                else:
                    gt = tl.load(g_base + t[:, None] * C2, mask=t_ok[:, None] & c_ok[None, :], other=0.0)
            if IEEE:
                mb = tl.dot(xt.to(DOT_DTYPE), gt.to(DOT_DTYPE), mb, input_precision="ieee")
            else:
                mb = tl.dot(xt.to(DOT_DTYPE), gt.to(DOT_DTYPE), mb)
        if FP8_CH:  # X = Q·diag(s), so Xᵀ G = diag(s)·(Qᵀ G): the loop only places the codes' bits
            grp = (l * B + bb) * H_I + hi
            sv = tl.load(sc + grp * D_I + d, mask=d_ok, other=0.0).to(tl.float32)
            mb = mb * (sv * SCALE_UNFOLD if CODEC == CODEC_FP8_CHANNEL else sv)[:, None]
        if INT8_FOLD:  # the loop's tiles were the values·2^-21
            mb = mb * INT8_FOLD_GAIN
        if FP8Z_FOLD:  # the values·2^-8 (an offset does not leave the product as fp8's scale does: it is decoded)
            mb = mb * FP8_FOLD_GAIN
        a = tl.load(alpha_ptr + bb * stride_ab + l * stride_al).to(tl.float32)
        w = tl.load(w_ptr + w_off, mask=fc_ok, other=0.0).to(tl.float32)
        part = tl.sum(tl.sum(w * mb, axis=1), axis=0) * g_out
        tl.store(dalpha_ptr + ((l * B + bb) * N_FBLK + pid_f) * N_CBLK + pid_c, part)
        dw += a * mb
    tl.store(dw_ptr + w_off, (dw * g_out).to(dw_ptr.dtype.element_ty), mask=fc_ok)


@triton.jit
def _fused_kv_dw_kernel(
    x, sc, of, sx0, sx1, sx2, sx3, w_ptr, sw0, sw1, g, dw_ptr, dalpha_ptr,
    x_v, sc_v, of_v, sxv0, sxv1, sxv2, sxv3, w_v_ptr, swv0, swv1, g_v, dw_v_ptr, dalpha_v_ptr,
    alpha_ptr, stride_ab, stride_al, gout_ptr,
    B, T, L, N_FBLK, N_CBLK, H_I,
    D_I: tl.constexpr, C2: tl.constexpr, CODEC: tl.constexpr, CODEC_V: tl.constexpr, KINDS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, USE_DESC: tl.constexpr,
    BLOCK_F: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # One program: one adapter tile (_dw_tile) of teacher i's keys, or with KINDS = 2 of its values too: grid axis 2
    # runs over L layers of keys, then L of values (same shapes: one launch instead of two; host time counts at
    # small batches). With KINDS = 1 the *_v arguments are stand-ins, never read.
    g_out = tl.load(gout_ptr).to(tl.float32)
    pid2 = tl.program_id(2)
    if KINDS == 2:
        if pid2 >= L:
            _dw_tile(x_v, sc_v, of_v, sxv0, sxv1, sxv2, sxv3, w_v_ptr, swv0, swv1, g_v, dw_v_ptr, dalpha_v_ptr,
                     alpha_ptr, stride_ab, stride_al, g_out, pid2 - L, B, T, N_FBLK, N_CBLK, H_I, D_I, C2, CODEC_V,
                     DOT_DTYPE, IEEE, USE_DESC, BLOCK_F, BLOCK_C, BLOCK_T)
        else:
            _dw_tile(x, sc, of, sx0, sx1, sx2, sx3, w_ptr, sw0, sw1, g, dw_ptr, dalpha_ptr, alpha_ptr, stride_ab,
                     stride_al, g_out, pid2, B, T, N_FBLK, N_CBLK, H_I, D_I, C2, CODEC, DOT_DTYPE, IEEE, USE_DESC,
                     BLOCK_F, BLOCK_C, BLOCK_T)
    else:
        _dw_tile(x, sc, of, sx0, sx1, sx2, sx3, w_ptr, sw0, sw1, g, dw_ptr, dalpha_ptr, alpha_ptr, stride_ab,
                 stride_al, g_out, pid2, B, T, N_FBLK, N_CBLK, H_I, D_I, C2, CODEC, DOT_DTYPE, IEEE, USE_DESC,
                 BLOCK_F, BLOCK_C, BLOCK_T)


# Autotuning: a few tile shapes on the GPU, one small config under the interpreter (where every config would run
# serially on the CPU). Partial-sum buffers are laid out for the smallest tiles a config list holds and zero-filled;
# a launch stores into the block of slots its config's grid covers, so the callers reduce whole buffers
# (`_launch_tuned` zeroes them again after the autotuner's benchmark runs of other configs).
def _fwd_pre_hook(nargs):
    _fit_descriptors(nargs, nargs["BLOCK_T"], nargs["BLOCK_K"], nargs["HPP"] * nargs["PH"], nargs["WIDE"])


def _fit_descriptors(args: dict, block_t: int, block_k: int, cb: int, wide: bool) -> None:
    """Give the TMA descriptors (where the launch uses them) the boxes of the config about to run."""
    for i in range(MAX_TEACHERS):
        if isinstance(args[f"x{i}"], TensorDescriptor):
            packed = args["CODECS"][i] >= CODEC_INT4_CHANNEL  # two int4 codes per byte
            args[f"x{i}"].block_shape = [1, 1, 1, block_t, block_k // 2 if packed else block_k]
            args[f"w{i}"].block_shape = [1, block_k, 2 * cb if wide else cb]
    for name, box in (("s", [1, 1, 1, block_t, cb]), ("ds", [1, 1, 1, block_t, cb]), ("g", [1, 1, block_t, cb])):
        if isinstance(args[name], TensorDescriptor):
            args[name].block_shape = box


def _tma_ready(x: torch.Tensor) -> bool:
    """TMA needs a 16-byte aligned base, 16-byte aligned strides and a unit last stride (triton checks the same)."""
    size = x.element_size()
    return (x.is_cuda or interpreting()) and x.stride(-1) == 1 and x.data_ptr() % 16 == 0 \
        and all(st * size % 16 == 0 for st in x.stride()[:-1]) and x.dim() <= 5


def _packed_boxes_ok(codecs, width: str, interp_config: dict, gpu_configs) -> bool:
    """TMA boxes must span ≥ 16 bytes in their last dim: an int4 teacher's box is width/2 bytes, so it may use a
    descriptor only if every config that can run has width ≥ 32 (all GPU configs do; the interpreter's may not)."""
    if not any(c >= CODEC_INT4_CHANNEL for c in codecs):
        return True
    configs = [interp_config] if interpreting() else [c.kwargs for c in gpu_configs]
    return min(c[width] for c in configs) >= 32


def _dw_pre_hook(nargs):
    _fit_dw_descriptors(nargs, nargs["BLOCK_F"], nargs["BLOCK_C"], nargs["BLOCK_T"])


def _fit_dw_descriptors(args: dict, block_f: int, block_c: int, block_t: int) -> None:
    for x, g, codec in (("x", "g", "CODEC"), ("x_v", "g_v", "CODEC_V")):
        if isinstance(args[x], TensorDescriptor):
            args[x].block_shape = [1, 1, 1, block_t, block_f // 2 if args[codec] >= CODEC_INT4_CHANNEL else block_f]
            args[g].block_shape = [1, 1, block_t, block_c]


# Tile lists: candidates from the sm_90a register report (ptxas through triton's compiler, no GPU needed: 256-token
# tiles and two 128-dim heads per program spill kilobytes; the weight-gradient tiles keep two fp32 accumulators, M(b)
# and ∂W, so 128 × 128 over 8 warps is the largest whose loop runs without spills), then kept by their time on an H200
# (bench/tune_fused_loss.py, 16k tokens; bench/NOTES.md). Two heads per program stays for small head dims.
_FWD_CONFIGS_GPU = autotune_configs([
    ({"BLOCK_T": 64, "BLOCK_K": 64, "HPP": 1, "WIDE": False}, 4, 4),
    ({"BLOCK_T": 64, "BLOCK_K": 128, "HPP": 1, "WIDE": False}, 4, 3),
    ({"BLOCK_T": 128, "BLOCK_K": 128, "HPP": 1, "WIDE": False}, 8, 3),
    ({"BLOCK_T": 128, "BLOCK_K": 64, "HPP": 1, "WIDE": False}, 8, 4),
    ({"BLOCK_T": 64, "BLOCK_K": 64, "HPP": 2, "WIDE": False}, 4, 3),
    # one N = 2·PH product per X tile (natural layout only); 3 stages: at 4 the fp8 float32-scale forward came out
    # wrong on the packaged SmolLM2's store (bench/NOTES.md), and bf16 gains the same from the tile above at 4
    ({"BLOCK_T": 64, "BLOCK_K": 64, "HPP": 1, "WIDE": True}, 4, 3),
    ({"BLOCK_T": 128, "BLOCK_K": 64, "HPP": 1, "WIDE": True}, 8, 3),
    ({"BLOCK_T": 128, "BLOCK_K": 32, "HPP": 1, "WIDE": True}, 8, 4),
], _fwd_pre_hook)
_DW_CONFIGS_GPU = autotune_configs([
    ({"BLOCK_F": 128, "BLOCK_C": 128, "BLOCK_T": 64}, 8, 4),
    ({"BLOCK_F": 64, "BLOCK_C": 256, "BLOCK_T": 64}, 8, 4),
    ({"BLOCK_F": 128, "BLOCK_C": 64, "BLOCK_T": 64}, 4, 4),
    ({"BLOCK_F": 64, "BLOCK_C": 128, "BLOCK_T": 64}, 4, 3),
    # 128-token tiles: a coded teacher's loop is issue-bound, and its fixed part (barriers, TMA and index work, ≈ 90
    # instructions a trip) then spreads over twice the tokens: sm_90a issue slots per token·feature·column -18 to
    # -23 % for fp8 and int4 (bench/ptx_fused_loss.py). 64 × 256 at 128 tokens needs 246 KB of shared memory for
    # bf16 teachers at 3 stages, over the H200's 227 (_prune_dw)
    ({"BLOCK_F": 64, "BLOCK_C": 128, "BLOCK_T": 128}, 4, 3),
    ({"BLOCK_F": 128, "BLOCK_C": 128, "BLOCK_T": 128}, 8, 3),
    ({"BLOCK_F": 64, "BLOCK_C": 256, "BLOCK_T": 128}, 8, 3),
], _dw_pre_hook)
# Under the interpreter one config runs; tests may change these.
INTERP_FWD = {"BLOCK_T": 16, "BLOCK_K": 16, "HPP": 1, "WIDE": False}
INTERP_DW = {"BLOCK_F": 16, "BLOCK_C": 16, "BLOCK_T": 16}
_MIN_BLOCK_T = 16
_MIN_BLOCK_F = 16
_MIN_BLOCK_C = 16


# Configs triton 3.6 compiles wrong on sm_90a for some teacher codecs: found by bench/check_configs.py on the H200,
# where their results were off or differed from run to run (bench/NOTES.md "Compressed teachers"); every other tile
# and stage count there was exact and repeatable. Launches with such a teacher avoid them (`_miscompiled_fwd`, the
# one-stage rule in `_prune_dw`) while this is True; check_configs --raw turns it off to test a newer triton.
AVOID_MISCOMPILES = True


def _miscompiled_fwd(c: triton.Config, codecs) -> bool:
    # dithered int4 at 64 x 128 over 4 warps: up to 2x bf16 rounding off, different each run, at 2 and 3 stages
    return AVOID_MISCOMPILES and any(code >= CODEC_CODES["int4d", "channel"] for code in codecs) \
        and c.num_warps == 4 and (c.kwargs["BLOCK_T"], c.kwargs["BLOCK_K"]) == (64, 128)


def _prune_fwd(configs, nargs, **kwargs):
    # HPP heads per program must divide H_s (no masked heads) and keep the tile within 128 pair columns; WIDE
    # needs a head's two column blocks side by side (natural layout).
    meta = {**nargs, **kwargs}
    keep = [c for c in configs
            if meta["H_S"] % c.kwargs["HPP"] == 0 and c.kwargs["HPP"] * meta["PH"] <= max(128, meta["PH"])
            and not ((meta["EPI_DESC"] or meta["NATURAL"]) and c.kwargs["HPP"] != 1)
            and (meta["NATURAL"] or not c.kwargs["WIDE"]) and not _miscompiled_fwd(c, meta["CODECS"])]
    if keep:
        return keep
    base = next(c for c in configs if not _miscompiled_fwd(c, meta["CODECS"]))
    return [triton.Config({**base.kwargs, "HPP": 1, "WIDE": False}, num_warps=base.num_warps,
                          num_stages=base.num_stages, pre_hook=_fwd_pre_hook)]


def _miscompiled_dw(c: triton.Config, codecs) -> bool:
    # 4-warp tiles 128 x 64 x 64 and 64 x 128 x 128 over fp8 teachers of head dim 64 (the packaged SmolLM2's store,
    # T = 173, C' = 192): ∂α NaN or off by percents, different each run; exact with plain teachers there and at the
    # bench's shapes. Left out for every compressed teacher (its decode takes the same register-operand path) until
    # check_configs --shape packaged says otherwise for int4
    tile = (c.kwargs["BLOCK_F"], c.kwargs["BLOCK_C"], c.kwargs["BLOCK_T"])
    return AVOID_MISCOMPILES and any(code != CODEC_PLAIN for code in codecs) and c.num_warps == 4 \
        and tile in ((128, 64, 64), (64, 128, 128))


def _prune_dw(configs, nargs, **kwargs):
    # fp8 with per-token scales (values of fp8 stores written before 26a4f1e, or a caller's own encoding): triton
    # 3.6's sm_90a code for its decode is wrong once the loop is software-pipelined — on the H200 ∂W of such a
    # teacher came out 1-20 % off in 4- and 8-warp tiles at 2-4 stages, some differently on every run — and exact
    # at one stage (bench/NOTES.md, "Compressed teachers"). So those launches run unpipelined (a full step 1.67x
    # bf16's).
    meta = {**nargs, **kwargs}
    codecs = (meta["CODEC"], meta["CODEC_V"])
    if CODEC_PLAIN in codecs:  # a bf16 X tile of 128 tokens by 64 beside a 128 x 256 G tile: too much shared memory
        configs = [c for c in configs if (c.kwargs["BLOCK_C"], c.kwargs["BLOCK_T"]) != (256, 128)]
    configs = [c for c in configs if not _miscompiled_dw(c, codecs)]
    if AVOID_MISCOMPILES and CODEC_CODES["fp8", "token"] in codecs:
        return [triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=1, pre_hook=c.pre_hook) for c in configs]
    return configs


# T is not part of the key: in training every batch has another length, and re-tuning each one cost seconds per
# step; the best tile barely moves with T.
_fwd_tuned = triton.autotune(_FWD_CONFIGS_GPU, key=["H_S", "D_S", "PH", "ROT", "N", "HEADS", "DIMS", "CODECS",
                                                    "IS_KEY", "COMPUTE_GRAD", "DOT_DTYPE", "USE_DESC", "EPI_DESC",
                                                    "NATURAL"],
                             prune_configs_by={"early_config_prune": _prune_fwd})(_fused_kv_fwd_kernel)
_dw_tuned = triton.autotune(_DW_CONFIGS_GPU, key=["D_I", "C2", "CODEC", "CODEC_V", "KINDS", "DOT_DTYPE",
                                                  "USE_DESC"],
                            prune_configs_by={"early_config_prune": _prune_dw})(_fused_kv_dw_kernel)


_TUNED: dict = {}


def _launch_tuned(tuned, key: tuple, grid, args: dict, partials: tuple[torch.Tensor, ...] = ()) -> dict:
    """Launch through the autotuner the first time a key is seen, then straight with the config it chose (the
    autotuner's per-call dispatch — its key, argument dicts, pre-hook — costs host time that small batches cannot
    hide, bench/NOTES.md). `key` must determine the autotuner's own key. `partials`: zero-filled slot buffers the
    caller reduces whole; the tuning runs of other configs leave values in slots the chosen one does not write, so
    after tuning they are zeroed again and the chosen config runs once more. `args` (built per call) receives the
    config's meta-parameters. Returns them."""
    chosen = _TUNED.get((id(tuned), key))
    if chosen is None:
        tuned[grid](**args)
        cfg = tuned.best_config
        chosen = _TUNED[(id(tuned), key)] = cfg, cfg.all_kwargs()
        if not partials:
            return cfg.kwargs
        for t in partials:
            t.zero_()
    cfg, meta = chosen
    args.update(meta)
    if cfg.pre_hook is not None:
        cfg.pre_hook(args)
    tuned.fn[grid(cfg.kwargs)](**args)
    return cfg.kwargs


def _alpha_strides(alpha: torch.Tensor) -> tuple[int, int, int]:
    if alpha.dim() == 2:
        return alpha.stride(0), 0, alpha.stride(1)
    return alpha.stride(0), alpha.stride(1), alpha.stride(2)


def _fp32_words(side: torch.Tensor) -> torch.Tensor:
    """Side data as fp32 words of the codec buffer: bf16 values (the FOLDED codecs', loaded as bf16) in pairs, padded
    to an even count, anything else converted to fp32."""
    if side.dtype != torch.bfloat16:
        return side.reshape(-1).to(torch.float32)
    flat = side.reshape(-1)
    return (flat if flat.numel() % 2 == 0 else torch.nn.functional.pad(flat, (0, 1))).view(torch.float32)


def _codec_buffer(scales, offsets, N: int, stand_in: torch.Tensor):
    """The compressed teachers' scales and offsets as one flat fp32 buffer (`_fp32_words`) and each teacher's (scale,
    offset) element offsets into it: two kernel arguments instead of sixteen, and none to build for plain teachers
    (their offsets point at a stand-in the kernels never read)."""
    scales = None if scales is None else [None if t is None else _fp32_words(t) for t in scales]
    offsets = None if offsets is None else [None if t is None else _fp32_words(t) for t in offsets]
    parts = [t for t in (*(scales or ()), *(offsets or ())) if t is not None]
    if not parts:
        return stand_in, ((0, 0),) * N
    starts, at = [], 0
    for t in parts:
        starts.append(at)
        at += t.numel()
    where = iter(starts)
    sc = [0 if t is None else next(where) for t in (scales or [None] * N)]
    of = [0 if t is None else next(where) for t in (offsets or [None] * N)]
    return torch.cat(parts), tuple(zip(sc, of))


def _codec_dims(teachers, codecs) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(heads, logical head dims) of each teacher: an int4 teacher's data holds two dims per byte."""
    return (tuple(int(x.shape[2]) for x in teachers),
            tuple(int(x.shape[4]) * (2 if c >= CODEC_INT4_CHANNEL else 1) for x, c in zip(teachers, codecs)))


def stat_slots(T: int, H_s: int) -> tuple[int, int]:
    """(token slots, head slots) of the forward's per-program partial sums: one slot per program of the smallest
    tile, so any config's programs find theirs."""
    return cdiv(T, _MIN_BLOCK_T), H_s


def fused_kv_loss_forward(student, teachers, weights, alpha, mask, positions, rot, inv_freq, scaling, rotary_pairs,
                          coef_mse, coef_cos, is_key: bool, compute_grad: bool, sums: torch.Tensor, codecs=None,
                          scales=None, offsets=None):
    """One fused pass for keys (is_key: RoPE on the fused projection) or values.

    student [L, B, H_s, T, D_s] (last stride 1); teachers[i] [L, B, H_i, T, D_i] (last stride 1); weights[i]
    [L, H_i·D_i, 2·H_s·PH] contiguous, pair layout (or natural, fused_kv_loss_op.natural_layout); alpha [B, N] |
    [B, L, N]; mask, positions [B, T] contiguous (bool, integer or float); rot [L] int32 (rotary dim per layer:
    rotary_pairs or 0); inv_freq [L, ≥ rotary_pairs/2] fp32 (stride 0 on L allowed); scaling [L] fp32; coef_mse,
    coef_cos [L] fp32 (see the kernel comment).
    codecs[i] (default plain): CODEC_* of teacher i, whose data is then fp8 or packed int4 bytes with scales[i]
    (and offsets[i]) contiguous as kvfuse.codecs.QuantizedKV lays them out.
    sums [2, L, B, *stat_slots(T, H_s)] fp32, zero-filled: the programs add nothing, each stores its partial squared
    error (sums[0]) and cosine sum (sums[1]) in its own slot, the rest stays zero, so the caller reduces it in one op
    (for keys and values together when their buffers are one).
    Returns (G [L, B, T, 2·H_s·PH] or None, dS [L, B, H_s, T, D_s] or None)."""
    L, B, H_s, T, D_s = student.shape
    PH = pair_width(D_s)
    N = len(teachers)
    codecs = tuple(codecs or (0,) * N)
    heads, dims = _codec_dims(teachers, codecs)
    dot_tl, g_dtype, ieee = dot_dtype(operand_dtypes(teachers, weights, codecs))
    n_t_slots, n_h_slots = stat_slots(T, H_s)
    dev = student.device
    sq, cs = sums[0], sums[1]
    codec_buf, codec_offs = _codec_buffer(scales, offsets, N, sums)
    if compute_grad:
        g = torch.empty(L, B, T, 2 * H_s * PH, device=dev, dtype=g_dtype)
        ds = torch.empty(L, B, H_s, T, D_s, device=dev, dtype=student.dtype)
    else:
        g = ds = sq  # never written: COMPUTE_GRAD=False removes the stores
    sab, sal, san = _alpha_strides(alpha)
    use_desc = (all(_tma_ready(x) for x in [*teachers, *weights])
                and _packed_boxes_ok(codecs, "BLOCK_K", INTERP_FWD, _FWD_CONFIGS_GPU))
    natural = natural_layout(D_s, rotary_pairs)
    interp_cfg = dict(INTERP_FWD, HPP=1) if natural else dict(INTERP_FWD, WIDE=False)
    epi_desc = (use_desc and natural and interp_cfg["HPP"] == 1
                and all(_tma_ready(x) for x in ([student, g, ds] if compute_grad else [student])))

    # Block shapes are placeholders: the pre-hook (or the interpreter branch below) fits them to each config.
    def desc(x, use, rank):
        return TensorDescriptor.from_tensor(x, [1] * (rank - 2) + [16, 16]) if use else x

    xs = [desc(x, use_desc, 5) for x in teachers] + [None] * (MAX_TEACHERS - len(teachers))
    ws = [desc(w, use_desc, 3) for w in weights] + [None] * (MAX_TEACHERS - len(weights))
    args = dict(
        **{f"x{i}": x for i, x in enumerate(xs)}, **{f"w{i}": w for i, w in enumerate(ws)},
        x_strides=tuple(tuple(x.stride()[:4]) for x in teachers),
        w_strides=tuple(tuple(w.stride()[:2]) for w in weights),
        codec_buf=codec_buf, codec_offs=codec_offs, HEADS=heads, DIMS=dims, CODECS=codecs, N=N,
        alpha_ptr=alpha, stride_ab=sab, stride_al=sal, stride_an=san,
        s=desc(student, epi_desc, 5), ss0=student.stride(0), ss1=student.stride(1), ss2=student.stride(2),
        ss3=student.stride(3), mask_ptr=mask, pos_ptr=positions, rot_ptr=rot, invf_ptr=inv_freq,
        stride_il=inv_freq.stride(0), scaling_ptr=scaling, coef_mse_ptr=coef_mse, coef_cos_ptr=coef_cos,
        sq_ptr=sq, cos_ptr=cs, g=desc(g, epi_desc and compute_grad, 4), ds=desc(ds, epi_desc and compute_grad, 5),
        B=B, T=T, n_t_slots=n_t_slots, n_h_slots=n_h_slots,
        H_S=H_s, D_S=D_s, PH=PH, ROT=int(rotary_pairs), IS_KEY=is_key, COMPUTE_GRAD=compute_grad,
        DOT_DTYPE=dot_tl, IEEE=ieee, USE_DESC=use_desc, EPI_DESC=epi_desc, NATURAL=natural,
        W2_OFF=PH if natural else H_s * PH)
    if interpreting():
        cfg = interp_cfg
        _fit_descriptors(args, cfg["BLOCK_T"], cfg["BLOCK_K"], cfg["HPP"] * PH, cfg["WIDE"])
        grid = (cdiv(T, cfg["BLOCK_T"]), H_s // cfg["HPP"], L * B)
        _fused_kv_fwd_kernel[grid](**args, **cfg)
    else:
        grid = lambda cfg: (cdiv(T, cfg["BLOCK_T"]), H_s // cfg["HPP"], L * B)  # noqa: E731
        key = (H_s, D_s, rotary_pairs, heads, dims, codecs, is_key, compute_grad, dot_tl, use_desc, epi_desc,
               natural, student.dtype)
        _launch_tuned(_fwd_tuned, key, grid, args, partials=(sums,))
    return (g if compute_grad else None), (ds if compute_grad else None)


def alpha_slots(heads_dims, C2: int) -> tuple[int, int]:
    """(f slots, c slots) of the weight-gradient kernel's ∂α partial sums for teachers of (heads, logical head dim)
    `heads_dims`: one slot per program of the smallest tile, so any config's programs find theirs."""
    return max(h * cdiv(d, _MIN_BLOCK_F) for h, d in heads_dims), cdiv(C2, _MIN_BLOCK_C)


class KindGrad(NamedTuple):
    """One kind's (keys' or values') inputs to the weight gradient: its teachers as the kernels read them, their
    adapters, and that kind's G = ∂L/∂P [L, B, T, C']."""
    storage: TeacherStorage
    weights: list
    G: torch.Tensor


_DW_ARGS = ("x", "sc", "of", "sx0", "sx1", "sx2", "sx3", "w_ptr", "sw0", "sw1", "g", "dw_ptr", "dalpha_ptr")
_DW_ARGS_V = ("x_v", "sc_v", "of_v", "sxv0", "sxv1", "sxv2", "sxv3", "w_v_ptr", "swv0", "swv1", "g_v", "dw_v_ptr",
              "dalpha_v_ptr")


def _dw_sides(kind: KindGrad, dws: list, parts: list) -> list[tuple[tuple, dict]]:
    """Per teacher of one kind: (what must match to share a launch, the kernel arguments)."""
    st, G = kind.storage, kind.G
    N = len(st.data)
    heads, dims = _codec_dims(st.data, st.codecs)
    scales, offsets = st.scale or [None] * N, st.offset or [None] * N
    dot_tl, _, ieee = dot_dtype(operand_dtypes(st.data, kind.weights, st.codecs))
    # One descriptor of G for every teacher's launch: a launch encodes its box when issued, so the next launch's
    # pre-hook may re-box the same object.
    g_desc = TensorDescriptor.from_tensor(G, [1, 1, 16, 16]) if _tma_ready(G) else None
    sides = []
    for i, (x, w) in enumerate(zip(st.data, kind.weights)):
        use_desc = (g_desc is not None and _tma_ready(x)
                    and _packed_boxes_ok(st.codecs[i:i + 1], "BLOCK_F", INTERP_DW, _DW_CONFIGS_GPU))
        values = (TensorDescriptor.from_tensor(x, [1, 1, 1, 16, 16]) if use_desc else x,
                  G if scales[i] is None else scales[i], G if offsets[i] is None else offsets[i], *x.stride()[:4],
                  w, w.stride(0), w.stride(1), g_desc if use_desc else G, dws[i], parts[i])
        sides.append(((heads[i], dims[i], use_desc, dot_tl, ieee, st.codecs[i], x.dtype),
                      dict(zip(_DW_ARGS, values))))
    return sides


def fused_kv_loss_backward(keys: KindGrad, values: KindGrad | None, alpha, grad_out, need_w: bool,
                           need_alpha: bool):
    """Adapter gradients (in the adapters' layout) from G = ∂L/∂P (see the module docstring) of keys and values
    (or keys alone), and the router gradient's partial sums. A teacher's keys and values share one launch when
    their shapes, codecs' load paths and operand dtypes allow (they normally do).

    Returns (keys' dW list, values' dW list or None, None where not needed; the ∂α partial sums [kinds, N, L, B,
    F slots, C slots] fp32 or None): each program stores g·<W_i, M_i(b)> over its tile in its own slot of a
    zero-filled buffer, so ∂α_i(b) is the sum over teacher i's slots of every kind (one op for the caller)."""
    kinds = [keys] if values is None else [keys, values]
    L, B, T, C2 = keys.G.shape
    N = len(keys.storage.data)
    if not (need_w or need_alpha):
        return [None] * N, (None if values is None else [None] * N), None
    sab, sal, _ = _alpha_strides(alpha)
    slots = alpha_slots([(h, d) for k in kinds for h, d in zip(*_codec_dims(k.storage.data, k.storage.codecs))], C2)
    if need_alpha:
        part = torch.zeros(len(kinds), N, L, B, *slots, device=keys.G.device, dtype=torch.float32)
    else:  # the kernel stores its partial sums anyway: one scratch slab takes them
        part = torch.empty(1, 1, L, B, *slots, device=keys.G.device, dtype=torch.float32)
    dws = [[torch.empty_like(w) for w in kind.weights] for kind in kinds]  # written either way
    sides = [_dw_sides(kind, dws[k], [part[k, i] if need_alpha else part[0, 0] for i in range(N)])
             for k, kind in enumerate(kinds)]
    for i in range(N):
        mine = [kind_sides[i] for kind_sides in sides]
        # keys and values in one launch when everything but the codec's scale layout matches
        groups = [mine] if len(mine) == 2 and mine[0][0][:5] == mine[1][0][:5] else [[side] for side in mine]
        for group in groups:
            (H_i, D_i, use_desc, dot_tl, ieee, codec, x_dtype), first = group[0]
            last = group[-1]
            args = dict(first, **dict(zip(_DW_ARGS_V, last[1].values())),
                        alpha_ptr=alpha[..., i], stride_ab=sab, stride_al=sal, gout_ptr=grad_out,
                        B=B, T=T, L=L, N_FBLK=slots[0], N_CBLK=slots[1], H_I=H_i, D_I=D_i, C2=C2, CODEC=codec,
                        CODEC_V=last[0][5], KINDS=len(group), DOT_DTYPE=dot_tl, IEEE=ieee, USE_DESC=use_desc)
            partials = tuple(side[1]["dalpha_ptr"] for side in group) if need_alpha else ()
            if interpreting():
                cfg = INTERP_DW
                _fit_dw_descriptors(args, cfg["BLOCK_F"], cfg["BLOCK_C"], cfg["BLOCK_T"])
                grid = (cdiv(C2, cfg["BLOCK_C"]), H_i * cdiv(D_i, cfg["BLOCK_F"]), L * len(group))
                _fused_kv_dw_kernel[grid](**args, **cfg)
            else:
                grid = lambda cfg: (cdiv(C2, cfg["BLOCK_C"]),  # noqa: E731
                                    H_i * cdiv(D_i, cfg["BLOCK_F"]), L * len(group))
                key = (D_i, C2, codec, last[0][5], len(group), dot_tl, use_desc, x_dtype, last[0][6])
                _launch_tuned(_dw_tuned, key, grid, args, partials=partials)
    dws = [[dw if need_w else None for dw in kind_dws] for kind_dws in dws]
    return dws[0], (None if values is None else dws[1]), (part if need_alpha else None)


@triton.jit
def _scale_pair_kernel(a, out_a, n_a, b, out_b, n_b, g_ptr, BLOCK: tl.constexpr):
    # Programs [0, cdiv(n_a, BLOCK)) scale a, the rest b: one launch for both tensors.
    pid = tl.program_id(0)
    blocks_a = tl.cdiv(n_a, BLOCK)
    g = tl.load(g_ptr)
    if pid < blocks_a:
        i = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = i < n_a
        x = tl.load(a + i, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_a + i, (x * g).to(out_a.dtype.element_ty), mask=ok)
    else:
        i = (pid - blocks_a).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = i < n_b
        x = tl.load(b + i, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_b + i, (x * g).to(out_b.dtype.element_ty), mask=ok)


def scale_pair(a: torch.Tensor, b: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a·g, b·g) in a's and b's dtypes, products in fp32; a, b contiguous, g a one-element fp32 tensor."""
    out_a, out_b = torch.empty_like(a), torch.empty_like(b)
    block = 1024 if interpreting() else 4096
    grid = (cdiv(a.numel(), block) + cdiv(b.numel(), block),)
    _scale_pair_kernel[grid](a, out_a, a.numel(), b, out_b, b.numel(), g, BLOCK=block, num_warps=8)
    return out_a, out_b
