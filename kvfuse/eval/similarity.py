"""Linear CKA (Kornblith et al., 2019) between the student's KV and a teacher's, on valid tokens.

The training losses live in different spaces (head-to-head adapters in Phase 3, a learnt Z in Phase 5, each router's
own fused target), so their values cannot be compared across runs. Linear CKA can: it is invariant to orthogonal
maps and isotropic scaling of either side and needs no adapter, so "how much does the student's KV geometry look
like the teacher's" is one number for every setup.
"""
from __future__ import annotations

import torch


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """CKA of x [n, F1] and y [n, F2] (rows are the same n tokens), materialised; the readable reference."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs [n, F1] and [n, F2] with the same n, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    cross = (y.T @ x).square().sum()
    return float(cross / ((x.T @ x).norm() * (y.T @ y).norm()))


class CKAAccumulator:
    """Streaming linear CKA over many batches: keeps Σx, Σy, xᵀx, yᵀy and yᵀx in float64 and centres at the end,
    so the result equals `linear_cka` on all tokens at once (per-batch CKA averaged would be biased at small n)."""

    def __init__(self) -> None:
        self.n = 0
        self.sums: dict[str, torch.Tensor] = {}

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
            raise ValueError(f"CKAAccumulator.update needs [n, F1] and [n, F2] with the same n, got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
        # on the features' device: float64 products of [n, 2HD] features for every layer and teacher take seconds per
        # batch on a few CPU threads, milliseconds on a GPU
        x, y = x.detach().double(), y.detach().to(x.device, torch.float64)
        parts = {"x": x.sum(0), "y": y.sum(0), "xx": x.T @ x, "yy": y.T @ y, "yx": y.T @ x}
        if self.sums and any(self.sums[k].shape != v.shape for k, v in parts.items()):
            raise ValueError("CKAAccumulator got features of another width than before")
        for k, v in parts.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.n += x.shape[0]

    def value(self) -> float:
        if self.n < 2:
            raise ValueError(f"CKA needs at least 2 tokens, got {self.n}")
        s, n = self.sums, self.n
        xx = s["xx"] - torch.outer(s["x"], s["x"]) / n
        yy = s["yy"] - torch.outer(s["y"], s["y"]) / n
        yx = s["yx"] - torch.outer(s["y"], s["x"]) / n
        return float(yx.square().sum() / (xx.norm() * yy.norm()))


def kv_tokens(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] keys and values → [B, T, H·2D]: per token, each head's key then value, heads side by side."""
    return torch.cat([keys, values], dim=-1).transpose(1, 2).flatten(2)


def token_features(keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] keys and values → [n_valid, H·2D]: `kv_tokens` of the valid tokens only."""
    return kv_tokens(keys, values)[mask.bool()]
