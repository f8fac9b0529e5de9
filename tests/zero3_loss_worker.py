"""One rank of the ZeRO-3 check for KVDistillLoss (launched by tests/test_zero3_loss.py):

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 tests/zero3_loss_worker.py --out DIR

The loss module is a submodule of the engine's model; its adapters are partitioned (persistence threshold 0).
Each rank feeds its own batch; the loss on each rank and the adapter gradients after DeepSpeed's reduction
(gathered with safe_get_full_grad) must equal a plain single-process module's loss and the mean of its
gradients over both ranks' batches. Checked for both backends (triton runs under TRITON_INTERPRET=1).
Rank 0 writes DIR/result.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad
from torch import nn

from kvfuse.loss import KVDistillLoss

L, B, T, H_S, D_S = 2, 2, 11, 2, 8
HEADS = [(4, 8), (1, 16)]


class StudentWithLoss(nn.Module):
    """A stand-in trainer model: a student-side layer (so ZeRO-3 sees a non-loss parameter too) plus the loss."""

    def __init__(self):
        super().__init__()
        self.student_proj = nn.Linear(D_S, D_S)
        self.kv_loss = KVDistillLoss(HEADS, (H_S, D_S), L, alpha=[0.4, 0.6], beta=0.3)

    def forward(self, sk, sv, tk0, tk1, tv0, tv1, mask, positions, inv_freq):
        loss, _ = self.kv_loss(self.student_proj(sk), sv, [tk0, tk1], [tv0, tv1], mask, positions, inv_freq,
                               attention_scaling=1.1)
        return loss


def batch(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[:, 0] = True
    return (r(L, B, H_S, T, D_S), r(L, B, H_S, T, D_S), *[r(L, B, h, T, d) for h, d in HEADS],
            *[r(L, B, h, T, d) for h, d in HEADS], mask, torch.arange(T).expand(B, T).contiguous(),
            1.0 / (10000 ** (torch.arange(0, D_S, 2).float() / D_S)))


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = StudentWithLoss()
    with torch.no_grad():  # move the adapters off their structured init so every gradient entry is exercised
        for w in model.kv_loss.w_k + model.kv_loss.w_v:
            w.add_(0.2 * torch.randn(w.shape))
    plain = copy.deepcopy(model)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                           config=config)
    adapters = [(n, p_) for n, p_ in engine.module.named_parameters() if n.startswith("kv_loss.w_")]
    result = {"world": world, "partitioned": all(p_.ds_tensor.numel() < p_.ds_numel for _, p_ in adapters),
              "released_outside_forward": all(p_.numel() == 0 for _, p_ in adapters), "backends": {}}
    for backend in ("torch", "triton"):
        engine.module.kv_loss.backend = plain.kv_loss.backend = backend
        loss = engine(*batch(rank))
        engine.backward(loss)
        full = {n: safe_get_full_grad(p_).clone() for n, p_ in adapters}  # collective: every rank calls it
        engine.step()  # lr 0: clears the gradients for the next backend, leaves the weights alone
        losses = [torch.zeros(()) for _ in range(world)]
        dist.all_gather(losses, loss.detach().reshape(()))
        if rank == 0:
            plain.zero_grad()
            ref_losses = []
            for r in range(world):
                ref = plain(*batch(r))
                (ref / world).backward()
                ref_losses.append(ref.item())
            ref_grads = {n: p_.grad for n, p_ in plain.named_parameters() if n.startswith("kv_loss.w_")}
            result["backends"][backend] = {
                "loss_err": max(abs(float(a) - b) / abs(b) for a, b in zip(losses, ref_losses)),
                "grad_err": {n: rel(full[n], ref_grads[n]) for n in full},
                "grad_norm": {n: float(ref_grads[n].norm()) for n in full},
            }
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "result.json").write_text(json.dumps(result, indent=1))
    dist.barrier()


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    main()
