"""Multi-teacher KV-distillation loss: the functional `kv_distill_loss` and the `KVDistillLoss` module.

Per student layer l and teacher i (DESIGN.md §3 step 7, §4):
    K̂_i = rotate(reshape(flat(K'_i) · W^k_i[l]))     flat: teacher heads per token, index h·D_i + d
    V̂_i = reshape(flat(V'_i) · W^v_i[l])            reshape: [.., T, H_s·D_s] -> [.., H_s, T, D_s]
    K_f = Σ_i α_i K̂_i,   V_f = Σ_i α_i V̂_i
    rotate(y) = (y·cos(pθ) + rotate_half(y)·sin(pθ))·attention_scaling,  θ = cat(inv_freq, inv_freq)
    k_mse[l] = Σ_{b,t} m Σ_{h,d} (K_s − K_f)² / (n H_s D_s),  v_mse likewise,  n = Σ m
    cos[l]   = Σ_{b,t} m Σ_h ½(cos(K_s, K_f) + cos(V_s, V_f)) / (n H_s),  cos(a, b) = a·b / max(|a||b|, 1e-8)
    loss     = Σ_l w_l (λK k_mse[l] + λV v_mse[l] + β (1 − cos[l])) / Σ_l w_l

`backend="torch"` is the readable reference (dtype-generic: float64 in, float64 out; half inputs are
projected in their dtype and the rest runs in float32); `backend="triton"` is the fused kernel in
kvfuse.kernels.fused_kv_loss and must agree with it.
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from kvfuse.backend import BACKENDS, resolve_backend

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_TEACHERS = 8


def _kernels():
    return importlib.import_module("kvfuse.kernels.fused_kv_loss")


# ----------------------------------------------------------------------------------------------- validation
def _check_float(name: str, x, dim: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {x.dtype}")
    if x.dim() != dim:
        raise ValueError(f"{name} must have {dim} dims, got shape {tuple(x.shape)}")
    return x


def _expect(name: str, x: torch.Tensor, shape: tuple, device: torch.device) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, expected {device} (student_k's device)")


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
        tk = _check_float(f"teacher_k[{i}]", teacher_k[i], 5)
        if tk.shape[0] != L or tk.shape[1] != B or tk.shape[3] != T:
            raise ValueError(f"teacher_k[{i}] has shape {tuple(tk.shape)}, expected [L={L}, B={B}, H_i, T={T}, D_i]")
        if tk.device != dev:
            raise ValueError(f"teacher_k[{i}] is on {tk.device}, expected {dev} (student_k's device)")
        _check_float(f"teacher_v[{i}]", teacher_v[i], 5)
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
        raise ValueError("inv_freq must be a floating tensor [D_s/2] or [L, D_s/2]")
    if tuple(inv_freq.shape) not in ((D_s // 2,), (L, D_s // 2)):
        raise ValueError(f"inv_freq has shape {tuple(inv_freq.shape)}, expected [{D_s // 2}] or [{L}, {D_s // 2}]")
    if inv_freq.device != dev:
        raise ValueError(f"inv_freq is on {inv_freq.device}, expected {dev}")
    if layer_weights is not None:
        if not isinstance(layer_weights, torch.Tensor):
            raise ValueError("layer_weights must be a tensor [L] or None")
        _expect("layer_weights", layer_weights, (L,), dev)


def _check_contents(named: list[tuple[str, torch.Tensor]], mask: torch.Tensor, layer_weights, check_finite: bool):
    # One host sync for all checks; the slow per-tensor pass runs only to name the culprit.
    flags = [mask.ne(0).any()]
    if layer_weights is not None:
        flags.append(layer_weights.sum().ne(0))
    if check_finite:
        # min and max propagate NaN and expose ±Inf: one read pass, no full-size boolean temporary.
        flags += [torch.isfinite(torch.stack(torch.aminmax(x.detach()))).all() if x.is_floating_point()
                  else torch.ones((), dtype=torch.bool, device=x.device) for _, x in named]
    ok = torch.stack(flags).tolist()
    if not ok[0]:
        raise ValueError("mask selects no token (all zeros): the masked means would divide by zero")
    if layer_weights is not None and not ok[1]:
        raise ValueError("layer_weights sum to zero")
    if check_finite:
        off = 2 if layer_weights is not None else 1
        bad = [name for (name, _), good in zip(named, ok[off:]) if not good]
        if bad:
            raise ValueError(f"non-finite values (NaN/Inf) in {', '.join(bad)}; "
                             "pass check_finite=False to skip this check")


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


def _rotate(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scaling: float) -> torch.Tensor:
    half = y.shape[-1] // 2
    rot = torch.cat((-y[..., half:], y[..., :half]), dim=-1)
    return (y * cos + rot * sin) * scaling


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # max(‖a‖‖b‖, 1e-8) written as sqrt(max(‖a‖²‖b‖², 1e-16)): the same value, but a zero vector (a padded or
    # unaligned token's fused KV) has a zero gradient instead of sqrt'(0) = inf, which the mask's 0 would turn
    # into NaN.
    den = torch.clamp_min(a.square().sum(-1) * b.square().sum(-1), 1e-16).sqrt()
    return (a * b).sum(-1) / den


def _torch_loss(student_k, student_v, teacher_k, teacher_v, w_k, w_v, alpha, mask, positions, inv_freq,
                attention_scaling, lambda_k, lambda_v, beta, layer_weights):
    L, B, H_s, T, D_s = student_k.shape
    acc = _compute_dtype(student_k.dtype)
    m = mask.to(acc)
    n = m.sum()
    invf = inv_freq.to(acc).expand(L, D_s // 2)
    ang = positions.to(acc)[None, :, :, None] * invf[:, None, None, :]          # [L, B, T, D/2]
    ang = torch.cat((ang, ang), dim=-1).unsqueeze(2)                            # [L, B, 1, T, D]
    cos, sin = ang.cos(), ang.sin()
    a = alpha.to(acc)
    a = a.t()[:, None, :].expand(-1, L, B) if alpha.dim() == 2 else a.permute(2, 1, 0)  # [N, L, B]
    k_f = v_f = 0
    for i in range(len(teacher_k)):
        ai = a[i][:, :, None, None, None]
        k_f = k_f + ai * _rotate(_project(teacher_k[i], w_k[i], H_s, D_s, acc), cos, sin, attention_scaling)
        v_f = v_f + ai * _project(teacher_v[i], w_v[i], H_s, D_s, acc)
    s_k, s_v = student_k.to(acc), student_v.to(acc)
    tok = m[None, :, None, :]                                                   # [1, B, 1, T]
    k_mse = (tok * (s_k - k_f).square().sum(-1)).sum((1, 2, 3)) / (n * H_s * D_s)
    v_mse = (tok * (s_v - v_f).square().sum(-1)).sum((1, 2, 3)) / (n * H_s * D_s)
    cos_l = (tok * 0.5 * (_cosine(s_k, k_f) + _cosine(s_v, v_f))).sum((1, 2, 3)) / (n * H_s)
    w = torch.ones(L, dtype=acc, device=student_k.device) if layer_weights is None else layer_weights.to(acc)
    loss = (w * (lambda_k * k_mse + lambda_v * v_mse + beta * (1 - cos_l))).sum() / w.sum()
    return loss, k_mse, v_mse, cos_l


def _triton_loss(student_k, student_v, teacher_k, teacher_v, w_k, w_v, alpha, mask, positions, inv_freq,
                 attention_scaling, lambda_k, lambda_v, beta, layer_weights):
    L, B, H_s, T, D_s = student_k.shape
    if student_k.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(f"backend='triton' needs CUDA tensors (got {student_k.device}); "
                         "use backend='torch' or set TRITON_INTERPRET=1")
    if any(x.dtype == torch.float64 for x in (student_k, student_v, *teacher_k, *teacher_v, *w_k, *w_v)):
        raise ValueError("backend='triton' takes fp16/bf16/fp32 tensors; use backend='torch' for float64")
    dev = student_k.device
    lw = torch.ones(L, device=dev, dtype=torch.float32) if layer_weights is None else layer_weights.float()
    invf = inv_freq.float().expand(L, D_s // 2)  # stride 0 on L: no copy for a shared inv_freq
    # fp32 adapters (master weights) with half-precision KV: run the GEMMs on half tensor cores with fp32
    # accumulation rather than fp32 'ieee' products; the cast is small ([L, F_i, C]) and differentiable.
    w_k = [w.to(x.dtype) if x.dtype in (torch.float16, torch.bfloat16) else w for w, x in zip(w_k, teacher_k)]
    w_v = [w.to(x.dtype) if x.dtype in (torch.float16, torch.bfloat16) else w for w, x in zip(w_v, teacher_v)]
    fn = _kernels().FusedKVDistillLossFunction
    return fn.apply(student_k, student_v, alpha, lw, mask.float().contiguous(), positions.float().contiguous(),
                    invf, float(attention_scaling), float(lambda_k), float(lambda_v), float(beta),
                    len(teacher_k), *w_k, *w_v, *teacher_k, *teacher_v)


def kv_distill_loss(student_k, student_v, teacher_k, teacher_v, w_k, w_v, alpha, mask, positions, inv_freq,
                    attention_scaling=1.0, lambda_k=1.0, lambda_v=1.0, beta=0.1, layer_weights=None,
                    backend="torch", check_finite=True):
    """Fused multi-teacher KV-distillation loss (formula in the module docstring).

    student_k, student_v [L, B, H_s, T, D_s] (keys post-RoPE); teacher_k, teacher_v: N lists of
    [L, B, H_i, T, D_i] (aligned, pre-RoPE); w_k, w_v: N lists of [L, H_i·D_i, H_s·D_s]; alpha [B, N] or
    [B, L, N]; mask [B, T] (bool or 0/1); positions [B, T]; inv_freq [D_s/2] or [L, D_s/2];
    layer_weights [L] or None (ones). backend: "torch" (reference) or "triton" (CUDA, or TRITON_INTERPRET=1).
    check_finite: raise on NaN/Inf in any input (one extra pass over the inputs; turn off for speed).

    Returns (loss, stats) with stats = {"k_mse": [L], "v_mse": [L], "cos": [L]} detached. Gradients reach
    student_k/v, w_k, w_v, alpha (and layer_weights); teachers get none.
    """
    if backend not in ("torch", "triton"):
        raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
    _validate(student_k, student_v, teacher_k, teacher_v, w_k, w_v, alpha, mask, positions, inv_freq,
              layer_weights)
    teacher_k = [x.detach() for x in teacher_k]
    teacher_v = [x.detach() for x in teacher_v]
    named = [("student_k", student_k), ("student_v", student_v), ("alpha", alpha), ("positions", positions),
             ("inv_freq", inv_freq)]
    for i in range(len(teacher_k)):
        named += [(f"teacher_k[{i}]", teacher_k[i]), (f"teacher_v[{i}]", teacher_v[i]),
                  (f"w_k[{i}]", w_k[i]), (f"w_v[{i}]", w_v[i])]
    _check_contents(named, mask, layer_weights, check_finite)
    impl = _torch_loss if backend == "torch" else _triton_loss
    loss, k_mse, v_mse, cos = impl(student_k, student_v, teacher_k, teacher_v, w_k, w_v, alpha, mask, positions,
                                   inv_freq, attention_scaling, lambda_k, lambda_v, beta, layer_weights)
    return loss, {"k_mse": k_mse.detach(), "v_mse": v_mse.detach(), "cos": cos.detach()}


# ------------------------------------------------------------------------------------------------ the module
def group_mean_adapter(teacher: tuple[int, int], student: tuple[int, int], n_layers: int,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Structured default W [L, H_t·D_t, H_s·D_s]: each student head is the mean of its group of teacher heads
    (H_t ≥ H_s: heads ht with ⌊ht·H_s/H_t⌋ = hs) or a copy of one teacher head (H_t < H_s: ⌊hs·H_t/H_s⌋),
    mapping feature d to d for d < min(D_t, D_s) (truncate or zero-pad the head dim)."""
    H_t, D_t = teacher
    H_s, D_s = student
    w = torch.zeros(H_t * D_t, H_s * D_s, dtype=dtype)
    d = torch.arange(min(D_t, D_s))
    for hs in range(H_s):
        group = [ht for ht in range(H_t) if ht * H_s // H_t == hs] if H_t >= H_s else [hs * H_t // H_s]
        for ht in group:
            w[ht * D_t + d, hs * D_s + d] += 1.0 / len(group)
    return w.unsqueeze(0).repeat(n_layers, 1, 1)


class KVDistillLoss(nn.Module):
    """The fused KV-distillation loss as a module that owns the per-teacher adapters W^k_i, W^v_i.

    teacher_heads: [(H_i, D_i)] per teacher; student_heads: (H_s, D_s); n_layers: student layers L.
    init: "group_mean" (default, see `group_mean_adapter`), or a sequence of N (w_k, w_v) tensor pairs
        [L, H_i·D_i, H_s·D_s] (e.g. from kvfuse.align.heads' structured inits or ridge fit).
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
                 init: str | Sequence[tuple[torch.Tensor, torch.Tensor]] = "group_mean",
                 router: nn.Module | Callable | None = None, alpha: Sequence[float] | torch.Tensor | None = None,
                 lambda_k: float = 1.0, lambda_v: float = 1.0, beta: float = 0.1, attention_scaling: float = 1.0,
                 backend: str = "auto", check_finite: bool = True, dtype: torch.dtype = torch.float32):
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
        self.teacher_heads, self.student_heads, self.n_layers = teacher_heads, (H_s, D_s), int(n_layers)
        self.lambda_k, self.lambda_v, self.beta = float(lambda_k), float(lambda_v), float(beta)
        self.attention_scaling, self.backend, self.check_finite = float(attention_scaling), backend, check_finite
        N = len(teacher_heads)
        self.n_teachers = N
        for i, (H_i, D_i) in enumerate(teacher_heads):
            shape = (self.n_layers, H_i * D_i, H_s * D_s)
            if isinstance(init, str):
                if init != "group_mean":
                    raise ValueError(f"init must be 'group_mean' or a list of (w_k, w_v) tensors, got {init!r}")
                wk = group_mean_adapter((H_i, D_i), (H_s, D_s), self.n_layers, dtype)
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
                attention_scaling=None, alpha=None, layer_weights=None, router_inputs=None):
        """Returns (loss, stats) as `kv_distill_loss`; see that function for the shapes."""
        if not isinstance(student_k, torch.Tensor) or student_k.dim() != 5:
            raise ValueError("student_k must be a tensor [L, B, H_s, T, D_s]")
        a = self._alpha(alpha, router_inputs, student_k.shape[1], student_k)
        backend = resolve_backend(self.backend, student_k)
        scaling = self.attention_scaling if attention_scaling is None else attention_scaling
        return kv_distill_loss(student_k, student_v, list(teacher_k), list(teacher_v), self.w_k, self.w_v, a, mask,
                               positions, inv_freq, attention_scaling=scaling, lambda_k=self.lambda_k,
                               lambda_v=self.lambda_v, beta=self.beta, layer_weights=layer_weights, backend=backend,
                               check_finite=self.check_finite)


def fused_teacher_keys(teacher_k, w_k, alpha, positions, inv_freq, attention_scaling, student_heads):
    """K_f = Σ_i α_i · rotate(K'_i W_k^i) [L, B, H_s, T, D_s]: the fused teacher keys in the student's head space,
    rotated at student positions (the attention-KL term's keys). Same math as the reference loss."""
    H_s, D_s = student_heads
    L = teacher_k[0].shape[0]
    acc = _compute_dtype(teacher_k[0].dtype)
    invf = inv_freq.to(acc).expand(L, D_s // 2)
    ang = positions.to(acc)[None, :, :, None] * invf[:, None, None, :]
    ang = torch.cat((ang, ang), dim=-1).unsqueeze(2)
    cos, sin = ang.cos(), ang.sin()
    B = positions.shape[0]
    a = alpha.to(acc)
    a = a.t()[:, None, :].expand(-1, L, B) if alpha.dim() == 2 else a.permute(2, 1, 0)
    fused = 0
    for i, (x, w) in enumerate(zip(teacher_k, w_k)):
        fused = fused + a[i][:, :, None, None, None] * _rotate(_project(x.detach(), w, H_s, D_s, acc), cos, sin,
                                                               attention_scaling)
    return fused
