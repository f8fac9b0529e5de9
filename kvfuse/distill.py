"""The distillation objective as one nn.Module: student + KV loss (with its per-teacher adapters) + router
(+ Z space). `forward(batch, ...)` returns the total loss and detached logs; it knows nothing of DeepSpeed, so the
same module trains under ZeRO-3 (train/main.py) or in any plain loop.

batch (from kvfuse.teacher.builder.collate, online or from the store):
    input_ids, attention_mask, positions, mask (supervised KV tokens), labels_mask (rationale tokens for CE) [B, T];
    teacher_k, teacher_v: N lists of [L_s, B, H_i, T, D_i] (aligned, pre-RoPE).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kvfuse.align.rope import rotate
from kvfuse.attention import attention_kl
from kvfuse.codecs import decode, decode_teachers, is_encoded
from kvfuse.eval.similarity import kv_tokens, token_features
from kvfuse.fuse.router import (FixedRouter, LearnableRouter, SimilarityRouter, entropy, entropy_regularizer,
                                first_tokens_feature, pooled_features)
from kvfuse.loss import KVDistillLoss, fused_teacher_keys
from kvfuse.models.capture import KVCapture, capture_kv
from kvfuse.zspace import ZSpace


class StudentKV(NamedTuple):
    """The student's captured KV of one batch, keys rotated as its own attention sees them, and its RoPE in the
    fused loss's form: inv_freq [L, R/2] (zero-padded past each layer's r_l/2), attention_scaling per layer,
    rotary_dim per layer (0 on NoPE layers)."""

    cap: KVCapture
    keys: torch.Tensor              # [L, B, H, T, D], post-RoPE
    values: torch.Tensor            # [L, B, H, T, D]
    inv_freq: torch.Tensor
    attention_scaling: list[float]
    rotary_dim: list[int]


@dataclass
class LossWeights:
    gamma: float = 0.0      # attention KL
    delta: float = 0.0      # CE on the gold rationale


def rationale_ce(logits: torch.Tensor, input_ids: torch.Tensor, labels_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over rationale tokens: token t is predicted from position t−1."""
    target_mask = labels_mask[:, 1:].bool()     # a 0/1 integer mask would index rows instead of selecting
    if not target_mask.any():
        raise ValueError("rationale_ce: no rationale token to score (labels_mask is empty)")
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return nll[target_mask].mean()


class DistillationModel(nn.Module):
    def __init__(self, student: nn.Module, kv_loss: KVDistillLoss, router: nn.Module,
                 zspace: ZSpace | None = None, entropy_weight: float = 0.0, entropy_target: str = "diversity",
                 router_k: int = 16, checkpoint: bool = False):
        """checkpoint: activation checkpointing of the student's layers through `capture_kv(checkpoint=True)`,
        the only form under which a KV loss still reaches the student (do not enable HF's own on the student)."""
        super().__init__()
        self.checkpoint = checkpoint
        self.student = student
        self.kv_loss = kv_loss
        self.router = router
        self.zspace = zspace
        self.entropy_weight = entropy_weight
        self.entropy_target = entropy_target
        self.router_k = router_k

    # ------------------------------------------------------------------------------------------------ student
    @property
    def lm(self) -> nn.Module:
        """The student as a plain *ForCausalLM (a PEFT/LoRA wrapper's base model, with its LoRA layers in place)."""
        return self.student.get_base_model() if hasattr(self.student, "get_base_model") else self.student

    def student_kv(self, batch: dict, with_queries: bool = False) -> StudentKV:
        cap = capture_kv(self.lm, batch["input_ids"], batch["attention_mask"],
                         position_ids=batch["positions"], requires_grad=True, return_hidden=True,
                         with_queries=with_queries, checkpoint=self.checkpoint)
        pos = batch["positions"][:, None]
        student_k = torch.stack([rotate(k, pos, *cap.rope[l]) for l, k in enumerate(cap.keys)])
        inv_freq, scalings, rotary_dims = cap.rope_table()
        return StudentKV(cap, student_k, torch.stack(cap.values), inv_freq.to(student_k.device), scalings,
                         rotary_dims)

    # ------------------------------------------------------------------------------------------------ routing
    def route(self, batch: dict, cap) -> torch.Tensor:
        B = batch["input_ids"].shape[0]
        if isinstance(self.router, FixedRouter):
            return self.router(B).to(batch["input_ids"].device)
        if isinstance(self.router, SimilarityRouter):
            return self.router([first_tokens_feature(decode(v), batch["mask"], self.router_k)
                                for v in batch["teacher_v"]])
        if isinstance(self.router, LearnableRouter):
            embeddings = self.lm.get_input_embeddings()(batch["input_ids"]).detach()
            return self.router(pooled_features(embeddings, batch["mask"]))
        raise TypeError(f"unsupported router {type(self.router).__name__}")

    # ------------------------------------------------------------------------------------------------ loss
    def forward(self, batch: dict, layer_weights: torch.Tensor | None = None,
                weights: LossWeights = LossWeights(), return_features: bool = False) -> tuple[torch.Tensor, dict]:
        """The total loss and its logged parts; `return_features` adds the student's per-layer pre-RoPE K|V token
        features (`logs["student_features"]`, [n_valid, H·2D] per layer) for space-free similarity metrics."""
        cap, student_k, student_v, inv_freq, scaling, rotary_dim = self.student_kv(batch,
                                                                                   with_queries=weights.gamma > 0)
        dtype = student_k.dtype
        # compressed store entries go to the KV loss as they are (it decodes them); the other terms take tensors
        teacher_k = [t if is_encoded(t) else t.to(dtype) for t in batch["teacher_k"]]
        teacher_v = [t if is_encoded(t) else t.to(dtype) for t in batch["teacher_v"]]
        alpha = self.route(batch, cap)
        logs: dict = {"alpha": alpha.detach()}
        if self.zspace is None:
            kv, stats = self.kv_loss(student_k, student_v, teacher_k, teacher_v, batch["mask"], batch["positions"],
                                     inv_freq, scaling, alpha=alpha, layer_weights=layer_weights,
                                     rotary_dim=rotary_dim)
            logs.update(stats)
        if self.zspace is not None or weights.gamma > 0:
            teacher_k, teacher_v = decode_teachers(teacher_k, teacher_v, dtype)
        if self.zspace is not None:
            kv, per_layer = self._z_loss(cap, teacher_k, teacher_v, alpha, batch["mask"], layer_weights)
            logs["z_loss"] = per_layer
        total = kv
        logs["kv_loss"] = kv.detach()
        if weights.delta > 0:
            logits = self.lm.lm_head(cap.hidden)
            ce = rationale_ce(logits, batch["input_ids"], batch["labels_mask"])
            total = total + weights.delta * ce
            logs["ce"] = ce.detach()
        if weights.gamma > 0:
            fused = fused_teacher_keys(teacher_k, list(self.kv_loss.w_k), alpha, batch["positions"], inv_freq,
                                       scaling, self.kv_loss.student_heads, rotary_dim=rotary_dim)
            pos = batch["positions"][:, None]
            kls = [attention_kl(rotate(q, pos, *cap.rope[l]), student_k[l], fused[l], batch["mask"], backend="auto")
                   for l, q in enumerate(cap.queries)]
            lw = torch.ones(len(kls)) if layer_weights is None else layer_weights.float().cpu()
            kl = sum(w * k for w, k in zip(lw.tolist(), kls)) / float(lw.sum())
            total = total + weights.gamma * kl
            logs["attn_kl"] = kl.detach()
        if isinstance(self.router, LearnableRouter) and self.entropy_weight > 0:
            total = total + entropy_regularizer(alpha, self.entropy_weight, self.entropy_target)
        logs["router_entropy"] = entropy(alpha.detach()).mean()
        if return_features:
            logs["student_features"] = [token_features(k.detach(), v.detach(), batch["mask"])
                                        for k, v in zip(cap.keys, cap.values)]
        return total, logs

    def _z_loss(self, cap, teacher_k, teacher_v, alpha, mask, layer_weights):
        if alpha.dim() == 3:
            alpha = alpha.mean(1)
        per_layer = []
        for l, (k, v) in enumerate(zip(cap.keys, cap.values)):
            # position-free student keys (pre-RoPE), like the stored teacher keys
            teachers = [kv_tokens(tk[l], tv[l]) for tk, tv in zip(teacher_k, teacher_v)]
            per_layer.append(self.zspace(kv_tokens(k, v), teachers, alpha, mask))
        losses = torch.stack(per_layer)
        lw = torch.ones_like(losses) if layer_weights is None else layer_weights.to(losses)
        return (lw * losses).sum() / lw.sum(), losses.detach()

    # ------------------------------------------------------------------------------------------------ eval
    @torch.no_grad()
    def rationale_nll(self, batch: dict) -> torch.Tensor:
        logits = self.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              position_ids=batch["positions"]).logits
        return rationale_ce(logits, batch["input_ids"], batch["labels_mask"])
