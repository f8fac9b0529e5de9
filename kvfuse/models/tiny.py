"""Tiny random-weight models of each supported architecture, built from configs in code (no downloads).

They keep the real architectures' structure (GQA, q/k norms, fused projections, partial rotary, NoPE layers,
sliding-window layers with their own RoPE base, MoE blocks) at sizes that run in milliseconds on a CPU. Sliding
windows (8) are shorter than the test sequences, so tests see the sliding-window cache drop tokens.
"""
from __future__ import annotations

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig,
                          PretrainedConfig, Qwen2Config)

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


def _family(model_type: str, rope: dict | None = None, **overrides) -> PretrainedConfig:
    """A 2-layer, hidden-64 model of `model_type` with GQA (4 query heads, 2 KV heads of dim 16)."""
    base = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, **(rope or {})},
                tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    kwargs = {key: value for key, value in {**base, **overrides}.items() if value is not None}
    return AutoConfig.for_model(model_type, **kwargs)


_SLIDING = ["sliding_attention", "full_attention"]
_MOE = dict(num_local_experts=2, num_experts=2, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=32)

# One tiny model per family; the comment says what about it capture has to get right.
TINY_FAMILIES = {
    "tiny-mistral": lambda: _family("mistral", sliding_window=8),                     # sliding window everywhere
    "tiny-mixtral": lambda: _family("mixtral", **_MOE),                                # MoE MLP
    "tiny-qwen2-moe": lambda: _family("qwen2_moe", **_MOE),                            # MoE + shared expert
    "tiny-qwen3": lambda: _family("qwen3"),                                            # per-head q/k RMSNorm
    "tiny-qwen3-moe": lambda: _family("qwen3_moe", **_MOE),
    "tiny-gemma": lambda: _family("gemma"),                                            # (1 + w) RMSNorm, embed scale
    "tiny-gemma2": lambda: _family("gemma2", sliding_window=8, layer_types=_SLIDING,   # alternating windows,
                                   query_pre_attn_scalar=16),                          # logit soft-capping
    "tiny-phi3": lambda: _family("phi3", rope={"partial_rotary_factor": 0.75}),        # fused qkv_proj, Phi-4-mini's
                                                                                       # partial rotary inside RoPE
    "tiny-phi": lambda: _family("phi", rope={"partial_rotary_factor": 0.5}),           # rotary slice, rest concat
    "tiny-gpt-neox": lambda: _family("gpt_neox", rope={"partial_rotary_factor": 0.25},  # fused qkv, Pythia's 25 %
                                     num_key_value_heads=None, head_dim=None),         # no GQA, no such keys
    "tiny-stablelm": lambda: _family("stablelm", rope={"partial_rotary_factor": 0.25}, num_key_value_heads=4),
    "tiny-olmo": lambda: _family("olmo"),                                              # non-parametric LayerNorm
    "tiny-olmo2": lambda: _family("olmo2"),                                            # q/k norm over the projection
    "tiny-granite": lambda: _family("granite", attention_multiplier=0.25),             # custom attention scale
    "tiny-cohere": lambda: _family("cohere", use_qk_norm=True),                        # interleaved RoPE pairs
    "tiny-smollm3": lambda: _family("smollm3", no_rope_layers=[1, 0]),                 # layer 1 is NoPE
}
TINY_CONFIGS = {"tiny-llama": _llama, "tiny-qwen2": _qwen2, "tiny-gemma3": _gemma3, **TINY_FAMILIES}


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


def _qwen3(layers, hidden, heads, intermediate, tie):
    return AutoConfig.for_model(
        "qwen3", vocab_size=151936, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=tie)


REAL_SHAPES = {
    "qwen2.5-0.5b": lambda: _qwen25(24, 896, 14, 2, 4864, 151936, True),
    "qwen2.5-1.5b": lambda: _qwen25(28, 1536, 12, 2, 8960, 151936, True),
    "qwen2.5-7b": lambda: _qwen25(28, 3584, 28, 4, 18944, 152064, False),
    "qwen3-1.7b": lambda: _qwen3(28, 2048, 16, 6144, True),
    "qwen3-8b": lambda: _qwen3(36, 4096, 32, 12288, False),
    "mistral-7b": lambda: MistralConfig(  # v0.3: 32768-token vocab, rope_theta 1e6, no sliding window
        vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=32768, sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=False),
    "gemma-2-9b": lambda: AutoConfig.for_model(
        "gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=4096, layer_types=["sliding_attention", "full_attention"] * 21,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True),
    "phi-4": lambda: AutoConfig.for_model(  # Phi3ForCausalLM: fused qkv_proj and gate_up_proj
        "phi3", vocab_size=100352, hidden_size=5120, intermediate_size=17920, num_hidden_layers=40,
        num_attention_heads=40, num_key_value_heads=10, max_position_embeddings=16384,
        original_max_position_embeddings=16384, pad_token_id=100349, bos_token_id=100257, eos_token_id=100265,
        rope_parameters={"rope_type": "default", "rope_theta": 250000.0, "partial_rotary_factor": 1.0},
        tie_word_embeddings=False),
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
