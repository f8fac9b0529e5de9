"""Fused multi-teacher KV-distillation loss: adapter projections, student RoPE, α-fusion, masked MSE + cosine.

Notation (one student layer l, batch row b, token t; see kvfuse.loss for the readable reference):
    X_i(t)   = teacher i's aligned pre-RoPE keys (or values), heads flattened: index h·D_i + d, F_i = H_i·D_i
    W_i      = adapter w[i][l], [F_i, C] with C = H_s·D_s (column index h·D_s + d)
    P(t)     = Σ_i α_i X_i(t) W_i                    the fused projection, [C]
    K_f(t)   = R_t P(t)                              RoPE at the student position (identity for values)
R_t is linear and the same for every teacher, so Σ_i α_i R_t(X_i W_i) = R_t(Σ_i α_i X_i W_i): the kernel
fuses first and rotates once. Folding α_i (a scalar per program: one b, one l) into the X loads makes the
whole fusion one K-loop over the teachers' features, i.e. one GEMM over the implicit concatenation
[α_1 X_1 | … | α_N X_N] · [W_1; …; W_N], read straight from the strided [L, B, H_i, T, D_i] tensors.

The loss is linear in its per-(token, head) terms, so its gradient w.r.t. P and the student tensors is known
in the forward up to the upstream scalar g: the forward pass writes G = ∂L/∂P and ∂L/∂S (scaled by g in the
backward). The backward then only needs the weight-gradient GEMM
    M_i(b) = Σ_t X_i(b, t)ᵀ G(b, t)        [F_i, C]
    ∂L/∂W_i = g Σ_b α_i(b) M_i(b),         ∂L/∂α_i(b) = g <W_i, M_i(b)>      (Frobenius product)
so no projected teacher tensor is ever stored and no GEMM is recomputed.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _fused_kv_fwd_kernel(
    xs, x_strides, ws, w_strides,
    HEADS: tl.constexpr, DIMS: tl.constexpr, N: tl.constexpr,
    alpha_ptr, stride_ab, stride_al, stride_an,
    s_ptr, ss0, ss1, ss2, ss3, ss4,
    mask_ptr, pos_ptr, invf_ptr, stride_il,
    coef_mse_ptr, coef_cos_ptr, scaling,
    sq_ptr, cos_ptr, g_ptr, ds_ptr,
    B, T, n_tiles,
    H_S: tl.constexpr, D_S: tl.constexpr, HALF_BLOCK: tl.constexpr,
    IS_KEY: tl.constexpr, COMPUTE_GRAD: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr,
):
    # One program: student head h, token tile t, (layer l, batch b).  The head's P lives in two accumulators
    # p1 = P[:, h·D + j], p2 = P[:, h·D + D/2 + j] (j < D/2), so rotate_half is a swap of accumulators and any
    # even D_s works (each half padded to HALF_BLOCK).
    #   forward   p     = Σ_i α_i X_i W_i[:, cols]                       (fp32 accumulation)
    #             k     = R p:  k1 = s(p1 cos − p2 sin), k2 = s(p2 cos + p1 sin),  cos/sin of pos·inv_freq[j]
    #             sq    = Σ_d (S − k)²,   cs = <S, k> / max(|S||k|, 1e-8)      per token
    #             partial sums Σ_t m·sq and Σ_t m·cs for this (l, b, tile, h)
    # With cm = 2 λ c_l / (n H_s D_s), cc = β c_l / (2 n H_s) and c_l = w_l / Σ w (∂L/∂cs = −cc·m):
    #   ∂L/∂k = m (−cm (S − k) − cc ∂cs/∂k),   ∂L/∂S = m (cm (S − k) − cc ∂cs/∂S)
    #   ∂cs/∂k = S/den − cs·k/|k|²,  ∂cs/∂S = k/den − cs·S/|S|²   (den = |S||k|; below 1e-8 only S/1e-8, k/1e-8)
    #   G = Rᵀ ∂L/∂k:  G1 = s(g1 cos + g2 sin),  G2 = s(g2 cos − g1 sin)
    h = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_lb = tl.program_id(2)
    l = (pid_lb // B).to(tl.int64)
    b = (pid_lb % B).to(tl.int64)
    HALF = D_S // 2
    C = H_S * D_S

    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    j = tl.arange(0, HALF_BLOCK)
    j_ok = j < HALF
    col1 = h * D_S + j
    col2 = col1 + HALF

    p1 = tl.zeros([BLOCK_T, HALF_BLOCK], dtype=tl.float32)
    p2 = tl.zeros([BLOCK_T, HALF_BLOCK], dtype=tl.float32)
    for i in tl.static_range(N):
        x_ptr = xs[i]
        w_ptr = ws[i]
        sx = x_strides[i]
        sw = w_strides[i]
        D_I = DIMS[i]
        F_I = HEADS[i] * DIMS[i]
        a_i = tl.load(alpha_ptr + b * stride_ab + l * stride_al + i * stride_an).to(tl.float32)
        x_base = x_ptr + l * sx[0] + b * sx[1] + t[:, None] * sx[3]
        w_base = w_ptr + l * sw[0]
        for f0 in range(0, F_I, BLOCK_F):
            f = f0 + tl.arange(0, BLOCK_F)
            f_ok = f < F_I
            xt = tl.load(x_base + (f // D_I)[None, :] * sx[2] + (f % D_I)[None, :] * sx[4],
                         mask=t_ok[:, None] & f_ok[None, :], other=0.0)
            # α_i folded into the X operand (fp32 multiply, then back to the dot dtype): one accumulator pair
            # for all teachers.  (A per-teacher accumulator scaled after its K-loop measured slower: NOTES.md.)
            xt = (xt.to(tl.float32) * a_i).to(DOT_DTYPE)
            w_rows = w_base + f[:, None] * sw[1]
            w_ok = f_ok[:, None] & j_ok[None, :]
            w1 = tl.load(w_rows + col1[None, :] * sw[2], mask=w_ok, other=0.0).to(DOT_DTYPE)
            w2 = tl.load(w_rows + col2[None, :] * sw[2], mask=w_ok, other=0.0).to(DOT_DTYPE)
            if IEEE:
                p1 = tl.dot(xt, w1, p1, input_precision="ieee")
                p2 = tl.dot(xt, w2, p2, input_precision="ieee")
            else:
                p1 = tl.dot(xt, w1, p1)
                p2 = tl.dot(xt, w2, p2)

    if IS_KEY:
        pos = tl.load(pos_ptr + b * T + t, mask=t_ok, other=0.0)
        invf = tl.load(invf_ptr + l * stride_il + j, mask=j_ok, other=0.0)
        ang = pos[:, None] * invf[None, :]
        cos_a = tl.cos(ang)
        sin_a = tl.sin(ang)
        k1 = (p1 * cos_a - p2 * sin_a) * scaling
        k2 = (p2 * cos_a + p1 * sin_a) * scaling
    else:
        k1 = p1
        k2 = p2

    s_base = s_ptr + l * ss0 + b * ss1 + h * ss2 + t[:, None] * ss3
    tj_ok = t_ok[:, None] & j_ok[None, :]
    s1 = tl.load(s_base + j[None, :] * ss4, mask=tj_ok, other=0.0).to(tl.float32)
    s2 = tl.load(s_base + (j + HALF)[None, :] * ss4, mask=tj_ok, other=0.0).to(tl.float32)
    m = tl.load(mask_ptr + b * T + t, mask=t_ok, other=0.0)

    d1 = s1 - k1
    d2 = s2 - k2
    sq = tl.sum(d1 * d1, axis=1) + tl.sum(d2 * d2, axis=1)
    sk = tl.sum(s1 * k1, axis=1) + tl.sum(s2 * k2, axis=1)
    ss = tl.sum(s1 * s1, axis=1) + tl.sum(s2 * s2, axis=1)
    kk = tl.sum(k1 * k1, axis=1) + tl.sum(k2 * k2, axis=1)
    den_raw = tl.sqrt(ss) * tl.sqrt(kk)
    big = den_raw > 1e-8
    den = tl.where(big, den_raw, 1e-8)
    cs = sk / den
    out = (pid_lb * n_tiles + pid_t) * H_S + h
    tl.store(sq_ptr + out, tl.sum(m * sq, axis=0))
    tl.store(cos_ptr + out, tl.sum(m * cs, axis=0))

    if COMPUTE_GRAD:
        cm = tl.load(coef_mse_ptr + l)
        cc = tl.load(coef_cos_ptr + l)
        inv_den = 1.0 / den
        # Where den was clamped the reference's clamp passes no gradient through |S||k|.
        ck = tl.where(big, cs / tl.where(big, kk, 1.0), 0.0)
        cS = tl.where(big, cs / tl.where(big, ss, 1.0), 0.0)
        mm = m[:, None]
        g1 = mm * (-cm * d1 - cc * (s1 * inv_den[:, None] - ck[:, None] * k1))
        g2 = mm * (-cm * d2 - cc * (s2 * inv_den[:, None] - ck[:, None] * k2))
        e1 = mm * (cm * d1 - cc * (k1 * inv_den[:, None] - cS[:, None] * s1))
        e2 = mm * (cm * d2 - cc * (k2 * inv_den[:, None] - cS[:, None] * s2))
        if IS_KEY:
            r1 = (g1 * cos_a + g2 * sin_a) * scaling
            r2 = (g2 * cos_a - g1 * sin_a) * scaling
        else:
            r1 = g1
            r2 = g2
        g_base = g_ptr + ((l * B + b) * T + t[:, None]) * C
        tl.store(g_base + col1[None, :], r1.to(g_ptr.dtype.element_ty), mask=tj_ok)
        tl.store(g_base + col2[None, :], r2.to(g_ptr.dtype.element_ty), mask=tj_ok)
        ds_base = ds_ptr + (((l * B + b) * H_S + h) * T + t[:, None]) * D_S
        tl.store(ds_base + j[None, :], e1.to(ds_ptr.dtype.element_ty), mask=tj_ok)
        tl.store(ds_base + (j + HALF)[None, :], e2.to(ds_ptr.dtype.element_ty), mask=tj_ok)


@triton.jit
def _fused_kv_dw_kernel(
    x_ptr, sx0, sx1, sx2, sx3, sx4,
    w_ptr, sw0, sw1, sw2,
    g_ptr, alpha_ptr, stride_ab, stride_al, gout_ptr,
    dw_ptr, dalpha_ptr,
    B, T,
    D_I: tl.constexpr, F_I: tl.constexpr, C: tl.constexpr, N_FBLK, N_CBLK,
    DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_F: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # One program: adapter tile W_i[l][f-block, c-block].  For each batch row b:
    #   M(b)    = Σ_t X_i(b, t)[f]ᵀ G(b, t)[c]            (fp32 accumulation over the T axis)
    #   ∂α_i(b) += g Σ_{f,c} W[f, c] M(b)[f, c]           (partial over this tile; summed by the launcher)
    #   ∂W[f, c] = g Σ_b α_i(b) M(b)[f, c]
    # G already carries the mask (zero on padded tokens), so padded tokens contribute nothing.
    pid_c = tl.program_id(0)
    pid_f = tl.program_id(1)
    l = tl.program_id(2).to(tl.int64)
    f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    f_ok = f < F_I
    c_ok = c < C
    fc_ok = f_ok[:, None] & c_ok[None, :]
    x_cols = (f // D_I) * sx2 + (f % D_I) * sx4
    g_out = tl.load(gout_ptr).to(tl.float32)
    w = tl.load(w_ptr + l * sw0 + f[:, None] * sw1 + c[None, :] * sw2, mask=fc_ok, other=0.0).to(tl.float32)

    dw = tl.zeros([BLOCK_F, BLOCK_C], dtype=tl.float32)
    for bb in range(0, B):
        # l is int64, so every offset below is computed in 64 bits.
        mb = tl.zeros([BLOCK_F, BLOCK_C], dtype=tl.float32)
        x_base = x_ptr + l * sx0 + bb * sx1
        g_base = g_ptr + (l * B + bb) * T * C
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            t_ok = t < T
            xt = tl.load(x_base + x_cols[:, None] + t[None, :] * sx3,
                         mask=f_ok[:, None] & t_ok[None, :], other=0.0).to(DOT_DTYPE)
            gt = tl.load(g_base + t[:, None] * C + c[None, :],
                         mask=t_ok[:, None] & c_ok[None, :], other=0.0).to(DOT_DTYPE)
            if IEEE:
                mb = tl.dot(xt, gt, mb, input_precision="ieee")
            else:
                mb = tl.dot(xt, gt, mb)
        a = tl.load(alpha_ptr + bb * stride_ab + l * stride_al).to(tl.float32)
        part = tl.sum(tl.sum(w * mb, axis=1), axis=0) * g_out
        tl.store(dalpha_ptr + ((l * B + bb) * N_FBLK + pid_f) * N_CBLK + pid_c, part)
        dw += a * mb
    tl.store(dw_ptr + l * F_I * C + f[:, None] * C + c[None, :], (dw * g_out).to(dw_ptr.dtype.element_ty),
             mask=fc_ok)


# Autotuning: a few tile shapes on the GPU, one small config under the interpreter (where every config
# would run serially on the CPU).  Partial-sum buffers are laid out for the smallest tile of each list, so a
# config with larger tiles leaves some slots unwritten: each config's pre-hook zeroes them before every run
# (autotuning included), so slots written by another config never leak into the sums.
def _zero_fwd_partials(nargs):
    nargs["sq_ptr"].zero_()
    nargs["cos_ptr"].zero_()


def _zero_dw_partials(nargs):
    nargs["dalpha_ptr"].zero_()


def _configs(options, hook):
    return [triton.Config(kw, num_warps=w, num_stages=s, pre_hook=hook) for kw, w, s in options]


_FWD_CONFIGS_GPU = _configs([
    ({"BLOCK_T": 128, "BLOCK_F": 64}, 8, 3),
    ({"BLOCK_T": 128, "BLOCK_F": 32}, 4, 4),
    ({"BLOCK_T": 64, "BLOCK_F": 64}, 4, 3),
    ({"BLOCK_T": 256, "BLOCK_F": 32}, 8, 3),
], _zero_fwd_partials)
_DW_CONFIGS_GPU = _configs([
    ({"BLOCK_F": 128, "BLOCK_C": 128, "BLOCK_T": 64}, 8, 3),
    ({"BLOCK_F": 64, "BLOCK_C": 128, "BLOCK_T": 64}, 4, 3),
    ({"BLOCK_F": 128, "BLOCK_C": 256, "BLOCK_T": 32}, 8, 3),
    ({"BLOCK_F": 64, "BLOCK_C": 64, "BLOCK_T": 128}, 4, 4),
], _zero_dw_partials)
# Under the interpreter one config runs (every config would run serially on the CPU); tests may change it.
INTERP_FWD = {"BLOCK_T": 16, "BLOCK_F": 16}
INTERP_DW = {"BLOCK_F": 16, "BLOCK_C": 16, "BLOCK_T": 16}
_MIN_BLOCK_T = 16
_MIN_BLOCK_F = 16
_MIN_BLOCK_C = 16

# T is not part of the key: in training every batch has another length, and re-tuning each one cost seconds per
# step (measured on the H100 in the ZeRO-3 runs, bench/NOTES.md); the best tile barely moves with T.
_fwd_tuned = triton.autotune(_FWD_CONFIGS_GPU, key=["H_S", "D_S", "N", "HEADS", "DIMS", "IS_KEY",
                                                    "COMPUTE_GRAD", "DOT_DTYPE"])(_fused_kv_fwd_kernel)
_dw_tuned = triton.autotune(_DW_CONFIGS_GPU, key=["D_I", "F_I", "C", "DOT_DTYPE"])(_fused_kv_dw_kernel)


def _dot_dtype(tensors: list[torch.Tensor]):
    """Tensor-core operand dtype: the shared half dtype, else fp32 (bit-faithful 'ieee' products).

    Under TRITON_INTERPRET=1 (triton 3.9) tl.dot on bf16 operands returns garbage, so upcast there."""
    dtypes = {x.dtype for x in tensors}
    if len(dtypes) == 1 and dtypes <= {torch.bfloat16, torch.float16}:
        dt = dtypes.pop()
        if dt == torch.bfloat16 and _interpreting():
            return tl.float32, torch.float32, False
        return (tl.bfloat16 if dt == torch.bfloat16 else tl.float16), dt, False
    return tl.float32, torch.float32, not _interpreting()


def _alpha_strides(alpha: torch.Tensor) -> tuple[int, int, int]:
    if alpha.dim() == 2:
        return alpha.stride(0), 0, alpha.stride(1)
    return alpha.stride(0), alpha.stride(1), alpha.stride(2)


def fused_kv_loss_forward(student, teachers, weights, alpha, mask, positions, inv_freq, attention_scaling,
                          coef_mse, coef_cos, is_key: bool, compute_grad: bool):
    """One fused pass for keys (is_key: RoPE on the fused projection) or values.

    student [L, B, H_s, T, D_s]; teachers[i] [L, B, H_i, T, D_i]; weights[i] [L, H_i·D_i, H_s·D_s];
    alpha [B, N] | [B, L, N]; mask, positions [B, T] fp32 contiguous; inv_freq [L, D_s/2] fp32 (stride 0 on L
    allowed); coef_mse, coef_cos [L] fp32 (see the kernel comment).
    Returns (sq_sum [L], cos_sum [L], G [L, B, T, C] or None, dS [L, B, H_s, T, D_s] or None)."""
    L, B, H_s, T, D_s = student.shape
    C = H_s * D_s
    dot_tl, g_dtype, ieee = _dot_dtype(list(teachers) + list(weights))
    n_tiles = triton.cdiv(T, _MIN_BLOCK_T)
    dev = student.device
    sq = torch.zeros(L * B, n_tiles, H_s, device=dev, dtype=torch.float32)
    cs = torch.zeros(L * B, n_tiles, H_s, device=dev, dtype=torch.float32)
    if compute_grad:
        g = torch.empty(L, B, T, C, device=dev, dtype=g_dtype)
        ds = torch.empty(L, B, H_s, T, D_s, device=dev, dtype=student.dtype)
    else:
        g = ds = sq  # never written: COMPUTE_GRAD=False removes the stores
    sab, sal, san = _alpha_strides(alpha)
    args = (
        tuple(teachers), tuple(tuple(x.stride()) for x in teachers),
        tuple(weights), tuple(tuple(w.stride()) for w in weights),
        tuple(int(x.shape[2]) for x in teachers), tuple(int(x.shape[4]) for x in teachers), len(teachers),
        alpha, sab, sal, san,
        student, *student.stride(),
        mask, positions, inv_freq, inv_freq.stride(0),
        coef_mse, coef_cos, float(attention_scaling),
        sq, cs, g, ds,
        B, T, n_tiles,
    )
    meta = dict(H_S=H_s, D_S=D_s, HALF_BLOCK=max(16, triton.next_power_of_2(D_s // 2)),
                IS_KEY=is_key, COMPUTE_GRAD=compute_grad, DOT_DTYPE=dot_tl, IEEE=ieee)
    if _interpreting():
        grid = (H_s, triton.cdiv(T, INTERP_FWD["BLOCK_T"]), L * B)
        _fused_kv_fwd_kernel[grid](*args, **meta, **INTERP_FWD)
    else:
        grid = lambda cfg: (H_s, triton.cdiv(T, cfg["BLOCK_T"]), L * B)  # noqa: E731
        _fwd_tuned[grid](*args, **meta)
    sq_l = sq.view(L, -1).sum(1)
    cs_l = cs.view(L, -1).sum(1)
    return sq_l, cs_l, (g if compute_grad else None), (ds if compute_grad else None)


def fused_kv_loss_backward(teachers, weights, alpha, G, grad_out, need_w: list[bool], need_alpha: bool):
    """Adapter and router gradients from G = ∂L/∂P (see the module docstring).

    Returns (dW list (None where not needed), dalpha [B, L, N] fp32 or None)."""
    L, B, T, C = G.shape
    N = len(teachers)
    dev = G.device
    dot_tl, _, ieee = _dot_dtype(list(teachers) + list(weights))
    sab, sal, _ = _alpha_strides(alpha)
    dalpha = torch.zeros(B, L, N, device=dev, dtype=torch.float32) if need_alpha else None
    dws = []
    for i, (x, w) in enumerate(zip(teachers, weights)):
        if not (need_w[i] or need_alpha):
            dws.append(None)
            continue
        D_i, F_i = int(x.shape[4]), int(x.shape[2] * x.shape[4])
        n_f, n_c = triton.cdiv(F_i, _MIN_BLOCK_F), triton.cdiv(C, _MIN_BLOCK_C)
        part = torch.zeros(L, B, n_f, n_c, device=dev, dtype=torch.float32)
        dw = torch.empty(L, F_i, C, device=dev, dtype=w.dtype)
        # alpha[..., i] is a view: its data pointer already points at teacher i, the (b, l) strides stay.
        args = (x, *x.stride(), w, *w.stride(), G, alpha[..., i], sab, sal, grad_out, dw, part, B, T)
        meta = dict(D_I=D_i, F_I=F_i, C=C, N_FBLK=n_f, N_CBLK=n_c, DOT_DTYPE=dot_tl, IEEE=ieee)
        if _interpreting():
            grid = (triton.cdiv(C, INTERP_DW["BLOCK_C"]), triton.cdiv(F_i, INTERP_DW["BLOCK_F"]), L)
            _fused_kv_dw_kernel[grid](*args, **meta, **INTERP_DW)
        else:
            grid = lambda cfg: (triton.cdiv(C, cfg["BLOCK_C"]), triton.cdiv(F_i, cfg["BLOCK_F"]), L)  # noqa: E731
            _dw_tuned[grid](*args, **meta)
        if need_alpha:
            dalpha[:, :, i] = part.sum((2, 3)).t()
        dws.append(dw if need_w[i] else None)
    return dws, dalpha


class FusedKVDistillLossFunction(torch.autograd.Function):
    """loss = Σ_l c_l (λK k_mse[l] + λV v_mse[l] + β (1 − cos[l])),  c_l = w_l / Σ_l w_l, where per layer l

        K_f = Σ_i α_i R(X^k_i W^k_i[l]),   V_f = Σ_i α_i X^v_i W^v_i[l]   (R: student RoPE, scaled by s)
        k_mse[l] = Σ_{b,t} m Σ_{h,d} (K_s − K_f)² / (n H_s D_s)          (same for v_mse)
        cos[l]   = Σ_{b,t} m Σ_h ½ (cos(K_s, K_f) + cos(V_s, V_f)) / (n H_s),  n = Σ m

    Arguments of `apply` (all on one device; strides allowed everywhere):
        student_k, student_v  [L, B, H_s, T, D_s]   bf16 | fp16 | fp32, student keys post-RoPE and values
        alpha                 [B, N] | [B, L, N]     router weights
        layer_weights         [L] fp32               w_l (gradient: ∂L/∂w_l = (term_l − loss) / Σ w)
        mask                  [B, T] fp32            0/1 token mask, at least one 1
        positions             [B, T] fp32            student positions
        inv_freq              [L, D_s/2] fp32        student RoPE frequencies (stride 0 on L for a shared one)
        attention_scaling, lambda_k, lambda_v, beta   Python floats
        n_teachers            N (1..8)
        *tensors              w_k[0..N), w_v[0..N), teacher_k[0..N), teacher_v[0..N)
                              w [L, H_i·D_i, H_s·D_s]; teacher [L, B, H_i, T, D_i] (pre-RoPE, aligned)
    Returns (loss [], k_mse [L], v_mse [L], cos [L]); the three stats are non-differentiable.
    Gradients reach student_k, student_v, alpha, layer_weights and the adapters, never the teachers.
    Backward runs once per forward (the saved ∂L/∂S buffers are scaled in place).
    """

    @staticmethod
    def forward(ctx, student_k, student_v, alpha, layer_weights, mask, positions, inv_freq,
                attention_scaling, lambda_k, lambda_v, beta, n_teachers, *tensors):
        N = n_teachers
        w_k, w_v = list(tensors[:N]), list(tensors[N:2 * N])
        t_k, t_v = list(tensors[2 * N:3 * N]), list(tensors[3 * N:])
        L, B, H_s, T, D_s = student_k.shape
        n = mask.sum()
        w_sum = layer_weights.sum()
        c_l = layer_weights / w_sum
        coef_k = 2.0 * lambda_k * c_l / (n * H_s * D_s)
        coef_v = 2.0 * lambda_v * c_l / (n * H_s * D_s)
        coef_cos = beta * c_l / (2.0 * n * H_s)
        compute_grad = any(ctx.needs_input_grad)
        sq_k, cs_k, g_k, ds_k = fused_kv_loss_forward(student_k, t_k, w_k, alpha, mask, positions, inv_freq,
                                                      attention_scaling, coef_k, coef_cos, True, compute_grad)
        sq_v, cs_v, g_v, ds_v = fused_kv_loss_forward(student_v, t_v, w_v, alpha, mask, positions, inv_freq,
                                                      attention_scaling, coef_v, coef_cos, False, compute_grad)
        k_mse = sq_k / (n * H_s * D_s)
        v_mse = sq_v / (n * H_s * D_s)
        cos = (cs_k + cs_v) / (2.0 * n * H_s)
        terms = lambda_k * k_mse + lambda_v * v_mse + beta * (1.0 - cos)
        loss = (c_l * terms).sum()
        if compute_grad:
            ctx.save_for_backward(alpha, g_k, g_v, ds_k, ds_v, terms, loss, w_sum, *w_k, *w_v, *t_k, *t_v)
        ctx.n_teachers = N
        ctx.spent = False
        ctx.mark_non_differentiable(k_mse, v_mse, cos)
        return loss, k_mse, v_mse, cos

    @staticmethod
    def backward(ctx, grad_loss, _g_kmse, _g_vmse, _g_cos):
        if ctx.spent:
            raise RuntimeError("the triton kv_distill_loss backward can run only once per forward "
                               "(use backend='torch' for retain_graph / double backward)")
        ctx.spent = True
        N = ctx.n_teachers
        alpha, g_k, g_v, ds_k, ds_v, terms, loss, w_sum, *rest = ctx.saved_tensors
        w_k, w_v, t_k, t_v = rest[:N], rest[N:2 * N], rest[2 * N:3 * N], rest[3 * N:]
        need = ctx.needs_input_grad
        g = grad_loss.detach().to(torch.float32).reshape(1).contiguous()
        d_sk = ds_k.mul_(g) if need[0] else None
        d_sv = ds_v.mul_(g) if need[1] else None
        need_alpha = need[2]
        dwk, da_k = fused_kv_loss_backward(t_k, w_k, alpha, g_k, g, list(need[12:12 + N]), need_alpha)
        dwv, da_v = fused_kv_loss_backward(t_v, w_v, alpha, g_v, g, list(need[12 + N:12 + 2 * N]), need_alpha)
        d_alpha = None
        if need_alpha:
            d_alpha = da_k + da_v
            if alpha.dim() == 2:
                d_alpha = d_alpha.sum(1)
            d_alpha = d_alpha.to(alpha.dtype)
        d_lw = g * (terms - loss) / w_sum if need[3] else None
        return (d_sk, d_sv, d_alpha, d_lw, None, None, None, None, None, None, None, None,
                *dwk, *dwv, *([None] * (2 * N)))
