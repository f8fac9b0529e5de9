"""Memory-efficient attention KL: KL(softmax(scale·Q K_sᵀ) ‖ softmax(scale·Q K_fᵀ)) per query row, in O(T) memory.

Notation (one batch row b, query head h, its KV head g = h // GROUP; the readable reference is
kvfuse.attention.attention_kl with backend="torch"):
    allowed(i, j) = j ≤ i  and  mask[b, i]  and  mask[b, j]       (causal, padded queries and keys excluded)
    s_ij = scale · q_i · k_s,j ,   f_ij = scale · q_i · k_f,j      (over allowed j only)
    P_ij = exp(s_ij − lse_s,i),    Q_ij = exp(f_ij − lse_f,i)
    E_i  = Σ_j P_ij (s_ij − f_ij)
    KL_i = Σ_j P_ij (log P_ij − log Q_ij) = E_i − lse_s,i + lse_f,i          (0 for a row with no allowed key)
Derivatives, for an upstream gradient w_i = ∂L/∂KL_i:
    ∂KL_i/∂s_ij = P_ij (s_ij − f_ij − E_i)        ∂KL_i/∂f_ij = Q_ij − P_ij
    dS_ij = w_i P_ij (s_ij − f_ij − E_i),          dF_ij = w_i (Q_ij − P_ij)
    ∂L/∂q_i    = scale Σ_j (dS_ij k_s,j + dF_ij k_f,j)
    ∂L/∂k_s,j  = scale Σ_{h in group g} Σ_i dS_ij q_i ,   ∂L/∂k_f,j = scale Σ_{h in group g} Σ_i dF_ij q_i
Only the T×T tiles in flight ever exist: the forward keeps per-row online-softmax statistics (running maxima,
normalisers and the P-weighted sum of s − f) and writes lse_s, lse_f, E and KL per row ([B, H, T] each); the
backward recomputes s and f tile by tile from them, once in a query-major kernel (∂q) and once in a key-major
kernel (∂k_s, ∂k_f per query head, summed over the group afterwards): no atomics, so results are deterministic.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# A finite stand-in for −∞: a row whose keys are all masked so far keeps max = _NEG, so no inf − inf = NaN can
# appear; masked pairs get exp(_NEG) = 0 (the exponent is replaced before exp, so nothing overflows either).
_NEG = tl.constexpr(-1.0e30)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _attention_kl_fwd_kernel(
    q_ptr, sqb, sqh, sqt, sqd,
    ks_ptr, sksb, sksh, skst, sksd,
    kf_ptr, skfb, skfh, skft, skfd,
    mask_ptr, kl_ptr, lse_s_ptr, lse_f_ptr, e_ptr,
    H, T, GROUP, scale, T_BUCKET,
    D: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program: query tile [BLOCK_M] of (b, h).  Over key tiles j < end of the tile (causal), online:
    #   m_s ← max(m_s, max_j s_ij),  c = exp(m_s,old − m_s)
    #   l_s ← c·l_s + Σ_j e^{s_ij − m_s},   a ← c·a + Σ_j e^{s_ij − m_s} (s_ij − f_ij)
    #   m_f, l_f likewise for f.          At the end: lse = m + log l,  E = a / l_s,  KL = E − lse_s + lse_f.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)   # heaviest (last) query tiles first
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    g = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < T
    d_ok = offs_d < D
    q_valid = (tl.load(mask_ptr + b * T + offs_m, mask=m_in, other=0) != 0) & m_in
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd,
                mask=m_in[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)

    m_s = tl.full([BLOCK_M], _NEG, tl.float32)
    m_f = tl.full([BLOCK_M], _NEG, tl.float32)
    l_s = tl.zeros([BLOCK_M], tl.float32)
    l_f = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M], tl.float32)
    ks_base = ks_ptr + b * sksb + g * sksh
    kf_base = kf_ptr + b * skfb + g * skfh
    hi = tl.minimum((pid_m + 1) * BLOCK_M, T)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_in = offs_n < T
        k_valid = (tl.load(mask_ptr + b * T + offs_n, mask=n_in, other=0) != 0) & n_in
        kd_ok = n_in[:, None] & d_ok[None, :]
        k_s = tl.load(ks_base + offs_n[:, None] * skst + offs_d[None, :] * sksd, mask=kd_ok, other=0.0)
        k_f = tl.load(kf_base + offs_n[:, None] * skft + offs_d[None, :] * skfd, mask=kd_ok, other=0.0)
        s = _dot(q, tl.trans(k_s.to(DOT_DTYPE)), IEEE) * scale
        f = _dot(q, tl.trans(k_f.to(DOT_DTYPE)), IEEE) * scale
        allowed = (offs_n[None, :] <= offs_m[:, None]) & k_valid[None, :] & q_valid[:, None]

        ms_new = tl.maximum(m_s, tl.max(tl.where(allowed, s, _NEG), axis=1))
        c_s = tl.exp(m_s - ms_new)
        p = tl.exp(tl.where(allowed, s - ms_new[:, None], _NEG))
        l_s = l_s * c_s + tl.sum(p, axis=1)
        acc = acc * c_s + tl.sum(p * (s - f), axis=1)
        m_s = ms_new

        mf_new = tl.maximum(m_f, tl.max(tl.where(allowed, f, _NEG), axis=1))
        c_f = tl.exp(m_f - mf_new)
        pf = tl.exp(tl.where(allowed, f - mf_new[:, None], _NEG))
        l_f = l_f * c_f + tl.sum(pf, axis=1)
        m_f = mf_new

    has = l_s > 0.0
    lse_s = tl.where(has, m_s + tl.log(tl.where(has, l_s, 1.0)), 0.0)
    lse_f = tl.where(has, m_f + tl.log(tl.where(has, l_f, 1.0)), 0.0)
    e = tl.where(has, acc / tl.where(has, l_s, 1.0), 0.0)
    kl = e - lse_s + lse_f
    row = (b * H + h) * T + offs_m
    tl.store(kl_ptr + row, kl, mask=m_in)
    tl.store(lse_s_ptr + row, lse_s, mask=m_in)
    tl.store(lse_f_ptr + row, lse_f, mask=m_in)
    tl.store(e_ptr + row, e, mask=m_in)


@triton.jit
def _attention_kl_bwd_dq_kernel(
    q_ptr, sqb, sqh, sqt, sqd,
    ks_ptr, sksb, sksh, skst, sksd,
    kf_ptr, skfb, skfh, skft, skfd,
    mask_ptr, dkl_ptr, lse_s_ptr, lse_f_ptr, e_ptr, dq_ptr,
    H, T, GROUP, scale, T_BUCKET,
    D: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program: query tile of (b, h).  Recompute s, f per key tile, then (header formulas)
    #   P = e^{s − lse_s}, Q = e^{f − lse_f} on allowed pairs (0 elsewhere)
    #   dS = w P (s − f − E),  dF = w (Q − P),   ∂q = scale (dS K_s + dF K_f)
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)   # heaviest (last) query tiles first
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    g = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < T
    d_ok = offs_d < D
    q_valid = (tl.load(mask_ptr + b * T + offs_m, mask=m_in, other=0) != 0) & m_in
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd,
                mask=m_in[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)
    row = (b * H + h) * T + offs_m
    w = tl.load(dkl_ptr + row, mask=m_in, other=0.0)
    lse_s = tl.load(lse_s_ptr + row, mask=m_in, other=0.0)
    lse_f = tl.load(lse_f_ptr + row, mask=m_in, other=0.0)
    e = tl.load(e_ptr + row, mask=m_in, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    ks_base = ks_ptr + b * sksb + g * sksh
    kf_base = kf_ptr + b * skfb + g * skfh
    hi = tl.minimum((pid_m + 1) * BLOCK_M, T)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_in = offs_n < T
        k_valid = (tl.load(mask_ptr + b * T + offs_n, mask=n_in, other=0) != 0) & n_in
        kd_ok = n_in[:, None] & d_ok[None, :]
        k_s = tl.load(ks_base + offs_n[:, None] * skst + offs_d[None, :] * sksd, mask=kd_ok,
                      other=0.0).to(DOT_DTYPE)
        k_f = tl.load(kf_base + offs_n[:, None] * skft + offs_d[None, :] * skfd, mask=kd_ok,
                      other=0.0).to(DOT_DTYPE)
        s = _dot(q, tl.trans(k_s), IEEE) * scale
        f = _dot(q, tl.trans(k_f), IEEE) * scale
        allowed = (offs_n[None, :] <= offs_m[:, None]) & k_valid[None, :] & q_valid[:, None]
        p = tl.exp(tl.where(allowed, s - lse_s[:, None], _NEG))
        pf = tl.exp(tl.where(allowed, f - lse_f[:, None], _NEG))
        ds = w[:, None] * p * (s - f - e[:, None])
        df = w[:, None] * (pf - p)
        dq += _dot(ds.to(DOT_DTYPE), k_s, IEEE)
        dq += _dot(df.to(DOT_DTYPE), k_f, IEEE)

    tl.store(dq_ptr + ((b * H + h) * T + offs_m[:, None]) * D + offs_d[None, :],
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=m_in[:, None] & d_ok[None, :])


@triton.jit
def _attention_kl_bwd_dk_kernel(
    q_ptr, sqb, sqh, sqt, sqd,
    ks_ptr, sksb, sksh, skst, sksd,
    kf_ptr, skfb, skfh, skft, skfd,
    mask_ptr, dkl_ptr, lse_s_ptr, lse_f_ptr, e_ptr, dks_ptr, dkf_ptr,
    H, T, GROUP, scale, T_BUCKET,
    D: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program: key tile [BLOCK_N] of KV head g as seen by ONE query head h of its group.  Over every query
    # tile that can see this key tile (i ≥ first key), recompute the transposed tiles sᵀ, fᵀ [BLOCK_N, BLOCK_M]:
    #   dSᵀ = Pᵀ (sᵀ − fᵀ − E) w,  dFᵀ = (Qᵀ − Pᵀ) w,   ∂k_s += scale dSᵀ q,  ∂k_f += scale dFᵀ q
    # and write this head's share as an fp32 partial [B, H, T, D]; the launcher sums the GROUP shares.  (One
    # program per query head rather than a loop over the group: GROUP× more programs to fill the GPU, no atomics.)
    # Key tile 0 sees every query tile, the last one only one: the heaviest programs are launched first.
    pid_n = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    g = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_in = offs_n < T
    d_ok = offs_d < D
    kd_ok = n_in[:, None] & d_ok[None, :]
    k_valid = (tl.load(mask_ptr + b * T + offs_n, mask=n_in, other=0) != 0) & n_in
    k_s = tl.load(ks_ptr + b * sksb + g * sksh + offs_n[:, None] * skst + offs_d[None, :] * sksd,
                  mask=kd_ok, other=0.0).to(DOT_DTYPE)
    k_f = tl.load(kf_ptr + b * skfb + g * skfh + offs_n[:, None] * skft + offs_d[None, :] * skfd,
                  mask=kd_ok, other=0.0).to(DOT_DTYPE)

    dks = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dkf = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    q_base = q_ptr + b * sqb + h * sqh
    row0 = (b * H + h) * T
    lo = (pid_n * BLOCK_N) // BLOCK_M * BLOCK_M
    for m0 in range(lo, T, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_in = offs_m < T
        q_valid = (tl.load(mask_ptr + b * T + offs_m, mask=m_in, other=0) != 0) & m_in
        q = tl.load(q_base + offs_m[:, None] * sqt + offs_d[None, :] * sqd,
                    mask=m_in[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)
        w = tl.load(dkl_ptr + row0 + offs_m, mask=m_in, other=0.0)
        lse_s = tl.load(lse_s_ptr + row0 + offs_m, mask=m_in, other=0.0)
        lse_f = tl.load(lse_f_ptr + row0 + offs_m, mask=m_in, other=0.0)
        e = tl.load(e_ptr + row0 + offs_m, mask=m_in, other=0.0)
        s_t = _dot(k_s, tl.trans(q), IEEE) * scale
        f_t = _dot(k_f, tl.trans(q), IEEE) * scale
        allowed = (offs_n[:, None] <= offs_m[None, :]) & k_valid[:, None] & q_valid[None, :]
        p_t = tl.exp(tl.where(allowed, s_t - lse_s[None, :], _NEG))
        pf_t = tl.exp(tl.where(allowed, f_t - lse_f[None, :], _NEG))
        ds_t = p_t * (s_t - f_t - e[None, :]) * w[None, :]
        df_t = (pf_t - p_t) * w[None, :]
        dks += _dot(ds_t.to(DOT_DTYPE), q, IEEE)
        dkf += _dot(df_t.to(DOT_DTYPE), q, IEEE)

    out = (row0 + offs_n[:, None]) * D + offs_d[None, :]
    tl.store(dks_ptr + out, dks * scale, mask=kd_ok)
    tl.store(dkf_ptr + out, dkf * scale, mask=kd_ok)


# Tile shapes: a few autotuned ones for half-precision inputs on the GPU; one small fixed shape for fp32 'ieee'
# products (no tensor cores: a 128-row fp32 tile compiles for ~15 s and spills, and fp32 is the checking path,
# not the training one); one small fixed shape under the interpreter (every config would run serially on the
# CPU; tests may change INTERP_BLOCKS).  All kernels write each output element exactly once (no accumulation
# into outputs), so autotuning's repeated launches are harmless.
def _configs(options):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in options]


# T's power-of-two bucket is in the key (T_BUCKET, otherwise unused by the kernels): small T needs small tiles
# to fill the GPU, long T prefers large ones, and training with many distinct lengths retunes only per bucket.
# The backward shapes were picked by ptxas -v for sm_90a (triton 3.9 here): the key-major kernel holds two
# [BLOCK_N, D] fp32 accumulators, so 64-key tiles want 8 warps (4 warps spilled ~1 KB per thread).
_KEY = ["T_BUCKET", "D", "GROUP", "DOT_DTYPE", "IEEE"]
_FP32 = [(64, 32, 4, 2)]
_TUNED = {
    "fwd": (triton.autotune(_configs([(128, 64, 8, 3), (64, 64, 4, 3)]), key=_KEY)(_attention_kl_fwd_kernel),
            triton.autotune(_configs(_FP32), key=_KEY)(_attention_kl_fwd_kernel)),
    "dq": (triton.autotune(_configs([(128, 64, 8, 2), (64, 64, 8, 3)]), key=_KEY)(_attention_kl_bwd_dq_kernel),
           triton.autotune(_configs(_FP32), key=_KEY)(_attention_kl_bwd_dq_kernel)),
    "dk": (triton.autotune(_configs([(64, 64, 8, 2), (32, 64, 4, 3)]), key=_KEY)(_attention_kl_bwd_dk_kernel),
           triton.autotune(_configs(_FP32), key=_KEY)(_attention_kl_bwd_dk_kernel)),
}
_KERNELS = {"fwd": _attention_kl_fwd_kernel, "dq": _attention_kl_bwd_dq_kernel, "dk": _attention_kl_bwd_dk_kernel}
INTERP_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}


def _dot_dtype(dtype: torch.dtype):
    """(operand dtype for tl.dot, 'ieee' fp32 products?).  Half inputs run on half tensor cores with fp32
    accumulation; fp32 inputs use 'ieee' products (tf32 would miss the 1e-4 contract).  Under TRITON_INTERPRET=1
    (triton 3.9) tl.dot on bf16 operands returns garbage, so bf16 is upcast there."""
    if dtype == torch.float16:
        return tl.float16, False
    if dtype == torch.bfloat16:
        return (tl.float32, False) if _interpreting() else (tl.bfloat16, False)
    return tl.float32, not _interpreting()


def _launch(name, grid_of, args, meta):
    if _interpreting():
        _KERNELS[name][grid_of(INTERP_BLOCKS)](*args, **meta, **INTERP_BLOCKS)
    else:
        _TUNED[name][1 if meta["IEEE"] else 0][grid_of](*args, **meta)


def attention_kl_forward(q, k_s, k_f, mask, scale: float):
    """Row KL and the row statistics the backward needs.

    q [B, H, T, D]; k_s, k_f [B, H_kv, T, D] (strides allowed, one dtype: fp16 | bf16 | fp32); mask [B, T] int8
    contiguous (nonzero = valid).  Returns (kl, lse_s, lse_f, e), each [B, H, T] fp32 contiguous."""
    B, H, T, D = q.shape
    H_kv = k_s.shape[1]
    dot_tl, ieee = _dot_dtype(q.dtype)
    kl, lse_s, lse_f, e = torch.empty(4, B, H, T, device=q.device, dtype=torch.float32).unbind(0)
    args = (q, *q.stride(), k_s, *k_s.stride(), k_f, *k_f.stride(), mask, kl, lse_s, lse_f, e,
            H, T, H // H_kv, float(scale), triton.next_power_of_2(T))
    meta = dict(D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), DOT_DTYPE=dot_tl, IEEE=ieee)
    _launch("fwd", lambda c: (triton.cdiv(T, c["BLOCK_M"]), B * H), args, meta)
    return kl, lse_s, lse_f, e


def attention_kl_backward(q, k_s, k_f, mask, scale: float, dkl, lse_s, lse_f, e, need_q=True, need_k=True):
    """Gradients of Σ dkl·KL: (dq [B, H, T, D], dk_s, dk_f [B, H_kv, T, D]) contiguous in the inputs' dtypes
    (None where not needed).  dkl, lse_s, lse_f, e: [B, H, T] fp32 contiguous."""
    B, H, T, D = q.shape
    H_kv = k_s.shape[1]
    dot_tl, ieee = _dot_dtype(q.dtype)
    meta = dict(D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), DOT_DTYPE=dot_tl, IEEE=ieee)
    common = (q, *q.stride(), k_s, *k_s.stride(), k_f, *k_f.stride(), mask, dkl, lse_s, lse_f, e)
    dq = dks = dkf = None
    if need_q:
        dq = torch.empty(B, H, T, D, device=q.device, dtype=q.dtype)
        _launch("dq", lambda c: (triton.cdiv(T, c["BLOCK_M"]), B * H),
                (*common, dq, H, T, H // H_kv, float(scale), triton.next_power_of_2(T)), meta)
    if need_k:
        # fp32 per-query-head partials (O(T) memory), summed over each KV head's group of query heads.
        part = torch.empty(2, B, H, T, D, device=q.device, dtype=torch.float32)
        _launch("dk", lambda c: (triton.cdiv(T, c["BLOCK_N"]), B * H),
                (*common, part[0], part[1], H, T, H // H_kv, float(scale), triton.next_power_of_2(T)), meta)
        dk = part.view(2, B, H_kv, H // H_kv, T, D).sum(3)
        dks, dkf = dk[0].to(k_s.dtype), dk[1].to(k_f.dtype)
    return dq, dks, dkf


class AttentionKLFunction(torch.autograd.Function):
    """Per-row attention KL, KL[b, h, i] = Σ_j P_ij (log P_ij − log Q_ij) with

        P = softmax_j(scale · q[b, h, i] · k_s[b, g, j]),  Q = softmax_j(scale · q[b, h, i] · k_f[b, g, j])
        over allowed j: j ≤ i, mask[b, j] and mask[b, i];  g = h // (H / H_kv).
    Rows with no allowed key (padded queries) give KL = 0 and pass no gradient.  Memory beyond the inputs and
    their gradients: four [B, H, T] fp32 row statistics, and in the backward two fp32 tensors of q's shape (the
    per-query-head key-gradient shares); no T × T tensor.

    Arguments of `apply` (one device; strides allowed; q, k_s, k_f share one dtype fp16 | bf16 | fp32):
        q      [B, H, T, D]       student queries (post-RoPE)
        k_s    [B, H_kv, T, D]    student keys (post-RoPE); H a multiple of H_kv
        k_f    [B, H_kv, T, D]    fused teacher keys (post-RoPE)
        mask   [B, T] int8        contiguous, nonzero = valid token
        scale  float              softmax scale (1/√D in attention)
    Returns KL [B, H, T] fp32.  Gradients reach q, k_s and k_f (fp32 accumulation, outputs in their dtypes).
    """

    @staticmethod
    def forward(ctx, q, k_s, k_f, mask, scale):
        kl, lse_s, lse_f, e = attention_kl_forward(q, k_s, k_f, mask, scale)
        ctx.save_for_backward(q, k_s, k_f, mask, lse_s, lse_f, e)
        ctx.scale = scale
        return kl

    @staticmethod
    def backward(ctx, dkl):
        q, k_s, k_f, mask, lse_s, lse_f, e = ctx.saved_tensors
        need = ctx.needs_input_grad
        dq, dks, dkf = attention_kl_backward(q, k_s, k_f, mask, ctx.scale, dkl.float().contiguous(),
                                             lse_s, lse_f, e, need_q=need[0], need_k=need[1] or need[2])
        return dq, (dks if need[1] else None), (dkf if need[2] else None), None, None
