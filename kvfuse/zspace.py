"""Phase 5: a common space Z for teachers too different to align head-to-head (docs/PLAN.md §4 Phase 5).

Per token, teacher i's aligned [K, V] (pre-RoPE keys, values, heads flattened) is mapped by g_i to Z_i and the
student's [K, V] by h_s to Z_s; the fused target Z_f = Σ_i α_i Z_i supervises Z_s with one of:

- mse:     mean over valid tokens of ‖Z_s − Z_f‖² / d
- cosine:  mean over valid tokens of 1 − cos(Z_s, Z_f)
- barlow:  Barlow Twins on the standardised cross-correlation C = Ẑ_sᵀ Ẑ_f / n:  Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij²
- cca:     −(1/d) Σ canonical correlations = −‖Σ_ss^{-1/2} Σ_sf Σ_ff^{-1/2}‖_* / d (Deep CCA's objective)

MSE and cosine can be won trivially by mapping everything to one point, so with them the teacher maps g_i are
frozen random orthogonal projections (the student must move into a fixed space); Barlow Twins and CCA are
invariant to that collapse by construction and train g_i too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Z_LOSSES = ("mse", "cosine", "barlow", "cca")


def _valid_rows(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """z [B, T, d], mask [B, T] → [n, d] rows of valid tokens."""
    return z[mask.bool()]


def mse_loss(z_s: torch.Tensor, z_f: torch.Tensor) -> torch.Tensor:
    return ((z_s - z_f) ** 2).mean()


def cosine_loss(z_s: torch.Tensor, z_f: torch.Tensor) -> torch.Tensor:
    return (1 - F.cosine_similarity(z_s, z_f, dim=-1, eps=1e-8)).mean()


def barlow_twins_loss(z_a: torch.Tensor, z_b: torch.Tensor, off_diagonal_weight: float = 5e-3,
                      eps: float = 1e-5) -> torch.Tensor:
    """z_a, z_b [n, d] (n ≥ 2 rows)."""
    n = z_a.shape[0]
    if n < 2:
        raise ValueError("barlow_twins_loss needs at least 2 valid tokens")
    za = (z_a - z_a.mean(0)) / (z_a.std(0, unbiased=False) + eps)
    zb = (z_b - z_b.mean(0)) / (z_b.std(0, unbiased=False) + eps)
    c = za.T @ zb / n
    on = ((1 - torch.diagonal(c)) ** 2).sum()
    off = (c ** 2).sum() - (torch.diagonal(c) ** 2).sum()
    return on + off_diagonal_weight * off


def _inv_sqrt(cov: torch.Tensor, eps: float) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(cov)
    return evecs @ torch.diag(evals.clamp_min(eps).rsqrt()) @ evecs.T


def cca_loss(z_a: torch.Tensor, z_b: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """z_a, z_b [n, d]; −mean canonical correlation (regularised covariances, ridge eps)."""
    n, d = z_a.shape
    if n < 2:
        raise ValueError("cca_loss needs at least 2 valid tokens")
    za = z_a - z_a.mean(0)
    zb = z_b - z_b.mean(0)
    eye = torch.eye(d, dtype=z_a.dtype, device=z_a.device)
    s_aa = za.T @ za / (n - 1) + eps * eye
    s_bb = zb.T @ zb / (n - 1) + eps * eye
    s_ab = za.T @ zb / (n - 1)
    t = _inv_sqrt(s_aa, eps) @ s_ab @ _inv_sqrt(s_bb, eps)
    return -torch.linalg.matrix_norm(t, ord="nuc") / d


class ZSpace(nn.Module):
    """Projections g_i (one per teacher) and h_s into a shared d-dimensional space, and the Z loss."""

    def __init__(self, teacher_dims: list[int], student_dim: int, z_dim: int = 128, loss: str = "mse",
                 seed: int = 0):
        super().__init__()
        if loss not in Z_LOSSES:
            raise ValueError(f"z loss must be one of {Z_LOSSES}, got {loss!r}")
        self.loss_name = loss
        gen = torch.Generator().manual_seed(seed)
        self.teacher_maps = nn.ModuleList()
        for dim in teacher_dims:
            layer = nn.Linear(dim, z_dim, bias=False)
            q, _ = torch.linalg.qr(torch.randn(max(dim, z_dim), min(dim, z_dim), generator=gen))
            layer.weight.data.copy_(q.T if dim >= z_dim else q)
            layer.weight.requires_grad_(loss in ("barlow", "cca"))
            self.teacher_maps.append(layer)
        self.student_map = nn.Linear(student_dim, z_dim, bias=True)

    def forward(self, student_kv: torch.Tensor, teacher_kv: list[torch.Tensor], alpha: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """student_kv [B, T, F_s], teacher_kv[i] [B, T, F_i], alpha [B, N], mask [B, T] → scalar loss."""
        if len(teacher_kv) != len(self.teacher_maps):
            raise ValueError(f"{len(teacher_kv)} teachers given, Z space built for {len(self.teacher_maps)}")
        if alpha.shape != (student_kv.shape[0], len(teacher_kv)):
            raise ValueError(f"alpha must be [B, N] = {(student_kv.shape[0], len(teacher_kv))}, "
                             f"got {tuple(alpha.shape)}")
        z_s, z_t = self._project(student_kv, teacher_kv)
        z_f = sum(alpha[:, i, None, None] * z for i, z in enumerate(z_t))
        zs, zf = _valid_rows(z_s, mask), _valid_rows(z_f, mask)
        if zs.shape[0] == 0:
            raise ValueError("mask selects no token")
        if self.loss_name == "mse":
            return mse_loss(zs, zf)
        if self.loss_name == "cosine":
            return cosine_loss(zs, zf)
        if self.loss_name == "barlow":
            return barlow_twins_loss(zs, zf)
        return cca_loss(zs, zf)

    def _project(self, student_kv: torch.Tensor, teacher_kv: list[torch.Tensor]) -> tuple[torch.Tensor, list]:
        """Z of the student and of each teacher, fp32. Each projection runs in its own parameter dtype (a bf16
        DeepSpeed engine casts the maps to bf16, and KV arrives in fp32 or bf16); the losses, whose covariances and
        inverse square roots want fp32, get fp32."""
        def one(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
            return layer(x.to(layer.weight.dtype)).float()

        return one(self.student_map, student_kv), [one(g, t) for g, t in zip(self.teacher_maps, teacher_kv)]

    @torch.no_grad()
    def embed(self, student_kv: torch.Tensor, teacher_kv: list[torch.Tensor]) -> tuple[torch.Tensor, list]:
        """Z of the student and of each teacher (for t-SNE pictures)."""
        return self._project(student_kv, teacher_kv)
