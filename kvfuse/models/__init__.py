"""Model loading (HF ids, local folders, GGUF, packaged aliases, tiny test models) and per-layer KV capture."""
from kvfuse.models.tiny import TINY_CONFIGS, tiny_config, tiny_model

__all__ = ["TINY_CONFIGS", "tiny_config", "tiny_model"]
from kvfuse.models.load import PACKAGED_MODELS, describe, fingerprint, load, load_tokenizer, tiny_tokenizer

__all__ += ["PACKAGED_MODELS", "describe", "fingerprint", "load", "load_tokenizer", "tiny_tokenizer"]
from kvfuse.models.student import make_student, student_layer_count

__all__ += ["make_student", "student_layer_count"]
from kvfuse.models.capture import KVCapture, capture_kv, positions_from_mask

__all__ += ["KVCapture", "capture_kv", "positions_from_mask"]
