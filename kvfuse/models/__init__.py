"""Model loading (HF ids, local folders, GGUF, packaged aliases, tiny test models) and per-layer KV capture."""
from kvfuse.models.tiny import TINY_CONFIGS, tiny_config, tiny_model

__all__ = ["TINY_CONFIGS", "tiny_config", "tiny_model"]
