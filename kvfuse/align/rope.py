"""Rotate-half RoPE, its exact inverse, and re-phasing teacher keys into the student's positions and bases.

Convention (HF's, and the fused loss kernel's — they must agree bit for bit in spirit):
    theta = cat(inv_freq, inv_freq)                         [D]
    rotate_half(y) = cat(-y[..., D/2:], y[..., :D/2])
    rotate(y, p)   = (y * cos(p theta) + rotate_half(y) * sin(p theta)) * s
    unrotate(y, p) = (y * cos(p theta) - rotate_half(y) * sin(p theta)) / s
Each (i, i + D/2) pair is turned by the angle p * inv_freq[i], so unrotate is rotate by the opposite angle
divided by the scale: an exact inverse.

Precision: like HF, angles, cos and sin are computed in float32 and cast to the tensor's dtype before the
multiply, so rotating captured keys reproduces the model's own keys exactly; float64 inputs get float64 angles.

Shapes: x `[..., T, D]`; positions `[..., T]` broadcast against x's leading dims. One exception for the usual
layout: 2-D positions `[B, T]` with an x of 4 or more dims `[..., B, H, T, D]` get the head axis inserted.
"""
from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _cos_sin(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
             scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    if inv_freq.dim() != 1:
        raise ValueError(f"inv_freq must be 1-D [D/2], got shape {tuple(inv_freq.shape)}")
    if x.shape[-1] != 2 * inv_freq.shape[0]:
        raise ValueError(f"x head dim {x.shape[-1]} != 2 * len(inv_freq) = {2 * inv_freq.shape[0]}")
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


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float = 1.0) -> torch.Tensor:
    """Apply RoPE (see module docstring) to pre-RoPE `x [..., T, D]` at `positions [..., T]`."""
    cos, sin = _cos_sin(x, positions, inv_freq, attention_scaling)
    return x * cos + rotate_half(x) * sin


def unrotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float = 1.0) -> torch.Tensor:
    """Exact inverse of `rotate`: recover pre-RoPE keys from post-RoPE `x [..., T, D]`."""
    if attention_scaling == 0.0:
        raise ValueError("attention_scaling must be non-zero to invert RoPE")
    cos, sin = _cos_sin(x, positions, inv_freq)
    return (x * cos - rotate_half(x) * sin) / attention_scaling


def rephase(
    k_rotated_teacher: torch.Tensor,
    teacher_positions: torch.Tensor,
    teacher_rope: tuple[torch.Tensor, float],
    student_positions: torch.Tensor,
    student_rope: tuple[torch.Tensor, float],
) -> torch.Tensor:
    """Teacher post-RoPE keys → the keys the student's RoPE would give the same content at student positions.

    Un-rotates with the teacher layer's `(inv_freq, attention_scaling)` at teacher positions, then rotates with
    the student layer's at student positions: covers prompt offsets, different bases and per-layer bases.
    Token t of the teacher keys must already correspond to token t of the student (same T).
    """
    pre = unrotate(k_rotated_teacher, teacher_positions, *teacher_rope)
    return rotate(pre, student_positions, *student_rope)


def rope_from_rotary(rotary: torch.nn.Module, layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention_scaling) as an HF rotary module holds them now (per layer type where it keeps several)."""
    prefix = "" if layer_type is None else f"{layer_type}_"
    inv_freq = getattr(rotary, f"{prefix}inv_freq", None)
    scaling = getattr(rotary, f"{prefix}attention_scaling", None)
    if inv_freq is None or scaling is None:
        raise ValueError(
            f"rotary module {type(rotary).__name__} has no {prefix}inv_freq / {prefix}attention_scaling "
            f"(layer type {layer_type!r}); this RoPE layout is not supported"
        )
    return inv_freq.detach().float().clone(), float(scaling)


def rope_params(model: torch.nn.Module) -> list[tuple[torch.Tensor, float]]:
    """Per-layer `(inv_freq [D/2], attention_scaling)` as the model computes them, read from its rotary module.

    Works on a *ForCausalLM or its bare decoder. Models with per-layer-type RoPE (Gemma3: local vs global)
    get each layer's own parameters. Dynamic RoPE types change inv_freq with sequence length: the values here
    are the ones held now (after the last forward); `capture_kv(...).rope` records those a forward used.
    """
    base = model if hasattr(model, "rotary_emb") else getattr(model, "model", None)
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None:
        raise ValueError(f"rope_params: {type(model).__name__} has no rotary_emb module (not a RoPE model?)")
    config = model.config
    per_type = isinstance(getattr(rotary, "rope_type", None), dict)
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return [rope_from_rotary(rotary, t if per_type else None) for t in types]
