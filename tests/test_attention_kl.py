import math

import pytest
import torch

from kvfuse.attention import attention_kl


def _loop_reference(q, ks, kf, mask, scale):
    """Per (batch, head, query) loops in float64: the definition, written out."""
    B, Hq, T, D = q.shape
    group = Hq // ks.shape[1]
    total, count = 0.0, 0
    for b in range(B):
        for h in range(Hq):
            for i in range(T):
                if not mask[b, i]:
                    continue
                keys = [j for j in range(i + 1) if mask[b, j]]
                ls = torch.stack([scale * q[b, h, i] @ ks[b, h // group, j] for j in keys]).double()
                lf = torch.stack([scale * q[b, h, i] @ kf[b, h // group, j] for j in keys]).double()
                ps, pf = ls.softmax(0), lf.softmax(0)
                total += float((ps * (ps.log() - pf.log())).sum())
                count += 1
    return total / count


@pytest.mark.parametrize("B,Hq,Hkv,T,D", [(2, 4, 2, 11, 8), (1, 3, 1, 7, 6), (2, 8, 8, 5, 4)])
def test_matches_loop_definition_with_padding(B, Hq, Hkv, T, D):
    gen = torch.Generator().manual_seed(B * 100 + T)
    q = torch.randn(B, Hq, T, D, generator=gen, dtype=torch.float64)
    ks = torch.randn(B, Hkv, T, D, generator=gen, dtype=torch.float64)
    kf = ks + 0.5 * torch.randn(B, Hkv, T, D, generator=gen, dtype=torch.float64)
    mask = torch.rand(B, T, generator=gen) > 0.3
    mask[:, 0] = False  # a left-padded start: its query row has no valid key
    mask[0, 1] = True
    got = attention_kl(q, ks, kf, mask)
    assert torch.isfinite(got)
    assert float(got) == pytest.approx(_loop_reference(q, ks, kf, mask, 1 / math.sqrt(D)), rel=1e-9)


def test_zero_when_keys_equal_and_gradients_finite():
    q = torch.randn(2, 4, 9, 8, requires_grad=True)
    k = torch.randn(2, 2, 9, 8)
    kf = k.clone().requires_grad_(True)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :3] = False
    loss = attention_kl(q, k, kf, mask)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    (attention_kl(q, k, kf + 0.3 * torch.randn_like(kf), mask)).backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(kf.grad).all() and kf.grad.abs().sum() > 0


def test_bad_inputs():
    q, k = torch.randn(1, 3, 5, 4), torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        attention_kl(q, k, k, torch.ones(1, 5))
    with pytest.raises(ValueError, match="selects no token"):
        attention_kl(torch.randn(1, 2, 5, 4), k, k, torch.zeros(1, 5))
    with pytest.raises(ValueError, match="mask must be"):
        attention_kl(torch.randn(1, 2, 5, 4), k, k, torch.ones(2, 5))
