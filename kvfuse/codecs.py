"""Compressed teacher KV: the codecs of the offline store and the layout the loss (and its kernel) decodes.

A teacher's keys or values, logical shape [..., T, D] ([L, H, T, D] per sample, [L, B, H, T, D] batched), are held
as one of:

* a plain tensor (bf16 / fp16 / fp32: the store's original format);
* `QuantizedKV` kind "fp8": data float8_e4m3fn [..., T, D], x ≈ data·scale, scale = amax/448 over the group (per
  channel: rounded up to a bfloat16 value and stored as bfloat16, so the kernels form code·scale in bf16 arithmetic
  exactly as the fp32 product rounds, and below FOLD_SCALE_LIMIT = 2¹⁶, whose fold the fused loss's decode takes;
  stores written before hold float32 scales and decode as written);
* `QuantizedKV` kind "fp8z": fp8 with a zero point per channel, x ≈ data·scale + offset, offset = the channel's
  mean over the sample's valid tokens (bfloat16, to nearest) and scale = max |x − offset|/448 (bfloat16, rounded up):
  e4m3's error follows |x − offset|, not |x|, and SmolLM2's keys hold 81 % of their energy in their channel means, so
  fp8z's key error is 5× below fp8's (values 1.3×) for 2 more bytes per (layer, head, channel) and sample
  (bench/NOTES.md "Store codecs");
* `QuantizedKV` kind "int8": data uint8 [..., T, D], one 8-bit code q ∈ 0..255 per value, x ≈ q·scale + offset,
  per channel offset = min rounded down and scale = (max − offset)/255 rounded up to bfloat16 values (the scale
  below FOLD_SCALE_LIMIT, as fp8's), so the grid spans the channel's range (asymmetric: twice fp8's resolution near
  a channel's extremes, where fp8's relative step is coarsest; Phase 1 from its store stays within 0.1 % of bf16's
  where fp8's lost 4 %, bench/NOTES.md "Store codecs"); per token float16, as int4;
* `QuantizedKV` kind "int4": data uint8 [..., T, D/2], two 4-bit codes q ∈ 0..15 per byte, the even channel in the
  low nibble (byte j = q[2j] | q[2j+1] << 4), x ≈ q·scale + offset, scale = (max − min)/15, offset = min;
* `QuantizedKV` kind "int4d": int4's layout, subtractively dithered: x ≈ (q − u)·scale + offset with u(t, d) ∈
  [−½, ½) a hash of the token index t (within the sample), the channel d and the group's scale (`int4_dither`), added
  before rounding and subtracted when decoding. Same bytes and the same bound as int4, but the error no longer
  follows the value: with per-channel key scales, int4's rounding error is a distortion shared by every token of a
  channel, which the student learns (bench/NOTES.md, "Store codecs": Phase 1 +5.4 % → +3.75 % over bf16);
* `LowRankKV`: X ≈ Z·B per layer, Z [L, B, 1, T, r] (a one-head teacher of width r, plain or quantised per token),
  B [L, r, F] float32 with F = H·D (feature f = h·D + d, the order in which the loss flattens heads).

Groups ("axis"): "channel" — one scale (and offset) per (layer, head, channel), shared over the sample's tokens,
float32 [..., D] (bfloat16 for fp8, fp8z and int8; keys: their outliers sit in fixed channels, as KIVI argues; fp8,
fp8z and int8 values too); "token" — one per (layer, head, token), shared over the head's D channels, float16
[..., T] (int4 values; fp16 because per-token side data is paid on every token: it keeps int4 under 0.28× of bf16).
`store_axis` says which a store uses.

Masked tokens (mask 0: padding, prompt tokens, unaligned tokens) take no part in the statistics and decode to 0
(int8 and int4 keys: to their channel's grid value nearest 0 — within scale/2 of 0 when 0 lies in the channel's
range, else the channel's min or max — since a channel's offset is shared with the valid tokens; fp8z: the code
nearest −offset/scale, which is 0 unless 0 lies beyond 448 steps of the offset): finite either way,
whatever they held (NaN and Inf included), and the loss, CKA and router all ignore them. A NaN or Inf in a valid
token is refused, a ValueError naming it and its position (`FiniteCheck`): no codec could store it faithfully, and
each would store it as something else. Bounds of one decoded value x̂ against x on a valid token (tested):
fp8 |x̂ − x| ≤ max(2⁻⁴|x|, 2⁻¹⁰·scale) (3 mantissa bits; subnormals below 2⁻⁶·scale) plus the rounding of the
scale; fp8z the same with x − offset for x; int8 and int4 |x̂ − x| ≤ scale/2 of the stored scale, plus the fp16
rounding of scale and offset on the token axis.

This module imports only torch (and the kernels' torch-only contract, for the dither's constants): the store, the
loader and the loss all use it, and the fused kernel decodes the same layout in registers.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import Tensor

from kvfuse.kernels.fused_kv_loss_op import DITHER_M1, DITHER_M2, DITHER_T, FOLD_SCALE_LIMIT

FP8_MAX = 448.0            # largest finite float8_e4m3fn
LEVELS = {"int8": 255, "int4": 15, "int4d": 15}  # integer kinds: codes 0..levels, with an offset
RANK_MULTIPLE = 16         # low-rank widths are padded to this (tensor-core tiles in the kernel)
KINDS = ("fp8", "fp8z", "int8", "int4", "int4d")
FP8_KINDS = ("fp8", "fp8z")  # e4m3 codes
OFFSET_KINDS = ("fp8z", *LEVELS)  # x ≈ q·scale + offset
PACKED = ("int4", "int4d")  # two 4-bit codes per byte
AXES = ("channel", "token")
SCALE_DTYPES = {"channel": torch.float32, "token": torch.float16}
# fp8 and int8 per channel (float32 in stores written before: read as written): 2 bytes per (layer, head, channel)
# and sample, so that a short sample's side data keeps the store near half of bf16's bytes
CHANNEL_BF16 = torch.bfloat16


def scale_dtypes(kind: str, axis: str) -> tuple[torch.dtype, ...]:
    """The dtypes a `kind` entry's scale (and offset) may have on `axis`; the first is what encoding writes."""
    if kind == "fp8z":
        return (CHANNEL_BF16,)
    if kind in ("fp8", "int8") and axis == "channel":
        return CHANNEL_BF16, SCALE_DTYPES[axis]
    return (SCALE_DTYPES[axis],)


def store_axis(kv: str, kind: str) -> str:
    """The group a store encodes teacher keys ("k") or values ("v") with, for quantised kind `kind`: keys per
    channel; int4(d) values per token (side data per channel would not fit int4's byte target); fp8 values per
    channel — fp8's exponent carries each token's magnitude, and the fused loss's weight gradient over per-token fp8
    scales must run unpipelined on triton 3.6 (a miscompile, bench/NOTES.md "Compressed teachers"); int8 values per
    channel, as measured in its round trip; fp8z per channel only (its zero point is a channel's mean). Stores
    written before keep per-token fp8 values: `stored_axis`."""
    return "token" if kv == "v" and kind in PACKED else "channel"


def stored_axis(scale: Tensor, name: str = "") -> str:
    """The group of a stored quantised entry `name`, from its scale's dtype (float32 or bfloat16 per channel,
    float16 per token), so stores of any layout read back as written."""
    if scale.dtype == CHANNEL_BF16:
        return "channel"
    for axis, dtype in SCALE_DTYPES.items():
        if scale.dtype == dtype:
            return axis
    raise ValueError(f"{name}.scale is {scale.dtype}: a stored scale is float32 or bfloat16 (per channel) or "
                     "float16 (per token)")


# ------------------------------------------------------------------------------------------------ containers
class _Compressed:
    """What both containers answer like a tensor: device, dim(), and the bytes a sample of it costs in a store."""

    @property
    def device(self) -> torch.device:
        return self.tensors()[0].device

    def dim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.payload())


@dataclass(frozen=True)
class QuantizedKV(_Compressed):
    """One teacher's keys or values, logical shape [..., T, D] ([L, H, T, D] per sample, [L, B, H, T, D] batched)."""

    kind: str                  # "fp8" | "fp8z" | "int8" | "int4" | "int4d"
    axis: str                  # "channel" | "token"
    data: Tensor               # fp8(z): float8_e4m3fn [..., T, D]; int8: uint8 [..., T, D];
    #                            int4(d): uint8 [..., T, D // 2] (low nibble = even channel)
    scale: Tensor              # channel: float32 [..., D] (fp8, int8: bfloat16, or float32 as written before;
    #                            fp8z: bfloat16); token: float16 [..., T]
    offset: Tensor | None = None   # fp8z, int8, int4(d): like scale (x ≈ q·scale + offset); fp8: None (x ≈ q·scale)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"QuantizedKV kind must be one of {KINDS}, got {self.kind!r}")
        if self.axis not in AXES:
            raise ValueError(f"QuantizedKV axis must be one of {AXES}, got {self.axis!r}")
        if self.kind == "fp8z" and self.axis != "channel":
            raise ValueError("fp8z is grouped per channel (its offset is a channel's mean), got axis 'token'")
        want = torch.float8_e4m3fn if self.kind in FP8_KINDS else torch.uint8
        if self.data.dtype != want:
            raise ValueError(f"{self.kind} data must be {want}, got {self.data.dtype}")
        lead, T, width = tuple(self.data.shape[:-2]), self.data.shape[-2], self.data.shape[-1]
        D = width * 2 if self.packed else width
        group = lead + ((D,) if self.axis == "channel" else (T,))
        for name, t in (("scale", self.scale), ("offset", self.offset)):
            if t is None:
                if name == "offset" and self.kind in OFFSET_KINDS:
                    raise ValueError(f"{self.kind} QuantizedKV needs an offset")
                continue
            if name == "offset" and self.kind not in OFFSET_KINDS:
                raise ValueError("fp8 QuantizedKV has no offset (x ≈ data·scale)")
            dtypes = scale_dtypes(self.kind, self.axis)
            if tuple(t.shape) != group or t.dtype not in dtypes:
                raise ValueError(f"{self.kind}/{self.axis} {name} must be {' or '.join(map(str, dtypes))} of shape "
                                 f"{group} for data of shape {tuple(self.data.shape)}, got {t.dtype} "
                                 f"{tuple(t.shape)}")

    # logical view ------------------------------------------------------------------------------------------
    @property
    def packed(self) -> bool:
        return self.kind in PACKED

    @property
    def shape(self) -> torch.Size:
        s = self.data.shape
        return torch.Size((*s[:-1], s[-1] * 2)) if self.packed else s

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.data, self.scale, self.offset) if t is not None]

    def payload(self) -> list[Tensor]:
        return self.tensors()

    def _map(self, fn) -> "QuantizedKV":
        return replace(self, data=fn(self.data), scale=fn(self.scale),
                       offset=None if self.offset is None else fn(self.offset))

    def to(self, device, non_blocking: bool = False) -> "QuantizedKV":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "QuantizedKV":
        return self._map(lambda t: t if t.is_pinned() else t.pin_memory())

    def decode(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The explicit decode, the reference the fused kernel must match: [..., T, D] in `dtype` (computed in fp32)."""
        q = (unpack_int4(self.data) if self.packed else self.data).to(torch.float32)
        if self.kind == "int4d":
            q = q - int4_dither(self.scale, self.axis, *q.shape[-2:])
        scale, offset = self._expand(self.scale), None if self.offset is None else self._expand(self.offset)
        x = q * scale if offset is None else q * scale + offset
        return x.to(dtype)

    def _expand(self, t: Tensor) -> Tensor:
        t = t.to(torch.float32)
        return t.unsqueeze(-2) if self.axis == "channel" else t.unsqueeze(-1)


@dataclass(frozen=True)
class LowRankKV(_Compressed):
    """X ≈ Z · B per layer: the teacher's H·D features projected on an r-dim basis."""

    coeffs: Tensor | QuantizedKV   # [L, B, 1, T, r] batched ([L, 1, T, r] per sample): a teacher of ONE head of
                                   # width r (r a multiple of 16, zero-padded), quantised with axis="token" if asked
    basis: Tensor                  # float32 [L, r, F], F = H·D (feature f = h·D + d, as the loss flattens heads)
    heads: int                     # H and D of the teacher the features came from
    head_dim: int

    def __post_init__(self):
        c = self.coeffs
        if self.basis.dim() != 3 or self.basis.dtype != torch.float32:
            raise ValueError(f"LowRankKV basis must be float32 [L, r, F], got {self.basis.dtype} "
                             f"{tuple(self.basis.shape)}")
        L, r, F = self.basis.shape
        if F != self.heads * self.head_dim:
            raise ValueError(f"LowRankKV basis has F={F} features, not heads·head_dim = {self.heads}·{self.head_dim}")
        if c.dim() not in (4, 5) or c.shape[0] != L or c.shape[-3] != 1 or c.shape[-1] != r:
            raise ValueError(f"LowRankKV coeffs must be [L={L}, (B,) 1, T, r={r}], got {tuple(c.shape)}")
        if isinstance(c, QuantizedKV) and c.axis != "token":
            raise ValueError("quantised low-rank coefficients use axis='token' (their channels are not features)")

    @property
    def shape(self) -> torch.Size:
        s = self.coeffs.shape
        return torch.Size((*s[:-3], self.heads, s[-2], self.head_dim))

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    def payload(self) -> list[Tensor]:
        """The coefficients: the per-sample part (the basis is stored once per store)."""
        c = self.coeffs
        return c.tensors() if isinstance(c, QuantizedKV) else [c]

    def tensors(self) -> list[Tensor]:
        return self.payload() + [self.basis]

    def to(self, device, non_blocking: bool = False) -> "LowRankKV":
        return replace(self, coeffs=self.coeffs.to(device, non_blocking=non_blocking),
                       basis=self.basis.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "LowRankKV":
        c = self.coeffs
        return replace(self, coeffs=c.pin_memory() if isinstance(c, QuantizedKV) or not c.is_pinned() else c)

    def coefficients(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Z as a plain tensor [L, (B,) 1, T, r]: the teacher the loss sees with the folded adapter B·W."""
        c = self.coeffs
        return c.decode(dtype) if isinstance(c, QuantizedKV) else c.to(dtype)

    def decode(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The explicit product Z·B reshaped to the teacher's heads: [L, (B,) H, T, D] in `dtype`."""
        z = self.coefficients(torch.float32).squeeze(-3)                       # [L, (B,) T, r]
        basis = self.basis.to(z.device)
        x = torch.matmul(z, basis if z.dim() == 3 else basis.unsqueeze(1))    # [L, (B,) T, F]
        x = x.unflatten(-1, (self.heads, self.head_dim)).transpose(-3, -2)    # [L, (B,) H, T, D]
        return x.to(dtype)


Encoded = QuantizedKV | LowRankKV


def is_encoded(x) -> bool:
    return isinstance(x, (QuantizedKV, LowRankKV))


# ------------------------------------------------------------------------------------------------ int4 packing
def int4_dither(scale: Tensor, axis: str, T: int, D: int) -> Tensor:
    """int4d's dither u [..., T, D] in [−½, ½), fp32, exact: the top 24 bits of lowbias32((t·DITHER_T + d mod 2³²)
    xor the bits of the group's stored scale as float32) — t the token's index in its sample, d the channel. The
    scale seeds it so that every sample, layer, head and group draws its own pattern (one pattern shared by all,
    a function of (t, d) alone, had let the student learn the error at each position: Phase 1 +4.70 / +4.33 %
    against +4.24 / +3.27 % seeded, seeds 0 / 1)."""
    low = 0xFFFFFFFF
    seed = _expand(scale.to(torch.float32), axis).view(torch.int32).to(torch.int64) & low
    t = torch.arange(T, dtype=torch.int64, device=scale.device)[:, None]
    d = torch.arange(D, dtype=torch.int64, device=scale.device)[None, :]
    x = ((t * DITHER_T + d) & low) ^ seed
    x = ((x ^ (x >> 16)) * DITHER_M1) & low
    x = ((x ^ (x >> 15)) * DITHER_M2) & low
    x = x ^ (x >> 16)
    return (x >> 8).to(torch.float32) * 2.0 ** -24 - 0.5


def pack_int4(q: Tensor) -> Tensor:
    """uint8 codes 0..15 [..., D] (D even) → bytes [..., D/2], byte j = q[2j] | q[2j+1] << 4."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even channel count, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """bytes [..., D/2] → uint8 codes [..., D] (inverse of `pack_int4`)."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


# ------------------------------------------------------------------------------------------------ encoders
def _check_axis(x: Tensor, axis: str) -> None:
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise ValueError(f"expected a floating tensor [..., T, D], got {getattr(x, 'dtype', type(x))} "
                         f"{tuple(getattr(x, 'shape', ()))}")


def _token_mask(x: Tensor, mask: Tensor | None) -> Tensor:
    """mask [T] (or broadcastable to x's [..., T]) as a float [..., T, 1] of 0/1; None: every token counts."""
    if mask is None:
        return torch.ones(x.shape[-2], 1, dtype=torch.float32, device=x.device)
    if mask.shape[-1] != x.shape[-2]:
        raise ValueError(f"mask has {mask.shape[-1]} tokens, the tensor {x.shape[-2]} (shape {tuple(x.shape)})")
    return mask.to(device=x.device, dtype=torch.float32).unsqueeze(-1)


def _group_reduce(x: Tensor, m: Tensor, axis: str, op: str) -> Tensor:
    """max / min / amax of x over the group (tokens for "channel", channels for "token"), valid tokens only; 0 for
    a group without a valid token. A NaN or Inf among the valid tokens stays in the statistic, so that the scale
    computed from it is not finite and the encoder's finite check, which reads only the scale, sees it."""
    dim = -2 if axis == "channel" else -1
    valid = m.bool()
    fill = {"max": -math.inf, "min": math.inf, "amax": 0.0}[op]
    src = x.abs() if op == "amax" else x
    out = torch.where(valid, src, fill)
    out = out.amax(dim) if op in ("max", "amax") else out.amin(dim)
    if op == "amax":
        return out
    # a group with no valid token (a masked token's row, or a channel of a sample without valid tokens) is ±inf
    return torch.where(valid.any(dim), out, 0.0)


def _expand(t: Tensor, axis: str) -> Tensor:
    return t.unsqueeze(-2) if axis == "channel" else t.unsqueeze(-1)


def _bf16_directed(t: Tensor, up: bool) -> Tensor:
    """fp32 t as bfloat16 rounded toward +inf (up) or −inf: the nearest bf16 value, moved one step where it fell on
    the wrong side."""
    r = t.to(torch.bfloat16)
    wrong = r.to(torch.float32) < t if up else r.to(torch.float32) > t
    return torch.where(wrong, torch.nextafter(r, torch.full_like(r, math.inf if up else -math.inf)), r)


def _scale_overflow(scale: Tensor) -> str:
    return f"a scale overflows {scale.dtype} (|x| too large to quantise; store bf16 instead)"


def encode_fp8(x: Tensor, axis: str, mask: Tensor | None = None, name: str = "",
               checks: list[FiniteCheck] | None = None, kind: str = "fp8") -> QuantizedKV:
    """e4m3 codes per group (valid tokens only). kind "fp8": scale = amax/448, masked tokens and all-zero groups
    decode to 0. kind "fp8z" (channel axis): offset = the group's mean (bf16, to nearest), scale = max |x −
    offset|/448, masked tokens decode to the code nearest 0 (their channel shares its offset with the valid tokens).
    name: what x is, for the error on a NaN/Inf in a valid token; checks: see `FiniteCheck`."""
    if kind not in FP8_KINDS:
        raise ValueError(f"fp8 codec kind must be one of {FP8_KINDS}, got {kind!r}")
    _check_axis(x, axis)
    if kind == "fp8z" and axis != "channel":
        raise ValueError("fp8z is grouped per channel (its offset is a channel's mean), got axis 'token'")
    source, x = x, x.to(torch.float32)
    m = _token_mask(x, mask)
    valid = m.bool()
    offset = None
    if kind == "fp8z":
        # where, not a product with the mask: a masked token may hold NaN or Inf, and 0·NaN is NaN; a NaN or Inf
        # among the valid tokens makes the mean, and so the scale, not finite: the finite check below sees it
        count = valid.sum(-2).clamp_min(1)
        offset = (torch.where(valid, x, 0.0).sum(-2) / count).to(CHANNEL_BF16)
        centred = x - _expand(offset.to(torch.float32), axis)
    else:
        centred = x
    amax = _group_reduce(centred, m, axis, "amax")
    dtype = scale_dtypes(kind, axis)[0]
    # a bf16 scale is rounded up, not to nearest: amax/scale stays within 448
    scale = _bf16_directed(amax / FP8_MAX, up=True) if dtype == CHANNEL_BF16 else (amax / FP8_MAX).to(dtype)
    bad, derived = ~finite_flag(scale), _scale_overflow(scale)
    if scale.dtype == torch.bfloat16:  # the fused kernels' one-multiply decode (fused_kv_loss_op.FOLD_EXP)
        bad = bad | (scale >= FOLD_SCALE_LIMIT).any()
        derived = (f"a scale overflows or reaches {FOLD_SCALE_LIMIT:g} (|x| ≥ {FP8_MAX * FOLD_SCALE_LIMIT:.3g}), "
                   "beyond what the fused loss's fp8 decode takes; store bf16 instead")
    _finite_check(checks, FiniteCheck(bad, source, m, _what(f"{kind} encoding", name), derived))
    # a constant or all-zero group, or an amax so small that amax/448 underflows: scale 1, the data (and offset)
    # alone carry the values
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    # a masked token: 0 − offset, the code nearest 0 once decoded
    zero = 0.0 if offset is None else -_expand(offset.to(torch.float32), axis)
    q = torch.where(valid, centred, zero) / _expand(scale.to(torch.float32), axis)
    return QuantizedKV(kind, axis, q.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale, offset)


def encode_int(x: Tensor, axis: str, mask: Tensor | None = None, name: str = "",
               checks: list[FiniteCheck] | None = None, kind: str = "int4") -> QuantizedKV:
    """Asymmetric integer codes of `kind` ("int8" | "int4" | "int4d", LEVELS[kind] = 255 | 15): offset = min and
    scale = (max − offset)/levels per group (valid tokens only; int8 per channel: rounded down and up to bf16 values),
    q = round((x − offset)/scale) clamped to 0..levels; int4 packed two per byte. A constant group has scale 1 (q = 0 decodes to the constant; int4d: scale 0); masked
    tokens decode to 0 (token axis: scale and offset 0) or to the code nearest 0 (channel axis). int4d: q =
    round((x − offset)/scale + u) (module docstring).
    name: what x is, for the error on a NaN/Inf in a valid token; checks: see `FiniteCheck`."""
    if kind not in LEVELS:
        raise ValueError(f"integer codec kind must be one of {tuple(LEVELS)}, got {kind!r}")
    _check_axis(x, axis)
    packed, dither, levels = kind in PACKED, kind == "int4d", LEVELS[kind]
    if packed and x.shape[-1] % 2:
        raise ValueError(f"{kind} needs an even head dim (two codes per byte), got D={x.shape[-1]}")
    source, x = x, x.to(torch.float32)
    m = _token_mask(x, mask)
    hi, lo = _group_reduce(x, m, axis, "max"), _group_reduce(x, m, axis, "min")
    if scale_dtypes(kind, axis)[0] == CHANNEL_BF16:
        # offset rounded down and scale up, so that the grid still spans [min, max] and the bound is scale/2 of the
        # stored scale (whose step grows by under |min|·2⁻⁷ over the range: ≤ 3.4 % on SmolLM2's KV, mean 0.4 %)
        offset = _bf16_directed(lo, up=False)
        scale = _bf16_directed((hi - offset.to(torch.float32)) / levels, up=True)
    else:
        dtype = SCALE_DTYPES[axis]
        offset = lo.to(dtype)
        scale = ((hi - offset.to(torch.float32)) / levels).to(dtype)
    # the scale answers for the offset too: an offset that is not finite makes hi − offset not finite
    bad, derived = ~finite_flag(scale), _scale_overflow(scale)
    if scale.dtype == CHANNEL_BF16:  # the fused kernels' folded decode (fused_kv_loss_op.FOLD_EXP)
        bad = bad | (scale >= FOLD_SCALE_LIMIT).any()
        derived = (f"a scale overflows or reaches {FOLD_SCALE_LIMIT:g} (a channel's range ≥ "
                   f"{levels * FOLD_SCALE_LIMIT:.3g}), beyond what the fused loss's {kind} decode takes; store bf16 "
                   "instead")
    _finite_check(checks, FiniteCheck(bad, source, m, _what(f"{kind} encoding", name), derived))
    constant = scale <= 0
    s, o = _expand(torch.where(constant, 1.0, scale.to(torch.float32)), axis), _expand(offset.to(torch.float32), axis)
    # a constant group: scale 1 (q = 0 decodes to the constant), int4d scale 0 (q − u would move it)
    scale = torch.where(constant, torch.zeros_like(scale) if dither else torch.ones_like(scale), scale)
    valid = m.bool()
    if axis == "token":
        # a masked token's group is its own row: make it exactly 0 (scale 0, offset 0, codes 0)
        rows = valid.squeeze(-1).expand(scale.shape)
        scale = torch.where(rows, scale, torch.zeros_like(scale))
        offset = torch.where(rows, offset, torch.zeros_like(offset))
    y, zero = (x - o) / s, -o / s
    if dither:
        u = int4_dither(scale, axis, *x.shape[-2:])
        y, zero = y + u, zero + u
    q = torch.where(valid, torch.round(y), 0.0 if axis == "token" else torch.round(zero)).clamp(0, levels)
    return QuantizedKV(kind, axis, pack_int4(q) if packed else q.to(torch.uint8), scale, offset)


def encode(x: Tensor, kind: str, axis: str, mask: Tensor | None = None, name: str = "",
           checks: list[FiniteCheck] | None = None) -> QuantizedKV:
    if kind in FP8_KINDS:
        return encode_fp8(x, axis, mask, name, checks, kind)
    if kind in LEVELS:
        return encode_int(x, axis, mask, name, checks, kind)
    raise ValueError(f"quantisation kind must be one of {KINDS}, got {kind!r}")


# ------------------------------------------------------------------------------------------------ finite input
@dataclass(frozen=True)
class FiniteCheck:
    """An encoder's verdict on its input, not yet read: `bad` (a 0-dim bool on x's device) is True when a valid
    token of x holds NaN or Inf, or when something the encoder derived from the valid tokens (`derived` says what:
    a scale that overflows, ...) is not finite. It is one small reduction of what the encoder computes anyway, and
    reading it is a host sync: an encoder given `checks` (a list) appends its verdict there instead of reading it,
    so that a caller encoding many tensors of one sample reads them all at once (`raise_if_not_finite`)."""

    bad: Tensor
    x: Tensor             # the encoder's input as given
    mask: Tensor          # float [..., T, 1], 1 on x's valid tokens (`_token_mask`)
    what: str             # "fp8 encoding of teacher0/k (keys)"
    derived: str          # the error when x's valid tokens are finite and `bad` is still True


def raise_if_not_finite(checks: Sequence[FiniteCheck]) -> None:
    """Read every verdict with one host sync; a ValueError for the first bad one, saying what (NaN, +Inf, -Inf) is
    where (layer, head, token, channel of x), or what else is not finite. The search for the position runs only
    then."""
    if not checks:
        return
    device = checks[0].bad.device
    bad = torch.stack([c.bad.to(device) for c in checks]).tolist()
    for check, is_bad in zip(checks, bad):
        if is_bad:
            raise ValueError(_not_finite_message(check))


def check_plain(x: Tensor, mask: Tensor | None = None, name: str = "",
                checks: list[FiniteCheck] | None = None) -> None:
    """The verdict on a tensor [..., T, D] stored as it is (no encoder, so no scale to read it from): bad when a
    valid token holds NaN/Inf; masked tokens are not looked at. Per-token min and max (NaN propagates through both,
    ±Inf shows in one): one read pass, temporaries of 1/D of x, no host sync. name, checks: as for the encoders."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise ValueError(f"expected a floating tensor [..., T, D], got {getattr(x, 'dtype', type(x))} "
                         f"{tuple(getattr(x, 'shape', ()))}")
    m = _token_mask(x, mask)
    x = x.detach()
    extremes = torch.stack(torch.aminmax(x, dim=-1))                                 # [2, ..., T]
    bad = (~torch.isfinite(extremes) & m.squeeze(-1).bool()).any()
    what = _what(f"plain {str(x.dtype).removeprefix('torch.')} storage", name)
    _finite_check(checks, FiniteCheck(bad, x, m, what, "not finite on its valid tokens"))


def _finite_check(checks: list[FiniteCheck] | None, check: FiniteCheck) -> None:
    if checks is None:
        raise_if_not_finite([check])
    else:
        checks.append(check)


def _what(step: str, name: str) -> str:
    return f"{step} of {name}" if name else step


def _position(index: Sequence[int]) -> str:
    lead = {2: (), 4: ("layer", "head"), 5: ("layer", "sample", "head")}.get(len(index))
    if lead is None:
        return f"index {tuple(index)} (token {index[-2]}, channel {index[-1]})"
    return ", ".join(f"{n} {i}" for n, i in zip((*lead, "token", "channel"), index))


def _not_finite_message(check: FiniteCheck) -> str:
    x = check.x.detach()
    bad = ~torch.isfinite(x) & check.mask.bool()
    where = torch.nonzero(bad)
    if len(where) == 0:  # finite, so something derived went wrong: a scale from too large an |x|
        valid = check.mask.bool().expand(x.shape)
        magnitude = torch.where(valid, x.float().abs(), -1.0)
        if magnitude.numel() == 0 or float(magnitude.max()) < 0:
            return f"{check.what}: {check.derived}"
        at = torch.unravel_index(magnitude.argmax(), magnitude.shape)
        return (f"{check.what}: {check.derived}; the largest |x| on a valid token is {float(magnitude.max()):.4g}, "
                f"at {_position([int(i) for i in at])} of shape {tuple(x.shape)}")
    first = where[0].tolist()
    values = x.expand(bad.shape)[bad].float()
    nan, pos = int(values.isnan().sum()), int((values == math.inf).sum())
    tally = ", ".join(f"{n} {kind}" for n, kind in ((nan, "NaN"), (pos, "+Inf"), (len(values) - nan - pos, "-Inf"))
                      if n)
    value = float(x.expand(bad.shape)[tuple(first)])
    kind = "NaN" if math.isnan(value) else "+Inf" if value > 0 else "-Inf"
    return (f"{check.what}: {kind} at {_position(first)} of shape {tuple(x.shape)}, a valid (mask 1) token "
            f"({tally} among the valid tokens in all); teacher KV must be finite on its valid tokens (masked tokens "
            "may hold anything)")


# ------------------------------------------------------------------------------------------------ low rank
def features(x: Tensor) -> Tensor:
    """[L, (B,) H, T, D] → [L, (B,) T, H·D], feature h·D + d (the loss's flattening)."""
    return x.transpose(-3, -2).flatten(-2)


def gram(x: Tensor, mask: Tensor | None = None, name: str = "") -> Tensor:
    """Σ over valid tokens of fᵀf per layer, float64 [L, F, F], for one sample x [L, H, T, D] (mask [T]): summed over
    calibration samples, its eigenvectors are the SVD basis of all their tokens without holding them. A NaN or Inf
    in a valid token is a ValueError (it would make every stored coefficient of the store wrong; `name` says what
    x is); masked tokens may hold anything."""
    f = features(x.to(torch.float64))
    m = _token_mask(x, mask)
    if mask is not None:
        f = torch.where(m.bool(), f, 0.0)
    g = f.transpose(-1, -2) @ f
    _finite_check(None, FiniteCheck(~finite_flag(g), x, m, _what("low-rank basis fit", name),
                                    "the Gram matrix overflows float64"))
    return g


def fit_lowrank_basis(gram_sum: Tensor, rank: int | None = None, energy: float | None = None
                      ) -> tuple[Tensor, list[int]]:
    """Per-layer uncentred PCA (SVD) basis from the summed Gram matrix [L, F, F] (`gram`): (basis float32 [L, R, F],
    ranks r_l). r_l is `rank`, or the fewest directions holding `energy` of the layer's Σ x²; R is max r_l rounded up
    to a multiple of 16 (≤ F) and a layer's rows past r_l are zero. Uncentred, because X ≈ Z·B has no mean term:
    the mean direction is simply one of the components. The rows are orthogonal but not unit: row j is the j-th
    singular direction times √(λ_j/λ_1), so that every coefficient spreads like the first (whitened) and one
    per-token quantisation scale suits all r of them; with unit rows the first (mean) coefficient set the scale and
    int4 rounded the smaller ones away (5 % relative MSE on SmolLM2's keys at any r, measured)."""
    if (rank is None) == (energy is None):
        raise ValueError("fit_lowrank_basis: give exactly one of rank and energy")
    L, F, _ = gram_sum.shape
    evals, evecs = torch.linalg.eigh(gram_sum.to(torch.float64))       # ascending
    evals, evecs = evals.flip(-1).clamp_min(0), evecs.flip(-1)         # descending; columns are directions
    if rank is not None:
        if not 1 <= rank <= F:
            raise ValueError(f"low-rank r={rank} must be in 1..{F} (the teacher's H·D features)")
        ranks = [rank] * L
    else:
        if not 0 < energy <= 1:
            raise ValueError(f"low-rank energy threshold must be in (0, 1], got {energy}")
        total = evals.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        kept = torch.cumsum(evals, -1) / total
        ranks = [min(int((kept[l] < energy - 1e-12).sum()) + 1, F) for l in range(L)]
    R = min(-(-max(ranks) // RANK_MULTIPLE) * RANK_MULTIPLE, F)
    basis = torch.zeros(L, R, F, dtype=torch.float32)
    for l, r in enumerate(ranks):
        spread = (evals[l, :r] / evals[l, 0].clamp_min(torch.finfo(torch.float64).tiny)).sqrt()
        basis[l, :r] = (evecs[l, :, :r] * spread).T.to(torch.float32)
    return basis, ranks


def lowrank_coefficients(x: Tensor, basis: Tensor) -> Tensor:
    """Z with Z·B the least-squares fit of X: features(x) [L, (B,) T, F] · Bᵀ(B·Bᵀ)⁻¹ for a basis of orthogonal
    rows (zero rows give zero coefficients)."""
    basis = basis.to(device=x.device, dtype=torch.float32)
    norms = basis.square().sum(-1)                                          # [L, R]: B·Bᵀ is diagonal
    inverse = torch.where(norms > 0, 1 / norms.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(norms))
    analysis = (basis * inverse[..., None]).transpose(-1, -2)               # [L, F, R]
    f = features(x.to(torch.float32))
    return f @ (analysis if f.dim() == 3 else analysis.unsqueeze(1))


def encode_lowrank(x: Tensor, basis: Tensor, quant: str | None = None, mask: Tensor | None = None, name: str = "",
                   checks: list[FiniteCheck] | None = None) -> LowRankKV:
    """One sample x [L, H, T, D] as coefficients Z [L, 1, T, R] on `basis` [L, R, F] (orthogonal rows, see
    `lowrank_coefficients`), optionally quantised per token (a KINDS entry); masked tokens get Z = 0.
    name: what x is, for the error on a NaN/Inf in a valid token; checks: see `FiniteCheck`."""
    if x.dim() != 4:
        raise ValueError(f"encode_lowrank takes one sample [L, H, T, D], got {tuple(x.shape)}")
    L, H, T, D = x.shape
    if basis.shape[0] != L or basis.shape[2] != H * D:
        raise ValueError(f"basis {tuple(basis.shape)} does not fit a teacher of {L} layers × {H}·{D} features")
    z = lowrank_coefficients(x, basis)                                       # [L, T, R]
    m = _token_mask(x, mask)                                                 # [T, 1]
    if mask is not None:
        # where, not a product: a masked token's NaN or Inf reaches its own row of Z (and only it), and 0·NaN is NaN
        z = torch.where(m.bool(), z, 0.0)
    z = z.unsqueeze(1)                                                              # [L, 1, T, R]
    what = _what(f"lowrank:{basis.shape[1]}{'+' + quant if quant else ''} encoding", name)
    # a NaN/Inf in a valid token of x spoils its whole row of Z (0·Inf is NaN), so Z's finiteness stands for x's;
    # the position is then looked up in x
    if quant is None:
        coeffs = z.to(torch.bfloat16)
        _finite_check(checks, FiniteCheck(~finite_flag(coeffs), x, m, what, "its coefficients are not finite "
                      "although its valid tokens are (a NaN/Inf in the basis, or a coefficient beyond bfloat16)"))
    else:
        inner: list[FiniteCheck] = []
        coeffs = encode(z, quant, "token", mask, checks=inner)
        _finite_check(checks, FiniteCheck(inner[0].bad, x, m, what, "its coefficients' scales are not finite "
                      f"although its valid tokens are (a NaN/Inf in the basis, or {_scale_overflow(coeffs.scale)})"))
    return LowRankKV(coeffs, basis.to(torch.float32), H, D)


def fold_lowrank_adapter(basis: Tensor, w: Tensor) -> Tensor:
    """W' = B·W, [L, r, C] from basis [L, r, F] and adapter [L, F, C]: X·W = Z·(B·W), so the loss can run on the
    coefficients (one head of width r) with W' instead of decoding X (differentiable in w)."""
    if basis.dim() != 3 or w.dim() != 3 or basis.shape[0] != w.shape[0] or basis.shape[2] != w.shape[1]:
        raise ValueError(f"fold_lowrank_adapter: basis [L, r, F] {tuple(basis.shape)} and adapter [L, F, C] "
                         f"{tuple(w.shape)} do not match")
    return torch.matmul(basis.to(w.dtype), w)


# ------------------------------------------------------------------------------------------------ batches
def decode(x, dtype: torch.dtype = torch.float32) -> Tensor:
    """A teacher entry as a plain tensor: encoded entries decoded, tensors cast to `dtype`."""
    return x.decode(dtype) if is_encoded(x) else x.to(dtype)


def decode_teachers(teacher_k: Sequence, teacher_v: Sequence, dtype: torch.dtype = torch.float32
                    ) -> tuple[list[Tensor], list[Tensor]]:
    """Teacher K/V lists with every QuantizedKV / LowRankKV decoded to `dtype`; plain tensors pass unchanged, and so
    does anything that is not a list or tuple (the loss's validation names it)."""
    def one(xs):
        if not isinstance(xs, (list, tuple)) or not any(is_encoded(x) for x in xs):
            return xs
        return [x.decode(dtype) if is_encoded(x) else x for x in xs]
    return one(teacher_k), one(teacher_v)


def _pad_group(t: Tensor, T: int, fill) -> Tensor:
    """[..., T_b] → [..., T] padded with `fill` (a scalar or a tensor broadcast over the padded tokens)."""
    if t.shape[-1] == T:
        return t
    pad = torch.empty(*t.shape[:-1], T - t.shape[-1], dtype=t.dtype, device=t.device)
    pad[...] = fill if not isinstance(fill, Tensor) else fill.unsqueeze(-1)
    return torch.cat([t, pad], -1)


def stack_samples(samples: Sequence[Encoded], T: int, pin_memory: bool = False) -> Encoded:
    """Per-sample encoded tensors ([L, H, T_b, D] logical) → one batch [L, B, H, T, D], right-padded to T with
    tokens that decode to 0 (integer keys: each channel's grid value nearest 0, see the module docstring; right
    padding keeps each token's index, which int4d's dither depends on). Low-rank
    samples must share one basis."""
    first = samples[0]
    if isinstance(first, LowRankKV):
        for s in samples:
            if not isinstance(s, LowRankKV) or s.basis is not first.basis and not torch.equal(s.basis, first.basis):
                raise ValueError("low-rank samples of one batch must share their basis (one store, one basis)")
        coeffs = [s.coeffs for s in samples]
        stacked = (stack_samples(coeffs, T, pin_memory) if isinstance(first.coeffs, QuantizedKV)
                   else _stack_plain(coeffs, T, pin_memory))
        return replace(first, coeffs=stacked)
    if not all(isinstance(s, QuantizedKV) and (s.kind, s.axis) == (first.kind, first.axis) for s in samples):
        raise ValueError(f"a batch mixes codecs: {[getattr(s, 'kind', type(s).__name__) for s in samples]}")
    data = _stack_plain([s.data for s in samples], T, pin_memory,
                        fill=None if first.kind == "fp8" or first.axis == "token" else
                        [_zero_code_bytes(s) for s in samples])
    if first.axis == "channel":
        scale = torch.stack([s.scale for s in samples], 1)
        offset = None if first.offset is None else torch.stack([s.offset for s in samples], 1)
    else:
        # padded tokens: scale 0 and offset 0, so they decode to exactly 0 whatever their codes
        scale = torch.stack([_pad_group(s.scale, T, 0) for s in samples], 1)
        offset = None if first.offset is None else torch.stack([_pad_group(s.offset, T, 0) for s in samples], 1)
    if pin_memory:
        scale = scale.pin_memory()
        offset = None if offset is None else offset.pin_memory()
    return QuantizedKV(first.kind, first.axis, data, scale, offset)


def _zero_code_bytes(s: QuantizedKV) -> Tensor:
    """Per channel byte [..., D] (int4: per channel pair, [..., D/2]) whose codes decode nearest 0 for a channel-axis
    sample with offsets (int4d: within a step of 0, the dither moving each padded token's value by under half a step;
    a scale-0 channel decodes to its offset whatever its code; fp8z: e4m3 codes)."""
    scale = s.scale.float()
    if s.kind == "fp8z":
        return (-s.offset.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    q = torch.where(scale > 0, torch.round(-s.offset.float() / scale), 0.0).clamp(0, LEVELS[s.kind])
    return pack_int4(q) if s.packed else q.to(torch.uint8)


def _stack_plain(xs: Sequence[Tensor], T: int, pin_memory: bool, fill: Sequence[Tensor] | None = None) -> Tensor:
    """[L, H, T_b, W] each → [L, B, H, T, W], written once into (pinned) memory, padding 0 or `fill[b]` [L, H, W]."""
    L, H, _, W = xs[0].shape
    out = torch.empty(L, len(xs), H, T, W, dtype=xs[0].dtype, device=xs[0].device,
                      pin_memory=pin_memory and xs[0].device.type == "cpu")
    for b, x in enumerate(xs):
        if x.shape[0] != L or x.shape[1] != H or x.shape[3] != W:
            raise ValueError(f"sample {b} has shape {tuple(x.shape)}, the batch's first [{L}, {H}, T, {W}]")
        n = x.shape[2]
        out[:, b, :, :n] = x
        if fill is None:
            out[:, b, :, n:] = 0
        else:
            out[:, b, :, n:] = fill[b].unsqueeze(-2)
    return out


# ------------------------------------------------------------------------------------------------ finiteness
def finite_parts(x, name: str = "") -> list[tuple[str, Tensor]]:
    """The tensors whose finiteness makes a teacher entry's decode finite, named `name` + "." + part: a plain tensor
    is itself (named `name`); a QuantizedKV its scale, offset and, fp8 only, data (integer codes are integers); a
    LowRankKV its basis and coeffs (".coeffs" or ".coeffs.scale", ...). The fp8 codes are read although today's
    encoders refuse a NaN/Inf input: a store dumped before they did holds such an input as a NaN code with a finite
    scale (and then an Inf as ±448 and int8 or int4 either as an ordinary code, which no check of the entry can see)."""
    def sub(part: str) -> str:
        return f"{name}.{part}" if name else part
    if isinstance(x, LowRankKV):
        return [(sub("basis"), x.basis), *finite_parts(x.coeffs, sub("coeffs"))]
    if isinstance(x, QuantizedKV):
        parts = (("scale", x.scale), ("offset", x.offset), ("data", x.data if x.kind in FP8_KINDS else None))
        return [(sub(part), t) for part, t in parts if t is not None]
    return [(name, x)]


def finite_flag(t: Tensor) -> Tensor:
    """A 0-dim bool on t's device, True when t holds no NaN/Inf: one read pass (fp8: two of its bytes), no full-size
    temporary and no host sync, so that a caller stacks the flags of all its tensors and reads them once."""
    if t.numel() == 0 or not t.is_floating_point():
        return torch.ones((), dtype=torch.bool, device=t.device)
    if t.dtype == torch.float8_e4m3fn:
        # no Inf in e4m3fn; NaN is the byte 0x7F or 0xFF, the largest value of the int8 or of the uint8 view
        return (t.view(torch.int8).amax() != 127) & (t.view(torch.uint8).amax() != 255)
    # min and max propagate NaN and expose ±Inf
    return torch.isfinite(torch.stack(torch.aminmax(t.detach()))).all()


# ------------------------------------------------------------------------------------------------ codec names
@dataclass(frozen=True)
class Codec:
    """A parsed store codec: "bf16" | "fp8" | "fp8z" | "int8" | "int4" | "int4d" | "lowrank:<r | e0.99>[+q]" with q
    one of fp8, int8, int4, int4d (low-rank coefficients are grouped per token, which fp8z is not)."""

    kind: str                       # "bf16" | "fp8" | "fp8z" | "int8" | "int4" | "int4d" | "lowrank"
    rank: int | None = None         # lowrank: a fixed r ...
    energy: float | None = None     # ... or an energy threshold
    quant: str | None = None        # lowrank coefficients: None (bf16) | "fp8" | "int8" | "int4" | "int4d"

    def __str__(self) -> str:
        if self.kind != "lowrank":
            return self.kind
        size = str(self.rank) if self.rank is not None else f"e{self.energy:g}"
        return f"lowrank:{size}" + (f"+{self.quant}" if self.quant else "")

    @property
    def lowrank(self) -> bool:
        return self.kind == "lowrank"


_LOWRANK = re.compile(r"lowrank:(?:(\d+)|e((?:0?\.\d+)|1(?:\.0*)?))(?:\+(fp8|int8|int4d?))?")


def parse_codec(text: str) -> Codec:
    """'bf16' | 'fp8' | 'fp8z' | 'int8' | 'int4' | 'int4d' | 'lowrank:<r or e0.99>[+fp8|+int8|+int4|+int4d]' →
    Codec; anything else is a ValueError saying what is accepted."""
    text = str(text).strip()
    if text in ("bf16", *KINDS):
        return Codec(text)
    match = _LOWRANK.fullmatch(text)
    if match is None:
        raise ValueError(f"unknown codec {text!r}: use bf16, fp8, fp8z, int8, int4, int4d or "
                         "lowrank:<r or e<energy>>[+fp8|+int8|+int4|+int4d] (e.g. lowrank:64+int4, lowrank:e0.99+fp8)")
    rank, energy, quant = match.groups()
    if rank is not None and int(rank) < 1:
        raise ValueError(f"codec {text!r}: the rank must be at least 1")
    if energy is not None and not 0 < float(energy) <= 1:
        raise ValueError(f"codec {text!r}: the energy threshold must be in (0, 1]")
    return Codec("lowrank", int(rank) if rank else None, float(energy) if energy else None, quant)
