"""What a model is: a fingerprint of its config and weights, and the KV shape the distillation needs."""
from __future__ import annotations

import hashlib
import json

import torch


# Config keys that describe how a model was loaded or run, not what it computes. "architectures" is only filled
# in by save_pretrained; the model class is hashed from the object instead.
_VOLATILE_CONFIG_KEYS = {"architectures", "_name_or_path", "_model_name_or_path", "transformers_version", "dtype",
                         "torch_dtype", "_attn_implementation", "_attn_implementation_autoset", "attn_implementation",
                         "_commit_hash", "quantization_config", "use_cache", "output_attentions",
                         "output_hidden_states", "return_dict"}


def canonical_config(config) -> str:
    data = {k: v for k, v in config.to_diff_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return json.dumps(data, sort_keys=True, default=str)


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short stable id of a model's config and weights, `<model_type>-<16 hex>`: sha256 over the canonical config
    and every state-dict tensor (name, dtype, shape, bytes; tied tensors hashed once)."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"cannot fingerprint {type(model).__name__}: it has no transformers config")
    digest = hashlib.sha256(f"{type(model).__name__}|{canonical_config(config)}".encode())
    seen: dict[tuple, str] = {}
    for key, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach()
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                 tuple(tensor.stride()), tensor.dtype)
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if ident in seen:
            digest.update(f"tied:{seen[ident]}".encode())
            continue
        seen[ident] = key
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"{config.model_type}-{digest.hexdigest()[:16]}"


def kv_heads(config) -> tuple[int, int]:
    """(key/value heads, head dim) of a transformers config; configs without `head_dim` split the hidden size evenly
    over the attention heads."""
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return (getattr(text, "num_key_value_heads", None) or text.num_attention_heads), head_dim
