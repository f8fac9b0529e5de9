"""Attention-KL term γ·KL(Attn_s ‖ Attn_f) (DESIGN.md §3 step 7): the student's queries over its own keys vs over
the fused teacher keys.  backend="torch" is the readable, materialised reference (O(T²) memory per head);
backend="triton" is the O(T)-memory kernel in kvfuse.kernels.attention_kl (the operator kvfuse::attention_kl_fwd,
which torch.compile traces without graph breaks), checked against it."""
from __future__ import annotations

import math

import torch

from kvfuse.backend import BACKENDS, TRITON_DTYPES as _TRITON_DTYPES, resolve_backend


def attention_kl(q_s: torch.Tensor, k_s: torch.Tensor, k_f: torch.Tensor, mask: torch.Tensor,
                 scale: float | None = None, backend: str = "torch") -> torch.Tensor:
    """Mean over heads and valid query tokens of Σ_j P_s log(P_s / P_f).

    q_s [B, H_q, T, D]; k_s, k_f [B, H_kv, T, D] with H_q a multiple of H_kv (query head h uses KV head
    h // (H_q / H_kv)); mask [B, T] (bool or 0/1). P = softmax(scale · q kᵀ), causal and over valid keys only;
    scale defaults to 1/√D. Computed in fp32 (or the inputs' wider dtype).
    backend: "torch" (the materialised reference), "triton" (O(T) memory; CUDA, or CPU under TRITON_INTERPRET=1;
    fp16/bf16/fp32) or "auto" (triton for CUDA fp16/bf16/fp32 tensors, torch otherwise).

    A mask that selects no token raises ValueError in eager mode only: the check reads a value from the device
    (a host synchronisation), so under torch.compile it is skipped and such a mask gives a loss of 0 (no valid
    query to average over) with zero gradients, on both backends.
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention_kl backend must be one of {BACKENDS}, got {backend!r}")
    if q_s.dim() != 4 or k_s.dim() != 4 or k_f.dim() != 4:
        raise ValueError(f"q_s, k_s, k_f must be [B, H, T, D]; got {tuple(q_s.shape)}, {tuple(k_s.shape)}, "
                         f"{tuple(k_f.shape)}")
    if k_s.shape != k_f.shape:
        raise ValueError(f"k_s {tuple(k_s.shape)} and k_f {tuple(k_f.shape)} differ")
    B, H_q, T, D = q_s.shape
    if k_s.shape[0] != B or k_s.shape[2] != T or k_s.shape[3] != D:
        raise ValueError(f"k_s {tuple(k_s.shape)} does not match q_s {tuple(q_s.shape)} in B, T or D")
    H_kv = k_s.shape[1]
    if H_kv == 0 or H_q % H_kv:
        raise ValueError(f"query heads ({H_q}) must be a multiple of KV heads ({H_kv})")
    if mask.shape != (B, T):
        raise ValueError(f"mask must be [B, T] = {(B, T)}, got {tuple(mask.shape)}")
    valid = mask.bool()
    if not torch.compiler.is_compiling() and not valid.any():
        raise ValueError("mask selects no token")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if resolve_backend(backend, q_s, k_s, k_f) == "triton":
        return _attention_kl_triton(q_s, k_s, k_f, valid, scale)
    return attention_kl_reference(q_s, k_s, k_f, valid, scale)


def attention_kl_reference(q_s: torch.Tensor, k_s: torch.Tensor, k_f: torch.Tensor, valid: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """The materialised definition (inputs already validated; valid [B, T] bool; 0 when it selects no token)."""
    B, H_q, T, D = q_s.shape
    group = H_q // k_s.shape[1]
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
    return kl_rows.masked_fill(~query_ok, 0.0).sum() / query_ok.sum().clamp_min(1)


def _attention_kl_triton(q_s, k_s, k_f, valid, scale):
    # Imported here so that Triton loads only when this backend is used; the import registers the operators.
    from kvfuse.kernels.attention_kl import attention_kl_rows

    dtype = torch.promote_types(torch.promote_types(q_s.dtype, k_s.dtype), k_f.dtype)
    if dtype not in _TRITON_DTYPES:
        raise ValueError(f"attention_kl backend='triton' takes fp16/bf16/fp32 tensors, got {dtype}; "
                         "use backend='torch' for float64")
    # One operand dtype for the kernel (e.g. fp32 fused keys from fp32 adapters with bf16 student tensors):
    # the cast is differentiable and no-op when the dtypes already agree.
    q, ks, kf = (x.to(dtype) for x in (q_s, k_s, k_f))
    kl_rows, _ = attention_kl_rows(q, ks, kf, valid.to(torch.int8).contiguous(), scale)
    return kl_rows.sum() / (q_s.shape[1] * valid.sum().clamp_min(1))
