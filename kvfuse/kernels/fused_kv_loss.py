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

import torch
import triton
import triton.language as tl

from kvfuse.kernels.fused_kv_loss_op import pair_width
from kvfuse.kernels.utils import autotune_configs, dot_dtype, interpreting


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
def _project_teacher(p1, p2, x_ptr, sx0, sx1, sx2, sx3, w_ptr, sw0, sw1, l, b, t, t_ok, col,
                     HALF_COLS: tl.constexpr, H_I: tl.constexpr, D_I: tl.constexpr, DOT_DTYPE: tl.constexpr,
                     IEEE: tl.constexpr, BLOCK_K: tl.constexpr):
    # K-loop over one teacher's features in chunks that never cross a head: the X tile is a plain [BLOCK_T, BLOCK_K]
    # box of one head's [T, D_i] block, contiguous along d (no per-element head/dim arithmetic, no mask along the
    # contiguous axis when BLOCK_K divides D_i, so loads stay 16-byte vectors); the W tiles are two row blocks of
    # the pair-layout adapter, contiguous along the columns.
    CHUNKS: tl.constexpr = (D_I + BLOCK_K - 1) // BLOCK_K
    k = tl.arange(0, BLOCK_K)
    x_base = x_ptr + l * sx0 + b * sx1 + t[:, None] * sx3
    w_base = w_ptr + l * sw0 + col[None, :]
    for kk in range(0, H_I * CHUNKS):
        hi = kk // CHUNKS
        d = (kk % CHUNKS) * BLOCK_K + k
        x_tile = x_base + hi * sx2 + d[None, :]
        w_rows = w_base + (hi * D_I + d)[:, None] * sw1
        if D_I % BLOCK_K == 0:
            xt = tl.load(x_tile, mask=t_ok[:, None], other=0.0)
            w1 = tl.load(w_rows)
            w2 = tl.load(w_rows + HALF_COLS)
        else:
            d_ok = d < D_I
            xt = tl.load(x_tile, mask=t_ok[:, None] & d_ok[None, :], other=0.0)
            w1 = tl.load(w_rows, mask=d_ok[:, None], other=0.0)
            w2 = tl.load(w_rows + HALF_COLS, mask=d_ok[:, None], other=0.0)
        xt = xt.to(DOT_DTYPE)
        w1 = w1.to(DOT_DTYPE)
        w2 = w2.to(DOT_DTYPE)
        if IEEE:
            p1 = tl.dot(xt, w1, p1, input_precision="ieee")
            p2 = tl.dot(xt, w2, p2, input_precision="ieee")
        else:
            p1 = tl.dot(xt, w1, p1)
            p2 = tl.dot(xt, w2, p2)
    return p1, p2


@triton.jit
def _fused_kv_fwd_kernel(
    xs, x_strides, ws, w_strides,
    HEADS: tl.constexpr, DIMS: tl.constexpr, N: tl.constexpr,
    alpha_ptr, stride_ab, stride_al, stride_an,
    s_ptr, ss0, ss1, ss2, ss3,
    mask_ptr, pos_ptr, rot_ptr, invf_ptr, stride_il, scaling_ptr,
    coef_mse_ptr, coef_cos_ptr,
    sq_ptr, cos_ptr, g_ptr, ds_ptr,
    B, T, n_t_slots, n_h_slots,
    H_S: tl.constexpr, D_S: tl.constexpr, PH: tl.constexpr, ROT: tl.constexpr,
    IS_KEY: tl.constexpr, COMPUTE_GRAD: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, HPP: tl.constexpr,
):
    # One program: token tile × HPP student heads × (layer l, batch row b). Consecutive programs share (l, b),
    # so a layer's adapters stay in L2 while its token tiles stream through.
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
    l = (pid_lb // B).to(tl.int64)
    b = (pid_lb % B).to(tl.int64)
    CB: tl.constexpr = HPP * PH
    HALF_COLS: tl.constexpr = H_S * PH

    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    c = tl.arange(0, CB)
    col = pid_h * CB + c
    j = c % PH
    h = (pid_h * HPP + c // PH).to(tl.int64)

    p1 = tl.zeros([BLOCK_T, CB], dtype=tl.float32)
    p2 = tl.zeros([BLOCK_T, CB], dtype=tl.float32)
    a_base = alpha_ptr + b * stride_ab + l * stride_al
    a_prev = tl.load(a_base).to(tl.float32) * 0.0 + 1.0
    for i in tl.static_range(N):
        a_i = tl.load(a_base + i * stride_an).to(tl.float32)
        if a_i != 0.0:
            r = a_prev / a_i
            p1 = p1 * r
            p2 = p2 * r
            sx = x_strides[i]
            p1, p2 = _project_teacher(p1, p2, xs[i], sx[0], sx[1], sx[2], sx[3], ws[i], w_strides[i][0],
                                      w_strides[i][1], l, b, t, t_ok, col, HALF_COLS, HEADS[i], DIMS[i],
                                      DOT_DTYPE, IEEE, BLOCK_K)
            a_prev = a_i
    p1 = p1 * a_prev
    p2 = p2 * a_prev

    d1, d2, freq, scale = _pair_dims(l, j, rot_ptr, invf_ptr, stride_il, scaling_ptr, D_S, ROT, IS_KEY)
    if IS_KEY:
        pos = tl.load(pos_ptr + b * T + t, mask=t_ok, other=0.0)
        ang = pos[:, None] * freq[None, :]
        cos_a = tl.cos(ang) * scale[None, :]
        sin_a = tl.sin(ang) * scale[None, :]
        k1 = p1 * cos_a - p2 * sin_a
        k2 = p2 * cos_a + p1 * sin_a
    else:
        k1 = p1
        k2 = p2

    tc_ok = t_ok[:, None] & (d1 >= 0)[None, :]
    s_base = s_ptr + l * ss0 + b * ss1 + h[None, :] * ss2 + t[:, None] * ss3
    s1 = tl.load(s_base + d1[None, :], mask=tc_ok, other=0.0).to(tl.float32)
    s2 = tl.load(s_base + d2[None, :], mask=tc_ok, other=0.0).to(tl.float32)
    m = tl.load(mask_ptr + b * T + t, mask=t_ok, other=0.0)

    e1 = s1 - k1
    e2 = s2 - k2
    sq = tl.sum(tl.sum(e1 * e1 + e2 * e2, axis=1) * m, axis=0)
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
        cm = tl.load(coef_mse_ptr + l)
        cc = tl.load(coef_cos_ptr + l)
        inv_den = _to_columns(1.0 / den, BLOCK_T, HPP, PH)
        # Where den was clamped the reference's clamp passes no gradient through |S||k|.
        ck = _to_columns(tl.where(big, cs / tl.where(big, kk, 1.0), 0.0), BLOCK_T, HPP, PH)
        cS = _to_columns(tl.where(big, cs / tl.where(big, ss, 1.0), 0.0), BLOCK_T, HPP, PH)
        mm = m[:, None]
        g1 = mm * (-cm * e1 - cc * (s1 * inv_den - ck * k1))
        g2 = mm * (-cm * e2 - cc * (s2 * inv_den - ck * k2))
        f1 = mm * (cm * e1 - cc * (k1 * inv_den - cS * s1))
        f2 = mm * (cm * e2 - cc * (k2 * inv_den - cS * s2))
        if IS_KEY:
            r1 = g1 * cos_a + g2 * sin_a
            r2 = g2 * cos_a - g1 * sin_a
        else:
            r1 = g1
            r2 = g2
        g_rows = g_ptr + ((l * B + b) * T + t[:, None]) * (2 * HALF_COLS) + col[None, :]
        tl.store(g_rows, r1.to(g_ptr.dtype.element_ty), mask=t_ok[:, None])
        tl.store(g_rows + HALF_COLS, r2.to(g_ptr.dtype.element_ty), mask=t_ok[:, None])
        ds_base = ds_ptr + (((l * B + b) * H_S + h[None, :]) * T + t[:, None]) * D_S
        tl.store(ds_base + d1[None, :], f1.to(ds_ptr.dtype.element_ty), mask=tc_ok)
        tl.store(ds_base + d2[None, :], f2.to(ds_ptr.dtype.element_ty), mask=tc_ok)


@triton.jit
def _fused_kv_dw_kernel(
    x_ptr, sx0, sx1, sx2, sx3,
    w_ptr, sw0, sw1,
    g_ptr, alpha_ptr, stride_ab, stride_al, gout_ptr,
    dw_ptr, dalpha_ptr,
    B, T, N_FBLK, N_CBLK,
    D_I: tl.constexpr, C2: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_F: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # One program: adapter tile W_i[l][f-block, c-block] (pair layout), the f-block inside one teacher head so the
    # X tile is a box of that head's [T, D_i] block. For each batch row b:
    #   M(b)    = Σ_t X_i(b, t)[f]ᵀ G(b, t)[c]            (fp32 accumulation over the T axis)
    #   ∂α_i(b) += g Σ_{f,c} W[f, c] M(b)[f, c]           (partial over this tile; summed by the launcher)
    #   ∂W[f, c] = g Σ_b α_i(b) M(b)[f, c]
    # G already carries the mask (zero on padded tokens and padding columns), so those contribute nothing.
    pid_c = tl.program_id(0)
    pid_f = tl.program_id(1)
    l = tl.program_id(2).to(tl.int64)
    CHUNKS: tl.constexpr = (D_I + BLOCK_F - 1) // BLOCK_F
    hi = pid_f // CHUNKS
    d = (pid_f % CHUNKS) * BLOCK_F + tl.arange(0, BLOCK_F)
    f = hi * D_I + d
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    d_ok = d < D_I
    c_ok = c < C2
    fc_ok = d_ok[:, None] & c_ok[None, :]
    g_out = tl.load(gout_ptr).to(tl.float32)
    w_tile = w_ptr + l * sw0 + f[:, None] * sw1 + c[None, :]

    dw = tl.zeros([BLOCK_F, BLOCK_C], dtype=tl.float32)
    for bb in range(0, B):
        mb = tl.zeros([BLOCK_F, BLOCK_C], dtype=tl.float32)
        x_base = x_ptr + l * sx0 + bb * sx1 + hi * sx2 + d[:, None]
        g_base = g_ptr + (l * B + bb) * T * C2 + c[None, :]
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            t_ok = t < T
            if D_I % BLOCK_F == 0:
                xt = tl.load(x_base + t[None, :] * sx3, mask=t_ok[None, :], other=0.0)
            else:
                xt = tl.load(x_base + t[None, :] * sx3, mask=d_ok[:, None] & t_ok[None, :], other=0.0)
            if C2 % BLOCK_C == 0:
                gt = tl.load(g_base + t[:, None] * C2, mask=t_ok[:, None], other=0.0)
            else:
                gt = tl.load(g_base + t[:, None] * C2, mask=t_ok[:, None] & c_ok[None, :], other=0.0)
            if IEEE:
                mb = tl.dot(xt.to(DOT_DTYPE), gt.to(DOT_DTYPE), mb, input_precision="ieee")
            else:
                mb = tl.dot(xt.to(DOT_DTYPE), gt.to(DOT_DTYPE), mb)
        a = tl.load(alpha_ptr + bb * stride_ab + l * stride_al).to(tl.float32)
        w = tl.load(w_tile, mask=fc_ok, other=0.0).to(tl.float32)
        part = tl.sum(tl.sum(w * mb, axis=1), axis=0) * g_out
        tl.store(dalpha_ptr + ((l * B + bb) * N_FBLK + pid_f) * N_CBLK + pid_c, part)
        dw += a * mb
    tl.store(dw_ptr + l * sw0 + f[:, None] * sw1 + c[None, :], (dw * g_out).to(dw_ptr.dtype.element_ty),
             mask=fc_ok)


# Autotuning: a few tile shapes on the GPU, one small config under the interpreter (where every config would run
# serially on the CPU). Partial-sum buffers are laid out for the smallest tiles a config list holds, so a config
# with larger tiles leaves some slots unwritten: each config's pre-hook zeroes them before every run (autotuning
# included), so slots written by another config never leak into the sums.
def _zero_fwd_partials(nargs):
    nargs["sq_ptr"].zero_()
    nargs["cos_ptr"].zero_()


def _zero_dw_partials(nargs):
    nargs["dalpha_ptr"].zero_()


_FWD_CONFIGS_GPU = autotune_configs([
    ({"BLOCK_T": 128, "BLOCK_K": 64, "HPP": 1}, 8, 3),
    ({"BLOCK_T": 128, "BLOCK_K": 32, "HPP": 1}, 8, 4),
    ({"BLOCK_T": 64, "BLOCK_K": 64, "HPP": 1}, 4, 3),
    ({"BLOCK_T": 128, "BLOCK_K": 64, "HPP": 2}, 8, 3),
    ({"BLOCK_T": 64, "BLOCK_K": 64, "HPP": 2}, 4, 3),
], _zero_fwd_partials)
_DW_CONFIGS_GPU = autotune_configs([
    ({"BLOCK_F": 128, "BLOCK_C": 128, "BLOCK_T": 64}, 8, 3),
    ({"BLOCK_F": 64, "BLOCK_C": 128, "BLOCK_T": 64}, 4, 3),
    ({"BLOCK_F": 128, "BLOCK_C": 256, "BLOCK_T": 32}, 8, 3),
    ({"BLOCK_F": 64, "BLOCK_C": 256, "BLOCK_T": 64}, 8, 3),
    ({"BLOCK_F": 128, "BLOCK_C": 64, "BLOCK_T": 128}, 4, 4),
], _zero_dw_partials)
# Under the interpreter one config runs; tests may change these.
INTERP_FWD = {"BLOCK_T": 16, "BLOCK_K": 16, "HPP": 1}
INTERP_DW = {"BLOCK_F": 16, "BLOCK_C": 16, "BLOCK_T": 16}
_MIN_BLOCK_T = 16
_MIN_BLOCK_F = 16
_MIN_BLOCK_C = 16


def _prune_fwd(configs, nargs, **kwargs):
    # HPP heads per program must divide H_s (no masked heads) and keep the tile within 128 pair columns.
    meta = {**nargs, **kwargs}
    keep = [c for c in configs
            if meta["H_S"] % c.kwargs["HPP"] == 0 and c.kwargs["HPP"] * meta["PH"] <= max(128, meta["PH"])]
    return keep or [triton.Config({**configs[0].kwargs, "HPP": 1}, num_warps=configs[0].num_warps,
                                  num_stages=configs[0].num_stages, pre_hook=_zero_fwd_partials)]


# T is not part of the key: in training every batch has another length, and re-tuning each one cost seconds per
# step; the best tile barely moves with T.
_fwd_tuned = triton.autotune(_FWD_CONFIGS_GPU, key=["H_S", "D_S", "PH", "ROT", "N", "HEADS", "DIMS", "IS_KEY",
                                                    "COMPUTE_GRAD", "DOT_DTYPE"],
                             prune_configs_by={"early_config_prune": _prune_fwd})(_fused_kv_fwd_kernel)
_dw_tuned = triton.autotune(_DW_CONFIGS_GPU, key=["D_I", "C2", "DOT_DTYPE"])(_fused_kv_dw_kernel)


def _alpha_strides(alpha: torch.Tensor) -> tuple[int, int, int]:
    if alpha.dim() == 2:
        return alpha.stride(0), 0, alpha.stride(1)
    return alpha.stride(0), alpha.stride(1), alpha.stride(2)


def fused_kv_loss_forward(student, teachers, weights, alpha, mask, positions, rot, inv_freq, scaling, rotary_pairs,
                          coef_mse, coef_cos, is_key: bool, compute_grad: bool):
    """One fused pass for keys (is_key: RoPE on the fused projection) or values.

    student [L, B, H_s, T, D_s] (last stride 1); teachers[i] [L, B, H_i, T, D_i] (last stride 1); weights[i]
    [L, H_i·D_i, 2·H_s·PH] contiguous, pair layout; alpha [B, N] | [B, L, N]; mask, positions [B, T] fp32
    contiguous; rot [L] int32 (rotary dim per layer: rotary_pairs or 0); inv_freq [L, ≥ rotary_pairs/2] fp32
    (stride 0 on L allowed); scaling [L] fp32; coef_mse, coef_cos [L] fp32 (see the kernel comment).
    Returns (sq_sum [L], cos_sum [L], G [L, B, T, 2·H_s·PH] or None, dS [L, B, H_s, T, D_s] or None)."""
    L, B, H_s, T, D_s = student.shape
    PH = pair_width(D_s)
    dot_tl, g_dtype, ieee = dot_dtype(list(t.dtype for t in teachers) + list(w.dtype for w in weights))
    n_t_slots = triton.cdiv(T, _MIN_BLOCK_T)
    dev = student.device
    sq = torch.zeros(L * B, n_t_slots, H_s, device=dev, dtype=torch.float32)
    cs = torch.zeros(L * B, n_t_slots, H_s, device=dev, dtype=torch.float32)
    if compute_grad:
        g = torch.empty(L, B, T, 2 * H_s * PH, device=dev, dtype=g_dtype)
        ds = torch.empty(L, B, H_s, T, D_s, device=dev, dtype=student.dtype)
    else:
        g = ds = sq  # never written: COMPUTE_GRAD=False removes the stores
    sab, sal, san = _alpha_strides(alpha)
    args = (
        tuple(teachers), tuple(tuple(x.stride()[:4]) for x in teachers),
        tuple(weights), tuple(tuple(w.stride()[:2]) for w in weights),
        tuple(int(x.shape[2]) for x in teachers), tuple(int(x.shape[4]) for x in teachers), len(teachers),
        alpha, sab, sal, san,
        student, *student.stride()[:4],
        mask, positions, rot, inv_freq, inv_freq.stride(0), scaling,
        coef_mse, coef_cos,
        sq, cs, g, ds,
        B, T, n_t_slots, H_s,
    )
    meta = dict(H_S=H_s, D_S=D_s, PH=PH, ROT=int(rotary_pairs), IS_KEY=is_key, COMPUTE_GRAD=compute_grad,
                DOT_DTYPE=dot_tl, IEEE=ieee)
    if interpreting():
        grid = (triton.cdiv(T, INTERP_FWD["BLOCK_T"]), H_s // INTERP_FWD["HPP"], L * B)
        _fused_kv_fwd_kernel[grid](*args, **meta, **INTERP_FWD)
    else:
        grid = lambda cfg: (triton.cdiv(T, cfg["BLOCK_T"]), H_s // cfg["HPP"], L * B)  # noqa: E731
        _fwd_tuned[grid](*args, **meta)
    sq_l = sq.view(L, -1).sum(1)
    cs_l = cs.view(L, -1).sum(1)
    return sq_l, cs_l, (g if compute_grad else None), (ds if compute_grad else None)


def fused_kv_loss_backward(teachers, weights, alpha, G, grad_out, need_w: bool, need_alpha: bool):
    """Adapter (pair layout) and router gradients from G = ∂L/∂P (see the module docstring).

    Returns (dW list (None where not needed), dalpha [B, L, N] fp32 or None)."""
    L, B, T, C2 = G.shape
    N = len(teachers)
    dev = G.device
    dot_tl, _, ieee = dot_dtype(list(t.dtype for t in teachers) + list(w.dtype for w in weights))
    sab, sal, _ = _alpha_strides(alpha)
    dalpha = torch.zeros(B, L, N, device=dev, dtype=torch.float32) if need_alpha else None
    dws = []
    for i, (x, w) in enumerate(zip(teachers, weights)):
        if not (need_w or need_alpha):
            dws.append(None)
            continue
        H_i, D_i = int(x.shape[2]), int(x.shape[4])
        n_f, n_c = H_i * triton.cdiv(D_i, _MIN_BLOCK_F), triton.cdiv(C2, _MIN_BLOCK_C)
        part = torch.zeros(L, B, n_f, n_c, device=dev, dtype=torch.float32)
        dw = torch.empty_like(w)
        # alpha[..., i] is a view: its data pointer already points at teacher i, the (b, l) strides stay.
        args = (x, *x.stride()[:4], w, *w.stride()[:2], G, alpha[..., i], sab, sal, grad_out, dw, part, B, T)
        meta = dict(D_I=D_i, C2=C2, DOT_DTYPE=dot_tl, IEEE=ieee)
        if interpreting():
            cfg = INTERP_DW
            grid = (triton.cdiv(C2, cfg["BLOCK_C"]), H_i * triton.cdiv(D_i, cfg["BLOCK_F"]), L)
            _fused_kv_dw_kernel[grid](*args, n_f, n_c, **meta, **cfg)
        else:
            grid = lambda cfg: (triton.cdiv(C2, cfg["BLOCK_C"]),  # noqa: E731
                                H_i * triton.cdiv(D_i, cfg["BLOCK_F"]), L)
            _dw_tuned[grid](*args, n_f, n_c, **meta)
        if need_alpha:
            dalpha[:, :, i] = part.sum((2, 3)).t()
        dws.append(dw if need_w else None)
    return dws, dalpha
