import numpy as np
import pytest
import scipy.linalg
import torch

from kvfuse.zspace import ZSpace, barlow_twins_loss, cca_loss, cosine_loss, mse_loss


def _pair(n=64, d=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=gen, dtype=torch.float64)
    b = a @ torch.randn(d, d, generator=gen, dtype=torch.float64) + 0.5 * torch.randn(n, d, generator=gen,
                                                                                        dtype=torch.float64)
    return a, b


def test_barlow_twins_equals_direct_formula():
    a, b = _pair()
    an, bn = a.numpy(), b.numpy()
    za = (an - an.mean(0)) / (an.std(0) + 1e-5)
    zb = (bn - bn.mean(0)) / (bn.std(0) + 1e-5)
    c = za.T @ zb / len(an)
    expected = sum((1 - c[i, i]) ** 2 for i in range(6)) + 5e-3 * sum(
        c[i, j] ** 2 for i in range(6) for j in range(6) if i != j)
    assert float(barlow_twins_loss(a, b)) == pytest.approx(expected, rel=1e-10)


def test_cca_equals_direct_formula():
    a, b = _pair(seed=1)
    an, bn = a.numpy() - a.numpy().mean(0), b.numpy() - b.numpy().mean(0)
    n = len(an)
    eps = 1e-4
    saa = an.T @ an / (n - 1) + eps * np.eye(6)
    sbb = bn.T @ bn / (n - 1) + eps * np.eye(6)
    sab = an.T @ bn / (n - 1)
    t = np.linalg.inv(scipy.linalg.sqrtm(saa)).real @ sab @ np.linalg.inv(scipy.linalg.sqrtm(sbb)).real
    correlations = np.linalg.svd(t, compute_uv=False)
    assert correlations.max() <= 1 + 1e-6
    assert float(cca_loss(a, b)) == pytest.approx(-correlations.sum() / 6, rel=1e-8)
    # identical views are perfectly correlated
    assert float(cca_loss(a, a)) == pytest.approx(-1.0, abs=1e-3)


def test_mse_cosine():
    a, b = _pair(seed=2)
    assert float(mse_loss(a, b)) == pytest.approx(float(((a - b) ** 2).mean()))
    assert float(cosine_loss(a, a)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("loss", ["mse", "cosine", "barlow", "cca"])
def test_z_training_reduces_its_loss(loss):
    gen = torch.Generator().manual_seed(3)
    B, T = 4, 24
    latent = torch.randn(B, T, 8, generator=gen)
    teachers = [latent @ torch.randn(8, 20, generator=gen), latent @ torch.randn(8, 12, generator=gen)]
    student = latent @ torch.randn(8, 16, generator=gen) + 0.1 * torch.randn(B, T, 16, generator=gen)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 20:] = False
    z = ZSpace([20, 12], 16, z_dim=8, loss=loss)
    alpha = torch.tensor([[0.6, 0.4]]).expand(B, 2)
    opt = torch.optim.Adam([p for p in z.parameters() if p.requires_grad], lr=1e-2)
    first = z(student, teachers, alpha, mask).item()
    for _ in range(150):
        opt.zero_grad()
        value = z(student, teachers, alpha, mask)
        value.backward()
        opt.step()
    final = value.item()
    if loss == "cca":
        # CCA is invariant to the linear maps' scale and mixing, so it starts near its optimum on linear data.
        assert final < first and final < -0.99, (first, final)
    else:
        assert final < first - 0.05 * abs(first), (first, final)
    assert not z.teacher_maps[0].weight.requires_grad if loss in ("mse", "cosine") else True


def test_zspace_errors():
    z = ZSpace([4], 4, z_dim=2)
    with pytest.raises(ValueError, match="alpha must be"):
        z(torch.randn(1, 3, 4), [torch.randn(1, 3, 4)], torch.ones(1, 2), torch.ones(1, 3))
    with pytest.raises(ValueError, match="z loss must be"):
        ZSpace([4], 4, loss="l1")


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss", ["mse", "barlow"])
def test_zspace_in_bf16_as_a_bf16_engine_casts_it(kv_dtype, loss):
    # A DeepSpeed bf16 engine holds the Z maps in bf16; fp32 KV then failed Phase 5's first evaluation ("expected
    # m1 and m2 to have the same dtype"). Any float KV goes in, an fp32 loss comes out, equal to the fp32 copy's to
    # bf16 precision, and the gradient reaches the bf16 maps.
    torch.manual_seed(0)
    z = ZSpace([24, 16], 20, z_dim=8, loss=loss)
    s, t = torch.randn(2, 7, 20), [torch.randn(2, 7, 24), torch.randn(2, 7, 16)]
    alpha, mask = torch.tensor([[0.3, 0.7], [0.5, 0.5]]), torch.ones(2, 7, dtype=torch.bool)
    ref = z(s, t, alpha, mask)
    z16 = z.to(torch.bfloat16)
    got = z16(s.to(kv_dtype), [x.to(kv_dtype) for x in t], alpha, mask)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    assert abs(float(got) - float(ref)) <= 0.05 * abs(float(ref)) + 1e-3, (float(got), float(ref))
    got.backward()
    assert z16.student_map.weight.grad is not None and z16.student_map.weight.grad.dtype == torch.bfloat16
    zs, zt = z16.embed(s, t)
    assert zs.dtype == torch.float32 and all(x.dtype == torch.float32 for x in zt)
