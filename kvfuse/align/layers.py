"""Layer map M [L_s, L_t]: which teacher layers (and with what weights) supervise each student layer.

Rows are convex weights (row-stochastic). Modes:
  interpolate  (default) student layer l_s sits at the fractional teacher depth l_s·(L_t−1)/(L_s−1); weights are
               linear interpolation between the two neighbouring teacher layers. First maps to first, last to last.
  round        the same depth rounded to the nearest teacher layer (one-hot rows; halves round up).
  ratio_mean   the plan's direction, teacher → student: teacher layer l_t lands on l_s = round(l_t·L_s/L_t)
               (halves up, clamped to L_s−1), and each student layer averages the teacher layers landing on it.
               When the student has more layers than the teacher, some student layers receive none; those fall
               back to the single teacher layer whose landing point l_t·L_s/L_t is nearest to them (ties: the
               shallower), so every row still sums to 1.
Edge cases: one student layer sits at the middle depth (L_t−1)/2 in interpolate/round (first-to-first and
last-to-last cannot both hold); one teacher layer feeds every student layer.
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch

MODES = ("interpolate", "round", "ratio_mean")


def _depth(l_s: int, n_teacher: int, n_student: int) -> float:
    if n_student == 1:
        return (n_teacher - 1) / 2.0
    return l_s * (n_teacher - 1) / (n_student - 1)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def layer_map(n_teacher_layers: int, n_student_layers: int, mode: str = "interpolate") -> torch.Tensor:
    """Row-stochastic float32 `[L_s, L_t]` layer map (see module docstring for the modes)."""
    for name, n in (("n_teacher_layers", n_teacher_layers), ("n_student_layers", n_student_layers)):
        if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    if mode not in MODES:
        raise ValueError(f"layer_map mode must be one of {MODES}, got {mode!r}")
    n_t, n_s = n_teacher_layers, n_student_layers
    m = torch.zeros(n_s, n_t, dtype=torch.float64)
    if mode == "interpolate":
        for l_s in range(n_s):
            depth = _depth(l_s, n_t, n_s)
            lo = min(int(math.floor(depth)), n_t - 1)
            hi = min(lo + 1, n_t - 1)
            frac = depth - lo
            m[l_s, lo] += 1.0 - frac
            m[l_s, hi] += frac
    elif mode == "round":
        for l_s in range(n_s):
            m[l_s, min(_round_half_up(_depth(l_s, n_t, n_s)), n_t - 1)] = 1.0
    else:
        landing = [l_t * n_s / n_t for l_t in range(n_t)]
        for l_t, point in enumerate(landing):
            m[min(_round_half_up(point), n_s - 1), l_t] = 1.0
        for l_s in range(n_s):
            if m[l_s].sum() == 0:
                nearest = min(range(n_t), key=lambda l_t: (abs(landing[l_t] - l_s), l_t))
                m[l_s, nearest] = 1.0
        m = m / m.sum(dim=1, keepdim=True)
    return m.float()


def apply_layer_map(M: torch.Tensor, per_layer: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """Mix teacher layers into student layers: `out[l_s] = Σ_t M[l_s, t] · per_layer[t]` → `[L_s, ...]`.

    per_layer: a list of L_t same-shaped tensors or one tensor `[L_t, ...]`. Only non-zero weights are touched
    (most rows have one or two), accumulating in float32 (float64 stays float64) and returning the input dtype.
    """
    if M.dim() != 2:
        raise ValueError(f"layer map M must be [L_s, L_t], got shape {tuple(M.shape)}")
    layers = list(per_layer.unbind(0)) if isinstance(per_layer, torch.Tensor) else list(per_layer)
    if len(layers) != M.shape[1]:
        raise ValueError(f"layer map has L_t={M.shape[1]} columns but {len(layers)} teacher layers were given")
    shape, dtype = layers[0].shape, layers[0].dtype
    for i, t in enumerate(layers):
        if t.shape != shape:
            raise ValueError(f"teacher layer {i} has shape {tuple(t.shape)}, layer 0 has {tuple(shape)}")
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    rows = []
    for l_s in range(M.shape[0]):
        acc = torch.zeros(shape, dtype=acc_dtype, device=layers[0].device)
        for l_t in torch.nonzero(M[l_s]).flatten().tolist():
            acc += float(M[l_s, l_t]) * layers[l_t].to(acc_dtype)
        rows.append(acc.to(dtype))
    return torch.stack(rows)
