"""Head/dim adapters W ∈ R^{(H_t·D_t)×(H_s·D_s)} (feature index h·D + d) and their initialisations.

The kernel applies one general linear adapter per (teacher, student layer): K̂ = K'·W_k, V̂ = V'·W_v, on
pre-RoPE teacher keys. Everything here builds such W:

* Structured maps are a head-mixing matrix `mix [H_t, H_s]` Kronecker a per-head dim map `dmap [D_t, D_s]`:
  W[h_t·D_t + d_t, h_s·D_s + d_s] = mix[h_t, h_s] · dmap[d_t, d_s]. A 1×1 convolution over heads is exactly such
  a mix, so group-mean reduction (H_t > H_s) and replication (H_t < H_s) are its initialisations.
* Dim map D_t → D_s. "identity" truncates / zero-pads *each half* of the rotary part separately, because
  rotate-half RoPE pairs dim i with dim i + r/2 (r = rotary dim, D for full rotary): teacher pair
  (i, i + r_t/2) goes to student pair (i, i + r_s/2), so the kept features stay at frequency slot i (lowest
  slots = fastest-rotating pairs are the ones kept when shrinking). The pass-through dims r..D of a
  partial-rotary head (Phi, GPT-NeoX) map to the student's pass-through dims in order; with a NoPE layer
  (r = 0) on either side there are no pairs to keep and all dims map in order. "orthogonal" is a random semi-orthogonal matrix (orthonormal rows when D_t ≤ D_s,
  orthonormal columns otherwise): it preserves norms as far as the shapes allow but mixes frequency slots.
* Head matching pairs teacher and student heads by the similarity of per-head patterns (attention maps, or
  `head_gram` of K/V when head dims differ) with a Hungarian assignment, then averages/replicates along it.
* Ridge regression fits W on a calibration batch, teacher features → student features, so training starts at
  a map that already reproduces the student's KV (the loss is small but the targets are not zero), and
  shrinking everything to zero is not a cheap way down. Keys are fitted pre-RoPE on both sides (student keys
  from `capture_kv`, or post-RoPE keys un-rotated with the student layer's parameters).
"""
from __future__ import annotations

from dataclasses import dataclass
import numbers
from typing import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

DIM_KINDS = ("identity", "orthogonal")


def _check_positive(**sizes: int) -> None:
    for name, n in sizes.items():
        if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")


def dim_map(d_t: int, d_s: int, kind: str = "identity", generator: torch.Generator | None = None,
            rotary_dims: tuple[int, int] | None = None) -> torch.Tensor:
    """Per-head dim map `[D_t, D_s]` (float32); see the module docstring for the two kinds.

    rotary_dims: (r_t, r_s), the dims of each teacher / student head that RoPE turns (default (D_t, D_s)); the
    identity map keeps the pairs within them."""
    _check_positive(d_t=d_t, d_s=d_s)
    if kind not in DIM_KINDS:
        raise ValueError(f"dim map kind must be one of {DIM_KINDS}, got {kind!r}")
    if kind == "orthogonal":
        big, small = max(d_t, d_s), min(d_t, d_s)
        gauss = torch.randn(big, small, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(gauss)
        # Sign fix makes the draw uniform (Haar) instead of biased by QR's sign convention.
        q = q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)
        return (q if d_t >= d_s else q.T).float()
    r_t, r_s = (d_t, d_s) if rotary_dims is None else rotary_dims
    for name, r, d in (("r_t", r_t, d_t), ("r_s", r_s, d_s)):
        if not isinstance(r, numbers.Integral) or isinstance(r, bool) or r < 0 or r > d or r % 2:
            raise ValueError(f"identity dim map keeps RoPE pairs: {name} must be an even int in [0, {d}], got {r!r}")
    if min(r_t, r_s) == 0:      # a NoPE side: no pairs to keep, positions never enter; dims map in order
        r_t = r_s = 0
    m = torch.zeros(d_t, d_s)
    idx = torch.arange(min(r_t, r_s) // 2)
    m[idx, idx] = 1.0
    m[r_t // 2 + idx, r_s // 2 + idx] = 1.0
    rest = torch.arange(min(d_t - r_t, d_s - r_s))
    m[r_t + rest, r_s + rest] = 1.0
    return m


def group_mean_mix(h_t: int, h_s: int) -> torch.Tensor:
    """`[H_t, H_s]`: student head j averages the contiguous teacher heads h with floor(h·H_s/H_t) == j."""
    _check_positive(h_t=h_t, h_s=h_s)
    if h_t < h_s:
        raise ValueError(f"group-mean reduction needs H_t >= H_s, got H_t={h_t}, H_s={h_s}; use replicate")
    mix = torch.zeros(h_t, h_s)
    mix[torch.arange(h_t), (torch.arange(h_t) * h_s) // h_t] = 1.0
    return mix / mix.sum(dim=0, keepdim=True)


def replicate_mix(h_t: int, h_s: int) -> torch.Tensor:
    """`[H_t, H_s]`: student head j copies teacher head floor(j·H_t/H_s) (1×1-conv expansion init)."""
    _check_positive(h_t=h_t, h_s=h_s)
    if h_t > h_s:
        raise ValueError(f"replication needs H_t <= H_s, got H_t={h_t}, H_s={h_s}; use group mean")
    mix = torch.zeros(h_t, h_s)
    mix[(torch.arange(h_s) * h_t) // h_s, torch.arange(h_s)] = 1.0
    return mix


def adapter_from_mix(mix: torch.Tensor, dmap: torch.Tensor, n_layers: int = 1) -> torch.Tensor:
    """`W [L_s, H_t·D_t, H_s·D_s]` = kron(mix, dmap) per student layer: one `dmap [D_t, D_s]` repeated over
    `n_layers`, or one per layer `[n_layers, D_t, D_s]`."""
    _check_positive(n_layers=n_layers)
    if mix.dim() != 2 or dmap.dim() not in (2, 3) or dmap.dim() == 3 and dmap.shape[0] != n_layers:
        raise ValueError(f"mix must be 2-D and dmap [D_t, D_s] or [n_layers={n_layers}, D_t, D_s], got "
                         f"{tuple(mix.shape)} and {tuple(dmap.shape)}")
    if dmap.dim() == 2:
        return torch.kron(mix.float(), dmap.float()).unsqueeze(0).repeat(n_layers, 1, 1)
    return torch.stack([torch.kron(mix.float(), d.float()) for d in dmap])


RotaryDims = tuple[int | Sequence[int], int | Sequence[int]]


def _dim_maps(d_t: int, d_s: int, n_layers: int, kind: str, generator: torch.Generator | None,
              rotary_dims: RotaryDims | None) -> torch.Tensor:
    """`[D_t, D_s]`, or `[n_layers, D_t, D_s]` when the rotary dims differ by layer (NoPE layers)."""
    if rotary_dims is None:
        return dim_map(d_t, d_s, kind, generator)
    per_layer = []
    for r in rotary_dims:
        r = [r] * n_layers if isinstance(r, numbers.Integral) else list(r)
        if len(r) != n_layers:
            raise ValueError(f"per-layer rotary dims {r} must list n_layers={n_layers} entries")
        per_layer.append(r)
    pairs = list(zip(*per_layer))
    if len(set(pairs)) == 1:
        return dim_map(d_t, d_s, kind, generator, pairs[0])
    return torch.stack([dim_map(d_t, d_s, kind, generator, pair) for pair in pairs])


def group_mean_adapter(h_t: int, d_t: int, h_s: int, d_s: int, n_layers: int = 1, dim_kind: str = "identity",
                       generator: torch.Generator | None = None,
                       rotary_dims: RotaryDims | None = None) -> torch.Tensor:
    """Adapter for H_t >= H_s: each student head is the mean of a contiguous group of teacher heads."""
    return adapter_from_mix(group_mean_mix(h_t, h_s),
                            _dim_maps(d_t, d_s, n_layers, dim_kind, generator, rotary_dims), n_layers)


def replicate_adapter(h_t: int, d_t: int, h_s: int, d_s: int, n_layers: int = 1, dim_kind: str = "identity",
                      generator: torch.Generator | None = None,
                      rotary_dims: RotaryDims | None = None) -> torch.Tensor:
    """Adapter for H_t <= H_s: each student head starts as a copy of one teacher head."""
    return adapter_from_mix(replicate_mix(h_t, h_s),
                            _dim_maps(d_t, d_s, n_layers, dim_kind, generator, rotary_dims), n_layers)


def structured_adapter(h_t: int, d_t: int, h_s: int, d_s: int, n_layers: int = 1, dim_kind: str = "identity",
                       generator: torch.Generator | None = None,
                       rotary_dims: RotaryDims | None = None) -> torch.Tensor:
    """The default adapter `[n_layers, H_t·D_t, H_s·D_s]`: group mean when the teacher has more KV heads,
    replication otherwise, with the RoPE-pair-keeping dim map.

    rotary_dims: (r_t, r_s), each an int or one int per student layer (the teacher's rotary dims of the teacher
    layers mixed into each student layer; 0 on NoPE layers); default full rotary (D_t, D_s)."""
    build = group_mean_adapter if h_t >= h_s else replicate_adapter
    return build(h_t, d_t, h_s, d_s, n_layers, dim_kind, generator, rotary_dims)


# ----------------------------------------------------------------------------------------------- head matching

def head_gram(kv: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-head token×token cosine matrices `[B, H, T, T]` of `kv [B, H, T, D]`: a pattern without D in its
    shape, so heads of different head dims can be compared. Padded tokens (mask False) become zero rows/cols."""
    if kv.dim() != 4:
        raise ValueError(f"head_gram expects [B, H, T, D], got shape {tuple(kv.shape)}")
    unit = torch.nn.functional.normalize(kv.float(), dim=-1)
    if mask is not None:
        if mask.shape != (kv.shape[0], kv.shape[2]):
            raise ValueError(f"mask shape {tuple(mask.shape)} != [B, T] = {(kv.shape[0], kv.shape[2])}")
        unit = unit * mask[:, None, :, None].to(unit.dtype)
    return unit @ unit.transpose(-1, -2)


@dataclass
class HeadMatch:
    """similarity `[H_t, H_s]` (cosine of flattened patterns); assignment: list of (teacher_head, student_head)
    pairs; mix `[H_t, H_s]`: replicate along the assignment (H_t <= H_s) or average each student head's
    teacher group (H_t > H_s) — feed it to `adapter_from_mix`."""

    similarity: torch.Tensor
    assignment: list[tuple[int, int]]
    mix: torch.Tensor


def _balanced_assignment(score: np.ndarray) -> list[tuple[int, int]]:
    """Assign every row of `score [R, C]` (R >= C) to a column, maximising total score, each column used
    at least once and at most ceil(R/C) times. Each column gets one 'first' slot with a bonus larger than
    any score difference, so the Hungarian solver fills all first slots before doubling up anywhere."""
    rows, cols = score.shape
    per_col = -(-rows // cols)
    bonus = 2.0 * (np.abs(score).sum() + 1.0)
    slots = np.concatenate([score + bonus] + [score] * (per_col - 1), axis=1)
    r, c = linear_sum_assignment(slots, maximize=True)
    return [(int(i), int(j % cols)) for i, j in zip(r, c)]


def match_heads(teacher: torch.Tensor, student: torch.Tensor, head_axis: int = 1) -> HeadMatch:
    """Match teacher heads to student heads by the cosine similarity of their patterns.

    teacher / student: per-head patterns with the head on `head_axis` and equal remaining shapes, e.g. attention
    maps `[B, H, T, T]` (HF's output_attentions layout, student time), or `head_gram(kv)` of time-aligned K/V.
    Every teacher head and every student head takes part: with H_t > H_s each student head averages the
    teacher heads assigned to it; with H_t < H_s teacher heads are replicated; equal counts give a permutation.
    """
    t = teacher.movedim(head_axis, 0).float()
    s = student.movedim(head_axis, 0).float()
    if t.shape[1:] != s.shape[1:]:
        raise ValueError(
            f"teacher pattern shape {tuple(t.shape[1:])} != student pattern shape {tuple(s.shape[1:])} "
            f"(besides the head axis {head_axis}); align time first or compare head_gram patterns"
        )
    t_unit = torch.nn.functional.normalize(t.reshape(t.shape[0], -1), dim=1)
    s_unit = torch.nn.functional.normalize(s.reshape(s.shape[0], -1), dim=1)
    similarity = t_unit @ s_unit.T
    h_t, h_s = similarity.shape
    score = similarity.double().numpy()
    if h_t >= h_s:
        pairs = _balanced_assignment(score)
        mix = torch.zeros(h_t, h_s)
        for i, j in pairs:
            mix[i, j] = 1.0
        mix = mix / mix.sum(dim=0, keepdim=True)
    else:
        pairs = [(i, j) for j, i in _balanced_assignment(score.T)]
        mix = torch.zeros(h_t, h_s)
        for i, j in pairs:
            mix[i, j] = 1.0
    return HeadMatch(similarity=similarity, assignment=sorted(pairs), mix=mix)


# ------------------------------------------------------------------------------------------------ ridge init

def ridge_adapter(teacher_feats: torch.Tensor, student_feats: torch.Tensor, lam: float = 1e-3) -> torch.Tensor:
    """Least-squares map `W [F_t, F_s]` with teacher_feats·W ≈ student_feats (rows = calibration tokens).

    Solves (XᵀX + λ·I) W = XᵀY in float64 with λ = lam · trace(XᵀX)/F_t, i.e. `lam` is relative to the mean
    feature energy, so one value works whatever the scale of the KV. lam = 0 is plain least squares (minimum
    norm when under-determined). Returns float32.
    """
    if teacher_feats.dim() != 2 or student_feats.dim() != 2:
        raise ValueError(
            f"ridge_adapter expects [N, F_t] and [N, F_s], got {tuple(teacher_feats.shape)} and {tuple(student_feats.shape)}"
        )
    if teacher_feats.shape[0] != student_feats.shape[0]:
        raise ValueError(f"teacher has {teacher_feats.shape[0]} rows, student {student_feats.shape[0]}: must match")
    if teacher_feats.shape[0] == 0:
        raise ValueError("ridge_adapter needs at least one calibration row")
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    x, y = teacher_feats.double(), student_feats.double()
    if lam == 0:
        return torch.linalg.lstsq(x, y, driver="gelsd").solution.float()
    gram = x.T @ x
    reg = lam * torch.trace(gram) / x.shape[1]
    if reg == 0:
        raise ValueError("teacher calibration features are all zero; cannot fit a ridge adapter")
    eye = torch.eye(x.shape[1], dtype=torch.float64, device=x.device)
    return torch.linalg.solve(gram + reg * eye, x.T @ y).float()


def _tokens_by_features(kv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`[B, H, T, D]` → `[N_valid, H·D]` rows of valid tokens, features ordered h·D + d."""
    b, h, t, d = kv.shape
    flat = kv.permute(0, 2, 1, 3).reshape(b, t, h * d)
    return flat[mask.bool()]


def ridge_adapters(teacher_kv: Sequence[torch.Tensor], student_kv: Sequence[torch.Tensor],
                   mask: torch.Tensor, lam: float = 1e-3) -> torch.Tensor:
    """Per student layer ridge fit: `W [L_s, H_t·D_t, H_s·D_s]`.

    teacher_kv: L_s tensors `[B, H_t, T, D_t]` already time- and layer-aligned to the student (pre-RoPE keys or
    values); student_kv: L_s tensors `[B, H_s, T, D_s]` (pre-RoPE keys or values); mask `[B, T]` selects the
    calibration tokens.
    """
    if len(teacher_kv) != len(student_kv):
        raise ValueError(f"{len(teacher_kv)} teacher layers vs {len(student_kv)} student layers: must match")
    weights = []
    for layer, (t, s) in enumerate(zip(teacher_kv, student_kv)):
        if t.dim() != 4 or s.dim() != 4 or t.shape[0] != s.shape[0] or t.shape[2] != s.shape[2]:
            raise ValueError(f"layer {layer}: teacher {tuple(t.shape)} / student {tuple(s.shape)} are not [B, H, T, D] with equal B, T")
        if mask.shape != (t.shape[0], t.shape[2]):
            raise ValueError(f"mask shape {tuple(mask.shape)} != [B, T] = {(t.shape[0], t.shape[2])}")
        weights.append(ridge_adapter(_tokens_by_features(t, mask), _tokens_by_features(s, mask), lam))
    return torch.stack(weights)
