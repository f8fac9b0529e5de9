"""Routers that weight the teachers (docs/PLAN.md §3 fusion v1–v3; docs/DESIGN.md §3 step 8).

Every router maps per-sample features to α, a distribution over the N teachers, of shape [B, N] or, when layer
aware, [B, L, N] (one distribution per student layer). α feeds `kv_distill_loss`; for the learnable router its
gradient flows back into the router's parameters.

- FixedRouter (v1): normalised constants, optionally one row per layer.
- SimilarityRouter (v2): α = softmax_i(cos(f_i(x), p_i) / τ) against per-teacher prototypes p_i; not learnable.
  f_i(x) may be one shared feature [B, F] (e.g. the student's pooled input embedding) or one feature per teacher
  [B, N, F] (e.g. the first-k-token KV of the sample under teacher i, in that teacher's space).
- LearnableRouter (v3): a small MLP/gate on pooled student features, per layer group when layer aware.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def pooled_features(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `hidden [B, T, F]` over the valid tokens of `mask [B, T]` → [B, F]."""
    if hidden.dim() != 3 or mask.shape != hidden.shape[:2]:
        raise ValueError(f"pooled_features: hidden [B, T, F] and mask [B, T] expected, got {tuple(hidden.shape)} "
                         f"and {tuple(mask.shape)}")
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    count = weights.sum(1)
    if (count == 0).any():
        raise ValueError(f"pooled_features: samples {torch.nonzero(count[:, 0] == 0).flatten().tolist()} have no "
                         "valid token")
    return (hidden * weights).sum(1) / count


def layer_groups(n_layers: int, n_groups: int) -> torch.Tensor:
    """Student layer → group index [L]: contiguous groups, shallow first (e.g. 2 groups = shallow / deep)."""
    if not 1 <= n_groups <= n_layers:
        raise ValueError(f"need 1 <= n_groups ({n_groups}) <= n_layers ({n_layers})")
    return torch.div(torch.arange(n_layers) * n_groups, n_layers, rounding_mode="floor")


def entropy(alpha: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of distributions along the last dim, same leading shape."""
    return -(alpha * torch.log(alpha.clamp_min(1e-12))).sum(-1)


def entropy_regularizer(alpha: torch.Tensor, weight: float, target: str = "diversity",
                        collapse_guard: float = 1.0) -> torch.Tensor:
    """Loss term on α [B, N] or [B, L, N].

    target="diversity": −weight·H(α) per sample (pushes each sample's α towards uniform).
    target="specialise": +weight·H(α) per sample (pushes each sample towards one teacher) — and, against collapse,
    collapse_guard·weight·(log N − H(mean α)): the batch-average α must stay spread, so different samples may
    prefer different teachers but all of them may not pick the same one.
    """
    if target not in ("diversity", "specialise"):
        raise ValueError(f"entropy target must be 'diversity' or 'specialise', got {target!r}")
    per_sample = entropy(alpha).mean()
    if target == "diversity":
        return -weight * per_sample
    marginal = alpha.reshape(-1, alpha.shape[-1]).mean(0) if alpha.dim() == 2 else alpha.mean(0)
    guard = (math.log(alpha.shape[-1]) - entropy(marginal)).mean()
    return weight * per_sample + collapse_guard * weight * guard


class FixedRouter(nn.Module):
    """α = normalised constants: `weights` [N] (same for every layer) or [L, N] (layer aware)."""

    def __init__(self, weights: Sequence[float] | torch.Tensor):
        super().__init__()
        w = torch.as_tensor(weights, dtype=torch.float32)
        if w.dim() not in (1, 2) or (w < 0).any() or (w.sum(-1) <= 0).any():
            raise ValueError(f"fixed router weights must be non-negative [N] or [L, N] with positive sums, got {w}")
        self.register_buffer("weights", w / w.sum(-1, keepdim=True))

    @property
    def n_teachers(self) -> int:
        return self.weights.shape[-1]

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.weights.expand(batch_size, *self.weights.shape).clone()


class SimilarityRouter(nn.Module):
    """α = softmax_i(cos(feature_i, prototype_i) / τ); not learnable.

    prototypes: [N, F] (one shared feature space), [G, N, F] (one set per layer group; needs n_layers), or a list
    of N tensors [F_i] (each teacher in its own space, e.g. its first-k-token KV; features then a list [B, F_i]).
    """

    def __init__(self, prototypes: torch.Tensor | Sequence[torch.Tensor], temperature: float = 0.1,
                 n_layers: int | None = None):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        if isinstance(prototypes, (list, tuple)):
            self.per_teacher = True
            for i, p in enumerate(prototypes):
                if p.dim() != 1:
                    raise ValueError(f"prototypes[{i}] must be [F_i], got {tuple(p.shape)}")
                self.register_buffer(f"prototype_{i}", p.detach().float())
            self.n_teachers = len(prototypes)
            self.groups = None
            return
        self.per_teacher = False
        if prototypes.dim() not in (2, 3):
            raise ValueError(f"prototypes must be [N, F], [G, N, F] or a list of [F_i], got {tuple(prototypes.shape)}")
        self.register_buffer("prototypes", prototypes.detach().float())
        self.n_teachers = prototypes.shape[-2]
        if prototypes.dim() == 3:
            if n_layers is None:
                raise ValueError("layer-group prototypes [G, N, F] need n_layers")
            self.register_buffer("groups", layer_groups(n_layers, prototypes.shape[0]))
        else:
            self.groups = None

    def forward(self, features: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        if self.per_teacher:
            if not isinstance(features, (list, tuple)) or len(features) != self.n_teachers:
                raise ValueError(f"features must be a list of {self.n_teachers} tensors [B, F_i]")
            sims = torch.stack([F.cosine_similarity(f.float(), getattr(self, f"prototype_{i}")[None], dim=-1,
                                                    eps=1e-8) for i, f in enumerate(features)], dim=-1)
            return torch.softmax(sims / self.temperature, dim=-1)
        protos = self.prototypes if self.prototypes.dim() == 3 else self.prototypes[None]   # [G, N, F]
        G, N, Fdim = protos.shape
        if features.dim() == 2:
            features = features[:, None, :].expand(-1, N, -1)
        if features.dim() != 3 or features.shape[1:] != (N, Fdim):
            raise ValueError(f"features must be [B, F] or [B, N={N}, F={Fdim}], got {tuple(features.shape)}")
        sims = F.cosine_similarity(features.float()[:, None], protos[None], dim=-1, eps=1e-8)    # [B, G, N]
        alpha = torch.softmax(sims / self.temperature, dim=-1)
        if self.groups is None:
            return alpha[:, 0]
        return alpha[:, self.groups]                                                           # [B, L, N]


def first_tokens_feature(teacher_v: torch.Tensor, mask: torch.Tensor, k: int = 16) -> torch.Tensor:
    """A sample's feature in one teacher's space: its aligned values [L, B, H, T, D] averaged over layers and the
    first k valid tokens, heads concatenated → [B, H·D] (docs/PLAN.md §3 v2: "the first steps' KV")."""
    L, B, H, T, D = teacher_v.shape
    first = (mask.bool().cumsum(-1) <= k) & mask.bool()                          # [B, T]
    if not first.any(-1).all():
        raise ValueError("first_tokens_feature: a sample has no valid token")
    w = first.to(torch.float32)
    pooled = torch.einsum("lbhtd,bt->bhd", teacher_v.float(), w) / (L * w.sum(-1))[:, None, None]
    return pooled.reshape(B, H * D)


def compute_prototypes(features: torch.Tensor) -> torch.Tensor:
    """Prototype per teacher: the mean calibration feature. features [N, S, F] (teacher, sample, dim) → [N, F]."""
    if features.dim() != 3 or features.shape[1] == 0:
        raise ValueError(f"features must be [N, S>0, F], got {tuple(features.shape)}")
    return features.float().mean(1)


class LearnableRouter(nn.Module):
    """α = softmax(MLP(pooled student features)); [B, N], or [B, L, N] with `n_layers` and `n_groups` > 1.

    Starts at uniform α (zero-initialised last layer), so routing is learnt from the loss rather than from the
    random initialisation.
    """

    def __init__(self, feature_dim: int, n_teachers: int, hidden: int = 64, n_layers: int | None = None,
                 n_groups: int = 1):
        super().__init__()
        if n_teachers < 1 or feature_dim < 1:
            raise ValueError(f"need n_teachers >= 1 and feature_dim >= 1, got {n_teachers}, {feature_dim}")
        self.n_teachers = n_teachers
        self.n_groups = n_groups
        if n_groups > 1:
            if n_layers is None:
                raise ValueError("a layer-aware router (n_groups > 1) needs n_layers")
            self.register_buffer("groups", layer_groups(n_layers, n_groups))
        else:
            self.groups = None
        self.norm = nn.LayerNorm(feature_dim)
        self.hidden = nn.Linear(feature_dim, hidden)
        self.out = nn.Linear(hidden, n_groups * n_teachers)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # In the router's own dtype (a bf16 DeepSpeed engine casts it to bf16), the softmax in fp32.
        logits = self.out(F.gelu(self.hidden(self.norm(features.to(self.out.weight.dtype))))).float()
        if self.groups is None:
            return torch.softmax(logits, dim=-1)
        logits = logits.view(-1, self.n_groups, self.n_teachers)
        return torch.softmax(logits, dim=-1)[:, self.groups]
