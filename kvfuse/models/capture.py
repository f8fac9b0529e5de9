"""Per-layer KV capture through forward hooks: pre-RoPE keys (after any k-norm), values, positions, RoPE parameters.

Why hooks and not the cache: the cache holds *post*-RoPE keys, and Gemma3's sliding-window layers keep only the
last window of them. The hooks sit on the modules that produce the keys right before rotation (`k_norm` where the
architecture has one, else `k_proj`), on `v_proj`, and on the model's own rotary module, so every position comes
back and the RoPE parameters are exactly the ones the forward used (rope_scaling types default, linear, dynamic,
llama3, yarn; Gemma3's per-layer-type local/global bases).

Positions: when no `position_ids` are given, capture derives them from the attention mask the way HF's
`generate` does (`cumsum(mask) - 1`, padding slots set to 1), so a left-padded row gets the same keys as the
same row unpadded. What is returned is what the rotary module actually received.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.utils.checkpoint

from kvfuse.align.rope import rope_from_rotary

# model_type -> names of the submodules whose outputs are the pre-RoPE key and query ([B, H, T, D] after a norm,
# or the flat [B, T, H*D] projection). Only architectures whose attention we have read and tested are listed.
_KEY_SOURCE = {"llama": "k_proj", "qwen2": "k_proj", "gemma3_text": "k_norm"}
_QUERY_SOURCE = {"llama": "q_proj", "qwen2": "q_proj", "gemma3_text": "q_norm"}
SUPPORTED_MODEL_TYPES = tuple(sorted(_KEY_SOURCE))


@dataclass
class KVCapture:
    """Captured teacher/student KV of one batch.

    keys, values: list over layers of `[B, H_kv, T, D]`, keys *before* RoPE (after k-norm where present).
    positions: `[B, T]` int64, the position ids the model's rotary embedding received.
    rope: list over layers of `(inv_freq [D/2] float32, attention_scaling float)`.
    attention_mask: `[B, T]` bool (all True when none was given).
    layer_types: list over layers, e.g. "full_attention" / "sliding_attention" (Gemma3), "full_attention" otherwise.
    queries: with `with_queries=True`, list over layers of pre-RoPE queries `[B, H_q, T, D]` (after q-norm).
    hidden: with `return_hidden=True`, the decoder's final hidden state `[B, T, hidden]` (after the final norm),
        ready for the LM head.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    positions: torch.Tensor
    rope: list[tuple[torch.Tensor, float]]
    attention_mask: torch.Tensor
    layer_types: list[str]
    queries: list[torch.Tensor] | None = None
    hidden: torch.Tensor | None = None

    @property
    def num_layers(self) -> int:
        return len(self.keys)


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The bare decoder (`model.model` of a *ForCausalLM), so capture skips the LM head and its huge logits."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _KEY_SOURCE:
        arch = getattr(config, "architectures", None) or [type(model).__name__]
        raise ValueError(
            f"capture_kv: unsupported architecture {arch} (model_type={model_type!r}); "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    base = model if hasattr(model, "layers") else getattr(model, "model", None)
    if base is None or not hasattr(base, "layers") or not hasattr(base, "rotary_emb"):
        raise ValueError(f"capture_kv: {type(model).__name__} has no decoder with `layers` and `rotary_emb`")
    return base


def layer_types_of(config) -> list[str]:
    n = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    return list(types) if types is not None else ["full_attention"] * n


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """HF generate's position ids for a (left- or right-) padded batch: running count of real tokens, pads at 1."""
    mask = attention_mask.long()
    positions = mask.cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 1)


def capture_kv(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    requires_grad: bool = False,
    with_queries: bool = False,
    return_hidden: bool = False,
    checkpoint: bool = False,
) -> KVCapture:
    """Run `model` on `input_ids [B, T]` and return every layer's pre-RoPE keys and values at every position.

    position_ids: optional `[B, T]`; default derived from `attention_mask` (see module docstring).
    requires_grad: keep the captured tensors in the autograd graph (a student being trained); otherwise the
    forward runs under `torch.no_grad()` and the tensors are detached (a teacher).
    with_queries / return_hidden: also return pre-RoPE queries (attention-KL) / the final hidden state (CE).
    checkpoint: activation checkpointing per decoder layer that keeps the captured tensors differentiable: each
    layer runs inside a (reentrant) checkpoint that returns its keys, values and queries as outputs next to the
    hidden state, so a loss on the KV alone reaches the weights. HF's own gradient checkpointing cannot be used for
    this: its reentrant form runs the first forward without grad (the hooked KV are cut off from the weights) and
    its non-reentrant form fails under ZeRO-3 (partitioned weights during the recompute). Only acts when
    `requires_grad` and grad mode are on; leave the model's own gradient checkpointing off.
    """
    base = _decoder(model)
    config = model.config
    if input_ids.dim() != 2:
        raise ValueError(f"capture_kv: input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    batch, length = input_ids.shape
    if length == 0:
        raise ValueError("capture_kv: input_ids has zero length")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.long)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"capture_kv: attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
        )
    if position_ids is None:
        position_ids = positions_from_mask(attention_mask)
    elif position_ids.shape[-1] != length:
        raise ValueError(f"capture_kv: position_ids shape {tuple(position_ids.shape)} does not match T={length}")

    layers = list(base.layers)
    n_layers = len(layers)
    head_dim = layers[0].self_attn.head_dim
    key_source = _KEY_SOURCE[config.model_type]
    rope_calls: dict[str | None, tuple[torch.Tensor, float]] = {}
    seen_positions: list[torch.Tensor] = []

    def to_heads(t: torch.Tensor) -> torch.Tensor:
        # projections are flat [B, T, H*D]; q_norm / k_norm already return [B, H, T, D].
        if t.dim() == 3:
            return t.view(batch, length, -1, head_dim).transpose(1, 2)
        return t

    def keep(t: torch.Tensor) -> torch.Tensor:
        return t if requires_grad else t.detach()

    sources = [key_source, "v_proj"] + ([_QUERY_SOURCE[config.model_type]] if with_queries else [])
    # per layer: [key, value(, query)], filled by the hooks or, under checkpointing, by the checkpoint's outputs
    captured: list[list[torch.Tensor | None]] = [[None] * len(sources) for _ in range(n_layers)]

    def hook_layer(layer, sink: list) -> list:
        """Hooks that write this layer's (key, value[, query]) into `sink`; returns their handles."""
        def writer(slot):
            def hook(_module, _inputs, output):
                sink[slot] = keep(to_heads(output))
            return hook
        attn = layer.self_attn
        return [getattr(attn, name).register_forward_hook(writer(slot)) for slot, name in enumerate(sources)]

    def checkpointed(i, layer):
        forward = layer.forward

        def run(hidden, *args, **kwargs):
            sink: list = [None] * len(sources)
            handles = hook_layer(layer, sink)
            try:
                out = forward(hidden, *args, **kwargs)
            finally:
                for handle in handles:
                    handle.remove()
            if not torch.is_tensor(out):
                raise TypeError(f"capture_kv(checkpoint=True): decoder layer {i} returned {type(out).__name__}, "
                                "expected the hidden-state tensor (transformers >= 5)")
            return (out, *sink)

        def forward_with_checkpoint(hidden, *args, **kwargs):
            if not hidden.requires_grad:     # frozen embeddings (LoRA): the checkpoint still needs a graph to replay
                hidden = hidden.detach().requires_grad_()
            # the reentrant form takes no keyword arguments: bind them (masks, RoPE tables; nothing trainable)
            out, *outputs = torch.utils.checkpoint.checkpoint(functools.partial(run, **kwargs), hidden, *args,
                                                              use_reentrant=True)
            captured[i] = outputs
            return out
        return forward_with_checkpoint

    def rotary_hook(module, args, kwargs, _output):
        pos = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        layer_type = kwargs.get("layer_type", args[2] if len(args) > 2 else None)
        seen_positions.append(pos.detach())
        rope_calls[layer_type] = rope_from_rotary(module, layer_type)

    grad = requires_grad and torch.is_grad_enabled()
    if grad and any(getattr(layer, "gradient_checkpointing", False) and layer.training for layer in layers):
        raise ValueError("capture_kv: the model's own (HF) gradient checkpointing is on; in its reentrant form the "
                         "hooked keys and values are cut off from the weights, so a KV loss would never reach the "
                         "student. Turn it off (model.gradient_checkpointing_disable()) and pass checkpoint=True.")
    handles = [base.rotary_emb.register_forward_hook(rotary_hook, with_kwargs=True)]
    patched = []
    try:
        for i, layer in enumerate(layers):
            if checkpoint and grad:
                layer.forward = checkpointed(i, layer)      # instance attribute, removed below
                patched.append(layer)
            else:
                handles += hook_layer(layer, captured[i])
        with torch.set_grad_enabled(grad):
            out = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        for layer in patched:
            del layer.forward

    missing = [i for i in range(n_layers) if any(t is None for t in captured[i])]
    if missing or not seen_positions:
        raise RuntimeError(f"capture_kv: hooks did not fire for layers {missing} of {type(model).__name__}")
    types = layer_types_of(config)
    per_type = None not in rope_calls
    rope = [rope_calls[types[i] if per_type else None] for i in range(n_layers)]
    positions = seen_positions[0].long().expand(batch, length).clone()
    return KVCapture(
        keys=[c[0] for c in captured], values=[c[1] for c in captured], positions=positions, rope=rope,
        attention_mask=attention_mask.bool(), layer_types=types,
        queries=[c[2] for c in captured] if with_queries else None,
        hidden=keep(out.last_hidden_state) if return_hidden else None,
    )
