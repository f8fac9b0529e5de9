"""capture_kv: pre-RoPE keys re-rotated equal the model's own cached keys; values equal; every position returned."""
import pytest
import torch

from kvfuse.align.rope import rope_from_rotary, rotate
from kvfuse.models.capture import capture_kv, positions_from_mask
from kvfuse.models.tiny import tiny_model

ARCHS = ["tiny-llama", "tiny-qwen2", "tiny-gemma3"]


def _batch(seed: int, batch: int, length: int, left_pad: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 512, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, :left_pad] = 0
    return ids, mask


def _cached(model, ids, mask, positions):
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    return [(layer.keys, layer.values) for layer in out.past_key_values.layers]


@pytest.mark.parametrize("arch", ARCHS)
def test_rotated_capture_equals_cache(arch):
    model = tiny_model(arch, seed=3)
    length = 19  # > Gemma3's sliding window of 8
    ids, mask = _batch(seed=11, batch=3, length=length, left_pad=5)
    cap = capture_kv(model, ids, mask)
    cache = _cached(model, ids, mask, cap.positions)
    assert cap.num_layers == model.config.num_hidden_layers == len(cache)
    assert torch.equal(cap.positions, positions_from_mask(mask))
    assert cap.positions[-1, 5:].tolist() == list(range(length - 5))
    truncated_layers = 0
    for i, (ck, cv) in enumerate(cache):
        k, v = cap.keys[i], cap.values[i]
        assert k.shape == (3, model.config.num_key_value_heads, length, k.shape[-1])  # every position, always
        kept = ck.shape[-2]
        truncated_layers += kept < length
        torch.testing.assert_close(rotate(k, cap.positions, *cap.rope[i])[..., -kept:, :], ck, rtol=0, atol=1e-6)
        torch.testing.assert_close(v[..., -kept:, :], cv, rtol=0, atol=0)
        assert float(k.norm()) > 0 and float(v.norm()) > 0
    if arch == "tiny-gemma3":
        assert truncated_layers == 2  # the sliding layers' cache really dropped tokens; capture did not
        assert cap.layer_types[0] == "sliding_attention" and cap.layer_types[1] == "full_attention"
        assert not torch.equal(cap.rope[0][0], cap.rope[1][0])  # local and global bases differ


def test_gemma3_keys_are_after_k_norm():
    model = tiny_model("tiny-gemma3", seed=0)
    with torch.no_grad():
        model.model.layers[0].self_attn.k_norm.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(1))
    ids, _ = _batch(seed=2, batch=1, length=10, left_pad=0)
    cap = capture_kv(model, ids)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        raw = attn.k_proj(hidden).view(1, 10, -1, attn.head_dim).transpose(1, 2)
    torch.testing.assert_close(cap.keys[0], attn.k_norm(raw).detach())
    assert not torch.allclose(cap.keys[0], raw.detach(), atol=1e-3)


ROPE_TYPES = {
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16},
}


@pytest.mark.parametrize("rope_type", sorted(ROPE_TYPES))
def test_rope_scaling_types_come_from_the_model(rope_type):
    model = tiny_model("tiny-llama", seed=1, rope_parameters=ROPE_TYPES[rope_type], max_position_embeddings=16)
    ids, mask = _batch(seed=5, batch=2, length=37, left_pad=3)  # longer than 16 so dynamic really rescales
    before = rope_from_rotary(model.model.rotary_emb)
    cap = capture_kv(model, ids, mask)
    cache = _cached(model, ids, mask, cap.positions)
    for i, (ck, _) in enumerate(cache):
        torch.testing.assert_close(rotate(cap.keys[i], cap.positions, *cap.rope[i]), ck, rtol=0, atol=1e-6)
    if rope_type == "dynamic":
        assert not torch.allclose(before.inv_freq, cap.rope[0].inv_freq)  # the forward rescaled; capture saw that
    if rope_type == "yarn":
        assert cap.rope[0][1] > 1.0


def test_student_capture_keeps_gradients():
    model = tiny_model("tiny-qwen2", seed=0)
    ids, _ = _batch(seed=4, batch=2, length=7, left_pad=0)
    cap = capture_kv(model, ids, requires_grad=True)
    sum(k.square().sum() + v.square().sum() for k, v in zip(cap.keys, cap.values)).backward()
    assert model.model.layers[-1].self_attn.k_proj.bias.grad.abs().sum() > 0
    teacher = capture_kv(model, ids)
    assert not teacher.keys[0].requires_grad


# + the families whose capture assembles keys: rotary slice + pass-through (Phi), NoPE layer (SmolLM3), interleaved
# pairs permuted (Cohere) — all of it has to happen inside the checkpoint, where the recompute repeats it
@pytest.mark.parametrize("arch", ARCHS + ["tiny-phi", "tiny-smollm3", "tiny-cohere"])
def test_checkpointed_capture_gives_the_same_kv_and_gradients(arch):
    # A loss on the captured KV (+ queries, + hidden) must reach every weight with checkpointing exactly as without:
    # HF's own reentrant checkpointing silently cut the KV off from the weights (a KV-only student never learned).
    model = tiny_model(arch, seed=1).train()
    ids, mask = _batch(seed=5, batch=2, length=11, left_pad=3)
    grads, caps = [], []
    for checkpoint in (False, True):
        model.zero_grad(set_to_none=True)
        cap = capture_kv(model, ids, mask, requires_grad=True, with_queries=True, return_hidden=True,
                         checkpoint=checkpoint)
        w = torch.linspace(0.5, 1.5, cap.num_layers)
        loss = sum(w[l] * (cap.keys[l].square().mean() + cap.values[l].sin().mean() + cap.queries[l].cos().mean())
                   for l in range(cap.num_layers)) + cap.hidden.square().mean()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        caps.append(cap)
    plain, ckpt = grads
    assert set(plain) == set(ckpt) and any("layers.0.self_attn.k_proj" in n for n in ckpt)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
    for a, b in zip(caps[0].keys + caps[0].values + caps[0].queries, caps[1].keys + caps[1].values + caps[1].queries):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert "forward" not in vars(model.model.layers[0])        # the per-layer patch is gone afterwards
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="own \\(HF\\) gradient checkpointing is on"):
        capture_kv(model, ids, mask, requires_grad=True)
    capture_kv(model.eval(), ids, mask, requires_grad=True)      # HF checkpoints only in training mode


def test_checkpointed_capture_reaches_lora_weights_under_frozen_embeddings():
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(tiny_model("tiny-llama", seed=2), LoraConfig(r=4, target_modules=["k_proj", "v_proj"]))
    model.train()
    ids, mask = _batch(seed=6, batch=2, length=9, left_pad=2)
    cap = capture_kv(model.get_base_model(), ids, mask, requires_grad=True, checkpoint=True)
    sum(k.square().mean() + v.square().mean() for k, v in zip(cap.keys, cap.values)).backward()
    lora = [p for n, p in model.named_parameters() if "lora_B" in n]     # B starts at 0, so A gets no grad yet
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)


def test_errors_name_the_problem():
    model = tiny_model("tiny-llama")
    with pytest.raises(ValueError, match="input_ids must be"):
        capture_kv(model, torch.randint(0, 512, (5,)))
    with pytest.raises(ValueError, match="attention_mask shape"):
        capture_kv(model, torch.randint(0, 512, (2, 5)), torch.ones(2, 4))
    model.config.model_type = "deepseek_v3"
    model.config.architectures = ["DeepseekV3ForCausalLM"]
    with pytest.raises(ValueError, match="DeepseekV3ForCausalLM.*multi-head latent attention"):
        capture_kv(model, torch.randint(0, 512, (1, 5)))


@pytest.mark.parametrize("arch", ARCHS)
def test_queries_and_hidden_reproduce_attention_and_logits(arch):
    """Rotated queries · rotated keys give the model's own attention maps (full-attention layers; padded row
    included); the final hidden state through the LM head gives its logits."""
    model = tiny_model(arch, seed=6)
    ids, mask = _batch(seed=8, batch=2, length=12, left_pad=4)
    cap = capture_kv(model, ids, mask, with_queries=True, return_hidden=True)
    out = model(input_ids=ids, attention_mask=mask, position_ids=cap.positions, output_attentions=True)
    torch.testing.assert_close(model.lm_head(cap.hidden), out.logits, rtol=0, atol=1e-5)
    allowed = torch.tril(torch.ones(12, 12, dtype=torch.bool)) & mask.bool()[:, None, None, :]
    checked = 0
    for i, attn in enumerate(model.model.layers):
        if cap.layer_types[i] != "full_attention":
            continue
        q = rotate(cap.queries[i], cap.positions, *cap.rope[i])
        k = rotate(cap.keys[i], cap.positions, *cap.rope[i])
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scores = (q @ k.transpose(-1, -2)) * attn.self_attn.scaling
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        real = mask.bool()[:, None, :, None].expand_as(probs)  # rows of padding tokens are not meaningful
        torch.testing.assert_close(probs[real], out.attentions[i][real], rtol=0, atol=1e-5)
        checked += 1
    assert checked >= 2
    assert capture_kv(model, ids, mask).queries is None


@pytest.mark.parametrize("alias,length", [("smollm2-135m-instruct", 33), ("gemma3-270m", 520)])
def test_real_packaged_models(alias, length, request):
    """The packaged pretrained models (converted once, cached); Gemma3 runs past its 512-token window."""
    fixture = {"smollm2-135m-instruct": "smollm2_model", "gemma3-270m": "gemma3_model"}[alias]
    model, _ = request.getfixturevalue(fixture)  # loaded once per session (tests/conftest.py)
    ids = torch.randint(10, 30000, (1, length), generator=torch.Generator().manual_seed(0))
    cap = capture_kv(model, ids)
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=cap.positions, use_cache=True)
    kept_lengths = set()
    for i, layer in enumerate(out.past_key_values.layers):
        kept = layer.keys.shape[-2]
        kept_lengths.add(kept)
        assert cap.keys[i].shape[-2] == length
        rotated = rotate(cap.keys[i], cap.positions, *cap.rope[i])[..., -kept:, :]
        torch.testing.assert_close(rotated, layer.keys, rtol=0, atol=1e-5 * float(layer.keys.abs().max()))
        torch.testing.assert_close(cap.values[i][..., -kept:, :], layer.values, rtol=0, atol=0)
    if alias == "gemma3-270m":
        assert min(kept_lengths) < length == max(kept_lengths)
        local = cap.layer_types.index("sliding_attention")
        glob = cap.layer_types.index("full_attention")
        assert not torch.equal(cap.rope[local][0], cap.rope[glob][0])


def test_captures_in_two_threads_and_the_helpers_put_back():
    """Two models of one family captured concurrently (the wrapped helpers are shared, the records are per thread),
    each also by two threads at once (serialised per model: its layer forwards are patched per capture), give what
    serial captures give; afterwards, and after a forward that fails, the modeling module's own helpers are back."""
    from concurrent.futures import ThreadPoolExecutor

    from transformers.models.qwen3 import modeling_qwen3

    originals = modeling_qwen3.apply_rotary_pos_emb, modeling_qwen3.ALL_ATTENTION_FUNCTIONS
    models = [tiny_model("tiny-qwen3", seed=s) for s in (0, 1)]
    ids, mask = _batch(seed=3, batch=2, length=9, left_pad=2)
    serial = [capture_kv(m, ids, mask) for m in models]
    with ThreadPoolExecutor(max_workers=2) as pool:
        caps = list(pool.map(lambda m: capture_kv(m, ids, mask), models * 3))
    for i, cap in enumerate(caps):
        for a, b in zip(cap.keys + cap.values, serial[i % 2].keys + serial[i % 2].values):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (modeling_qwen3.apply_rotary_pos_emb, modeling_qwen3.ALL_ATTENTION_FUNCTIONS) == originals
    with pytest.raises(IndexError):
        capture_kv(models[0], torch.full((1, 4), 10_000))       # fails inside the forward (no such token)
    assert (modeling_qwen3.apply_rotary_pos_emb, modeling_qwen3.ALL_ATTENTION_FUNCTIONS) == originals
    assert "forward" not in vars(models[0].model.layers[0])


def test_a_rotary_module_whose_cos_rotate_does_not_reproduce_is_refused():
    model = tiny_model("tiny-llama", seed=2)
    rotary = model.model.rotary_emb
    forward = rotary.forward
    rotary.forward = lambda *args, **kwargs: tuple(t * 1.01 for t in forward(*args, **kwargs))
    ids, mask = _batch(seed=3, batch=2, length=9, left_pad=2)
    with pytest.raises(ValueError, match="layer 0's RoPE cos differs from rotate's"):
        capture_kv(model, ids, mask)


def test_the_rope_check_reads_the_device_on_a_models_first_capture_and_when_its_inv_freq_changes(count_host_reads):
    model = tiny_model("tiny-llama", seed=4)
    ids, mask = _batch(seed=6, batch=2, length=9, left_pad=2)

    def reads() -> int:
        with count_host_reads() as counted:
            capture_kv(model, ids, mask)
        return counted.n
    first, again = reads(), reads()
    assert first == again + 1          # one rotary table, checked once; the model's own reads stay in both counts
    with torch.no_grad():
        model.model.rotary_emb.inv_freq.mul_(1.0)       # an in-place edit: same values, a new version
    assert reads() == first
    model.model.rotary_emb.register_buffer("inv_freq", model.model.rotary_emb.inv_freq.clone(), persistent=False)
    assert reads() == first and reads() == again   # a new tensor is checked once, then trusted again


def test_an_inference_tensor_inv_freq_is_checked_on_every_capture(count_host_reads):
    # no version counter to see an in-place edit by: never trusted from one capture to the next
    model = tiny_model("tiny-llama", seed=4)
    rotary = model.model.rotary_emb
    with torch.inference_mode():
        frozen = rotary.inv_freq.clone()
    rotary.register_buffer("inv_freq", frozen, persistent=False)
    ids, mask = _batch(seed=6, batch=2, length=9, left_pad=2)

    def reads() -> int:
        with count_host_reads() as counted:
            cap = capture_kv(model, ids, mask)
        assert torch.equal(cap.rope[0].inv_freq, frozen)
        return counted.n
    assert reads() == reads()
    plain = tiny_model("tiny-llama", seed=4)
    with count_host_reads() as counted:
        capture_kv(plain, ids, mask)
    assert reads() == counted.n          # as many reads as a first capture, which checks
