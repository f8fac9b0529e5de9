"""Layer map M: row-stochastic, the documented formulas per mode, edge cases, and apply_layer_map."""
import pytest
import torch

from kvfuse.align.layers import MODES, apply_layer_map, layer_map

SIZES = [(30, 30), (30, 18), (18, 30), (7, 3), (3, 7), (1, 5), (5, 1), (1, 1), (30, 3), (4, 8)]


@pytest.mark.parametrize("n_t,n_s", SIZES)
@pytest.mark.parametrize("mode", MODES)
def test_row_stochastic(mode, n_t, n_s):
    m = layer_map(n_t, n_s, mode)
    assert m.shape == (n_s, n_t) and m.dtype == torch.float32
    assert (m >= 0).all()
    torch.testing.assert_close(m.sum(dim=1), torch.ones(n_s))


def test_interpolate_formula():
    n_t, n_s = 30, 18
    m = layer_map(n_t, n_s, "interpolate").double()
    depth = (m * torch.arange(n_t, dtype=torch.float64)).sum(dim=1)  # expected teacher depth of each row
    torch.testing.assert_close(depth, torch.arange(n_s, dtype=torch.float64) * (n_t - 1) / (n_s - 1), rtol=0, atol=1e-6)
    assert m[0, 0] == 1 and m[-1, -1] == 1
    assert ((m > 0).sum(dim=1) <= 2).all()
    assert layer_map(5, 1, "interpolate")[0, 2] == 1  # one student layer sits at the middle depth
    torch.testing.assert_close(layer_map(4, 1, "interpolate")[0], torch.tensor([0.0, 0.5, 0.5, 0.0]))
    torch.testing.assert_close(layer_map(30, 30, "interpolate"), torch.eye(30))


def test_round_is_nearest():
    m = layer_map(7, 3, "round")
    assert m.tolist() == [[1, 0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0, 1]]
    m = layer_map(4, 3, "round")  # depths 0, 1.5, 3: half rounds up
    assert m.argmax(dim=1).tolist() == [0, 2, 3]


def test_ratio_mean_averages_landing_teacher_layers():
    m = layer_map(7, 3, "ratio_mean")
    landing = [0, 0, 1, 1, 2, 2, 2]  # round-half-up of l_t·3/7 = 0, .43, .86, 1.29, 1.71, 2.14, 2.57 (3 clamped to 2)
    expected = torch.zeros(3, 7)
    for l_t, l_s in enumerate(landing):
        expected[l_s, l_t] = 1.0
    expected = expected / expected.sum(dim=1, keepdim=True)
    torch.testing.assert_close(m, expected)
    # Student deeper than teacher: layers no teacher lands on fall back to the nearest landing point.
    m = layer_map(4, 8, "ratio_mean")  # teacher l_t lands on 0, 2, 4, 6
    assert m.argmax(dim=1).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert ((m == 1) | (m == 0)).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_student_layers"):
        layer_map(4, 0)
    with pytest.raises(ValueError, match="mode"):
        layer_map(4, 2, "cubic")


def test_apply_layer_map_against_dense_einsum():
    g = torch.Generator().manual_seed(0)
    per_layer = [torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64) for _ in range(7)]
    for mode in MODES:
        m = layer_map(7, 3, mode)
        out = apply_layer_map(m, per_layer)
        ref = torch.einsum("st,t...->s...", m.double(), torch.stack(per_layer))
        assert out.shape == (3, 2, 3, 5, 4)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    stacked = torch.stack(per_layer).to(torch.bfloat16)
    out = apply_layer_map(layer_map(7, 3), stacked)
    assert out.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="L_t=7"):
        apply_layer_map(layer_map(7, 3), per_layer[:6])
    with pytest.raises(ValueError, match="teacher layer 2"):
        apply_layer_map(layer_map(3, 2), [per_layer[0], per_layer[1], per_layer[2][0]])
