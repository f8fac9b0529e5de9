"""Students derived from a loaded model: all layers, or every other layer (PLAN Phase 3's smaller student)."""
from __future__ import annotations

import math

import torch

STUDENT_LAYER_CHOICES = ("all", "every_other")


def student_layer_count(model: torch.nn.Module, student_layers: str) -> int:
    if student_layers not in STUDENT_LAYER_CHOICES:
        raise ValueError(f"student_layers must be one of {STUDENT_LAYER_CHOICES}, got {student_layers!r}")
    n = model.config.num_hidden_layers
    return n if student_layers == "all" else math.ceil(n / 2)


def make_student(model: torch.nn.Module, student_layers: str) -> torch.nn.Module:
    """The model itself (all) or, in place, the model keeping layers 0, 2, 4, … (every_other).

    Layer indices, the config's layer count and per-layer types are renumbered so caches and Gemma3's
    local/global pattern stay consistent with the kept layers.
    """
    n_keep = student_layer_count(model, student_layers)
    if student_layers == "all":
        return model
    decoder = model.model if hasattr(model, "model") else model
    kept = [layer for i, layer in enumerate(decoder.layers) if i % 2 == 0]
    assert len(kept) == n_keep
    decoder.layers = torch.nn.ModuleList(kept)
    for new_index, layer in enumerate(kept):
        if hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new_index
    config = model.config
    types = getattr(config, "layer_types", None)
    if types is not None:
        config.layer_types = [t for i, t in enumerate(types) if i % 2 == 0]
    config.num_hidden_layers = n_keep
    return model
