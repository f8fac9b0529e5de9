"""Experiment (issue 16): does decoding compressed teacher tiles into shared memory, overlapped with the tensor cores,
close the weight-gradient gap to bf16 on Hopper?

The Triton weight-gradient kernel (kvfuse/kernels/fused_kv_loss.py, `_dw_tile`) feeds a compressed tile to the MMA
as a transposed register operand: on sm_90a its loop issues 287 (fp8) / 313 (int4) instructions per thread per
64-token tile against 76 for bf16 (scalar byte loads from shared memory, packing), more issue slots than the
tile's MMA takes. Here the same product is written in Gluon with the schedule spelled out: TMA brings codes and G
S−1 tiles ahead; each tile is decoded in a vectorised layout and stored to shared memory in the MMA's layout
(double-buffered), and its two MMAs run asynchronously while the next tile decodes. The two halves of a
[BLOCK_F] channel block are separate MMA operands (fp8: the block's first and second halves, int4: even and odd
channels, the two nibbles of a byte), so int4 needs no interleave in registers.

Scope of the experiment: one kind, one teacher; T a multiple of BLOCK_T and D_i of BLOCK_F (2-D descriptors over
[L·B·H_i·T, D_i] and [L·B·T, C']); codecs fp8 / int4 with channel or token scales. It checks ∂W and the ∂α sums
of both kernels against torch on the explicitly decoded teacher, then times both with bf16 teachers as the mark.

    python -m bench.exp_dw_gluon --out DIR      (H200, triton 3.6)
"""
from __future__ import annotations

import argparse
import csv
import os

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from kvfuse.codecs import encode_fp8, encode_int4
from kvfuse.kernels.fused_kv_loss import (CODEC_FP8_CHANNEL, CODEC_FP8_TOKEN, CODEC_INT4_CHANNEL, CODEC_INT4_TOKEN,
                                          KindGrad, alpha_slots, fused_kv_loss_backward)
from kvfuse.kernels.fused_kv_loss_op import CODEC_CODES, TeacherStorage


@gluon.jit
def _channel_scales(sc, of, grp, ch, D_I: gl.constexpr, CODEC: gl.constexpr):
    # one row's per-channel scale and offset, loaded once per row (values, not addresses, stay live in the loop)
    s = gl.load(sc + grp * D_I + ch).to(gl.float32)
    if CODEC == CODEC_INT4_CHANNEL:
        o = gl.load(of + grp * D_I + ch).to(gl.float32)
    else:
        o = s * 0.0
    return s, o


@gluon.jit
def _decode_half(raw, s_ch, o_ch, sc, of, grp, t, T, CODEC: gl.constexpr, HALF: gl.constexpr):
    # raw: fp8 codes of this half, or the packed bytes (HALF 0: low nibbles = even channels, 1: high = odd);
    # s_ch, o_ch: the row's channel scales / offsets of this half (channel codecs)
    if CODEC >= CODEC_INT4_CHANNEL:
        if HALF == 0:
            q = (raw & 0xF).to(gl.float32)
        else:
            q = (raw >> 4).to(gl.float32)
    else:
        q = raw.to(gl.float32)
    if CODEC == CODEC_FP8_CHANNEL:
        return (q * s_ch[None, :]).to(gl.bfloat16)
    elif CODEC == CODEC_INT4_CHANNEL:
        return (q * s_ch[None, :] + o_ch[None, :]).to(gl.bfloat16)
    elif CODEC == CODEC_FP8_TOKEN:
        s = gl.load(sc + grp * T + t).to(gl.float32)[:, None]
        return (q * s).to(gl.bfloat16)
    else:
        s = gl.load(sc + grp * T + t).to(gl.float32)[:, None]
        o = gl.load(of + grp * T + t).to(gl.float32)[:, None]
        return (q * s + o).to(gl.bfloat16)


@gluon.jit
def _issue(x_desc, g_desc, xs, gs, bars, j, l, B, T, H_I, hi, d0, pid_c, NT,
           CODEC: gl.constexpr, NBOX: gl.constexpr, S: gl.constexpr, BLOCK_T: gl.constexpr,
           BLOCK_F: gl.constexpr, BLOCK_C: gl.constexpr):
    s = j % S
    b = j // NT
    t0 = (j % NT) * BLOCK_T
    bar = bars.index(s)
    mbarrier.expect(bar, NBOX * x_desc.block_type.nbytes + g_desc.block_type.nbytes)
    row = ((l * B + b) * H_I + hi) * T + t0
    if NBOX == 2:
        tma.async_copy_global_to_shared(x_desc, [row, d0], bar, xs.index(2 * s))
        tma.async_copy_global_to_shared(x_desc, [row, d0 + BLOCK_F // 2], bar, xs.index(2 * s + 1))
    else:
        tma.async_copy_global_to_shared(x_desc, [row, d0 // 2], bar, xs.index(s))
    tma.async_copy_global_to_shared(g_desc, [(l * B + b) * T + t0, pid_c * BLOCK_C], bar, gs.index(s))


@gluon.jit
def _w_offsets(l, sw0, sw1, hi, d0, pid_c, D_I: gl.constexpr, NBOX: gl.constexpr, HALF: gl.constexpr,
               HF: gl.constexpr, BLOCK_C: gl.constexpr, acc_l: gl.constexpr):
    # adapter rows of accumulator half HALF (fp8: the block's halves; int4: even / odd channels), in acc_l
    ka = gl.arange(0, HF, layout=gl.SliceLayout(1, acc_l))
    ca = pid_c * BLOCK_C + gl.arange(0, BLOCK_C, layout=gl.SliceLayout(0, acc_l))
    if NBOX == 2:
        f = hi * D_I + d0 + HALF * HF + ka
    else:
        f = hi * D_I + d0 + 2 * ka + HALF
    return l * sw0 + f[:, None] * sw1 + ca[None, :]


@gluon.jit
def _dw_gluon_kernel(x_desc, g_desc, sc, of, w_ptr, sw0, sw1, dw_ptr, dalpha_ptr, alpha_ptr, stride_ab, stride_al,
                     gout_ptr, B, T, H_I, N_FBLK, N_CBLK,
                     D_I: gl.constexpr, CODEC: gl.constexpr, S: gl.constexpr,
                     BLOCK_F: gl.constexpr, BLOCK_C: gl.constexpr, BLOCK_T: gl.constexpr):
    HF: gl.constexpr = BLOCK_F // 2
    NBOX: gl.constexpr = 1 if CODEC >= CODEC_INT4_CHANNEL else 2
    pid_c = gl.program_id(0)
    pid_f = gl.program_id(1)
    l = gl.program_id(2)
    CHUNKS: gl.constexpr = D_I // BLOCK_F
    hi = pid_f // CHUNKS
    d0 = (pid_f % CHUNKS) * BLOCK_F
    NT = T // BLOCK_T
    total = B * NT

    # decode layout: 8 consecutive channels per thread (16-byte shared stores of bf16)
    blk: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [8, 1], [1, 0])
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                    instr_shape=[16, BLOCK_C // 2, 16])
    dec_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_T, HF], gl.bfloat16)
    xs = gl.allocate_shared_memory(x_desc.dtype, [S * NBOX, BLOCK_T, HF if NBOX == 2 else BLOCK_F // 2],
                                   x_desc.layout)
    gs = gl.allocate_shared_memory(g_desc.dtype, [S, BLOCK_T, BLOCK_C], g_desc.layout)
    dec = gl.allocate_shared_memory(gl.bfloat16, [4, BLOCK_T, HF], dec_l)
    bars = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(S):
        mbarrier.init(bars.index(i), count=1)

    for jj in gl.static_range(S - 1):
        if jj < total:
            _issue(x_desc, g_desc, xs, gs, bars, jj, l, B, T, H_I, hi, d0, pid_c, NT, CODEC, NBOX, S, BLOCK_T,
                   BLOCK_F, BLOCK_C)

    k = gl.arange(0, HF, layout=gl.SliceLayout(0, blk))
    tt = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, blk))
    if NBOX == 2:
        ch0 = d0 + k
        ch1 = d0 + HF + k
    else:
        ch0 = d0 + 2 * k
        ch1 = d0 + 2 * k + 1

    acc0 = gl.zeros([HF, BLOCK_C], gl.float32, acc_l)
    acc1 = gl.zeros([HF, BLOCK_C], gl.float32, acc_l)
    dw0 = gl.zeros([HF, BLOCK_C], gl.float32, acc_l)
    dw1 = gl.zeros([HF, BLOCK_C], gl.float32, acc_l)
    g_out = gl.load(gout_ptr).to(gl.float32)
    for b in range(B):
        grp = (l * B + b) * H_I + hi
        if CODEC == CODEC_FP8_CHANNEL or CODEC == CODEC_INT4_CHANNEL:
            s0, o0 = _channel_scales(sc, of, grp, ch0, D_I, CODEC)
            s1, o1 = _channel_scales(sc, of, grp, ch1, D_I, CODEC)
        else:  # token scales: loaded per tile in _decode_half
            s0 = k.to(gl.float32)
            o0 = s0
            s1 = s0
            o1 = s0
        for it in range(NT):
            j = b * NT + it
            s = j % S
            t = it * BLOCK_T + tt
            mbarrier.wait(bars.index(s), (j // S) & 1)
            buf = (j % 2) * 2
            if NBOX == 2:
                x0 = _decode_half(xs.index(2 * s).load(blk), s0, o0, sc, of, grp, t, T, CODEC, 0)
                x1 = _decode_half(xs.index(2 * s + 1).load(blk), s1, o1, sc, of, grp, t, T, CODEC, 1)
            else:
                raw = xs.index(s).load(blk)
                x0 = _decode_half(raw, s0, o0, sc, of, grp, t, T, CODEC, 0)
                x1 = _decode_half(raw, s1, o1, sc, of, grp, t, T, CODEC, 1)
            dec.index(buf).store(x0)
            dec.index(buf + 1).store(x1)
            fence_async_shared()
            gl.thread_barrier()
            acc0 = warpgroup_mma(dec.index(buf).permute((1, 0)), gs.index(s), acc0, use_acc=it != 0,
                                 is_async=True)
            acc1 = warpgroup_mma(dec.index(buf + 1).permute((1, 0)), gs.index(s), acc1, use_acc=it != 0,
                                 is_async=True)
            # the previous tile's two products are done: its decode buffer and its G / code slot are free
            acc0, acc1 = warpgroup_mma_wait(num_outstanding=2, deps=(acc0, acc1))
            if j + S - 1 < total:
                _issue(x_desc, g_desc, xs, gs, bars, j + S - 1, l, B, T, H_I, hi, d0, pid_c, NT, CODEC, NBOX, S,
                       BLOCK_T, BLOCK_F, BLOCK_C)
        acc0, acc1 = warpgroup_mma_wait(num_outstanding=0, deps=(acc0, acc1))
        a = gl.load(alpha_ptr + b * stride_ab + l * stride_al).to(gl.float32)
        w0 = gl.load(w_ptr + _w_offsets(l, sw0, sw1, hi, d0, pid_c, D_I, NBOX, 0, HF, BLOCK_C, acc_l)).to(gl.float32)
        part = gl.sum(gl.sum(w0 * acc0, axis=1), axis=0)
        w1 = gl.load(w_ptr + _w_offsets(l, sw0, sw1, hi, d0, pid_c, D_I, NBOX, 1, HF, BLOCK_C, acc_l)).to(gl.float32)
        part += gl.sum(gl.sum(w1 * acc1, axis=1), axis=0)
        gl.store(dalpha_ptr + ((l * B + b) * N_FBLK + pid_f) * N_CBLK + pid_c, part * g_out)
        dw0 += a * acc0
        dw1 += a * acc1
    for i in gl.static_range(S):
        mbarrier.invalidate(bars.index(i))
    gl.store(dw_ptr + _w_offsets(l, sw0, sw1, hi, d0, pid_c, D_I, NBOX, 0, HF, BLOCK_C, acc_l),
             (dw0 * g_out).to(dw_ptr.dtype.element_ty))
    gl.store(dw_ptr + _w_offsets(l, sw0, sw1, hi, d0, pid_c, D_I, NBOX, 1, HF, BLOCK_C, acc_l),
             (dw1 * g_out).to(dw_ptr.dtype.element_ty))


GL_DTYPE = {torch.float8_e4m3fn: gl.float8e4nv, torch.uint8: gl.uint8, torch.bfloat16: gl.bfloat16}


def dw_gluon(q, w, G, alpha, grad_out, codec: int, block_f=128, block_c=128, block_t=64, stages=3):
    """∂W [L, F, C'] and the ∂α partial sums [L, B, F slots, C slots] of one compressed teacher (one kind)."""
    L, B, H, T, width = q.data.shape
    D = width * 2 if codec >= int(CODEC_INT4_CHANNEL) else width
    C2 = G.shape[-1]
    assert T % block_t == 0 and D % block_f == 0 and C2 % block_c == 0
    box = [block_t, block_f // 2]
    x2 = q.data.reshape(-1, width)
    x_desc = TensorDescriptor.from_tensor(x2, box, gl.NVMMASharedLayout.get_default_for(box, GL_DTYPE[x2.dtype]))
    g2 = G.reshape(-1, C2)
    g_desc = TensorDescriptor.from_tensor(g2, [block_t, block_c],
                                          gl.NVMMASharedLayout.get_default_for([block_t, block_c], gl.bfloat16))
    n_f, n_c = H * (D // block_f), C2 // block_c
    dw = torch.empty_like(w)
    part = torch.zeros(L, B, n_f, n_c, device=G.device, dtype=torch.float32)
    of = q.offset if q.offset is not None else q.scale
    _dw_gluon_kernel[(n_c, n_f, L)](x_desc, g_desc, q.scale, of, w, w.stride(0), w.stride(1), dw, part, alpha,
                                    alpha.stride(0), alpha.stride(1), grad_out, B, T, H, n_f, n_c, D_I=D,
                                    CODEC=codec, S=stages, BLOCK_F=block_f, BLOCK_C=block_c, BLOCK_T=block_t,
                                    num_warps=8)
    return dw, part


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=".")
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--stages", type=int, nargs="+", default=[3])
    args = p.parse_args(argv)
    torch.manual_seed(0)
    dev = "cuda"
    L, B, T, H, D, C2 = args.layers, args.batch, args.seq, args.heads, 128, 256
    x = torch.randn(L, B, H, T, D, device=dev, dtype=torch.bfloat16)
    x[..., ::7] *= 4   # a few louder channels, as real keys have
    G = (torch.randn(L, B, T, C2, device=dev) * 1e-2).to(torch.bfloat16)
    G[:, :, T - T // 16:] = 0   # padded tail, as the forward writes it
    w = (torch.randn(L, H * D, C2, device=dev) * 0.05).to(torch.bfloat16)
    alpha = torch.rand(B, L, 1, device=dev)
    grad_out = torch.ones((), device=dev)
    commit = os.environ.get("KVFUSE_COMMIT", "")
    name = torch.cuda.get_device_name()
    rows = []

    def triton_dw(storage):
        kind = KindGrad(storage, [w], G)
        dws, _, part = fused_kv_loss_backward(kind, None, alpha, grad_out, True, True)
        return dws[0], part

    bf16 = TeacherStorage.plain([x])
    ms_bf16 = triton.testing.do_bench(lambda: triton_dw(bf16), warmup=25, rep=200)
    rows.append(dict(codec="bf16", axis="", impl="triton", stages="", ms=ms_bf16, vs_bf16=1.0, err_dw="", err_da=""))
    print(f"bf16 triton {ms_bf16:.3f} ms", flush=True)
    for kind, axis in (("fp8", "channel"), ("fp8", "token"), ("int4", "channel"), ("int4", "token")):
        q = (encode_fp8 if kind == "fp8" else encode_int4)(x, axis)
        code = CODEC_CODES[kind, axis]
        storage = TeacherStorage([q.data], (code,), [q.scale], [q.offset])
        dw_ref, part_ref = triton_dw(storage)
        da_ref = part_ref.sum(dim=(-2, -1))[0, 0]
        # torch on the explicitly decoded teacher: M(b) = Σ_t X(b)ᵀ G(b), ∂W = Σ_b α_b M(b), ∂α_b = <W, M(b)>
        xd = q.decode().to(torch.bfloat16).float()              # the kernels' operand: decoded, rounded to bf16
        xd = xd.permute(0, 1, 3, 2, 4).reshape(L, B, T, H * D)
        m = torch.einsum("lbtf,lbtc->lbfc", xd, G.float())
        dw_t = torch.einsum("lbfc,bl->lfc", m, alpha[..., 0])
        da_t = torch.einsum("lbfc,lfc->lb", m, w.float())
        del xd, m
        err_t = ((dw_ref.float() - dw_t).norm() / dw_t.norm()).item()
        err_ta = ((da_ref - da_t).norm() / da_t.norm()).item()
        print(f"{kind} {axis} triton vs torch: rel err dW {err_t:.2e} dalpha {err_ta:.2e}", flush=True)
        ms = triton.testing.do_bench(lambda: triton_dw(storage), warmup=25, rep=200)
        rows.append(dict(codec=kind, axis=axis, impl="triton", stages="", ms=ms, vs_bf16=ms / ms_bf16, err_dw=err_t,
                         err_da=err_ta))
        print(f"{kind} {axis} triton {ms:.3f} ms ({ms / ms_bf16:.2f}x bf16)", flush=True)
        for stages in args.stages:
            try:
                dw, part = dw_gluon(q, w, G, alpha, grad_out, code, stages=stages)
            except Exception as e:  # a config that does not compile is a result of the experiment, reported
                print(f"{kind} {axis} gluon S={stages}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
                rows.append(dict(codec=kind, axis=axis, impl="gluon", stages=stages, ms="", vs_bf16="",
                                 err_dw=f"{type(e).__name__}", err_da=""))
                continue
            da = part.sum(dim=(-2, -1))
            err_dw = ((dw.float() - dw_t).norm() / dw_t.norm()).item()
            err_da = ((da - da_t).norm() / da_t.norm()).item()
            ms = triton.testing.do_bench(lambda: dw_gluon(q, w, G, alpha, grad_out, code, stages=stages),
                                         warmup=25, rep=200)
            rows.append(dict(codec=kind, axis=axis, impl="gluon", stages=stages, ms=ms, vs_bf16=ms / ms_bf16,
                             err_dw=err_dw, err_da=err_da))
            print(f"{kind} {axis} gluon S={stages} {ms:.3f} ms ({ms / ms_bf16:.2f}x bf16) rel err dW {err_dw:.2e} "
                  f"dalpha {err_da:.2e}", flush=True)
    path = os.path.join(args.out, f"exp_dw_gluon_{name.replace(' ', '_')}_{commit or 'local'}.csv")
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=["device", "commit", "L", "B", "T", "H", "D", "C2", *rows[0].keys()])
        wr.writeheader()
        for r in rows:
            wr.writerow(dict(device=name, commit=commit, L=L, B=B, T=T, H=H, D=D, C2=C2, **r))
    print("wrote", path)


if __name__ == "__main__":
    main()
