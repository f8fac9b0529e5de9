"""kvfuse: multi-teacher KV-cache distillation (fused Triton loss, C++ alignment, offline teacher-KV store).

Public API (imported lazily so that `import kvfuse` stays cheap and needs neither Triton nor transformers):
    kv_distill_loss, KVDistillLoss   fused KV-distillation loss (kvfuse.loss)
    attention_kl                      attention-KL term (kvfuse.attention)
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "kv_distill_loss": "kvfuse.loss",
    "KVDistillLoss": "kvfuse.loss",
    "attention_kl": "kvfuse.attention",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kvfuse' has no attribute {name!r}")


__all__ = sorted(_LAZY)
