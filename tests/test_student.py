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
