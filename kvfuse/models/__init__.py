"""Model loading (HF ids, local folders, GGUF, packaged aliases, tiny test models) and per-layer KV capture."""
from kvfuse.models.tiny import TINY_CONFIGS, tiny_config, tiny_model

__all__ = ["TINY_CONFIGS", "tiny_config", "tiny_model"]
from kvfuse.models.bpe import tiny_tokenizer
from kvfuse.models.identity import kv_heads, model_fingerprint
from kvfuse.models.load import fingerprint, load, load_tokenizer
from kvfuse.models.packaged import PACKAGED_MODELS

__all__ += ["PACKAGED_MODELS", "fingerprint", "kv_heads", "load", "load_tokenizer", "model_fingerprint",
            "tiny_tokenizer"]
from kvfuse.models.student import make_student, student_layer_count

__all__ += ["make_student", "student_layer_count"]
from kvfuse.models.capture import KVCapture, capture_kv, positions_from_mask

__all__ += ["KVCapture", "capture_kv", "positions_from_mask"]
