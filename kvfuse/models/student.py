"""Students derived from a loaded model: all layers, or every other layer (PLAN Phase 3's smaller student)."""
from __future__ import annotations

import math

import torch

from kvfuse.models.capture import decoder_of

STUDENT_LAYER_CHOICES = ("all", "every_other")
# config attributes that hold one entry per decoder layer
_PER_LAYER_LISTS = ("layer_types", "no_rope_layers")


def student_layer_count(model: torch.nn.Module, student_layers: str) -> int:
    if student_layers not in STUDENT_LAYER_CHOICES:
        raise ValueError(f"student_layers must be one of {STUDENT_LAYER_CHOICES}, got {student_layers!r}")
    n = model.config.num_hidden_layers
    return n if student_layers == "all" else math.ceil(n / 2)


def make_student(model: torch.nn.Module, student_layers: str) -> torch.nn.Module:
    """The model itself (all) or, in place, the model keeping layers 0, 2, 4, … (every_other).

    Layer indices, the config's layer count and its per-layer lists (layer types, SmolLM3's NoPE layers) are
    renumbered so caches, local/global patterns and NoPE layers stay consistent with the kept layers.
    """
    n_keep = student_layer_count(model, student_layers)
    if student_layers == "all":
        return model
    decoder = decoder_of(model)
    kept = [layer for i, layer in enumerate(decoder.layers) if i % 2 == 0]
    assert len(kept) == n_keep
    decoder.layers = torch.nn.ModuleList(kept)
    for new_index, layer in enumerate(kept):
        for module in layer.modules():      # the attention's, and in some families the layer's or its MoE's
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    config = model.config
    for name in _PER_LAYER_LISTS:
        values = getattr(config, name, None)
        if values is not None:
            setattr(config, name, [v for i, v in enumerate(values) if i % 2 == 0])
    config.num_hidden_layers = n_keep
    return model
