"""Tiny random-weight models of each supported architecture, built from configs in code (no downloads).

They keep the real architectures' structure (GQA, k-norm, Gemma3's sliding-window local layers with their own
RoPE base) at sizes that run in milliseconds on a CPU. Gemma3's window (8) is shorter than the test sequences, so
tests see the sliding-window cache drop tokens.
"""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, PretrainedConfig, Qwen2Config

TINY_VOCAB = 512


def _llama() -> PretrainedConfig:
    return LlamaConfig(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True,
    )


def _qwen2() -> PretrainedConfig:
    return Qwen2Config(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=True,
    )


def _gemma3() -> PretrainedConfig:
    return Gemma3TextConfig(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
        sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
        },
        query_pre_attn_scalar=32,
    )


TINY_CONFIGS = {"tiny-llama": _llama, "tiny-qwen2": _qwen2, "tiny-gemma3": _gemma3}


def tiny_config(name: str) -> PretrainedConfig:
    if name not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {sorted(TINY_CONFIGS)}")
    return TINY_CONFIGS[name]()


def tiny_model(name: str, seed: int = 0, **config_overrides) -> torch.nn.Module:
    """A random-weight causal LM of architecture `name` (deterministic for a given seed), in eval mode."""
    config = tiny_config(name)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


# Random-weight models of real checkpoints' shapes (no weights needed): speed work, multi-GPU runs and benchmarks.
# Loaded as `random:<name>`; they use the tiny tokenizer (ids < 512 are valid in every vocab).
def _qwen25(layers, hidden, heads, kv_heads, intermediate, vocab, tie):
    return Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=32768,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=tie)


REAL_SHAPES = {
    "qwen2.5-0.5b": lambda: _qwen25(24, 896, 14, 2, 4864, 151936, True),
    "qwen2.5-1.5b": lambda: _qwen25(28, 1536, 12, 2, 8960, 151936, True),
    "qwen2.5-7b": lambda: _qwen25(28, 3584, 28, 4, 18944, 152064, False),
    "llama-3.1-8b": lambda: LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=131072,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}


def random_model(name: str, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                 device: str | torch.device = "cpu") -> torch.nn.Module:
    """A random-weight model of the shape `name` (see REAL_SHAPES), initialised directly on `device`."""
    if name not in REAL_SHAPES:
        raise ValueError(f"unknown model shape {name!r}; choose one of {sorted(REAL_SHAPES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(REAL_SHAPES[name](), dtype=dtype)
    return model.eval()
