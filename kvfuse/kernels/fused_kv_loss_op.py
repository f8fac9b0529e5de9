"""The operators `kvfuse::fused_kv_loss` and `kvfuse::fused_kv_loss_backward`, and the autograd.Function around them.

Registered with torch.library's define/impl and fake (meta) implementations (kernels.utils.define_op), the Triton
kernels are opaque nodes to torch.compile: a compiled training step traces through them with no graph break, and
AOTAutograd traces `FusedKVLoss.backward`, so the backward op lands in the backward graph. The kernels' module
(kvfuse.kernels.fused_kv_loss) is imported when an op first runs.

Shapes (all tensors on one device):
    student_k, student_v   [L, B, H_s, T, D_s]     fp16 | bf16 | fp32, last stride 1 (keys post-RoPE)
    alpha                  [B, N] | [B, L, N]      router weights
    layer_weights          [L] fp32                w_l (loss = Σ_l w_l term_l / Σ_l w_l)
    mask, positions        [B, T] contiguous       0/1 token mask, student positions (bool, integer or float)
    rot                    [L] int32               each layer's rotary dim: `rotary_dim` or 0 (NoPE layer)
    inv_freq               [L, ≥ rotary_dim/2] fp32 (stride 0 on L allowed)
    scaling                [L] fp32                RoPE attention_scaling per layer
    lambda_k, lambda_v, beta float                  the loss's weights (formula in kvfuse.loss)
    w_k[i], w_v[i]         [L, H_i·D_i, 2·H_s·PH]  adapters in the pair layout (kvfuse.kernels.fused_kv_loss), or
                                                   as given when natural_layout(D_s, rotary_dim)
    teacher_k[i], _v[i]    [L, B, H_i, T, D_i]     aligned pre-RoPE teacher KV, last stride 1
A compressed teacher's scales and offsets are laid out as kvfuse.codecs lays them out, those of FOLDED codecs
(per-channel fp8 and int8 with bf16 side data) folded (`fold_side_data`).
"""
from __future__ import annotations

import importlib
from typing import NamedTuple

import torch
from torch import Tensor

from kvfuse.kernels.utils import define_op, host_constant


def _kernels():
    return importlib.import_module("kvfuse.kernels.fused_kv_loss")


MAX_TEACHERS = 8  # the kernels take teachers as eight separate arguments
# Codec code of a compressed teacher (kvfuse.codecs.QuantizedKV kind and axis; `codec_code`); 0 is a plain tensor.
# ("fp8", "channel"), ("fp8z", "channel") and ("int8", "channel") have bfloat16 side data, which the kernels fold
# into a bf16 decode (FOLD_EXP below); the "channel/f32" codes are the float32 side data of stores written before,
# decoded in fp32. The kernels test ranges: from int8 on, integer codes with an offset; from int4 on, two codes per
# byte; from int4d on, dithered. Codes live only in a launch, never in a store, so they may be renumbered.
CODEC_CODES = {("fp8", "channel"): 1, ("fp8", "token"): 2, ("fp8", "channel/f32"): 3, ("fp8z", "channel"): 4,
               ("int8", "channel"): 5, ("int8", "channel/f32"): 6, ("int8", "token"): 7, ("int4", "channel"): 8,
               ("int4", "token"): 9, ("int4d", "channel"): 10, ("int4d", "token"): 11}


def codec_code(kind: str, axis: str, scale_dtype: torch.dtype) -> int:
    """The kernels' code for a QuantizedKV of `kind` grouped on `axis` whose scale has `scale_dtype`."""
    if kind in ("fp8", "int8") and axis == "channel" and scale_dtype == torch.float32:
        return CODEC_CODES[kind, "channel/f32"]
    return CODEC_CODES[kind, axis]


# int4d's dither (kvfuse.codecs.int4_dither, decoded the same way in the kernels): u ∈ [−½, ½) from a 32-bit integer
# hash (lowbias32: two multiply–xorshift rounds) of t·DITHER_T + d, xor the group's scale bits; uncorrelated between
# neighbouring tokens and channels; integer arithmetic, so the torch decode and the kernels' agree exactly
DITHER_T = 0x9E3779B1      # 2³²/φ, odd: spreads the token index over the high bits before the hash
DITHER_M1 = 0x7FEB352D     # lowbias32's multipliers
DITHER_M2 = 0x846CA68B

# Folded side data (`fold_side_data`): the kernels take the bf16 scales of FOLDED codecs as scale·2^FOLD_EXP, fp8z's
# bf16 offsets as offset·2^(FOLD_EXP − 120) and int8's as offset·2^(FOLD_EXP − 133), so that with bf16 products one
# bf16 multiply (fp8) or FMA (fp8z, int8) decodes two codes from their bits (kernels.fused_kv_loss._fp8_to_bf16,
# _int8_to_bf16: a code's bits make a bf16 of its value times 2^-120 (fp8, fp8z) or 2^-133 (int8: the byte as bf16
# bits 0x00qq, subnormal below 128)), giving the decoded value times 2^-8 or 2^-21, rounded once; the teacher's α
# (the weight gradient: its accumulator) carries the power of two back, and the fp32 decode multiplies it back out,
# exactly. Exact while scale·2^FOLD_EXP stays finite in bf16, so the encoders refuse scales from FOLD_SCALE_LIMIT up
# (fp8 |x| ≥ 448·2^16 ≈ 2.9e7; int8 a channel range ≥ 255·2^16 ≈ 1.7e7).
FOLD_EXP = 112
FOLD_SCALE_LIMIT = 2.0 ** (128 - FOLD_EXP)
FOLDED = (CODEC_CODES["fp8", "channel"], CODEC_CODES["fp8z", "channel"], CODEC_CODES["int8", "channel"])
FP8_OFFSET_EXP = FOLD_EXP - 120
INT8_OFFSET_EXP = FOLD_EXP - 133
OFFSET_EXP = {CODEC_CODES["fp8z", "channel"]: FP8_OFFSET_EXP, CODEC_CODES["int8", "channel"]: INT8_OFFSET_EXP}


def pair_width(d_s: int) -> int:
    """PH: pair columns per student head in the pair layout (a power of two ≥ D_s/2, ≥ 16 for tl.dot)."""
    return max(16, 1 << max(0, d_s // 2 - 1).bit_length())


def natural_layout(d_s: int, rotary_dim: int) -> bool:
    """True when the kernels take the adapters [L, F, H_s·D_s] in their own column order: with full rotary and
    D_s/2 a power of two ≥ 16, the pair layout's two column blocks of a head are exactly the head's two halves
    (pair j = (j, j + D_s/2)), so the kernels address them in place and no permuted copy is made. Otherwise the
    adapters come in the pair layout (kvfuse.loss.pair_layout_adapter)."""
    return rotary_dim == d_s and pair_width(d_s) == d_s // 2


def operand_dtypes(teachers: list[Tensor], weights: list[Tensor], codecs) -> list[torch.dtype]:
    """What the kernels' GEMMs multiply: a compressed teacher (codec ≠ 0) is decoded to its adapter's dtype."""
    return [w.dtype if c else t.dtype for t, w, c in zip(teachers, weights, codecs)] + [w.dtype for w in weights]


def _grad_dtype(teachers: list[Tensor], weights: list[Tensor], codecs: list[int]) -> torch.dtype:
    from kvfuse.kernels.utils import dot_dtype
    return dot_dtype(operand_dtypes(teachers, weights, codecs))[1]


def _present(tensors: list[Tensor | None], n: int) -> list[Tensor | None]:
    """Scale / offset lists as the kernels take them: one entry per teacher (None where it has none); an empty list
    (every teacher plain) stands for n Nones."""
    return list(tensors) if tensors else [None] * n


def fused_kv_loss(student_k: Tensor, student_v: Tensor, alpha: Tensor, layer_weights: Tensor, mask: Tensor,
                  positions: Tensor, rot: Tensor, inv_freq: Tensor, scaling: Tensor, w_k: list[Tensor],
                  w_v: list[Tensor], teacher_k: list[Tensor], teacher_v: list[Tensor], k_codecs: list[int],
                  k_scale: list[Tensor | None], k_offset: list[Tensor | None], v_codecs: list[int],
                  v_scale: list[Tensor | None], v_offset: list[Tensor | None], rotary_dim: int, lambda_k: float,
                  lambda_v: float, beta: float, compute_grad: bool
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The loss, its statistics [3, L] (k_mse, v_mse, cos), the per-layer terms [L] and Σ_l w_l (which the layer
    weights' gradient needs), then the saved gradient buffers G_k, G_v (∂L/∂P in the pair layout) and ∂L/∂S_k,
    ∂L/∂S_v for an upstream gradient of 1 (empty when compute_grad is false). A teacher with codec c ≠ 0
    (kernels.fused_kv_loss.CODEC_*) holds fp8, int8 or packed int4 data, decoded in the kernels' registers with its
    scale (and offset: None for fp8; both None for a plain teacher, and the lists may be empty when every teacher
    is plain). The loss's coefficients and statistics are small tensor ops computed here, inside the operator: under
    torch.compile they then run as in eager mode, with cached device constants, instead of being traced into the
    graph with their constants (which slowed the compiled step at 4k tokens, bench/NOTES.md)."""
    kern = _kernels()
    L, B, H_s, T, D_s = student_k.shape
    n = mask.sum(dtype=torch.float32)
    (coef_k, coef_v, coef_cos), lw_sum = _coefficients(layer_weights, n, H_s, D_s, lambda_k, lambda_v, beta)
    # One zero-filled slot buffer for both kinds, reduced by one op (host time counts at small batches).
    sums = torch.zeros(2, 2, L, B, *kern.stat_slots(T, H_s), device=student_k.device, dtype=torch.float32)
    g_k, ds_k = kern.fused_kv_loss_forward(student_k, teacher_k, w_k, alpha, mask, positions, rot, inv_freq,
                                           scaling, rotary_dim, coef_k, coef_cos, True, compute_grad, sums[0],
                                           k_codecs, _present(k_scale, len(w_k)), _present(k_offset, len(w_k)))
    g_v, ds_v = kern.fused_kv_loss_forward(student_v, teacher_v, w_v, alpha, mask, positions, rot, inv_freq,
                                           scaling, rotary_dim, coef_v, coef_cos, False, compute_grad, sums[1],
                                           v_codecs, _present(v_scale, len(w_v)), _present(v_offset, len(w_v)))
    if not compute_grad:
        g_k, g_v, ds_k, ds_v = (student_k.new_empty(0) for _ in range(4))
    loss, stats, terms = _statistics(sums.sum((3, 4, 5)), layer_weights, lw_sum, n, H_s, D_s, lambda_k, lambda_v,
                                     beta)
    return loss, stats, terms, lw_sum, g_k, g_v, ds_k, ds_v


def _fused_kv_loss_fake(student_k, student_v, alpha, layer_weights, mask, positions, rot, inv_freq, scaling, w_k,
                        w_v, teacher_k, teacher_v, k_codecs, k_scale, k_offset, v_codecs, v_scale, v_offset,
                        rotary_dim, lambda_k, lambda_v, beta, compute_grad):
    L, B, H_s, T, D_s = student_k.shape
    scalars = [student_k.new_empty((), dtype=torch.float32) for _ in range(2)]  # loss, Σ w_l
    stats = student_k.new_empty((3, L), dtype=torch.float32)
    terms = student_k.new_empty((L,), dtype=torch.float32)
    if compute_grad:
        c2 = w_k[0].shape[2]
        bufs = [student_k.new_empty((L, B, T, c2), dtype=_grad_dtype(teacher_k, w_k, k_codecs)),
                student_k.new_empty((L, B, T, c2), dtype=_grad_dtype(teacher_v, w_v, v_codecs)),
                torch.empty_like(student_k, memory_format=torch.contiguous_format),
                torch.empty_like(student_v, memory_format=torch.contiguous_format)]
    else:
        bufs = [student_k.new_empty(0) for _ in range(4)]
    return (scalars[0], stats, terms, scalars[1], *bufs)


def fused_kv_loss_backward(grad_loss: Tensor, alpha: Tensor, g_k: Tensor, g_v: Tensor, ds_k: Tensor, ds_v: Tensor,
                           w_k: list[Tensor], w_v: list[Tensor], teacher_k: list[Tensor], teacher_v: list[Tensor],
                           k_codecs: list[int], k_scale: list[Tensor | None], k_offset: list[Tensor | None],
                           v_codecs: list[int], v_scale: list[Tensor | None], v_offset: list[Tensor | None],
                           need_w: bool, need_alpha: bool, need_student: bool
                           ) -> tuple[Tensor, Tensor, Tensor, list[Tensor], list[Tensor]]:
    """(∂α, ∂S_k, ∂S_v, ∂W_k list, ∂W_v list) for the upstream gradient grad_loss (a 0-d tensor); what is not asked
    for comes back empty."""
    kern = _kernels()
    g = grad_loss.detach().to(torch.float32).reshape(1).contiguous()
    dwk, dwv, part = kern.fused_kv_loss_backward(
        kern.KindGrad(TeacherStorage(teacher_k, tuple(k_codecs), k_scale, k_offset), w_k, g_k),
        kern.KindGrad(TeacherStorage(teacher_v, tuple(v_codecs), v_scale, v_offset), w_v, g_v),
        alpha, g, need_w, need_alpha)
    d_alpha = alpha.new_empty(0)
    if need_alpha:
        # part [kinds, N, L, B, slots…]: every kind's and teacher's partial sums, reduced by one op
        if alpha.dim() == 2:  # [B, N]: one α for every layer
            d_alpha = part.sum((0, 2, 4, 5)).t().contiguous().to(alpha.dtype)
        else:
            d_alpha = part.sum((0, 4, 5)).permute(2, 1, 0).contiguous().to(alpha.dtype)
    d_sk, d_sv = kern.scale_pair(ds_k, ds_v, g) if need_student else (ds_k.new_empty(0), ds_v.new_empty(0))
    return (d_alpha, d_sk, d_sv, [d if need_w else w.new_empty(0) for d, w in zip(dwk, w_k)],
            [d if need_w else w.new_empty(0) for d, w in zip(dwv, w_v)])


def _fused_kv_loss_backward_fake(grad_loss, alpha, g_k, g_v, ds_k, ds_v, w_k, w_v, teacher_k, teacher_v, k_codecs,
                                 k_scale, k_offset, v_codecs, v_scale, v_offset, need_w, need_alpha, need_student):
    d_alpha = torch.empty_like(alpha) if need_alpha else alpha.new_empty(0)
    d_s = [torch.empty_like(x) if need_student else x.new_empty(0) for x in (ds_k, ds_v)]
    return (d_alpha, *d_s, [torch.empty_like(w) if need_w else w.new_empty(0) for w in w_k],
            [torch.empty_like(w) if need_w else w.new_empty(0) for w in w_v])


fused_kv_loss_op = define_op(fused_kv_loss, _fused_kv_loss_fake)
fused_kv_loss_backward_op = define_op(fused_kv_loss_backward, _fused_kv_loss_backward_fake)


def _statistics(sums: Tensor, layer_weights: Tensor, lw_sum: Tensor, n: Tensor, H_s: int, D_s: int,
                lambda_k: float, lambda_v: float, beta: float):
    """(loss, stats [3, L]: k_mse, v_mse, cos, terms) from the kernels' per-layer sums [2 (keys, values), 2 (Σ
    squared error, Σ cosine), L] (formula in kvfuse.loss). stats is a tensor of its own, not views of one the loss
    depends on (AOTAutograd, torch 2.11, lost mark_non_differentiable on such views). As few tensor ops as the
    formula allows: each costs host time that a small batch's kernels do not hide (bench/NOTES.md)."""
    dev = sums.device
    # [kind, stat, L]: k_mse, cos_k / v_mse, cos_v, with cos = cos_k + cos_v
    scaled = sums * (host_constant(((1.0 / (H_s * D_s),), (0.5 / H_s,)), torch.float32, dev) / n)
    weights = host_constant((((lambda_k,), (-beta,)), ((lambda_v,), (-beta,))), torch.float32, dev)
    terms = (scaled * weights).sum((0, 1)) + beta
    stats = torch.cat((scaled[:, 0], scaled[:, 1].sum(0, keepdim=True)))
    return torch.dot(layer_weights, terms) / lw_sum, stats, terms


def _coefficients(layer_weights: Tensor, n: Tensor, H_s: int, D_s: int, lambda_k: float, lambda_v: float,
                  beta: float) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor]:
    """(∂loss/∂(squared error) per layer for keys and for values, and ∂loss/∂(Σ cosine) up to its sign: three [L]
    rows of one tensor), and Σ_l w_l."""
    lw_sum = layer_weights.sum()
    per_term = host_constant(((2.0 * lambda_k / (H_s * D_s),), (2.0 * lambda_v / (H_s * D_s),), (beta / (2.0 * H_s),)),
                             torch.float32, layer_weights.device)
    return (per_term * (layer_weights / (lw_sum * n))).unbind(0), lw_sum


class TeacherStorage(NamedTuple):
    """One kind (keys or values) of every teacher as the kernels read it: data (a plain tensor, fp8, int8 or
    packed int4 bytes), the codec codes (kernels.fused_kv_loss.CODEC_*), and scales / offsets: one entry per teacher
    (None where it has none), or empty lists when every teacher is plain."""
    data: list[Tensor]
    codecs: tuple[int, ...]
    scale: list[Tensor | None]
    offset: list[Tensor | None]

    @classmethod
    def plain(cls, data: list[Tensor]) -> "TeacherStorage":
        return cls(list(data), (0,) * len(data), [], [])

    def side_tensors(self) -> list[Tensor]:
        """The scale and offset tensors present, in order (what FusedKVLoss passes and saves)."""
        return [t for t in (*self.scale, *self.offset) if t is not None]


class FusedKVLoss(torch.autograd.Function):
    """loss and stats [3, L] (k_mse, v_mse, cos) of the fused kernels, differentiable in the student tensors, α, the
    layer weights and the adapters (teachers get no gradient). Adapters and teacher tensors travel as trailing
    positional arguments (w_k, w_v, keys' and values' data, N each, then the scales and offsets present), since
    autograd tracks tensors only as direct arguments; `layout` (keys and values with their data and side tensors
    taken out) says how to put them back."""

    @staticmethod
    def forward(ctx, student_k, student_v, alpha, layer_weights, mask, positions, rot, inv_freq, scaling,
                rotary_dim, lambda_k, lambda_v, beta, layout, *tensors):
        keys, values = FusedKVLoss._unpack(layout, tensors)
        N = len(keys.codecs)
        w_k, w_v = list(tensors[:N]), list(tensors[N:2 * N])
        out = fused_kv_loss_op(student_k, student_v, alpha, layer_weights, mask, positions, rot, inv_freq, scaling,
                               w_k, w_v, keys.data, values.data, list(keys.codecs), keys.scale, keys.offset,
                               list(values.codecs), values.scale, values.offset, rotary_dim, lambda_k, lambda_v, beta,
                               True)
        loss, stats, terms, lw_sum = out[:4]
        ctx.mark_non_differentiable(stats)
        ctx.layout = layout
        ctx.save_for_backward(alpha, lw_sum, terms, loss, *out[4:], *tensors)
        return loss, stats

    @staticmethod
    def _unpack(layout, tensors) -> tuple[TeacherStorage, TeacherStorage]:
        (k_codecs, k_sc, k_of), (v_codecs, v_sc, v_of) = layout
        N = len(k_codecs)
        sides = iter(tensors[4 * N:])

        def fill(present):
            return [next(sides) if p else None for p in present]

        keys = TeacherStorage(list(tensors[2 * N:3 * N]), k_codecs, fill(k_sc), fill(k_of))
        values = TeacherStorage(list(tensors[3 * N:4 * N]), v_codecs, fill(v_sc), fill(v_of))
        return keys, values

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        alpha, lw_sum, terms, loss, g_k, g_v, ds_k, ds_v, *tensors = ctx.saved_tensors
        keys, values = FusedKVLoss._unpack(ctx.layout, tensors)
        N = len(keys.codecs)
        w_k, w_v = tensors[:N], tensors[N:2 * N]
        need = ctx.needs_input_grad
        first_w = 14
        need_w = any(need[first_w:first_w + 2 * N])
        d_alpha, d_sk, d_sv, dwk, dwv = fused_kv_loss_backward_op(
            grad_loss, alpha, g_k, g_v, ds_k, ds_v, w_k, w_v, keys.data, values.data, list(keys.codecs), keys.scale,
            keys.offset, list(values.codecs), values.scale, values.offset, need_w, need[2], need[0] or need[1])
        d_lw = grad_loss.to(torch.float32) * (terms - loss) / lw_sum if need[3] else None
        return (d_sk if need[0] else None, d_sv if need[1] else None, d_alpha if need[2] else None, d_lw,
                *[None] * (first_w - 4), *[d if need[first_w + i] else None for i, d in enumerate(dwk)],
                *[d if need[first_w + N + i] else None for i, d in enumerate(dwv)],
                *[None] * (len(tensors) - 2 * N))


def fold_side_data(keys: TeacherStorage, values: TeacherStorage) -> tuple[TeacherStorage, TeacherStorage]:
    """Keys and values with the side data of FOLDED codecs as the kernels take it (FOLD_EXP above), computed by one
    multi-tensor multiply for every teacher of both kinds: one launch a step, where a fold per tensor and kernel
    launch cost a few microseconds each (bench/NOTES.md "Compressed teachers")."""
    sides, factors, where = [], [], []
    for k, st in enumerate((keys, values)):
        for i, code in enumerate(st.codecs):
            if code in FOLDED:
                parts = (("scale", st.scale[i], FOLD_EXP), ("offset", st.offset[i], OFFSET_EXP.get(code)))
                for part, t, exp in parts:
                    if t is not None:
                        sides.append(t)
                        factors.append(2.0 ** exp)
                        where.append((k, part, i))
    if not sides:
        return keys, values
    new = [{"scale": list(st.scale), "offset": list(st.offset)} for st in (keys, values)]
    for (k, part, i), t in zip(where, torch._foreach_mul(sides, factors)):
        new[k][part][i] = t
    return keys._replace(**new[0]), values._replace(**new[1])


def _layout(keys: TeacherStorage, values: TeacherStorage):
    """What FusedKVLoss needs besides the tensors to rebuild keys and values: codecs and which scales / offsets are
    present (plain tuples: a constant under torch.compile)."""
    def flags(s: TeacherStorage):
        return s.codecs, tuple(t is not None for t in s.scale), tuple(t is not None for t in s.offset)
    return flags(keys), flags(values)


def fused_kv_loss_function(student_k, student_v, alpha, layer_weights, mask, positions, rot, inv_freq, scaling,
                           w_k, w_v, keys: TeacherStorage, values: TeacherStorage, rotary_dim: int, lambda_k: float,
                           lambda_v: float, beta: float, compute_grad: bool):
    """(loss, k_mse, v_mse, cos) through FusedKVLoss, or the forward op alone when no gradient is wanted."""
    if compute_grad:
        loss, stats = FusedKVLoss.apply(student_k, student_v, alpha, layer_weights, mask, positions, rot, inv_freq,
                                        scaling, rotary_dim, lambda_k, lambda_v, beta, _layout(keys, values), *w_k,
                                        *w_v, *keys.data, *values.data, *keys.side_tensors(),
                                        *values.side_tensors())
    else:
        loss, stats = fused_kv_loss_op(student_k, student_v, alpha, layer_weights, mask, positions, rot, inv_freq,
                                       scaling, w_k, w_v, keys.data, values.data, list(keys.codecs), keys.scale,
                                       keys.offset, list(values.codecs), values.scale, values.offset, rotary_dim,
                                       lambda_k, lambda_v, beta, False)[:2]
    return (loss, *stats.unbind(0))
