"""Memory-efficient attention KL: KL(softmax(scale·Q K_sᵀ) ‖ softmax(scale·Q K_fᵀ)) per query row, in O(T) memory,
and the operators `kvfuse::attention_kl_fwd` / `kvfuse::attention_kl_bwd` that torch.compile traces as single nodes.

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
Only the T×T tiles in flight ever exist.  Forward: per-row online-softmax statistics (running maxima, normalisers
and the P-weighted sum of s − f); it writes KL and (lse_s, lse_f, E) per row.  Backward, one pass: a key-major
program per (key tile, b, KV head[, share of its query heads]) computes s and f once per (query tile, key tile)
pair, keeps ∂k_s, ∂k_f in registers over the group's query heads and query tiles, and adds each pair's ∂q share
into an fp32 buffer with atomics (6 products per pair in the backward, 8 with the forward's 2: the floor).  Atomics
make ∂q's fp32 summation order vary from run to run; when torch.use_deterministic_algorithms(True) is on, ∂q comes
instead from a query-major kernel that recomputes s and f (two passes, 8 products per pair, no atomics).

Masking: a padded key gets the additive bias −1e30 on both logits (a finite stand-in for −∞, so no inf − inf);
the forward and the query-major ∂q kernel apply the causal mask only on key tiles that straddle the diagonal (the
one-pass backward on every tile, see there); a padded query row is zeroed at the end of the forward and given
lse = +1e30 in the backward (so P = Q = 0 there, whatever its logits).  Inside the kernels logits are in base-2
units (log2(e)·scale·q·k, exp2 and log2); the row statistics they exchange are in natural units.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from triton.tools.tensor_descriptor import TensorDescriptor

from kvfuse.kernels.utils import autotune_configs, cdiv, define_op, dot_dtype, interpreting, next_power_of_2

_NEG = tl.constexpr(-1.0e30)
_POS = tl.constexpr(1.0e30)
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _key_bias(mask_row, offs_n, T):
    """0 for a valid key, −1e30 for a padded or out-of-range one."""
    n_in = offs_n < T
    return tl.where((tl.load(mask_row + offs_n, mask=n_in, other=0) != 0) & n_in, 0.0, _NEG)


@triton.jit
def _logits_query_major(q, ks_base, skst, sksd, kf_base, skft, skfd, mask_row, n0, offs_m, offs_d, d_ok, T, scale2,
                        kv_b, kv_g, kv_row0, BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
                        CAUSAL: tl.constexpr, K_TMA: tl.constexpr = 0, BLOCK_D: tl.constexpr = 16):
    """Base-2 logits s, f [BLOCK_M, BLOCK_N] of query rows offs_m against key tile n0 (padded keys, and later keys
    when CAUSAL, biased by −1e30), and the key tiles k_s, k_f [BLOCK_N, BLOCK_D].  K_TMA: the key tiles come from
    TMA descriptors (ks_base, kf_base: 2 = rows [B·H_kv·T, D] from row kv_row0 = (b·H_kv + g)·T on, 1 = 4-D
    [B, H_kv, T, D] at (kv_b, kv_g)) instead of pointers."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    bias = _key_bias(mask_row, offs_n, T)[None, :]
    if CAUSAL:
        bias = tl.where(offs_n[None, :] <= offs_m[:, None], bias, _NEG)
    if K_TMA == 2:
        # Rows [B·H_kv·T, D]: rows past T are the next head's keys (finite, biased by −1e30) or zeros past the end.
        k_s = ks_base.load([kv_row0 + n0, 0]).to(DOT_DTYPE)
        k_f = kf_base.load([kv_row0 + n0, 0]).to(DOT_DTYPE)
    elif K_TMA == 1:
        k_s = ks_base.load([kv_b, kv_g, n0, 0]).reshape(BLOCK_N, BLOCK_D).to(DOT_DTYPE)
        k_f = kf_base.load([kv_b, kv_g, n0, 0]).reshape(BLOCK_N, BLOCK_D).to(DOT_DTYPE)
    else:
        kd_ok = (offs_n < T)[:, None] & d_ok[None, :]
        k_s = tl.load(ks_base + offs_n[:, None] * skst + offs_d[None, :] * sksd, mask=kd_ok, other=0.0).to(DOT_DTYPE)
        k_f = tl.load(kf_base + offs_n[:, None] * skft + offs_d[None, :] * skfd, mask=kd_ok, other=0.0).to(DOT_DTYPE)
    s = _dot(q, tl.trans(k_s), IEEE) * scale2 + bias
    f = _dot(q, tl.trans(k_f), IEEE) * scale2 + bias
    return s, f, k_s, k_f


@triton.jit
def _fwd_step(q, ks_base, skst, sksd, kf_base, skft, skfd, mask_row, n0, offs_m, offs_d, d_ok, T, scale2,
              m_s, m_f, l_s, l_f, acc, kv_b, kv_g, kv_row0,
              BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, CAUSAL: tl.constexpr,
              K_TMA: tl.constexpr, BLOCK_D: tl.constexpr):
    # Online update over one key tile, in base-2 units (s, f, m ← log2(e)·logits; exp2 spares the multiply
    # that exp costs per element):  m ← max(m, max_j s_ij),  c = 2^{m_old − m},
    #   l_s ← c·l_s + Σ_j 2^{s_ij − m_s},   acc ← c·acc + Σ_j 2^{s_ij − m_s} (s_ij − f_ij);  m_f, l_f likewise.
    # A padded key's bias cancels in s − f and its weight is 0 once the row has seen a valid key (c = 0 then).
    s, f, _, _ = _logits_query_major(q, ks_base, skst, sksd, kf_base, skft, skfd, mask_row, n0, offs_m, offs_d, d_ok,
                                     T, scale2, kv_b, kv_g, kv_row0, BLOCK_N, DOT_DTYPE, IEEE, CAUSAL, K_TMA,
                                     BLOCK_D)

    ms_new = tl.maximum(m_s, tl.max(s, axis=1))
    c_s = tl.exp2(m_s - ms_new)
    p = tl.exp2(s - ms_new[:, None])
    l_s = l_s * c_s + tl.sum(p, axis=1)
    acc = acc * c_s + tl.sum(p * (s - f), axis=1)

    mf_new = tl.maximum(m_f, tl.max(f, axis=1))
    l_f = l_f * tl.exp2(m_f - mf_new) + tl.sum(tl.exp2(f - mf_new[:, None]), axis=1)
    return ms_new, mf_new, l_s, l_f, acc


@triton.jit
def _query_tile(q_ptr, sqb, sqh, sqt, sqd, mask_ptr, H, T, GROUP, D: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr):
    """The query-major programs' start: (b, h, KV head g) of grid axis 0, the query tile of axis 1 counted from the
    end (the heaviest causal tiles first), its offsets and masks, the mask row and the loaded q tile."""
    pid_bh = tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    g = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < T
    d_ok = offs_d < D
    mask_row = mask_ptr + b * T
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd,
                mask=m_in[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)
    return b, h, g, pid_m, start_m, offs_m, offs_d, m_in, d_ok, mask_row, q


@triton.jit
def _attention_kl_fwd_kernel(
    q_ptr, sqb, sqh, sqt, sqd,
    ks_ptr, sksb, sksh, skst, sksd,
    kf_ptr, skfb, skfh, skft, skfd,
    mask_ptr, kl_ptr, stats_ptr,
    H, T, GROUP, N_ROWS, scale, T_BUCKET,
    D: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, K_TMA: tl.constexpr = 0,
):
    # One program: query tile [BLOCK_M] of (b, h).  Key tiles wholly below the diagonal first (no causal mask),
    # then the ones that straddle it.  At the end: lse = ln 2 · (m + log2 l), E = ln 2 · acc / l_s,
    # KL = E − lse_s + lse_f.
    # Grid (B·H, query tiles), the last (heaviest) query tiles launched first.
    b, h, g, pid_m, start_m, offs_m, offs_d, m_in, d_ok, mask_row, q = _query_tile(
        q_ptr, sqb, sqh, sqt, sqd, mask_ptr, H, T, GROUP, D, BLOCK_D, DOT_DTYPE, BLOCK_M)
    q_valid = (tl.load(mask_row + offs_m, mask=m_in, other=0) != 0) & m_in

    m_s = tl.full([BLOCK_M], _NEG, tl.float32)
    m_f = tl.full([BLOCK_M], _NEG, tl.float32)
    l_s = tl.zeros([BLOCK_M], tl.float32)
    l_f = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M], tl.float32)
    if K_TMA:
        ks_base = ks_ptr
        kf_base = kf_ptr
    else:
        ks_base = ks_ptr + b * sksb + g * sksh
        kf_base = kf_ptr + b * skfb + g * skfh
    kv_b = b.to(tl.int32)
    kv_g = g.to(tl.int32)
    kv_row0 = (kv_b * (H // GROUP) + kv_g) * T
    scale2 = scale * _LOG2E
    full_end = start_m // BLOCK_N * BLOCK_N          # keys j < full_end ≤ start_m ≤ i: all causal-allowed
    for n0 in range(0, full_end, BLOCK_N):
        m_s, m_f, l_s, l_f, acc = _fwd_step(q, ks_base, skst, sksd, kf_base, skft, skfd, mask_row, n0, offs_m,
                                            offs_d, d_ok, T, scale2, m_s, m_f, l_s, l_f, acc, kv_b, kv_g, kv_row0,
                                            BLOCK_N, DOT_DTYPE, IEEE, False, K_TMA, BLOCK_D)
    for n0 in range(full_end, tl.minimum(start_m + BLOCK_M, T), BLOCK_N):
        m_s, m_f, l_s, l_f, acc = _fwd_step(q, ks_base, skst, sksd, kf_base, skft, skfd, mask_row, n0, offs_m,
                                            offs_d, d_ok, T, scale2, m_s, m_f, l_s, l_f, acc, kv_b, kv_g, kv_row0,
                                            BLOCK_N, DOT_DTYPE, IEEE, True, K_TMA, BLOCK_D)

    # A valid query always sees itself, so l_s ≥ 1 on valid rows; padded rows are zeroed here.
    l_s = tl.where(q_valid, l_s, 1.0)
    l_f = tl.where(q_valid, l_f, 1.0)
    lse_s = tl.where(q_valid, (m_s + tl.log2(l_s)) * _LN2, 0.0)
    lse_f = tl.where(q_valid, (m_f + tl.log2(l_f)) * _LN2, 0.0)
    e = tl.where(q_valid, acc * _LN2 / l_s, 0.0)
    row = (b * H + h) * T + offs_m
    tl.store(kl_ptr + row, e - lse_s + lse_f, mask=m_in)
    tl.store(stats_ptr + row, lse_s, mask=m_in)
    tl.store(stats_ptr + N_ROWS + row, lse_f, mask=m_in)
    tl.store(stats_ptr + (row + N_ROWS) + N_ROWS, e, mask=m_in)   # row first: int64 before 2·N_ROWS


@triton.jit
def _row_stats(mask_row, dkl_ptr, stats_ptr, n_rows, row0, offs_m, T):
    """Of query rows offs_m: the upstream gradient w, w·ln 2, and lse_s, lse_f, E in base-2 units (the logits'
    units in the backward); padded rows get lse = +1e30, so P = Q = 0 there."""
    m_in = offs_m < T
    q_valid = (tl.load(mask_row + offs_m, mask=m_in, other=0) != 0) & m_in
    w = tl.load(dkl_ptr + row0 + offs_m, mask=m_in, other=0.0)
    lse_s = tl.where(q_valid, tl.load(stats_ptr + row0 + offs_m, mask=m_in, other=0.0) * _LOG2E, _POS)
    lse_f = tl.where(q_valid, tl.load(stats_ptr + n_rows + row0 + offs_m, mask=m_in, other=0.0) * _LOG2E, _POS)
    e = tl.load(stats_ptr + (row0 + n_rows) + n_rows + offs_m, mask=m_in, other=0.0) * _LOG2E
    return w, w * _LN2, lse_s, lse_f, e


@triton.jit
def _bwd_step(k_s, k_f, bias, offs_n, q_ptr, b, h, bh, sqb, sqh, sqt, sqd, mask_row, dkl_ptr, stats_ptr, n_rows, row0,
              dq_ptr, m0, offs_d, d_ok, T, scale, dks, dkf,
              D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, DOT_DTYPE: tl.constexpr,
              IEEE: tl.constexpr, ATOMIC_DQ: tl.constexpr, Q_TMA: tl.constexpr, DQ_TMA: tl.constexpr,
              LEAN: tl.constexpr):
    # Transposed tiles of one (key tile, query tile) pair, [BLOCK_N, BLOCK_M], logits and row statistics in
    # base-2 units (ln 2 · (s − f − E) = natural units, hence w·ln 2 in dS):
    #   sᵀ, fᵀ;  Pᵀ = 2^{sᵀ − lse_s},  Qᵀ = 2^{fᵀ − lse_f};  dSᵀ = Pᵀ (sᵀ − fᵀ − E) w ln 2,  dFᵀ = (Qᵀ − Pᵀ) w
    #   ∂k_s += dSᵀ q,  ∂k_f += dFᵀ q  (scaled at the end);   ∂q[tile] += scale (dS k_s + dF k_f)  (atomics).
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_in = offs_m < T
    w, w_ln2, lse_s, lse_f, e = _row_stats(mask_row, dkl_ptr, stats_ptr, n_rows, row0, offs_m, T)
    if Q_TMA == 2:
        # q viewed as [B·H·T, D] rows through a TMA descriptor (box [BLOCK_M, D]): one bulk copy per tile and no
        # per-element 64-bit addresses in registers.  Rows past T are the next head's (or zeros past the end):
        # finite, and their P = Q = 0 (lse = +1e30), so they add nothing.
        q = q_ptr.load([bh.to(tl.int32) * T + m0, 0]).to(DOT_DTYPE)
    elif Q_TMA == 1:
        # q [B, H, T, D] through a TMA descriptor (box [1, 1, BLOCK_M, D]; rows past T read as zeros).
        q = q_ptr.load([b.to(tl.int32), h.to(tl.int32), m0, 0]).reshape(BLOCK_M, BLOCK_D).to(DOT_DTYPE)
    else:
        q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd,
                    mask=m_in[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)
    if LEAN:
        # No bias tile: the raw products a_s, a_f enter one FMA each (2^{c·a − lse}), the mask (causal and padded
        # keys) selects 0 afterwards (an exponential that overflows on a masked pair is discarded, never
        # multiplied), and s − f = c (a_s − a_f) needs no bias.  One [BLOCK_N, BLOCK_M] fp32 tile fewer live.
        c = scale * _LOG2E
        ok = (offs_n[:, None] <= offs_m[None, :]) & (bias == 0.0)
        a_s = _dot(k_s, tl.trans(q), IEEE)
        a_f = _dot(k_f, tl.trans(q), IEEE)
        p_t = tl.where(ok, tl.exp2(a_s * c - lse_s[None, :]), 0.0)
        ds_t = (p_t * ((a_s - a_f) * c - e[None, :]) * w_ln2[None, :]).to(DOT_DTYPE)
        df_t = ((tl.where(ok, tl.exp2(a_f * c - lse_f[None, :]), 0.0) - p_t) * w[None, :]).to(DOT_DTYPE)
    else:
        bias = tl.where(offs_n[:, None] <= offs_m[None, :], bias, _NEG)
        s_t = _dot(k_s, tl.trans(q), IEEE) * (scale * _LOG2E) + bias
        f_t = _dot(k_f, tl.trans(q), IEEE) * (scale * _LOG2E) + bias
        p_t = tl.exp2(s_t - lse_s[None, :])
        ds_t = (p_t * (s_t - f_t - e[None, :]) * w_ln2[None, :]).to(DOT_DTYPE)
        df_t = ((tl.exp2(f_t - lse_f[None, :]) - p_t) * w[None, :]).to(DOT_DTYPE)
    dks += _dot(ds_t, q, IEEE)
    dkf += _dot(df_t, q, IEEE)
    if ATOMIC_DQ:
        # ∂qᵀ = k_sᵀ dSᵀ + k_fᵀ dFᵀ [BLOCK_D, BLOCK_M]: M = D ≥ 64 keeps the product on wgmma (∂q = dS k_s has
        # M = BLOCK_M, and BLOCK_M < 64 compiled to mma.sync).
        dq_t = _dot(tl.trans(k_s), ds_t, IEEE) + _dot(tl.trans(k_f), df_t, IEEE)
        if DQ_TMA:
            # One bulk reduction (cp.reduce.async.bulk .add.f32) of the [D, BLOCK_M] tile into ∂qᵀ [B·H, D, T_pad]
            # fp32 (box [1, D, BLOCK_M]; columns past T are clipped by the copy engine, and are zero anyway).
            dq_ptr.atomic_add([bh.to(tl.int32), 0, m0],
                              (dq_t * scale).reshape(1, BLOCK_D, BLOCK_M))
        else:
            tl.atomic_add(dq_ptr + (row0 + offs_m[None, :]) * D + offs_d[:, None], dq_t * scale,
                          mask=m_in[None, :] & d_ok[:, None], sem="relaxed")
    return dks, dkf


@triton.jit
def _attention_kl_bwd_kernel(
    q_ptr, sqb, sqh, sqt, sqd,
    ks_ptr, sksb, sksh, skst, sksd,
    kf_ptr, skfb, skfh, skft, skfd,
    mask_ptr, dkl_ptr, stats_ptr, dq_ptr, dks_ptr, dkf_ptr,
    H, H_KV, T, GROUP, SPLIT, N_ROWS, scale, T_BUCKET,
    D: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    Q_TMA: tl.constexpr = 0, DQ_TMA: tl.constexpr = False, LEAN: tl.constexpr = False,
):
    # One program: key tile [BLOCK_N] of KV head g in batch row b, over GROUP / SPLIT of g's query heads (share
    # `part` of SPLIT) and every query tile that can see the tile.  Writes its fp32 ∂k_s, ∂k_f shares to
    # dks, dkf [B, H_KV, SPLIT, T, D] (the launcher sums the SPLIT shares); adds ∂q into dq [B, H, T, D] fp32 when
    # ATOMIC_DQ.  Grid (B·H_KV·SPLIT, key tiles): key tile 0 sees every query tile, the last one only the last,
    # so the heaviest tiles are launched first.
    pid = tl.program_id(0)
    pid_n = tl.num_programs(1) - 1 - tl.program_id(1)
    part = pid % SPLIT
    g = (pid // SPLIT) % H_KV
    b = (pid // (SPLIT * H_KV)).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kd_ok = (offs_n < T)[:, None] & d_ok[None, :]
    mask_row = mask_ptr + b * T
    bias = _key_bias(mask_row, offs_n, T)[:, None]
    g64 = g.to(tl.int64)
    k_s = tl.load(ks_ptr + b * sksb + g64 * sksh + offs_n[:, None] * skst + offs_d[None, :] * sksd,
                  mask=kd_ok, other=0.0).to(DOT_DTYPE)
    k_f = tl.load(kf_ptr + b * skfb + g64 * skfh + offs_n[:, None] * skft + offs_d[None, :] * skfd,
                  mask=kd_ok, other=0.0).to(DOT_DTYPE)

    dks = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dkf = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    heads = GROUP // SPLIT
    # One flat loop over (query head, query tile) pairs, every tile causally masked: splitting off the tiles
    # that need no causal mask, or nesting the head loop, made ptxas spill (sm_90a, triton 3.9, 32 × 128 tiles /
    # 8 warps, measured with ∂q formed untransposed: no spill flat, 312 B of stack split and nested).
    lo = start_n // BLOCK_M * BLOCK_M
    n_m = tl.cdiv(T - lo, BLOCK_M)
    for it in range(0, heads * n_m):
        hh = it // n_m
        m0 = lo + (it - hh * n_m) * BLOCK_M
        h = (g * GROUP + part * heads + hh).to(tl.int64)
        bh = b * H + h
        dks, dkf = _bwd_step(k_s, k_f, bias, offs_n, q_ptr, b, h, bh, sqb, sqh, sqt, sqd, mask_row, dkl_ptr,
                             stats_ptr, N_ROWS, bh * T, dq_ptr, m0, offs_d, d_ok, T, scale, dks, dkf,
                             D, BLOCK_D, BLOCK_M, DOT_DTYPE, IEEE, ATOMIC_DQ, Q_TMA, DQ_TMA, LEAN)

    out = ((b * H_KV + g64) * SPLIT + part) * T * D + offs_n[:, None] * D + offs_d[None, :]
    tl.store(dks_ptr + out, dks * scale, mask=kd_ok)
    tl.store(dkf_ptr + out, dkf * scale, mask=kd_ok)


@triton.jit
def _dq_step(q, ks_base, skst, sksd, kf_base, skft, skfd, mask_row, n0, offs_m, offs_d, d_ok, T, scale2,
             w, w_ln2, lse_s, lse_f, e, dq,
             BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, CAUSAL: tl.constexpr):
    # Base-2 units as in _bwd_step:  dS = P (s − f − E) w ln 2,  dF = (Q − P) w,  ∂q += dS K_s + dF K_f
    # (scaled at the end).
    s, f, k_s, k_f = _logits_query_major(q, ks_base, skst, sksd, kf_base, skft, skfd, mask_row, n0, offs_m, offs_d,
                                         d_ok, T, scale2, 0, 0, 0, BLOCK_N, DOT_DTYPE, IEEE, CAUSAL)
    p = tl.exp2(s - lse_s[:, None])
    ds = p * (s - f - e[:, None]) * w_ln2[:, None]
    df = (tl.exp2(f - lse_f[:, None]) - p) * w[:, None]
    dq += _dot(ds.to(DOT_DTYPE), k_s, IEEE)
    dq += _dot(df.to(DOT_DTYPE), k_f, IEEE)
    return dq


@triton.jit
def _attention_kl_bwd_dq_kernel(
    q_ptr, sqb, sqh, sqt, sqd,
    ks_ptr, sksb, sksh, skst, sksd,
    kf_ptr, skfb, skfh, skft, skfd,
    mask_ptr, dkl_ptr, stats_ptr, dq_ptr,
    H, T, GROUP, N_ROWS, scale, T_BUCKET,
    D: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program: query tile of (b, h), ∂q in registers (the deterministic path, and the one when only q needs a
    # gradient).  Grid (B·H, query tiles), heaviest first.
    b, h, g, pid_m, start_m, offs_m, offs_d, m_in, d_ok, mask_row, q = _query_tile(
        q_ptr, sqb, sqh, sqt, sqd, mask_ptr, H, T, GROUP, D, BLOCK_D, DOT_DTYPE, BLOCK_M)
    row0 = (b * H + h) * T
    w, w_ln2, lse_s, lse_f, e = _row_stats(mask_row, dkl_ptr, stats_ptr, N_ROWS, row0, offs_m, T)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    ks_base = ks_ptr + b * sksb + g * sksh
    kf_base = kf_ptr + b * skfb + g * skfh
    scale2 = scale * _LOG2E
    full_end = start_m // BLOCK_N * BLOCK_N
    for n0 in range(0, full_end, BLOCK_N):
        dq = _dq_step(q, ks_base, skst, sksd, kf_base, skft, skfd, mask_row, n0, offs_m, offs_d, d_ok, T, scale2,
                      w, w_ln2, lse_s, lse_f, e, dq, BLOCK_N, DOT_DTYPE, IEEE, False)
    for n0 in range(full_end, tl.minimum(start_m + BLOCK_M, T), BLOCK_N):
        dq = _dq_step(q, ks_base, skst, sksd, kf_base, skft, skfd, mask_row, n0, offs_m, offs_d, d_ok, T, scale2,
                      w, w_ln2, lse_s, lse_f, e, dq, BLOCK_N, DOT_DTYPE, IEEE, True)

    tl.store(dq_ptr + (row0 + offs_m[:, None]) * D + offs_d[None, :],
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=m_in[:, None] & d_ok[None, :])


# Tile shapes: a few autotuned ones for half-precision inputs on the GPU; one small fixed shape for fp32 'ieee'
# products (no tensor cores: a 128-row fp32 tile compiles for ~15 s and spills, and fp32 is the checking path,
# not the training one); one small fixed shape under the interpreter (every config would run serially on the
# CPU; tests may change INTERP_BLOCKS).  The one-pass backward adds into its ∂q buffer, so its autotuner zeroes
# that buffer before each trial and again before the real launch (reset_to_zero).
def _configs(options):
    return autotune_configs([({"BLOCK_M": m, "BLOCK_N": n}, w, s) for m, n, w, s in options])


# T's power-of-two bucket is in the key (T_BUCKET, otherwise unused by the kernels): small T needs small tiles
# to fill the GPU, long T prefers large ones, and training with many distinct lengths retunes only per bucket.
# Backward tiles (ptxas for sm_90a, triton 3.9, D = 128 bf16, every product on wgmma): the key-major program
# holds two [BLOCK_N, D] fp32 accumulators, its two key tiles and a [D, BLOCK_M] ∂q share; 32 × 64 / 8 warps
# fits in 246 registers without spilling, 32 × 128 / 8 spills 32 B, 64 × 64 / 8 320 B, 16 × 64 / 4 is the
# small-T fallback.  Autotuning decides.  128-key tiles halve the ∂q atomics per product.  Forward: 128 × 128 /
# 8 warps also fits (255 registers, no spill).
_KEY = ["T_BUCKET", "D", "GROUP", "DOT_DTYPE", "IEEE"]
_FP32 = [(64, 32, 4, 2)]
_FP32_BWD = [(16, 32, 4, 2)]      # 198 registers, no spill; 32 × 64 spilled 9 KB and compiled for 35 s
_TUNED = {
    "fwd": (triton.autotune(_configs([(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 3)]), key=_KEY)(
        _attention_kl_fwd_kernel),
            triton.autotune(_configs(_FP32), key=_KEY)(_attention_kl_fwd_kernel)),
    "bwd": (triton.autotune(_configs([(32, 128, 8, 2), (64, 64, 8, 2), (32, 64, 8, 2), (16, 64, 4, 2)]),
                            key=_KEY + ["ATOMIC_DQ", "SPLIT"], reset_to_zero=["dq_ptr"])(_attention_kl_bwd_kernel),
            triton.autotune(_configs(_FP32_BWD), key=_KEY)(_attention_kl_bwd_kernel)),
    "dq": (triton.autotune(_configs([(128, 64, 8, 2), (64, 64, 8, 3)]), key=_KEY)(_attention_kl_bwd_dq_kernel),
           triton.autotune(_configs(_FP32), key=_KEY)(_attention_kl_bwd_dq_kernel)),
}

# One-pass backward variants (a private switch the bench sweeps), (q through TMA, ∂q by TMA reduction, lean
# elementwise):  "ptr" = pointer loads of q, per-element fp32 atomics for ∂q, a −1e30 bias tile;  "lean" = the same
# with the lean elementwise form (no bias tile; _bwd_step), the default: fastest at every T on the H200 (16k full
# 12.65 ms against 13.66 for "ptr", 13.86 "tma_dq", 14.38 "tma"; bench/NOTES.md);  "tma_dq" = lean, and ∂q added
# per pair by one TMA bulk reduction (tensor descriptor atomic_add) into a transposed fp32 buffer;  "tma" = that
# plus q tiles loaded through a TMA descriptor.  The TMA parts run only for half-precision inputs (q TMA-aligned
# for the q loads); otherwise the pointer forms run.
BWD_VARIANTS = {"ptr": (False, False, False), "lean": (False, False, True), "tma_dq": (False, True, True),
                "tma": (True, True, True)}
BWD_VARIANT = "lean"
# Forward variants: "ptr" = pointer loads of the key tiles (the default: "tma" measured 1.2–1.3× slower in the full
# step at 4k–32k); "tma" = key tiles through TMA
# descriptors (bulk copies, no per-element addresses in registers), for the same inputs as the backward's.
FWD_VARIANTS = ("ptr", "tma")
FWD_VARIANT = "ptr"


def _bwd_tma_pre_hook(nargs):
    """Before each autotuning trial and the launch: the descriptors' boxes for the config about to run, and the
    ∂qᵀ buffer zeroed (every trial adds into it)."""
    m, d = nargs["BLOCK_M"], nargs["BLOCK_D"]
    if isinstance(nargs["q_ptr"], TensorDescriptor):
        nargs["q_ptr"].block_shape = [m, d] if nargs["Q_TMA"] == 2 else [1, 1, m, d]
    if isinstance(nargs["dq_ptr"], TensorDescriptor):
        nargs["dq_ptr"].block_shape = [1, d, m]
        nargs["dq_ptr"].base.zero_()


def _fwd_tma_pre_hook(nargs):
    """The key descriptors' boxes for the config about to run."""
    box = [nargs["BLOCK_N"], nargs["BLOCK_D"]]
    for name in ("ks_ptr", "kf_ptr"):
        if isinstance(nargs[name], TensorDescriptor):
            nargs[name].block_shape = box if nargs["K_TMA"] == 2 else [1, 1, *box]


# Variant tiles (ptxas for sm_90a through triton 3.6's compiler, D = 128 bf16, bench/ptx_attention_kl.py; the
# table is in bench/NOTES.md): tiles that fit in 255 registers without spilling.  64-query tiles spill 160–880 B in
# every variant and 16 warps cap registers at 128 (0.5–2.5 KB of spill), so none of those is listed.  With q
# through TMA, 32 × 128 spills ~350 B at 2 or 3 stages and none at 1 (the pipeliner keeps a second q tile and its
# row statistics live), hence 1 stage there; 16-query tiles fit with 3 stages except with q through TMA.
_VARIANT_BWD = {"bwd_lean": [(32, 128, 8, 2), (32, 128, 8, 3), (16, 128, 8, 3), (32, 64, 8, 2)],
                "bwd_tma_dq": [(32, 128, 8, 2), (32, 128, 8, 1), (16, 128, 8, 3), (32, 64, 8, 2)],
                "bwd_tma": [(32, 128, 8, 1), (32, 64, 8, 2), (32, 64, 8, 1)]}
_VARIANT_KEY = _KEY + ["ATOMIC_DQ", "SPLIT", "Q_TMA", "DQ_TMA", "LEAN"]
for _name, _tiles in _VARIANT_BWD.items():
    _options = [({"BLOCK_M": m, "BLOCK_N": n}, w, st) for m, n, w, st in _tiles]
    if _name == "bwd_lean":   # pointer atomics: the autotuner zeroes the ∂q buffer before each trial and the launch
        _tuner = triton.autotune(autotune_configs(_options), key=_VARIANT_KEY, reset_to_zero=["dq_ptr"])
    else:
        _tuner = triton.autotune(autotune_configs(_options, _bwd_tma_pre_hook), key=_VARIANT_KEY)
    _TUNED[_name] = (_tuner(_attention_kl_bwd_kernel), None)
# Forward with TMA key tiles: 128 registers at 64 × 64 / 4 and 128 × 64 / 8 (pointer loads: 167, 172), no spill;
# 2 stages halve the shared memory so that two programs fit on an SM.
_TMA_FWD = [(64, 64, 4, 3), (64, 64, 4, 2), (128, 64, 8, 3), (128, 64, 8, 2)]
_TUNED["fwd_tma"] = (triton.autotune(autotune_configs([({"BLOCK_M": m, "BLOCK_N": n}, w, st)
                                                       for m, n, w, st in _TMA_FWD], _fwd_tma_pre_hook),
                                     key=_KEY + ["K_TMA"])(_attention_kl_fwd_kernel), None)
_KERNELS = {"fwd": _attention_kl_fwd_kernel, "fwd_tma": _attention_kl_fwd_kernel, "bwd": _attention_kl_bwd_kernel,
            "dq": _attention_kl_bwd_dq_kernel, **{name: _attention_kl_bwd_kernel for name in _VARIANT_BWD}}
INTERP_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}


def _launch(name, grid_of, args, meta):
    if interpreting():
        if name in ("bwd_tma", "bwd_tma_dq", "fwd_tma"):
            nargs = {**dict(zip(_KERNELS[name].arg_names, args)), **meta, **INTERP_BLOCKS}
            (_fwd_tma_pre_hook if name == "fwd_tma" else _bwd_tma_pre_hook)(nargs)
        _KERNELS[name][grid_of(INTERP_BLOCKS)](*args, **meta, **INTERP_BLOCKS)
    else:
        _TUNED[name][1 if meta["IEEE"] else 0][grid_of](*args, **meta)


def _meta(q):
    dot_tl, _, ieee = dot_dtype([q.dtype])
    return dict(D=q.shape[3], BLOCK_D=max(16, next_power_of_2(q.shape[3])), DOT_DTYPE=dot_tl, IEEE=ieee)


def _check_device(q):
    if not q.is_cuda and not interpreting():
        raise ValueError(f"attention_kl backend='triton' needs CUDA tensors (got {q.device}); "
                         "use backend='torch' or 'auto', or set TRITON_INTERPRET=1")


def _check_op_inputs(q, k_s, k_f, mask):
    """What the kernels assume of the operators' tensors (kvfuse.attention.attention_kl prepares them so; a
    direct caller of torch.ops.kvfuse.* gets an error here, from the fake implementation too, rather than garbage).
    Shapes, dtypes and devices only: no value is read."""
    if q.dim() != 4 or k_s.dim() != 4 or k_s.shape != k_f.shape:
        raise ValueError(f"kvfuse::attention_kl: q [B, H, T, D], k_s = k_f [B, H_kv, T, D] expected; got "
                         f"{tuple(q.shape)}, {tuple(k_s.shape)}, {tuple(k_f.shape)}")
    B, H, T, D = q.shape
    if (k_s.shape[0], k_s.shape[2], k_s.shape[3]) != (B, T, D) or k_s.shape[1] == 0 or H % k_s.shape[1]:
        raise ValueError(f"kvfuse::attention_kl: k_s {tuple(k_s.shape)} does not fit q {tuple(q.shape)} (same B, T, "
                         "D; H a multiple of H_kv)")
    if not q.dtype == k_s.dtype == k_f.dtype or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"kvfuse::attention_kl: q, k_s, k_f must share one dtype of fp16/bf16/fp32; got {q.dtype}, "
                         f"{k_s.dtype}, {k_f.dtype}")
    if mask.shape != (B, T) or mask.dtype != torch.int8:
        raise ValueError(f"kvfuse::attention_kl: mask must be int8 [B, T] = {(B, T)}; got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    if not q.device == k_s.device == k_f.device == mask.device:
        raise ValueError(f"kvfuse::attention_kl: tensors on different devices: q {q.device}, k_s {k_s.device}, "
                         f"k_f {k_f.device}, mask {mask.device}")


def attention_kl_forward(q, k_s, k_f, mask, scale: float):
    """Row KL and the row statistics the backward needs.

    q [B, H, T, D]; k_s, k_f [B, H_kv, T, D] (strides allowed, one dtype: fp16 | bf16 | fp32); mask [B, T] int8
    contiguous (nonzero = valid).  Returns (kl [B, H, T], stats [3, B, H, T] = lse_s, lse_f, E), fp32 contiguous."""
    _check_device(q)
    B, H, T, _ = q.shape
    kl = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    stats = torch.empty(3, B, H, T, device=q.device, dtype=torch.float32)
    meta = _meta(q)
    k_tma = fwd_k_tma(k_s, k_f, meta)
    ks_arg, kf_arg = (_rows_descriptor(k) if k_tma == 2 else TensorDescriptor.from_tensor(k, [1, 1, 16, 16])
                      if k_tma else k for k in (k_s, k_f))
    args = (q, *q.stride(), ks_arg, *k_s.stride(), kf_arg, *k_f.stride(), mask, kl, stats,
            H, T, H // k_s.shape[1], B * H * T, float(scale), next_power_of_2(T))
    grid = lambda c: (B * H, cdiv(T, c["BLOCK_M"]))  # noqa: E731
    if k_tma:
        _launch("fwd_tma", grid, args, dict(meta, K_TMA=k_tma))
    else:
        _launch("fwd", grid, args, meta)
    return kl, stats


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def group_split(B: int, H_kv: int, group: int, T: int, sms: int, block_n: int = 64) -> int:
    """How many programs share one KV head's query heads in the one-pass backward: the smallest divisor of the
    group giving ≥ 4 programs per SM at a nominal 64-key tile (small B·H_kv·T would otherwise leave SMs idle
    and the load imbalanced: key tile 0 carries T queries, the last one a tile), else the whole group."""
    tiles = B * H_kv * cdiv(T, block_n)
    for split in range(1, group + 1):
        if group % split == 0 and tiles * split >= 4 * sms:
            return split
    return group


def _tma_ready(x: torch.Tensor) -> bool:
    """TMA needs a 16-byte aligned base, 16-byte aligned strides and a unit last stride."""
    size = x.element_size()
    return x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and all(st * size % 16 == 0 for st in x.stride()[:-1])


def _tma_mode(x: torch.Tensor) -> int:
    """How a TMA descriptor can read x [B, H, T, D]: 2 = as rows [B·H·T, D] ((b, h, t) collapse to one stride),
    1 = as itself (4-D), 0 = not at all (alignment)."""
    if not _tma_ready(x):
        return 0
    B, H, T, _ = x.shape
    rows = (B == 1 or x.stride(0) == H * x.stride(1)) and (H == 1 or x.stride(1) == T * x.stride(2))
    return 2 if rows else 1


def _rows_descriptor(x: torch.Tensor) -> TensorDescriptor:
    """x [B, H, T, D] as rows [B·H·T, D] (box a placeholder; the pre-hooks fit it to each config)."""
    B, H, T, D = x.shape
    return TensorDescriptor(x, [B * H * T, D], [x.stride(2), 1], [16, 16])


def fwd_k_tma(k_s: torch.Tensor, k_f: torch.Tensor, meta: dict, variant: str | None = None) -> int:
    """K_TMA the forward runs with for `variant` (default FWD_VARIANT): 0 = pointer loads; else both key tensors
    through descriptors of one kind (2 = rows, 1 = 4-D), for half products with D = BLOCK_D on the GPU (any dtype
    under the interpreter, so the tests cover it)."""
    if (FWD_VARIANT if variant is None else variant) != "tma":
        return 0
    if not interpreting() and (meta["IEEE"] or meta["D"] != meta["BLOCK_D"]):
        return 0
    modes = {_tma_mode(k_s), _tma_mode(k_f)}
    return 0 if 0 in modes else min(modes)


def bwd_variant_flags(q: torch.Tensor, meta: dict, variant: str | None = None) -> tuple[int, bool, bool]:
    """(Q_TMA, DQ_TMA, LEAN) the one-pass backward runs with for `variant` (default BWD_VARIANT).  TMA only for
    half products (not the fp32 'ieee' path; under the interpreter any dtype, so the tests cover it) and
    D = BLOCK_D on the GPU.  Q_TMA: 0 = pointer loads (q not TMA-ready), 2 = a 2-D descriptor over q's rows
    [B·H·T, D] when (b, h, t) collapse to one stride (contiguous q), 1 = a 4-D descriptor otherwise.  LEAN applies
    to half products only on the GPU (the fp32 path keeps its one tuned tile)."""
    q_tma, dq_tma, lean = BWD_VARIANTS[BWD_VARIANT if variant is None else variant]
    if not interpreting() and (meta["IEEE"] or meta["D"] != meta["BLOCK_D"]):
        return 0, False, lean and not meta["IEEE"]
    return (_tma_mode(q) if q_tma else 0), dq_tma, lean


def attention_kl_backward(q, k_s, k_f, mask, scale: float, dkl, stats, need_q=True, need_k=True,
                          split: int | None = None, variant: str | None = None):
    """Gradients of Σ dkl·KL: (dq [B, H, T, D], dk_s, dk_f [B, H_kv, T, D]) contiguous in the inputs' dtypes
    (None where not needed).  dkl [B, H, T], stats [3, B, H, T]: fp32 contiguous.  `split` (a divisor of the GQA
    group; default group_split) sets how many programs share a KV head's query heads.  Under
    torch.use_deterministic_algorithms(True), ∂q comes from the atomic-free query-major kernel."""
    _check_device(q)
    B, H, T, D = q.shape
    H_kv = k_s.shape[1]
    group = H // H_kv
    meta = _meta(q)
    common = (q, *q.stride(), k_s, *k_s.stride(), k_f, *k_f.stride(), mask, dkl, stats)
    one_pass = need_q and need_k and not torch.are_deterministic_algorithms_enabled()
    dq = dks = dkf = None
    if need_q and not one_pass:
        dq = torch.empty(B, H, T, D, device=q.device, dtype=q.dtype)
        _launch("dq", lambda c: (B * H, cdiv(T, c["BLOCK_M"])),
                (*common, dq, H, T, group, B * H * T, float(scale), next_power_of_2(T)), meta)
    if need_k:
        split = group_split(B, H_kv, group, T, _sm_count(q.device)) if split is None else split
        if split < 1 or group % split:
            raise ValueError(f"split ({split}) must divide the GQA group ({group})")
        q_tma, dq_tma, lean = bwd_variant_flags(q, meta, variant) if one_pass else (0, False, False)
        dks, dkf = (torch.empty(B, H_kv, split, T, D, device=q.device, dtype=torch.float32) for _ in range(2))
        grid = lambda c: (B * H_kv * split, cdiv(T, c["BLOCK_N"]))  # noqa: E731
        tail = (H, H_kv, T, group, split, B * H * T, float(scale), next_power_of_2(T))
        if q_tma or dq_tma:
            # ∂qᵀ [B·H, D, T_pad] fp32, T_pad a multiple of 4 (16-byte rows); the pre-hook zeroes it.  Block
            # shapes here are placeholders: the pre-hook fits them to each config.
            t_pad = (T + 3) // 4 * 4
            dqt = torch.empty(B * H, D, t_pad, device=q.device, dtype=torch.float32)
            dq_desc = TensorDescriptor(dqt, [B * H, D, T], [D * t_pad, t_pad, 1], [1, 16, 16])
            if q_tma == 2:
                q_arg = _rows_descriptor(q)
            else:
                q_arg = TensorDescriptor.from_tensor(q, [1, 1, 16, 16]) if q_tma else q
            _launch("bwd_tma" if q_tma else "bwd_tma_dq", grid, (q_arg, *common[1:], dq_desc, dks, dkf, *tail),
                    dict(meta, ATOMIC_DQ=True, Q_TMA=q_tma, DQ_TMA=dq_tma, LEAN=lean))
            dq = torch.empty(B, H, T, D, device=q.device, dtype=q.dtype)
            dq.copy_(dqt.view(B, H, D, t_pad)[..., :T].transpose(2, 3))
        else:
            dq32 = torch.zeros(B, H, T, D, device=q.device, dtype=torch.float32) if one_pass else None
            # Without atomics the ∂q pointer is never used: any fp32 tensor stands in (the autotuner zeroes it).
            args = (*common, dks if dq32 is None else dq32, dks, dkf, *tail)
            if lean:
                _launch("bwd_lean", grid, args, dict(meta, ATOMIC_DQ=True, LEAN=True))
            else:
                _launch("bwd", grid, args, dict(meta, ATOMIC_DQ=one_pass))
            if one_pass:
                dq = dq32.to(q.dtype)
        dks, dkf = (x.sum(2) if split > 1 else x.squeeze(2) for x in (dks, dkf))
        dks, dkf = dks.to(k_s.dtype), dkf.to(k_f.dtype)
    return dq, dks, dkf


# The operators: torch.compile sees each as one opaque node (shapes from the fake implementations), so a compiled
# training step traces through attention_kl without graph breaks and the kernels launch as in eager mode. Plain
# torch.library define/impl (kernels.utils.define_op); the gradient lives in AttentionKLRows around them.
def attention_kl_fwd(q: torch.Tensor, k_s: torch.Tensor, k_f: torch.Tensor, mask: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL [B, H, T] fp32, stats [3, B, H, T] fp32) of attention_kl_forward."""
    _check_op_inputs(q, k_s, k_f, mask)
    return attention_kl_forward(q, k_s, k_f, mask.contiguous(), scale)


def _attention_kl_fwd_fake(q, k_s, k_f, mask, scale):
    _check_op_inputs(q, k_s, k_f, mask)
    B, H, T, _ = q.shape
    return q.new_empty(B, H, T, dtype=torch.float32), q.new_empty(3, B, H, T, dtype=torch.float32)


def attention_kl_bwd(q: torch.Tensor, k_s: torch.Tensor, k_f: torch.Tensor, mask: torch.Tensor, scale: float,
                     dkl: torch.Tensor, stats: torch.Tensor, need_q: bool,
                     need_k: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(∂q, ∂k_s, ∂k_f) of Σ dkl·KL; a gradient not asked for (need_q / need_k false) is an empty tensor."""
    dq, dks, dkf = attention_kl_backward(q, k_s, k_f, mask.contiguous(), scale, dkl.float().contiguous(),
                                         stats.contiguous(), need_q=need_q, need_k=need_k)
    return (q.new_empty(0) if dq is None else dq, k_s.new_empty(0) if dks is None else dks,
            k_f.new_empty(0) if dkf is None else dkf)


def _attention_kl_bwd_fake(q, k_s, k_f, mask, scale, dkl, stats, need_q, need_k):
    return (q.new_empty(q.shape if need_q else (0,)), k_s.new_empty(k_s.shape if need_k else (0,)),
            k_f.new_empty(k_f.shape if need_k else (0,)))


attention_kl_fwd = define_op(attention_kl_fwd, _attention_kl_fwd_fake)
attention_kl_bwd = define_op(attention_kl_bwd, _attention_kl_bwd_fake)


class AttentionKLRows(torch.autograd.Function):
    """Row KL [B, H, T] (and the non-differentiable stats) with gradients to q, k_s and k_f."""

    @staticmethod
    def forward(ctx, q, k_s, k_f, mask, scale):
        kl, stats = attention_kl_fwd(q, k_s, k_f, mask, scale)
        ctx.save_for_backward(q, k_s, k_f, mask, stats)
        ctx.scale = scale
        ctx.mark_non_differentiable(stats)
        return kl, stats

    @staticmethod
    def backward(ctx, dkl, _dstats):
        q, k_s, k_f, mask, stats = ctx.saved_tensors
        need = ctx.needs_input_grad
        dq, dks, dkf = attention_kl_bwd(q, k_s, k_f, mask, ctx.scale, dkl, stats, need[0], need[1] or need[2])
        return dq if need[0] else None, dks if need[1] else None, dkf if need[2] else None, None, None


def attention_kl_rows(q, k_s, k_f, mask, scale: float):
    """(KL [B, H, T], stats) through the operators, differentiable in q, k_s, k_f (mask int8 [B, T])."""
    return AttentionKLRows.apply(q, k_s, k_f, mask, scale)
