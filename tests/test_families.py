"""Every supported decoder family as a tiny random-weight model of the installed transformers: captured keys rotated
equal the model's own cache on every layer (exactly: max error 0 in fp32; in bf16 0, or one ulp where the model
rotates in float32), values equal, with left and right padding
and a fully padded row; cross-family re-phasing; the clear error for families without per-head RoPE'd keys; the
real-shape `random:` aliases."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kvfuse.align.rope import rephase
from kvfuse.models import capture
from kvfuse.models.capture import capture_kv
from kvfuse.models.tiny import REAL_SHAPES, TINY_CONFIGS, random_model, tiny_model

FAMILIES = sorted(TINY_CONFIGS)
T = 13      # longer than the tiny sliding windows (8), so those layers' caches really drop tokens


def _padded_batch():
    """Rows: unpadded, left-padded, right-padded, fully padded."""
    ids = torch.randint(1, 512, (4, T), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(4, T, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, 9:] = 0
    mask[3] = 0
    return ids, mask


def _expected_rotary_dims(config) -> list[int]:
    """Each layer's rotary dim read from the config (not from the model's code): partial_rotary_factor of the head,
    0 on the layers SmolLM3-style configs mark as NoPE."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rotary = int(head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0))
    with_rope = getattr(config, "no_rope_layers", None) or [1] * config.num_hidden_layers
    return [rotary if use else 0 for use in with_rope]


@pytest.mark.parametrize("name", FAMILIES)
def test_captured_keys_rotated_equal_the_cache_exactly(name):
    # fp32 and max error 0: rotate repeats HF's own operations (float32 angles, scale folded into cos/sin before
    # the cast, same multiply-add order), so there is nothing for a tolerance to absorb.
    model = tiny_model(name, seed=1)
    ids, mask = _padded_batch()
    cap = capture_kv(model, ids, mask, with_queries=True)
    out = model(input_ids=ids, attention_mask=mask, position_ids=cap.positions, use_cache=True)
    cache = out.past_key_values.layers
    assert cap.num_layers == model.config.num_hidden_layers == len(cache)
    assert cap.rotary_dims == _expected_rotary_dims(model.config)
    truncated = 0
    for i, layer in enumerate(cache):
        kept = layer.keys.shape[-2]
        truncated += kept < T
        assert cap.keys[i].shape == (4, layer.keys.shape[1], T, layer.keys.shape[-1])     # every position, always
        assert torch.isfinite(cap.keys[i]).all() and torch.isfinite(layer.keys).all()
        torch.testing.assert_close(cap.post_rope_keys(i)[..., -kept:, :], layer.keys, rtol=0, atol=0)
        torch.testing.assert_close(cap.values[i][..., -kept:, :], layer.values, rtol=0, atol=0)
    assert truncated == sum(t == "sliding_attention" for t in cap.layer_types) or name == "tiny-mistral"
    if name == "tiny-mistral":     # sliding_window on every layer
        assert truncated == cap.num_layers
    assert (cap.head_dim_order is not None) == (name == "tiny-cohere")
    # Layer 0's inputs do not depend on position, so pre-RoPE keys and queries must not either: shifting every
    # position by 7 changes the rotated keys of the rotary dims, and nothing of what capture returns.
    shifted = capture_kv(model, ids, mask, position_ids=cap.positions + 7, with_queries=True)
    torch.testing.assert_close(shifted.keys[0], cap.keys[0], rtol=0, atol=0)
    torch.testing.assert_close(shifted.queries[0], cap.queries[0], rtol=0, atol=0)
    if cap.rope[0].rotary_dim:
        assert not torch.allclose(shifted.post_rope_keys(0), cap.post_rope_keys(0))


def test_phi3_longrope_with_partial_rotary():
    """Phi-3/4's longrope (short factors up to the original context, long factors past it, attention scaling > 1)
    on a partial-rotary head: the scaling multiplies the rotary dims only, and capture picks up the factors the
    forward used."""
    half = 6       # 0.75 of the 16-dim head rotates
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
            "short_factor": [1.0 + 0.1 * i for i in range(half)], "long_factor": [2.0 + 0.3 * i for i in range(half)],
            "original_max_position_embeddings": 16}
    model = tiny_model("tiny-phi3", seed=1, rope_parameters=rope, max_position_embeddings=64,
                       original_max_position_embeddings=16)
    ropes = []
    for length in (13, 40):
        ids = torch.randint(1, 512, (2, length), generator=torch.Generator().manual_seed(length))
        cap = capture_kv(model, ids)
        cache = model(input_ids=ids, position_ids=cap.positions, use_cache=True).past_key_values.layers
        for i, layer in enumerate(cache):
            torch.testing.assert_close(cap.post_rope_keys(i), layer.keys, rtol=0, atol=0)
        assert cap.rope[0].rotary_dim == 12 and cap.rope[0].attention_scaling > 1.0
        ropes.append(cap.rope[0])
    assert not torch.equal(ropes[0].inv_freq, ropes[1].inv_freq)       # short factors, then long ones


# Their apply_rotary_pos_emb rotates in float32 and casts back (Cohere upcasts q/k, OLMo keeps float32 cos/sin);
# rotate works in the keys' dtype like every other family, so in bf16 the two differ by a last-bit rounding.
ROTATE_IN_FLOAT32 = {"tiny-cohere", "tiny-olmo", "tiny-olmo2"}


@pytest.mark.parametrize("name", FAMILIES)
def test_bf16_capture_within_one_ulp_of_the_cache(name):
    model = tiny_model(name, seed=1).to(torch.bfloat16)
    ids, mask = _padded_batch()
    cap = capture_kv(model, ids, mask)
    cache = model(input_ids=ids, attention_mask=mask, position_ids=cap.positions,
                  use_cache=True).past_key_values.layers
    for i, layer in enumerate(cache):
        kept = layer.keys.shape[-2]
        rotated = cap.post_rope_keys(i)[..., -kept:, :]
        # one bf16 ulp at the keys' largest magnitude (8 significant bits)
        ulp = float(layer.keys.float().abs().max()) * 2.0 ** -7 if name in ROTATE_IN_FLOAT32 else 0.0
        torch.testing.assert_close(rotated.float(), layer.keys.float(), rtol=0, atol=ulp)
        torch.testing.assert_close(cap.values[i][..., -kept:, :], layer.values, rtol=0, atol=0)


# (teacher, student, the student's RoPE): the student's rope base differs from the teacher's, and so does its
# rotary dim where the families differ in it
REPHASE_PAIRS = [
    ("tiny-qwen3", "tiny-mistral", {"rope_theta": 500.0}),
    ("tiny-phi3", "tiny-phi", {"rope_theta": 2000.0, "partial_rotary_factor": 0.5}),      # 12 → 8 rotary dims
    ("tiny-gpt-neox", "tiny-stablelm", {"rope_theta": 300.0, "partial_rotary_factor": 0.5}),  # 4 → 8
    ("tiny-cohere", "tiny-qwen3", {"rope_theta": 700.0}),                                   # interleaved pairs
]


@pytest.mark.parametrize("teacher_name,student_name,student_rope", REPHASE_PAIRS,
                         ids=[f"{t}->{s}" for t, s, _ in REPHASE_PAIRS])
def test_rephasing_across_families(teacher_name, student_name, student_rope):
    """A teacher's cached keys behind a prompt, re-phased to the student's RoPE (from the student's own capture)
    and positions, equal the keys computed directly by the teacher's weights under the student's rope config at
    the student's positions (layer 0, whose pre-RoPE keys depend on the token alone)."""
    student_params = {"rope_type": "default", **student_rope}
    student = tiny_model(student_name, seed=4, rope_parameters=student_params)
    teacher = tiny_model(teacher_name, seed=3)
    direct = tiny_model(teacher_name, seed=3, rope_parameters=student_params)   # same weights, the student's rope
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(1, 512, (2, 6), generator=g)
    prompt_lens = [5, 2]
    total = max(prompt_lens) + 6
    ids, mask = torch.zeros(2, total, dtype=torch.long), torch.zeros(2, total, dtype=torch.long)
    for b, p in enumerate(prompt_lens):
        ids[b, total - 6 - p:total - 6] = torch.randint(1, 512, (p,), generator=g)
        ids[b, total - 6:] = shared[b]
        mask[b, total - 6 - p:] = 1
    t_cap = capture_kv(teacher, ids, mask)
    s_cap = capture_kv(student, shared)
    assert t_cap.rope[0].rotary_dim != s_cap.rope[0].rotary_dim or not torch.equal(t_cap.rope[0].inv_freq,
                                                                                   s_cap.rope[0].inv_freq)
    order = t_cap.head_dim_order
    t_keys = teacher(input_ids=ids, attention_mask=mask, position_ids=t_cap.positions,
                     use_cache=True).past_key_values.layers[0].keys[..., -6:, :]
    d_keys = direct(input_ids=shared, position_ids=s_cap.positions, use_cache=True).past_key_values.layers[0].keys
    if order is not None:       # work in capture's rotate-half order, as the whole stack does
        t_keys, d_keys = t_keys[..., order], d_keys[..., order]
    moved = rephase(t_keys, t_cap.positions[:, -6:], t_cap.rope[0], s_cap.positions, s_cap.rope[0])
    torch.testing.assert_close(moved, d_keys, rtol=0, atol=3e-5)
    assert (t_keys - d_keys).abs().max() > 1e-2        # without re-phasing they really differ


def _tiny_config(model_type: str, **overrides):
    return AutoConfig.for_model(model_type, vocab_size=512, hidden_size=64, intermediate_size=96,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                pad_token_id=0, bos_token_id=1, eos_token_id=1, **overrides)


UNSUPPORTED = {
    "deepseek_v3": (dict(q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                         n_routed_experts=2, num_experts_per_tok=1, moe_intermediate_size=32, first_k_dense_replace=2,
                         rope_interleave=False),   # the plain helper, so the shape check is what refuses it
                    "multi-head latent attention", "not per-head RoPE'd projections"),
    "lfm2": (dict(layer_types=["conv", "full_attention"], full_attn_idxs=[1]),
             "state-space / linear-attention", "exactly one self-attention"),
    # learned absolute positions: the attention sees keys, but nothing rotates them
    "biogpt": ({}, None, "never called its modeling module's apply_rotary_pos_emb"),
    "gpt2": (dict(n_embd=64, n_layer=2, n_head=4), None, "no decoder with a `layers` ModuleList"),
}


@pytest.mark.parametrize("model_type", sorted(UNSUPPORTED))
def test_families_without_per_head_rope_keys_get_a_clear_error(model_type, monkeypatch):
    overrides, named, generic = UNSUPPORTED[model_type]
    config = _tiny_config(model_type, **overrides)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(1, 512, (1, 6))
    if named is not None:
        with pytest.raises(ValueError, match=f"model_type='{model_type}'.*{named}"):
            capture_kv(model, ids)
        # without the registry entry the generic checks still refuse it, and say why
        monkeypatch.delitem(capture.UNSUPPORTED_FAMILIES, model_type)
    with pytest.raises(ValueError, match=generic):
        capture_kv(model, ids)


# parameter counts of the real checkpoints these shapes copy (embeddings included, tied where the real one ties)
REAL_SIZES = {"qwen3-1.7b": 1_720_574_976, "qwen3-8b": 8_190_735_360, "llama-3.1-8b": 8_030_261_248,
              "mistral-7b": 7_248_023_552, "gemma-2-9b": 9_241_705_984, "phi-4": 14_659_507_200}


@pytest.mark.parametrize("name", sorted(REAL_SIZES))
def test_random_aliases_have_the_real_shapes(name):
    from kvfuse.models.load import load

    model = random_model(name, device="meta")
    assert sum(p.numel() for p in model.parameters()) == REAL_SIZES[name]
    family = {"qwen3": "qwen3", "llama": "llama", "mistral": "mistral", "gemma": "gemma2", "phi": "phi3"}
    assert model.config.model_type == family[name.split("-")[0]]
    assert name in REAL_SHAPES
    with pytest.raises(ValueError, match="unknown random model shape"):
        load("random:" + name + "-nope")


# students whose RoPE differs by layer: a NoPE layer, partial rotary, and per-layer attention scalings (Gemma3 with
# yarn on its global layers only: 1.0 on the local ones, > 1 on the global ones)
_YARN_GLOBAL = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                                   "original_max_position_embeddings": 16}}
DISTILL_STUDENTS = {"tiny-smollm3": {}, "tiny-phi": {}, "tiny-gemma3": {"rope_parameters": _YARN_GLOBAL}}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", sorted(DISTILL_STUDENTS))
def test_distillation_from_itself_is_lossless_whatever_the_rope(name, backend):
    """DistillationModel with the student as its own teacher (pre-RoPE keys, identity adapters): the fused loss
    rotates the teacher keys with the student's RoPE as capture found it — each layer's rotary dim (0 on NoPE
    layers) and attention scaling — so the keys match exactly and k_mse vanishes on every layer. One scaling for
    all layers (what distill passed before) fails the Gemma3 case."""
    from kvfuse.distill import DistillationModel
    from kvfuse.fuse.router import FixedRouter
    from kvfuse.loss import KVDistillLoss

    student = tiny_model(name, seed=2, **DISTILL_STUDENTS[name])
    ids, mask = _padded_batch()
    ids, mask = ids[:3], mask[:3]                  # the loss needs supervised tokens in every row
    positions = capture.positions_from_mask(mask)
    cap = capture_kv(student, ids, mask)
    assert len({r.rotary_dim for r in cap.rope}) > 1 or len({r.attention_scaling for r in cap.rope}) > 1 \
        or cap.rope[0].rotary_dim < cap.keys[0].shape[-1]
    h, d, n = cap.keys[0].shape[1], cap.keys[0].shape[-1], cap.num_layers
    eye = torch.eye(h * d).expand(n, h * d, h * d).clone()
    kv_loss = KVDistillLoss([(h, d)], (h, d), n, init=[(eye, eye.clone())], backend=backend)
    model = DistillationModel(student, kv_loss, FixedRouter([1.0]))
    batch = {"input_ids": ids, "attention_mask": mask, "positions": positions, "mask": mask.bool(),
             "labels_mask": mask.bool(), "teacher_k": [torch.stack(cap.keys)], "teacher_v": [torch.stack(cap.values)]}
    loss, logs = model(batch)
    torch.testing.assert_close(logs["k_mse"], torch.zeros(n), rtol=0, atol=1e-10)
    torch.testing.assert_close(logs["cos"], torch.ones(n), rtol=0, atol=1e-5)
    assert float(loss.detach()) < 1e-5
