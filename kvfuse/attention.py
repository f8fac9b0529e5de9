"""Attention-KL term γ·KL(Attn_s ‖ Attn_f) (DESIGN.md §3 step 7): the student's queries over its own keys vs over
the fused teacher keys. This is the readable, materialised reference (O(T²) memory per head)."""
from __future__ import annotations

import math

import torch


def attention_kl(q_s: torch.Tensor, k_s: torch.Tensor, k_f: torch.Tensor, mask: torch.Tensor,
                 scale: float | None = None, backend: str = "torch") -> torch.Tensor:
    """Mean over heads and valid query tokens of Σ_j P_s log(P_s / P_f).

    q_s [B, H_q, T, D]; k_s, k_f [B, H_kv, T, D] with H_q a multiple of H_kv (query head h uses KV head
    h // (H_q / H_kv)); mask [B, T] (bool or 0/1). P = softmax(scale · q kᵀ), causal and over valid keys only;
    scale defaults to 1/√D. Computed in fp32 (or the inputs' wider dtype).
    """
    if backend != "torch":
        raise ValueError(f"attention_kl backend {backend!r} is not available; use backend='torch'")
    if q_s.dim() != 4 or k_s.dim() != 4 or k_f.dim() != 4:
        raise ValueError(f"q_s, k_s, k_f must be [B, H, T, D]; got {tuple(q_s.shape)}, {tuple(k_s.shape)}, "
                         f"{tuple(k_f.shape)}")
    if k_s.shape != k_f.shape:
        raise ValueError(f"k_s {tuple(k_s.shape)} and k_f {tuple(k_f.shape)} differ")
    B, H_q, T, D = q_s.shape
    if k_s.shape[0] != B or k_s.shape[2] != T or k_s.shape[3] != D:
        raise ValueError(f"k_s {tuple(k_s.shape)} does not match q_s {tuple(q_s.shape)} in B, T or D")
    H_kv = k_s.shape[1]
    if H_q % H_kv:
        raise ValueError(f"query heads ({H_q}) must be a multiple of KV heads ({H_kv})")
    if mask.shape != (B, T):
        raise ValueError(f"mask must be [B, T] = {(B, T)}, got {tuple(mask.shape)}")
    valid = mask.bool()
    if not valid.any():
        raise ValueError("mask selects no token")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    group = H_q // H_kv
    acc = torch.promote_types(q_s.dtype, torch.float32)
    q = q_s.to(acc)
    ks = k_s.to(acc).repeat_interleave(group, dim=1)
    kf = k_f.to(acc).repeat_interleave(group, dim=1)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    allowed = causal[None, None] & valid[:, None, None, :]           # [B, 1, T_q, T_k]
    # A finite fill keeps rows with no allowed key (padding queries) NaN-free; they are excluded below anyway.
    neg = torch.finfo(acc).min
    logits_s = (scale * q @ ks.transpose(-1, -2)).masked_fill(~allowed, neg)
    logits_f = (scale * q @ kf.transpose(-1, -2)).masked_fill(~allowed, neg)
    log_ps = torch.log_softmax(logits_s, dim=-1)
    log_pf = torch.log_softmax(logits_f, dim=-1)
    kl_rows = (log_ps.exp() * (log_ps - log_pf)).masked_fill(~allowed, 0.0).sum(-1)   # [B, H, T]
    query_ok = valid[:, None, :].expand_as(kl_rows)
    return kl_rows[query_ok].sum() / query_ok.sum()
