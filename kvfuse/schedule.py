"""Training schedules from docs/PLAN.md §3/§5: layer-weight annealing, γ/δ warm-in, warmup + cosine LR."""
from __future__ import annotations

import math

import torch


def layer_weights(step: int, total_steps: int, n_layers: int, warmup_fraction: float = 0.3,
                  ramp_fraction: float = 0.2) -> torch.Tensor:
    """Per-layer loss weights [n_layers] at `step`.

    For the first `warmup_fraction` of training only the first third of layers is distilled (weight 1, others 0);
    then the deeper layers ramp linearly to weight 1 over the next `ramp_fraction` of training (deep layers are
    harder to align, so they come in late but smoothly rather than as a jump in the loss).
    """
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    shallow = max(1, math.ceil(n_layers / 3))
    weights = torch.zeros(n_layers)
    weights[:shallow] = 1.0
    if total_steps <= 0 or warmup_fraction <= 0:
        return torch.ones(n_layers)
    progress = step / total_steps
    if progress >= warmup_fraction:
        ramp = 1.0 if ramp_fraction <= 0 else min(1.0, (progress - warmup_fraction) / ramp_fraction)
        weights[shallow:] = ramp
    return weights


def warm_in(step: int, total_steps: int, start_value: float, final_value: float, start_fraction: float) -> float:
    """A loss coefficient that holds `start_value` until `start_fraction` of training, then ramps to `final_value`."""
    if total_steps <= 0:
        return final_value
    progress = step / total_steps
    if progress <= start_fraction or start_fraction >= 1.0:
        return start_value
    t = min(1.0, (progress - start_fraction) / (1.0 - start_fraction))
    return start_value + t * (final_value - start_value)


def lr_factor(step: int, total_steps: int, warmup_ratio: float = 0.03, min_factor: float = 0.0) -> float:
    """Linear warmup over `warmup_ratio` of the steps (at least one step), then cosine decay to `min_factor`."""
    warmup = max(1, math.ceil(warmup_ratio * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total_steps - warmup)
    t = min(1.0, (step - warmup) / span)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))
