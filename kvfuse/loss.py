"""Multi-teacher KV-distillation loss: the functional `kv_distill_loss` and the `KVDistillLoss` module.

Per student layer l and teacher i:
    K̂_i = rotate(reshape(flat(K'_i) · W^k_i[l]))     flat: teacher heads per token, index h·D_i + d
    V̂_i = reshape(flat(V'_i) · W^v_i[l])            reshape: [.., T, H_s·D_s] -> [.., H_s, T, D_s]
    K_f = Σ_i α_i K̂_i,   V_f = Σ_i α_i V̂_i
    rotate(y) = (y·cos(pθ) + rotate_half(y)·sin(pθ))·s_l on the first r_l dims of each head (rotate-half pairs
                (j, j + r_l/2), θ = cat(inv_freq, inv_freq)), identity on the rest; r_l = D_s for full RoPE, 0 on a
                NoPE layer; s_l = attention_scaling of layer l
    k_mse[l] = Σ_{b,t} m Σ_{h,d} (K_s − K_f)² / (n H_s D_s),  v_mse likewise,  n = Σ m
    cos[l]   = Σ_{b,t} m Σ_h ½(cos(K_s, K_f) + cos(V_s, V_f)) / (n H_s),  cos(a, b) = a·b / max(|a||b|, 1e-8)
    loss     = Σ_l w_l (λK k_mse[l] + λV v_mse[l] + β (1 − cos[l])) / Σ_l w_l

`backend="torch"` is the readable reference (dtype-generic: float64 in, float64 out; half inputs are
projected in their dtype and the rest runs in float32); `backend="triton"` is the fused kernel in
kvfuse.kernels.fused_kv_loss (called through the operator kvfuse::fused_kv_loss, so compiled trainers trace
through it) and must agree with it.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from kvfuse.align.heads import structured_adapter
from kvfuse.align.rope import rotate
from kvfuse.backend import BACKENDS, resolve_backend
from kvfuse.codecs import (LowRankKV, QuantizedKV, decode_teachers, finite_flag, finite_parts, fold_lowrank_adapter,
                           is_encoded)
from kvfuse.kernels.fused_kv_loss_op import (FOLD_SCALE_LIMIT, FOLDED, MAX_TEACHERS, TeacherStorage, codec_code,
                                             fold_side_data, fused_kv_loss_function, natural_layout, pair_width)
from kvfuse.kernels.utils import host_constant

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------- validation
def _check_float(name: str, x, dim: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {x.dtype}")
    if x.dim() != dim:
        raise ValueError(f"{name} must have {dim} dims, got shape {tuple(x.shape)}")
    return x


def _check_teacher(name: str, x):
    """A teacher entry: a floating tensor [L, B, H_i, T, D_i], or a compressed one (kvfuse.codecs) of that logical
    shape (its container validated its own dtypes)."""
    if is_encoded(x):
        if len(x.shape) != 5:
            raise ValueError(f"{name} must have 5 dims, got logical shape {tuple(x.shape)}")
        return x
    return _check_float(name, x, 5)


def _expect(name: str, x: torch.Tensor, shape: tuple, device: torch.device) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, expected {device} (student_k's device)")


def rotary_dims(rotary_dim, n_layers: int, head_dim: int, n_freq: int) -> tuple[int, ...]:
    """Each layer's rotary dim r_l: None → 2·n_freq everywhere; an int → that on every layer; a sequence → per
    layer (0 = NoPE layer). The first r_l dims of each head rotate as rotate-half pairs (j, j + r_l/2), the rest
    pass through unrotated and unscaled (partial rotary, as in Phi, GPT-NeoX, StableLM)."""
    if rotary_dim is None:
        dims = (2 * n_freq,) * n_layers
    elif isinstance(rotary_dim, int) and not isinstance(rotary_dim, bool):
        dims = (rotary_dim,) * n_layers
    elif isinstance(rotary_dim, Sequence) and not isinstance(rotary_dim, str):
        dims = tuple(rotary_dim)
        if len(dims) != n_layers:
            raise ValueError(f"rotary_dim has {len(dims)} entries for {n_layers} layers")
    else:
        raise ValueError(f"rotary_dim must be None, an int or a sequence of {n_layers} ints, got {rotary_dim!r:.80}")
    for l, r in enumerate(dims):
        if not isinstance(r, int) or isinstance(r, bool) or r < 0 or r % 2 or r > head_dim or r > 2 * n_freq:
            raise ValueError(f"rotary_dim of layer {l} is {r!r}: it must be an even int in [0, {head_dim}] "
                             f"(the head dim) and at most {2 * n_freq} (twice inv_freq's last dim)")
    return dims


def _layer_scalings(attention_scaling, n_layers: int, device) -> torch.Tensor:
    """attention_scaling as an [L] tensor (from a float, an [L] sequence, or a 0-d / [L] tensor)."""
    if isinstance(attention_scaling, torch.Tensor):
        if tuple(attention_scaling.shape) not in ((), (n_layers,)) or not attention_scaling.is_floating_point():
            raise ValueError(f"attention_scaling must be a float or a floating tensor [L={n_layers}], got "
                             f"{attention_scaling.dtype} of shape {tuple(attention_scaling.shape)}")
        if attention_scaling.device != device:
            raise ValueError(f"attention_scaling is on {attention_scaling.device}, expected {device}")
        return attention_scaling.detach().expand(n_layers)
    if isinstance(attention_scaling, Sequence):
        if len(attention_scaling) != n_layers:
            raise ValueError(f"attention_scaling has {len(attention_scaling)} entries for {n_layers} layers")
        return host_constant([float(s) for s in attention_scaling], torch.float64, device)
    # float64, so a float64 reference sees exactly the Python value; each backend casts to its compute dtype.
    return torch.full((n_layers,), float(attention_scaling), dtype=torch.float64, device=device)


def _validate(student_k, student_v, teacher_k, teacher_v, w_k, w_v, alpha, mask, positions, inv_freq,
              layer_weights) -> None:
    _check_float("student_k", student_k, 5)
    L, B, H_s, T, D_s = student_k.shape
    dev = student_k.device
    if D_s % 2:
        raise ValueError(f"student head dim D_s={D_s} must be even (rotate-half RoPE)")
    if min(L, B, H_s, T, D_s) == 0:
        raise ValueError(f"student_k has an empty dimension: shape {tuple(student_k.shape)}")
    _check_float("student_v", student_v, 5)
    _expect("student_v", student_v, student_k.shape, dev)
    for name, seq in (("teacher_k", teacher_k), ("teacher_v", teacher_v), ("w_k", w_k), ("w_v", w_v)):
        if isinstance(seq, torch.Tensor) or not isinstance(seq, Sequence):
            raise ValueError(f"{name} must be a list of tensors (one per teacher), got {type(seq).__name__}")
    N = len(teacher_k)
    if not 1 <= N <= MAX_TEACHERS:
        raise ValueError(f"teacher_k must hold 1..{MAX_TEACHERS} teachers, got {N}")
    for name, seq in (("teacher_v", teacher_v), ("w_k", w_k), ("w_v", w_v)):
        if len(seq) != N:
            raise ValueError(f"{name} has {len(seq)} entries but teacher_k has {N}")
    for i in range(N):
        tk = _check_teacher(f"teacher_k[{i}]", teacher_k[i])
        if tk.shape[0] != L or tk.shape[1] != B or tk.shape[3] != T:
            raise ValueError(f"teacher_k[{i}] has shape {tuple(tk.shape)}, expected [L={L}, B={B}, H_i, T={T}, D_i]")
        if tk.device != dev:
            raise ValueError(f"teacher_k[{i}] is on {tk.device}, expected {dev} (student_k's device)")
        _check_teacher(f"teacher_v[{i}]", teacher_v[i])
        _expect(f"teacher_v[{i}]", teacher_v[i], tk.shape, dev)
        F_i = tk.shape[2] * tk.shape[4]
        for name, w in ((f"w_k[{i}]", w_k[i]), (f"w_v[{i}]", w_v[i])):
            _check_float(name, w, 3)
            _expect(name, w, (L, F_i, H_s * D_s), dev)
    if not isinstance(alpha, torch.Tensor) or alpha.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"alpha must be a floating tensor [B, N] or [B, L, N], got {alpha!r:.80}")
    if tuple(alpha.shape) not in ((B, N), (B, L, N)):
        raise ValueError(f"alpha has shape {tuple(alpha.shape)}, expected [B={B}, N={N}] or [B, L={L}, N]")
    if alpha.device != dev:
        raise ValueError(f"alpha is on {alpha.device}, expected {dev}")
    for name, x in (("mask", mask), ("positions", positions)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a tensor [B, T]")
        _expect(name, x, (B, T), dev)
    if mask.dtype.is_complex:
        raise ValueError("mask must be bool or real 0/1 values")
    if not isinstance(inv_freq, torch.Tensor) or not inv_freq.dtype.is_floating_point:
        raise ValueError("inv_freq must be a floating tensor [R/2] or [L, R/2] (R: the rotary dim)")
    if inv_freq.dim() not in (1, 2) or (inv_freq.dim() == 2 and inv_freq.shape[0] != L) \
            or inv_freq.shape[-1] > D_s // 2:
        raise ValueError(f"inv_freq has shape {tuple(inv_freq.shape)}, expected [R/2] or [{L}, R/2] with "
                         f"R ≤ D_s = {D_s} (the rotary dim; [{D_s // 2}] for full RoPE)")
    if inv_freq.device != dev:
        raise ValueError(f"inv_freq is on {inv_freq.device}, expected {dev}")
    if layer_weights is not None:
        if not isinstance(layer_weights, torch.Tensor):
            raise ValueError("layer_weights must be a tensor [L] or None")
        _expect("layer_weights", layer_weights, (L,), dev)


def _folded_scales(x, name: str) -> list[tuple[str, torch.Tensor]]:
    """The scales of a teacher entry that the Triton kernels take folded (per-channel fp8 and int8 with bf16 scales;
    low-rank coefficients are grouped per token: `fold_side_data`), named as `finite_parts` names them. The fold
    (scale·2^FOLD_EXP in bf16) needs them below FOLD_SCALE_LIMIT, which kvfuse.codecs' encoders keep."""
    if isinstance(x, QuantizedKV) and codec_code(x.kind, x.axis, x.scale.dtype) in FOLDED:
        return [(f"{name}.scale", x.scale)]
    return []


def _check_contents(named: list[tuple[str, torch.Tensor]], mask: torch.Tensor, layer_weights, check_finite: bool,
                    folded: Sequence[tuple[str, torch.Tensor]] = ()):
    # One flag per check and one host sync for all; the flags name the culprits. kv_distill_loss runs this in eager
    # mode only: under torch.compile a sync would break the graph and stall the stream.
    flags = [mask.ne(0).any()]
    if layer_weights is not None:
        flags.append(layer_weights.sum().ne(0))
    if check_finite:
        flags += [finite_flag(x) for _, x in named]
    if folded:  # one multi-tensor reduction for all of them: a few launches a step, not three per scale
        flags += (torch.stack(torch._foreach_norm([s.detach() for _, s in folded], float("inf")))
                  < FOLD_SCALE_LIMIT).unbind(0)
    ok = torch.stack(flags).tolist()
    if not ok[0]:
        raise ValueError("mask selects no token (all zeros): the masked means would divide by zero")
    if layer_weights is not None and not ok[1]:
        raise ValueError("layer_weights sum to zero")
    at = 2 if layer_weights is not None else 1
    if check_finite:
        bad = [name for (name, _), good in zip(named, ok[at:]) if not good]
        if bad:
            raise ValueError(f"non-finite values (NaN/Inf) in {', '.join(bad)}; "
                             "pass check_finite=False to skip this check")
        at += len(named)
    big = [name for (name, _), good in zip(folded, ok[at:]) if not good]
    if big:
        raise ValueError(f"{', '.join(big)}: a scale reaches {FOLD_SCALE_LIMIT:g} (or is not finite); the Triton "
                         "backend decodes per-channel fp8 and int8 codes with bf16 scales through a fold that needs "
                         f"them below {FOLD_SCALE_LIMIT:g}, as kvfuse.codecs' encoders keep them; give those teachers "
                         "float32 scales, or use backend='torch'")


# ------------------------------------------------------------------------------------------ torch reference
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _project(x: torch.Tensor, w: torch.Tensor, H_s: int, D_s: int, acc: torch.dtype) -> torch.Tensor:
    """[L, B, H_i, T, D_i] · [L, H_i·D_i, H_s·D_s] -> [L, B, H_s, T, D_s] (in `acc`)."""
    L, B, H_i, T, D_i = x.shape
    mm = torch.promote_types(x.dtype, w.dtype)
    flat = x.permute(0, 1, 3, 2, 4).reshape(L, B, T, H_i * D_i).to(mm)
    y = torch.matmul(flat, w.to(mm).unsqueeze(1))
    return y.to(acc).view(L, B, T, H_s, D_s).permute(0, 1, 3, 2, 4)


def rotate_layers(y: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: torch.Tensor,
                  rot: tuple[int, ...]) -> torch.Tensor:
    """RoPE at the student's positions on every layer of y [L, B, H, T, D]: kvfuse.align.rope.rotate per layer with
    that layer's rotary dim (0: NoPE), frequencies inv_freq [R/2] | [L, R/2] and scale."""
    invf = inv_freq.expand(len(rot), inv_freq.shape[-1])
    return torch.stack([rotate(y[l], positions, invf[l, :r // 2], scaling[l].to(y.dtype), r)
                        for l, r in enumerate(rot)])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # max(‖a‖‖b‖, 1e-8) as the contract states: the product of the norms, not sqrt(‖a‖²‖b‖²), which overflows in
    # fp32 for ‖a‖, ‖b‖ ≳ 1e9. vector_norm's gradient at a zero vector (a padded or unaligned token's fused KV) is
    # 0, not NaN, and the clamp passes none below 1e-8.
    den = torch.clamp_min(torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1), 1e-8)
    return (a * b).sum(-1) / den


def _torch_loss(student_k, student_v, teacher_k, teacher_v, w_k, w_v, alpha, mask, positions, inv_freq,
                scaling, rot, lambda_k, lambda_v, beta, layer_weights):
    L, B, H_s, T, D_s = student_k.shape
    acc = _compute_dtype(student_k.dtype)
    m = mask.to(acc)
    n = m.sum()
    pos = positions.to(acc)
    a = alpha.to(acc)
    a = a.t()[:, None, :].expand(-1, L, B) if alpha.dim() == 2 else a.permute(2, 1, 0)  # [N, L, B]
    k_f = v_f = 0
    for i in range(len(teacher_k)):
        ai = a[i][:, :, None, None, None]
        k_f = k_f + ai * rotate_layers(_project(teacher_k[i], w_k[i], H_s, D_s, acc), pos, inv_freq, scaling, rot)
        v_f = v_f + ai * _project(teacher_v[i], w_v[i], H_s, D_s, acc)
    s_k, s_v = student_k.to(acc), student_v.to(acc)
    tok = m[None, :, None, :]                                                   # [1, B, 1, T]
    k_mse = (tok * (s_k - k_f).square().sum(-1)).sum((1, 2, 3)) / (n * H_s * D_s)
    v_mse = (tok * (s_v - v_f).square().sum(-1)).sum((1, 2, 3)) / (n * H_s * D_s)
    cos_l = (tok * 0.5 * (_cosine(s_k, k_f) + _cosine(s_v, v_f))).sum((1, 2, 3)) / (n * H_s)
    w = torch.ones(L, dtype=acc, device=student_k.device) if layer_weights is None else layer_weights.to(acc)
    loss = (w * (lambda_k * k_mse + lambda_v * v_mse + beta * (1 - cos_l))).sum() / w.sum()
    return loss, k_mse, v_mse, cos_l


def pair_layout_adapter(w: torch.Tensor, student_heads: tuple[int, int], rotary_dim: int) -> torch.Tensor:
    """[L, F, H_s·D_s] -> [L, F, 2·H_s·PH]: the adapter's columns in the kernel's pair layout (differentiable).

    Column (η, h, j) = η·H_s·PH + h·PH + j holds student dim d_η(j) of head h, where pair j is (j, j + r/2) for
    j < r/2 and (r + u, r + (D_s − r)/2 + u), u = j − r/2, for the pass-through dims; pairs j ≥ D_s/2 are zero."""
    H_s, D_s = student_heads
    L, F, _ = w.shape
    half, r2 = D_s // 2, rotary_dim // 2
    ph = pair_width(D_s)
    w4 = w.reshape(L, F, H_s, D_s)
    if rotary_dim != D_s:
        first = list(range(r2)) + [rotary_dim + u for u in range(half - r2)]
        second = [j + r2 for j in range(r2)] + [rotary_dim + half - r2 + u for u in range(half - r2)]
        w4 = w4[..., first + second]
    w5 = w4.reshape(L, F, H_s, 2, half).transpose(2, 3)
    if ph != half:
        w5 = torch.nn.functional.pad(w5, (0, ph - half))
    return w5.reshape(L, F, 2 * H_s * ph).contiguous()


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _kernel_storage(teachers, adapters) -> tuple[TeacherStorage, list[torch.Tensor]]:
    """Teacher entries as the kernels read them, and the adapters they pair with: a low-rank teacher becomes its
    coefficients (one head of width r) with the folded adapter B·W; an fp8 / int8 / int4 one stays compressed (the
    kernels decode it in registers); a plain tensor passes as it is."""
    data, codecs, scales, offsets, ws = [], [], [], [], []
    for x, w in zip(teachers, adapters):
        if isinstance(x, LowRankKV):
            x, w = x.coeffs, fold_lowrank_adapter(x.basis, w)
        if isinstance(x, QuantizedKV):
            data.append(_unit_stride(x.data))
            codecs.append(codec_code(x.kind, x.axis, x.scale.dtype))
            scales.append(x.scale.contiguous())
            offsets.append(None if x.offset is None else x.offset.contiguous())
        else:
            data.append(_unit_stride(x))
            codecs.append(0)
            scales.append(None)
            offsets.append(None)
        ws.append(w)
    if not any(codecs):
        return TeacherStorage.plain(data), ws
    return TeacherStorage(data, tuple(codecs), scales, offsets), ws


def _triton_loss(student_k, student_v, teacher_k, teacher_v, w_k, w_v, alpha, mask, positions, inv_freq,
                 scaling, rot, lambda_k, lambda_v, beta, layer_weights):
    L, B, H_s, T, D_s = student_k.shape
    if student_k.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(f"backend='triton' needs CUDA tensors (got {student_k.device}); "
                         "use backend='torch' or set TRITON_INTERPRET=1")
    plain = [x for x in (*teacher_k, *teacher_v) if not is_encoded(x)]
    if any(x.dtype == torch.float64 for x in (student_k, student_v, *plain, *w_k, *w_v)):
        raise ValueError("backend='triton' takes fp16/bf16/fp32 tensors; use backend='torch' for float64")
    turning = sorted({r for r in rot if r})
    if len(turning) > 1:
        raise ValueError(f"backend='triton' needs one rotary dim for all rotating layers, got {turning}; "
                         "use backend='torch'")
    pairing = turning[0] if turning else D_s
    dev = student_k.device
    lw = host_constant((1.0,) * L, torch.float32, dev) if layer_weights is None else layer_weights.float()
    invf = inv_freq.float().expand(L, inv_freq.shape[-1])  # stride 0 on L: no copy for a shared inv_freq
    rot_t = host_constant(rot, torch.int32, dev)
    keys, w_k = _kernel_storage(teacher_k, w_k)
    values, w_v = _kernel_storage(teacher_v, w_v)
    keys, values = fold_side_data(keys, values)
    # Compressed teachers decode to the student's half dtype (fp32 for an fp32 student).
    decoded = student_k.dtype if student_k.dtype in (torch.float16, torch.bfloat16) else torch.float32

    # fp32 adapters (master weights) with half-precision KV: run the GEMMs on half tensor cores with fp32
    # accumulation rather than fp32 'ieee' products; the cast is small ([L, F_i, C]) and differentiable.
    def layout(ws, storage):
        dtypes = [decoded if c else x.dtype for x, c in zip(storage.data, storage.codecs)]
        ws = [w.to(dt) if dt in (torch.float16, torch.bfloat16) else w for w, dt in zip(ws, dtypes)]
        if natural_layout(D_s, pairing):
            return [_unit_stride(w) for w in ws]
        return [pair_layout_adapter(w, (H_s, D_s), pairing) for w in ws]

    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (student_k, student_v, alpha, lw, *w_k, *w_v))
    return fused_kv_loss_function(
        _unit_stride(student_k), _unit_stride(student_v), alpha, lw, mask.contiguous(), positions.contiguous(),
        rot_t, invf, scaling.float(), layout(w_k, keys), layout(w_v, values), keys, values, pairing,
        float(lambda_k), float(lambda_v), float(beta), grad)


def kv_distill_loss(student_k, student_v, teacher_k, teacher_v, w_k, w_v, alpha, mask, positions, inv_freq,
                    attention_scaling=1.0, lambda_k=1.0, lambda_v=1.0, beta=0.1, layer_weights=None,
                    backend="torch", check_finite=True, rotary_dim=None):
    """Fused multi-teacher KV-distillation loss (formula in the module docstring).

    student_k, student_v [L, B, H_s, T, D_s] (keys post-RoPE); teacher_k, teacher_v: N lists of
    [L, B, H_i, T, D_i] (aligned, pre-RoPE), each a tensor or compressed (kvfuse.codecs: QuantizedKV fp8 / int8 / int4,
    decoded in the Triton kernel's registers, or LowRankKV, run as its coefficients with the folded adapter B·W;
    the torch reference decodes them explicitly); w_k, w_v: N lists of [L, H_i·D_i, H_s·D_s]; alpha [B, N] or
    [B, L, N]; mask [B, T] (bool or 0/1); positions [B, T]; inv_freq [R/2] or [L, R/2] (R the rotary dim: D_s for
    full RoPE); attention_scaling a float or one per layer ([L] tensor or sequence); layer_weights [L] or None
    (ones); rotary_dim None (every layer rotates R = 2·inv_freq.shape[-1] dims), an int, or one int per layer
    (0 = NoPE layer). backend: "torch" (reference) or "triton" (CUDA, or TRITON_INTERPRET=1).
    check_finite: raise on NaN/Inf in any input (one extra pass over the inputs; turn off for speed). The content
    checks (finite inputs, a non-empty mask, non-zero layer weights; for backend="triton", per-channel fp8 and
    int8 scales in bf16 below FOLD_SCALE_LIMIT = 2^16, which the kernels' fold needs) read device values on the
    host, so they run in eager mode only; under torch.compile they are skipped (an all-zero mask then gives a NaN
    loss).

    Returns (loss, stats) with stats = {"k_mse": [L], "v_mse": [L], "cos": [L]} detached. Gradients reach
    student_k/v, w_k, w_v, alpha and layer_weights on both backends; teachers and attention_scaling get none.
    """
    if backend not in ("torch", "triton"):
        raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
    _validate(student_k, student_v, teacher_k, teacher_v, w_k, w_v, alpha, mask, positions, inv_freq,
              layer_weights)
    L, D_s = student_k.shape[0], student_k.shape[4]
    rot = rotary_dims(rotary_dim, L, D_s, inv_freq.shape[-1])
    scaling = _layer_scalings(attention_scaling, L, student_k.device)
    if backend == "torch":  # the reference decodes compressed teachers explicitly
        teacher_k, teacher_v = decode_teachers(teacher_k, teacher_v, _compute_dtype(student_k.dtype))
    teacher_k = [x if is_encoded(x) else x.detach() for x in teacher_k]
    teacher_v = [x if is_encoded(x) else x.detach() for x in teacher_v]
    if not torch.compiler.is_compiling():
        named = [("student_k", student_k), ("student_v", student_v), ("alpha", alpha), ("positions", positions),
                 ("inv_freq", inv_freq), ("attention_scaling", scaling)]
        for i in range(len(teacher_k)):
            named += [*finite_parts(teacher_k[i], f"teacher_k[{i}]"),
                      *finite_parts(teacher_v[i], f"teacher_v[{i}]"), (f"w_k[{i}]", w_k[i]), (f"w_v[{i}]", w_v[i])]
        folded = []
        if backend == "triton":
            for i in range(len(teacher_k)):
                folded += [*_folded_scales(teacher_k[i], f"teacher_k[{i}]"),
                           *_folded_scales(teacher_v[i], f"teacher_v[{i}]")]
        _check_contents(named, mask, layer_weights, check_finite, folded)
    impl = _torch_loss if backend == "torch" else _triton_loss
    loss, k_mse, v_mse, cos = impl(student_k, student_v, teacher_k, teacher_v, w_k, w_v, alpha, mask, positions,
                                   inv_freq, scaling, rot, lambda_k, lambda_v, beta, layer_weights)
    return loss, {"k_mse": k_mse.detach(), "v_mse": v_mse.detach(), "cos": cos.detach()}


# ------------------------------------------------------------------------------------------------ the module
class KVDistillLoss(nn.Module):
    """The fused KV-distillation loss as a module that owns the per-teacher adapters W^k_i, W^v_i.

    teacher_heads: [(H_i, D_i)] per teacher; student_heads: (H_s, D_s); n_layers: student layers L.
    init: "structured" (default: kvfuse.align.heads.structured_adapter — group mean of the teacher heads, or
        replication, with each head's dims mapped so that RoPE pairs stay pairs), or a sequence of N (w_k, w_v)
        tensor pairs [L, H_i·D_i, H_s·D_s] (e.g. a ridge fit, kvfuse.align.heads.ridge_adapters).
    rotary_dims: for the structured init, N pairs (r_t, r_s) of the teacher's and the student's rotary dims (each
        an int, or one int per student layer; 0 on NoPE layers); None: full rotary on both sides.
    router: an nn.Module or callable giving α [B, N] | [B, L, N]; called as router(*router_inputs) when
        router_inputs is a tuple, router(**router_inputs) for a dict. An nn.Module router is registered, so
        its parameters train with the loss.
    alpha: constant weights [N] or [L, N] used when neither α nor the router is given (default uniform 1/N);
        normalised to sum 1 over teachers.
    backend: "auto" picks "triton" for CUDA inputs of a Triton dtype, "torch" otherwise (kvfuse.backend).

    The adapters are touched only inside forward, so under DeepSpeed ZeRO-3 (the module being a submodule of
    the engine's model) DeepSpeed's pre-forward hook gathers them and their gradients reach its reducer.
    """

    def __init__(self, teacher_heads: Sequence[tuple[int, int]], student_heads: tuple[int, int], n_layers: int,
                 init: str | Sequence[tuple[torch.Tensor, torch.Tensor]] = "structured",
                 router: nn.Module | Callable | None = None, alpha: Sequence[float] | torch.Tensor | None = None,
                 lambda_k: float = 1.0, lambda_v: float = 1.0, beta: float = 0.1,
                 attention_scaling: float | Sequence[float] = 1.0, backend: str = "auto", check_finite: bool = True,
                 dtype: torch.dtype = torch.float32, rotary_dims: Sequence[tuple] | None = None):
        super().__init__()
        teacher_heads = [tuple(int(v) for v in th) for th in teacher_heads]
        if not 1 <= len(teacher_heads) <= MAX_TEACHERS:
            raise ValueError(f"teacher_heads must list 1..{MAX_TEACHERS} teachers, got {len(teacher_heads)}")
        if any(len(th) != 2 or min(th) < 1 for th in teacher_heads):
            raise ValueError(f"teacher_heads must be positive (H_i, D_i) pairs, got {teacher_heads}")
        H_s, D_s = (int(v) for v in student_heads)
        if H_s < 1 or D_s < 2 or D_s % 2:
            raise ValueError(f"student_heads must be (H_s >= 1, even D_s), got {student_heads}")
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if rotary_dims is not None and len(rotary_dims) != len(teacher_heads):
            raise ValueError(f"rotary_dims has {len(rotary_dims)} (r_t, r_s) pairs for {len(teacher_heads)} teachers")
        self.teacher_heads, self.student_heads, self.n_layers = teacher_heads, (H_s, D_s), int(n_layers)
        self.lambda_k, self.lambda_v, self.beta = float(lambda_k), float(lambda_v), float(beta)
        self.attention_scaling, self.backend, self.check_finite = attention_scaling, backend, check_finite
        N = len(teacher_heads)
        self.n_teachers = N
        for i, (H_i, D_i) in enumerate(teacher_heads):
            shape = (self.n_layers, H_i * D_i, H_s * D_s)
            if isinstance(init, str):
                if init != "structured":
                    raise ValueError(f"init must be 'structured' or a list of (w_k, w_v) tensors, got {init!r}")
                wk = structured_adapter(H_i, D_i, H_s, D_s, self.n_layers,
                                        rotary_dims=None if rotary_dims is None else tuple(rotary_dims[i])).to(dtype)
                wv = wk.clone()
            else:
                if len(init) != N:
                    raise ValueError(f"init has {len(init)} (w_k, w_v) pairs for {N} teachers")
                wk, wv = init[i]
                for name, w in ((f"init[{i}][0]", wk), (f"init[{i}][1]", wv)):
                    if not isinstance(w, torch.Tensor) or tuple(w.shape) != shape:
                        raise ValueError(f"{name} must be a tensor of shape {shape}, "
                                         f"got {tuple(w.shape) if isinstance(w, torch.Tensor) else type(w)}")
                wk, wv = wk.detach().to(dtype).clone(), wv.detach().to(dtype).clone()
            # Direct parameters, not an nn.ParameterList: ZeRO-3 gathers the parameters a module owns itself
            # in that module's pre-forward hook; a container child never runs forward, so its would stay empty.
            self.register_parameter(f"w_k_{i}", nn.Parameter(wk))
            self.register_parameter(f"w_v_{i}", nn.Parameter(wv))
        self.router = router
        if alpha is None:
            const = torch.full((N,), 1.0 / N)
        else:
            const = torch.as_tensor(alpha, dtype=torch.float32)
            if tuple(const.shape) not in ((N,), (self.n_layers, N)):
                raise ValueError(f"alpha must have shape [{N}] or [{self.n_layers}, {N}], got {tuple(const.shape)}")
            if (const.sum(-1) <= 0).any():
                raise ValueError("constant alpha must have a positive sum over teachers")
            const = const / const.sum(-1, keepdim=True)
        self.register_buffer("alpha_const", const, persistent=False)

    @property
    def w_k(self) -> list[nn.Parameter]:
        """Key adapters W^k_i, [L, H_i·D_i, H_s·D_s] each."""
        return [getattr(self, f"w_k_{i}") for i in range(self.n_teachers)]

    @property
    def w_v(self) -> list[nn.Parameter]:
        """Value adapters W^v_i, [L, H_i·D_i, H_s·D_s] each."""
        return [getattr(self, f"w_v_{i}") for i in range(self.n_teachers)]

    def _alpha(self, alpha, router_inputs, B: int, ref: torch.Tensor) -> torch.Tensor:
        if alpha is not None:
            return alpha
        if self.router is not None and router_inputs is not None:
            if isinstance(router_inputs, Mapping):
                return self.router(**router_inputs)
            if isinstance(router_inputs, tuple):
                return self.router(*router_inputs)
            return self.router(router_inputs)
        if self.router is not None:
            raise ValueError("this KVDistillLoss has a router: pass router_inputs (or alpha) to forward")
        a = self.alpha_const.to(device=ref.device)
        return a.expand(B, *a.shape)

    def forward(self, student_k, student_v, teacher_k, teacher_v, mask, positions, inv_freq,
                attention_scaling=None, alpha=None, layer_weights=None, router_inputs=None, rotary_dim=None):
        """Returns (loss, stats) as `kv_distill_loss`; see that function for the shapes. attention_scaling
        (float or per layer) defaults to the module's; rotary_dim as in `kv_distill_loss`."""
        if not isinstance(student_k, torch.Tensor) or student_k.dim() != 5:
            raise ValueError("student_k must be a tensor [L, B, H_s, T, D_s]")
        a = self._alpha(alpha, router_inputs, student_k.shape[1], student_k)
        backend = resolve_backend(self.backend, student_k)
        scaling = self.attention_scaling if attention_scaling is None else attention_scaling
        return kv_distill_loss(student_k, student_v, list(teacher_k), list(teacher_v), self.w_k, self.w_v, a, mask,
                               positions, inv_freq, attention_scaling=scaling, lambda_k=self.lambda_k,
                               lambda_v=self.lambda_v, beta=self.beta, layer_weights=layer_weights, backend=backend,
                               check_finite=self.check_finite, rotary_dim=rotary_dim)


def fused_teacher_keys(teacher_k, w_k, alpha, positions, inv_freq, attention_scaling, student_heads,
                       rotary_dim=None):
    """K_f = Σ_i α_i · rotate(K'_i W_k^i) [L, B, H_s, T, D_s]: the fused teacher keys in the student's head space,
    rotated at student positions (the attention-KL term's keys). Same math and arguments as the reference loss."""
    H_s, D_s = student_heads
    L = teacher_k[0].shape[0]
    acc = _compute_dtype(teacher_k[0].dtype)
    rot = rotary_dims(rotary_dim, L, D_s, inv_freq.shape[-1])
    scaling = _layer_scalings(attention_scaling, L, positions.device)
    B = positions.shape[0]
    a = alpha.to(acc)
    a = a.t()[:, None, :].expand(-1, L, B) if alpha.dim() == 2 else a.permute(2, 1, 0)
    fused = 0
    for i, (x, w) in enumerate(zip(teacher_k, w_k)):
        fused = fused + a[i][:, :, None, None, None] * rotate_layers(_project(x.detach(), w, H_s, D_s, acc),
                                                                     positions.to(acc), inv_freq, scaling, rot)
    return fused
