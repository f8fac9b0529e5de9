import pytest
import torch

from kvfuse.models.student import make_student, student_layer_count
from kvfuse.models.tiny import tiny_model


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_every_other_layer_student_runs_and_keeps_even_layers(name):
    full = tiny_model(name, seed=1)
    reference = [layer.self_attn.k_proj.weight.clone() for layer in full.model.layers]
    student = make_student(tiny_model(name, seed=1), "every_other")
    assert student.config.num_hidden_layers == student_layer_count(full, "every_other") == 2
    for new, old in enumerate(range(0, 4, 2)):
        assert torch.equal(student.model.layers[new].self_attn.k_proj.weight, reference[old])
    if name == "tiny-gemma3":
        assert student.config.layer_types == ["sliding_attention", "sliding_attention"]
    ids = torch.randint(0, 512, (2, 13))
    out = student(ids, use_cache=True)
    assert out.logits.shape == (2, 13, 512) and len(out.past_key_values.layers) == 2
    assert make_student(full, "all") is full
    with pytest.raises(ValueError, match="student_layers must be"):
        student_layer_count(full, "half")


@pytest.mark.parametrize("name,overrides,rotary_dims", [
    ("tiny-smollm3", {"no_rope_layers": [1, 1, 0, 1]}, [16, 0]),    # kept layers 0 and 2: RoPE, then NoPE
    ("tiny-gpt-neox", {}, [4, 4]),                                  # decoder under .gpt_neox, attention .attention
])
def test_every_other_layer_student_of_other_families(name, overrides, rotary_dims):
    from kvfuse.models.capture import capture_kv

    overrides = {"num_hidden_layers": 4, "layer_types": ["full_attention"] * 4, **overrides}
    full = tiny_model(name, seed=2, **overrides)
    student = make_student(tiny_model(name, seed=2, **overrides), "every_other")
    ids = torch.randint(1, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    kept, every = capture_kv(student, ids), capture_kv(full, ids)
    assert kept.rotary_dims == rotary_dims and student.config.num_hidden_layers == 2
    assert student.config.layer_types == ["full_attention"] * 2
    if "no_rope_layers" in overrides:
        assert student.config.no_rope_layers == overrides["no_rope_layers"][::2]
    # layer 0 sees the same input in both models, so its keys agree; the attention indices were renumbered
    torch.testing.assert_close(kept.keys[0], every.keys[0], rtol=0, atol=0)
    assert [m.layer_idx for m in student.modules() if hasattr(m, "layer_idx")][-1] == 1
    out = student(ids, use_cache=True)
    assert len(out.past_key_values.layers) == 2
    torch.testing.assert_close(kept.post_rope_keys(1), out.past_key_values.layers[1].keys, rtol=0, atol=0)
