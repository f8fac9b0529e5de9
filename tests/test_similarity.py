"""Linear CKA: the streaming accumulator equals the materialised reference; the invariances it is used for hold."""
import pytest
import torch

from kvfuse.eval.similarity import CKAAccumulator, linear_cka, token_features


def _pair(n=301, f1=24, f2=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, f1, generator=g) * 3 + 1.5          # off-centre: centring must matter
    y = x @ torch.randn(f1, f2, generator=g) + 0.5 * torch.randn(n, f2, generator=g) - 2.0
    return x, y


def test_streaming_equals_reference_over_uneven_chunks():
    x, y = _pair()
    acc = CKAAccumulator()
    for lo, hi in ((0, 7), (7, 150), (150, 151), (151, 301)):
        acc.update(x[lo:hi], y[lo:hi])
    assert acc.n == 301
    assert acc.value() == pytest.approx(linear_cka(x, y), rel=1e-10)


def test_invariances_and_range():
    x, y = _pair(seed=1)
    base = linear_cka(x, y)
    assert 0.3 < base < 1.0
    q, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64))
    assert linear_cka(x, (y.double() @ q) * 7.5 + 3.0) == pytest.approx(base, rel=1e-9)   # rotation, scale, shift
    assert linear_cka(x, x) == pytest.approx(1.0, rel=1e-12)
    noise = torch.randn(301, 40, generator=torch.Generator().manual_seed(9))
    assert linear_cka(x, noise) < 0.5 * base                 # unrelated features score far lower
    # an anisotropic rescaling is *not* an invariance: CKA must see it
    assert linear_cka(x, y * torch.linspace(0.01, 10, 40)) != pytest.approx(base, rel=1e-3)


def test_token_features_keep_only_valid_tokens_in_order():
    k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    mask = torch.tensor([[0, 1, 1, 0, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    feats = token_features(k, v, mask)
    assert feats.shape == (4, 3 * 8)
    assert torch.equal(feats[0, :4], k[0, 0, 1]) and torch.equal(feats[0, 4:8], v[0, 0, 1])
    assert torch.equal(feats[3, 8:12], k[1, 1, 0])


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="same n"):
        linear_cka(torch.randn(5, 3), torch.randn(6, 3))
    acc = CKAAccumulator()
    acc.update(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="another width"):
        acc.update(torch.randn(4, 5), torch.randn(4, 2))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        CKAAccumulator().value()
