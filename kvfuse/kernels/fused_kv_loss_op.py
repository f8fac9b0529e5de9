"""`kvfuse::fused_kv_loss` and its backward as torch.library custom ops.

As custom ops with fake (meta) implementations and a registered autograd formula, the Triton kernels are opaque
nodes to torch.compile: a compiled training step traces through them with no graph break, and AOTAutograd puts
the backward op in the backward graph. This module imports no Triton at import time (the op bodies do), so
`import kvfuse` stays cheap and works where Triton is absent.

Shapes (all tensors on one device):
    student_k, student_v   [L, B, H_s, T, D_s]     fp16 | bf16 | fp32, last stride 1 (keys post-RoPE)
    alpha                  [B, N] | [B, L, N]      router weights
    layer_weights          [L] fp32                w_l (loss = Σ_l w_l term_l / Σ_l w_l)
    mask, positions        [B, T] fp32 contiguous  0/1 token mask, student positions
    rot                    [L] int32               each layer's rotary dim: `rotary_dim` or 0 (NoPE layer)
    inv_freq               [L, ≥ rotary_dim/2] fp32 (stride 0 on L allowed)
    scaling                [L] fp32                RoPE attention_scaling per layer
    w_k[i], w_v[i]         [L, H_i·D_i, 2·H_s·PH]  adapters in the pair layout (kvfuse.kernels.fused_kv_loss)
    teacher_k[i], _v[i]    [L, B, H_i, T, D_i]     aligned pre-RoPE teacher KV, last stride 1
Returns (loss [], k_mse [L], v_mse [L], cos [L], terms [L], G_k, G_v, dS_k, dS_v); the last four are the saved
gradient buffers (empty when no gradient is needed) and, like the statistics, carry no gradient.
"""
from __future__ import annotations

import importlib

import torch
from torch import Tensor


def _kernels():
    return importlib.import_module("kvfuse.kernels.fused_kv_loss")


MAX_TEACHERS = 8  # the kernels take teachers as eight separate arguments


def pair_width(d_s: int) -> int:
    """PH: pair columns per student head in the pair layout (a power of two ≥ D_s/2, ≥ 16 for tl.dot)."""
    return max(16, 1 << max(0, d_s // 2 - 1).bit_length())


def _grad_dtype(teachers: list[Tensor], weights: list[Tensor]) -> torch.dtype:
    from kvfuse.kernels.utils import dot_dtype
    return dot_dtype([t.dtype for t in teachers] + [w.dtype for w in weights])[1]


@torch.library.custom_op("kvfuse::fused_kv_loss", mutates_args=())
def fused_kv_loss(student_k: Tensor, student_v: Tensor, alpha: Tensor, layer_weights: Tensor, mask: Tensor,
                  positions: Tensor, rot: Tensor, inv_freq: Tensor, scaling: Tensor, w_k: list[Tensor],
                  w_v: list[Tensor], teacher_k: list[Tensor], teacher_v: list[Tensor], rotary_dim: int,
                  lambda_k: float, lambda_v: float, beta: float, compute_grad: bool
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    kern = _kernels()
    L, B, H_s, T, D_s = student_k.shape
    n = mask.sum()
    c_l = layer_weights / layer_weights.sum()
    coef_k = 2.0 * lambda_k * c_l / (n * H_s * D_s)
    coef_v = 2.0 * lambda_v * c_l / (n * H_s * D_s)
    coef_cos = beta * c_l / (2.0 * n * H_s)
    sq_k, cs_k, g_k, ds_k = kern.fused_kv_loss_forward(student_k, teacher_k, w_k, alpha, mask, positions, rot,
                                                       inv_freq, scaling, rotary_dim, coef_k, coef_cos, True,
                                                       compute_grad)
    sq_v, cs_v, g_v, ds_v = kern.fused_kv_loss_forward(student_v, teacher_v, w_v, alpha, mask, positions, rot,
                                                       inv_freq, scaling, rotary_dim, coef_v, coef_cos, False,
                                                       compute_grad)
    k_mse = sq_k / (n * H_s * D_s)
    v_mse = sq_v / (n * H_s * D_s)
    cos = (cs_k + cs_v) / (2.0 * n * H_s)
    terms = lambda_k * k_mse + lambda_v * v_mse + beta * (1.0 - cos)
    loss = (c_l * terms).sum()
    if not compute_grad:  # outputs of a custom op may not alias each other: four distinct empties
        g_k, g_v, ds_k, ds_v = (student_k.new_empty(0) for _ in range(4))
    return loss, k_mse, v_mse, cos, terms, g_k, g_v, ds_k, ds_v


@fused_kv_loss.register_fake
def _(student_k, student_v, alpha, layer_weights, mask, positions, rot, inv_freq, scaling, w_k, w_v, teacher_k,
      teacher_v, rotary_dim, lambda_k, lambda_v, beta, compute_grad):
    L, B, H_s, T, D_s = student_k.shape
    stat = [student_k.new_empty((L,), dtype=torch.float32) for _ in range(4)]
    loss = student_k.new_empty((), dtype=torch.float32)
    if compute_grad:
        g_dtype = _grad_dtype(teacher_k, w_k)
        c2 = w_k[0].shape[2]
        bufs = [student_k.new_empty((L, B, T, c2), dtype=g_dtype),
                student_k.new_empty((L, B, T, c2), dtype=_grad_dtype(teacher_v, w_v)),
                torch.empty_like(student_k, memory_format=torch.contiguous_format),
                torch.empty_like(student_v, memory_format=torch.contiguous_format)]
    else:
        bufs = [student_k.new_empty(0) for _ in range(4)]
    return (loss, *stat, *bufs)


@torch.library.custom_op("kvfuse::fused_kv_loss_backward", mutates_args=())
def fused_kv_loss_backward(grad_loss: Tensor, alpha: Tensor, g_k: Tensor, g_v: Tensor, w_k: list[Tensor],
                           w_v: list[Tensor], teacher_k: list[Tensor], teacher_v: list[Tensor], need_w: bool,
                           need_alpha: bool) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    kern = _kernels()
    g = grad_loss.detach().to(torch.float32).reshape(1).contiguous()
    dwk, da_k = kern.fused_kv_loss_backward(teacher_k, w_k, alpha, g_k, g, need_w, need_alpha)
    dwv, da_v = kern.fused_kv_loss_backward(teacher_v, w_v, alpha, g_v, g, need_w, need_alpha)
    d_alpha = alpha.new_empty(0)
    if need_alpha:
        d_alpha = da_k + da_v
        if alpha.dim() == 2:
            d_alpha = d_alpha.sum(1)
        d_alpha = d_alpha.to(alpha.dtype)
    return (d_alpha, [d if need_w else w.new_empty(0) for d, w in zip(dwk, w_k)],
            [d if need_w else w.new_empty(0) for d, w in zip(dwv, w_v)])


@fused_kv_loss_backward.register_fake
def _(grad_loss, alpha, g_k, g_v, w_k, w_v, teacher_k, teacher_v, need_w, need_alpha):
    d_alpha = torch.empty_like(alpha) if need_alpha else alpha.new_empty(0)
    return (d_alpha, [torch.empty_like(w) if need_w else w.new_empty(0) for w in w_k],
            [torch.empty_like(w) if need_w else w.new_empty(0) for w in w_v])


def _setup_context(ctx, inputs, output):
    (student_k, student_v, alpha, layer_weights, mask, positions, rot, inv_freq, scaling, w_k, w_v, teacher_k,
     teacher_v, rotary_dim, lambda_k, lambda_v, beta, compute_grad) = inputs
    loss, k_mse, v_mse, cos, terms, g_k, g_v, ds_k, ds_v = output
    if not compute_grad:
        ctx.n_teachers = -1  # the caller asked for no gradient: backward must not run
        return
    ctx.n_teachers = len(w_k)
    ctx.save_for_backward(alpha, layer_weights, terms, loss, g_k, g_v, ds_k, ds_v, *w_k, *w_v, *teacher_k,
                          *teacher_v)


def _backward(ctx, grad_loss, *_stats_and_buffers):
    if ctx.n_teachers < 0:
        raise RuntimeError("kvfuse::fused_kv_loss ran with compute_grad=False; its backward has no buffers")
    N = ctx.n_teachers
    alpha, layer_weights, terms, loss, g_k, g_v, ds_k, ds_v, *rest = ctx.saved_tensors
    w_k, w_v, t_k, t_v = rest[:N], rest[N:2 * N], rest[2 * N:3 * N], rest[3 * N:]
    need = ctx.needs_input_grad
    need_w = any(need[9]) or any(need[10])
    d_alpha, dwk, dwv = fused_kv_loss_backward(grad_loss, alpha, g_k, g_v, list(w_k), list(w_v), list(t_k),
                                               list(t_v), need_w, bool(need[2]))
    g = grad_loss.to(torch.float32)
    d_sk = (ds_k * g).to(ds_k.dtype) if need[0] else None
    d_sv = (ds_v * g).to(ds_v.dtype) if need[1] else None
    d_lw = g * (terms - loss) / layer_weights.sum() if need[3] else None
    return (d_sk, d_sv, d_alpha if need[2] else None, d_lw, None, None, None, None, None,
            [d if need[9][i] else None for i, d in enumerate(dwk)],
            [d if need[10][i] else None for i, d in enumerate(dwv)],
            [None] * N, [None] * N, None, None, None, None, None)


fused_kv_loss.register_autograd(_backward, setup_context=_setup_context)
