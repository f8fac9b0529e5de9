import math

import pytest
import torch

from kvfuse.fuse.router import (FixedRouter, LearnableRouter, SimilarityRouter, compute_prototypes, entropy,
                                first_tokens_feature,
                                entropy_regularizer, layer_groups, pooled_features)


def _is_distribution(alpha):
    return bool((alpha >= 0).all()) and torch.allclose(alpha.sum(-1), torch.ones(alpha.shape[:-1]), atol=1e-6)


def test_fixed_router_normalises_and_is_layer_aware():
    alpha = FixedRouter([7, 3])(batch_size=4)
    assert alpha.shape == (4, 2) and torch.allclose(alpha[0], torch.tensor([0.7, 0.3]))
    layered = FixedRouter(torch.rand(5, 3) + 0.1)(batch_size=2)
    assert layered.shape == (2, 5, 3) and _is_distribution(layered)
    with pytest.raises(ValueError, match="non-negative"):
        FixedRouter([1.0, -0.5])


def test_similarity_router_picks_the_matching_prototype():
    gen = torch.Generator().manual_seed(1)
    protos = torch.randn(3, 16, generator=gen)
    alpha = SimilarityRouter(protos, temperature=0.05)(protos.clone())   # sample i's feature == prototype i
    assert _is_distribution(alpha) and alpha.argmax(-1).tolist() == [0, 1, 2]
    per_teacher = torch.randn(2, 3, 16, generator=gen)
    per_teacher[0, 2] = protos[2] * 3.0          # cosine is scale-free
    assert SimilarityRouter(protos, 0.05)(per_teacher)[0].argmax() == 2
    grouped = SimilarityRouter(torch.randn(2, 3, 16, generator=gen), 0.1, n_layers=6)(torch.randn(4, 16))
    assert grouped.shape == (4, 6, 3) and _is_distribution(grouped)
    assert torch.equal(grouped[:, 0], grouped[:, 2]) and not torch.equal(grouped[:, 0], grouped[:, 3])
    assert compute_prototypes(torch.ones(3, 5, 16) * torch.arange(3.0)[:, None, None]).shape == (3, 16)


def test_learnable_router_shapes_and_gradient_reaches_it():
    router = LearnableRouter(feature_dim=12, n_teachers=3, n_layers=8, n_groups=2)
    feats = torch.randn(5, 12)
    alpha = router(feats)
    assert alpha.shape == (5, 8, 3) and _is_distribution(alpha)
    assert torch.allclose(alpha, torch.full_like(alpha, 1 / 3))      # starts uniform
    (alpha[..., 0] * torch.arange(8.0)).sum().backward()
    assert router.out.weight.grad.abs().sum() > 0
    assert LearnableRouter(12, 2)(feats).shape == (5, 2)


@pytest.mark.parametrize("features_dtype", [torch.float32, torch.bfloat16])
def test_learnable_router_in_bf16_as_a_bf16_engine_casts_it(features_dtype):
    # A DeepSpeed bf16 engine holds the router in bf16 (the GPU-scale Phase 4 runs failed on fp32 features then):
    # it routes features of any float dtype, returns fp32 α, and agrees with its fp32 copy to bf16 precision.
    torch.manual_seed(0)
    router = LearnableRouter(feature_dim=12, n_teachers=3)
    torch.nn.init.normal_(router.out.weight)
    feats = torch.randn(5, 12)
    alpha16 = router.to(torch.bfloat16)(feats.to(features_dtype))
    alpha32 = router.float()(feats)
    assert alpha16.dtype == torch.float32 and _is_distribution(alpha16)
    assert torch.allclose(alpha16, alpha32, atol=3e-2) and not torch.allclose(alpha32, torch.full_like(alpha32, 1 / 3))


def test_entropy_regulariser_moves_alpha_the_intended_way():
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(0)) * 2
    for target, direction in (("diversity", +1), ("specialise", -1)):
        param = logits.clone().requires_grad_(True)
        opt = torch.optim.SGD([param], lr=0.5)
        before = float(entropy(torch.softmax(logits, -1)).mean())
        for _ in range(20):
            opt.zero_grad()
            entropy_regularizer(torch.softmax(param, -1), weight=1.0, target=target, collapse_guard=0.0).backward()
            opt.step()
        after = float(entropy(torch.softmax(param.detach(), -1)).mean())
        assert (after - before) * direction > 0.05, (target, before, after)


def test_collapse_guard_keeps_the_batch_spread():
    # Every sample starts preferring teacher 0: specialising without a guard collapses, the guard spreads them.
    logits = torch.randn(8, 2, generator=torch.Generator().manual_seed(2)) * 0.1 + torch.tensor([1.0, 0.0])
    param = logits.clone().requires_grad_(True)
    opt = torch.optim.SGD([param], lr=1.0)
    for _ in range(200):
        opt.zero_grad()
        entropy_regularizer(torch.softmax(param, -1), weight=1.0, target="specialise", collapse_guard=4.0).backward()
        opt.step()
    marginal = torch.softmax(param.detach(), -1).mean(0)
    assert float(entropy(marginal)) > 0.6 * math.log(2), marginal


def test_helpers_validate():
    assert layer_groups(6, 2).tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="n_groups"):
        layer_groups(2, 3)
    h = torch.randn(2, 4, 3)
    m = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert torch.allclose(pooled_features(h, m)[0], h[0, :2].mean(0))
    with pytest.raises(ValueError, match=r"samples \[1\] have no valid token"):
        pooled_features(h, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="entropy target"):
        entropy_regularizer(torch.full((2, 2), 0.5), 1.0, target="nope")


def test_similarity_router_per_teacher_spaces_and_first_token_feature():
    gen = torch.Generator().manual_seed(4)
    teacher_v = [torch.randn(3, 2, 2, 9, 4, generator=gen), torch.randn(3, 2, 1, 9, 6, generator=gen)]
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 5:] = False
    feats = [first_tokens_feature(v, mask, k=4) for v in teacher_v]
    assert feats[0].shape == (2, 8) and feats[1].shape == (2, 6)
    assert torch.allclose(feats[1][1], teacher_v[1][:, 1, :, :4].mean(dim=(0, 2)).reshape(-1), atol=1e-6)
    # sample 0 matches teacher 0's prototype exactly, sample 1 matches teacher 1's
    router = SimilarityRouter([feats[0][0], feats[1][1]], temperature=0.01)
    alpha = router(feats)
    assert alpha.shape == (2, 2) and alpha[0].argmax() == 0 and alpha[1].argmax() == 1
