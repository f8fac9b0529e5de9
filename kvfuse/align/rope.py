"""Rotate-half RoPE over the first `rotary_dim` dims of each head, its exact inverse, and re-phasing teacher keys
into the student's positions and bases.

Convention (HF's, and the fused loss kernel's — they must agree bit for bit in spirit), r = rotary_dim ≤ D:
    theta = cat(inv_freq, inv_freq)                         [r]   (inv_freq [r/2])
    rotate_half(y) = cat(-y[..., r/2:r], y[..., :r/2])
    rotate(y, p)[..., :r] = (y[..., :r] * cos(p theta) + rotate_half(y) * sin(p theta)) * s
    rotate(y, p)[..., r:] = y[..., r:]
Each (i, i + r/2) pair is turned by the angle p * inv_freq[i], so unrotate is rotate by the opposite angle
divided by the scale: an exact inverse. The pass-through dims r..D of a partial-rotary head (Phi, GPT-NeoX,
StableLM) are not multiplied by the scale: HF folds the scale into cos/sin, which only meet the rotary part.
r = 0 is a NoPE layer (SmolLM3): identity.

Precision: like HF, angles, cos and sin are computed in float32 and cast to the tensor's dtype before the
multiply, so rotating captured keys reproduces the model's own keys exactly; float64 inputs get float64 angles.

Shapes: x `[..., T, D]`; positions `[..., T]` broadcast against x's leading dims. One exception for the usual
layout: 2-D positions `[B, T]` with an x of 4 or more dims `[..., B, H, T, D]` get the head axis inserted.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class Rope(NamedTuple):
    """One layer's RoPE as the model applies it: `rotate(x, positions, *rope)`."""

    inv_freq: torch.Tensor          # [rotary_dim / 2] float32 ([0] on a NoPE layer)
    attention_scaling: float
    rotary_dim: int                 # dims of each head that rotate (0: NoPE layer)


NOPE = Rope(torch.zeros(0), 1.0, 0)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotary_dim(x: torch.Tensor, inv_freq: torch.Tensor, rotary_dim: int | None) -> int:
    if inv_freq.dim() != 1:
        raise ValueError(f"inv_freq must be 1-D [rotary_dim/2], got shape {tuple(inv_freq.shape)}")
    head_dim = x.shape[-1]
    if rotary_dim is None:
        if head_dim != 2 * inv_freq.shape[0]:
            raise ValueError(f"x head dim {head_dim} != 2 * len(inv_freq) = {2 * inv_freq.shape[0]}; "
                             "pass rotary_dim for a partial-rotary head")
        return head_dim
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int) or rotary_dim < 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be an even int >= 0, got {rotary_dim!r}")
    if rotary_dim > head_dim:
        raise ValueError(f"rotary_dim {rotary_dim} > head dim {head_dim}")
    if rotary_dim and rotary_dim != 2 * inv_freq.shape[0]:
        raise ValueError(f"rotary_dim {rotary_dim} != 2 * len(inv_freq) = {2 * inv_freq.shape[0]}")
    return rotary_dim


def cos_sin(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
             scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin `[..., T, r]` for the rotary part of `x [..., T, r]`."""
    if positions.dim() == 0:
        raise ValueError("positions must have a time axis [..., T]")
    if positions.shape[-1] != x.shape[-2]:
        raise ValueError(f"positions length {positions.shape[-1]} != x time length {x.shape[-2]}")
    if positions.dim() == 2 and x.dim() >= 4:
        positions = positions[:, None, :]
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    freqs = positions.to(device=x.device, dtype=compute)[..., None] * inv_freq.to(device=x.device, dtype=compute)
    emb = torch.cat((freqs, freqs), dim=-1)
    # HF folds the scale into cos/sin before the dtype cast; doing the same keeps low-precision results identical.
    return (emb.cos() * scale).to(x.dtype), (emb.sin() * scale).to(x.dtype)


def _turn(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scale: float, rotary_dim: int | None,
          sign: float) -> torch.Tensor:
    r = _rotary_dim(x, inv_freq, rotary_dim)
    if r == 0:
        if positions.shape[-1] != x.shape[-2]:
            raise ValueError(f"positions length {positions.shape[-1]} != x time length {x.shape[-2]}")
        return x
    rot = x[..., :r]
    cos, sin = cos_sin(rot, positions, inv_freq, scale)
    turned = rot * cos + rotate_half(rot) * (sin if sign > 0 else -sin)
    return turned if r == x.shape[-1] else torch.cat((turned, x[..., r:]), dim=-1)


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float = 1.0,
           rotary_dim: int | None = None) -> torch.Tensor:
    """Apply RoPE (see module docstring) to pre-RoPE `x [..., T, D]` at `positions [..., T]`.

    rotary_dim: None rotates the whole head (D == 2·len(inv_freq)); r rotates the first r dims (0: identity)."""
    return _turn(x, positions, inv_freq, attention_scaling, rotary_dim, 1.0)


def unrotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float = 1.0,
             rotary_dim: int | None = None) -> torch.Tensor:
    """Exact inverse of `rotate`: recover pre-RoPE keys from post-RoPE `x [..., T, D]`."""
    if attention_scaling == 0.0:
        raise ValueError("attention_scaling must be non-zero to invert RoPE")
    r = _rotary_dim(x, inv_freq, rotary_dim)
    turned = _turn(x, positions, inv_freq, 1.0, r, -1.0)
    if r == 0:
        return x
    back = turned[..., :r] / attention_scaling
    return back if r == x.shape[-1] else torch.cat((back, turned[..., r:]), dim=-1)


def rephase(
    k_rotated_teacher: torch.Tensor,
    teacher_positions: torch.Tensor,
    teacher_rope: tuple,
    student_positions: torch.Tensor,
    student_rope: tuple,
) -> torch.Tensor:
    """Teacher post-RoPE keys → the keys the student's RoPE would give the same content at student positions.

    Un-rotates with the teacher layer's `(inv_freq, attention_scaling[, rotary_dim])` at teacher positions, then
    rotates with the student layer's at student positions: covers prompt offsets, different bases, per-layer
    bases, partial rotary and NoPE layers on either side. Token t of the teacher keys must already correspond to
    token t of the student (same T), and the head dims must match (map them with an adapter first).
    """
    pre = unrotate(k_rotated_teacher, teacher_positions, *teacher_rope)
    return rotate(pre, student_positions, *student_rope)


def inv_freq_buffer(rotary: torch.nn.Module, layer_type: str | None = None) -> torch.Tensor | None:
    """The inv_freq tensor an HF rotary module holds now for `layer_type` (None where it keeps one for all)."""
    return getattr(rotary, "inv_freq" if layer_type is None else f"{layer_type}_inv_freq", None)


def rope_from_rotary(rotary: torch.nn.Module, layer_type: str | None = None) -> Rope:
    """The `Rope` an HF rotary module holds now (per layer type where it keeps several)."""
    prefix = "" if layer_type is None else f"{layer_type}_"
    inv_freq = inv_freq_buffer(rotary, layer_type)
    scaling = getattr(rotary, f"{prefix}attention_scaling", None)
    if inv_freq is None or scaling is None:
        raise ValueError(
            f"rotary module {type(rotary).__name__} has no {prefix}inv_freq / {prefix}attention_scaling "
            f"(layer type {layer_type!r}); this RoPE layout is not supported"
        )
    inv_freq = inv_freq.detach().float().clone()
    return Rope(inv_freq, float(scaling), 2 * inv_freq.shape[0])
