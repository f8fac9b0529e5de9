"""RoPE: rotate vs a float64 per-pair reference (full, partial rotary, NoPE), exact inverse, broadcasting,
re-phasing on real (tiny) models."""
import math

import pytest
import torch

from kvfuse.align.rope import rephase, rotate, unrotate
from kvfuse.models.capture import capture_kv
from kvfuse.models.tiny import tiny_model


def _reference_rotate(x, positions, inv_freq, scale):
    """Float64, one (i, i + D/2) pair at a time, as a 2-D rotation by angle p·inv_freq[i]."""
    x = x.double()
    out = torch.empty_like(x)
    half = x.shape[-1] // 2
    for i in range(half):
        angle = positions.double() * float(inv_freq[i])
        c, s = torch.cos(angle), torch.sin(angle)
        a, b = x[..., i], x[..., i + half]
        out[..., i] = (a * c - b * s) * scale
        out[..., i + half] = (b * c + a * s) * scale
    return out


def _inv_freq(dim, base):
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


@pytest.mark.parametrize("dim,scale", [(2, 1.0), (18, 1.0), (64, 1.37)])
def test_rotate_matches_float64_reference(dim, scale):
    g = torch.Generator().manual_seed(dim)
    x = torch.randn(2, 3, 13, dim, generator=g)
    positions = torch.randint(0, 3000, (2, 13), generator=g)
    inv_freq = _inv_freq(dim, 10000.0)
    ref = _reference_rotate(x, positions[:, None, :], inv_freq, scale)
    torch.testing.assert_close(rotate(x.double(), positions, inv_freq.double(), scale), ref, rtol=1e-12, atol=1e-12)
    # float32 keeps HF's float32 angles: large positions cost ~1e-4 in the angle, nothing more.
    torch.testing.assert_close(rotate(x, positions, inv_freq, scale), ref.float(), rtol=0, atol=5e-3 * scale)


@pytest.mark.parametrize("dim,rotary_dim", [(16, 8), (16, 4), (12, 2), (16, 0)])
def test_partial_rotary_and_nope(dim, rotary_dim):
    """Only the first r dims turn, as pairs (i, i + r/2); the rest pass through and are not scaled; r = 0 is a
    NoPE layer (identity). unrotate inverts it, and rephase works between different rotary dims."""
    g = torch.Generator().manual_seed(dim + rotary_dim)
    x = torch.randn(2, 3, 11, dim, generator=g, dtype=torch.float64)
    positions = torch.randint(0, 2000, (2, 11), generator=g)
    inv_freq = _inv_freq(rotary_dim, 10000.0).double() if rotary_dim else torch.zeros(0, dtype=torch.float64)
    y = rotate(x, positions, inv_freq, 1.7, rotary_dim)
    if rotary_dim:
        ref = _reference_rotate(x[..., :rotary_dim], positions[:, None, :], inv_freq, 1.7)
        torch.testing.assert_close(y[..., :rotary_dim], ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y[..., rotary_dim:], x[..., rotary_dim:], rtol=0, atol=0)
    torch.testing.assert_close(unrotate(y, positions, inv_freq, 1.7, rotary_dim), x, rtol=1e-12, atol=1e-12)
    full = _inv_freq(dim, 500.0).double()
    moved = rephase(y, positions, (inv_freq, 1.7, rotary_dim), positions + 3, (full, 1.0, dim))
    torch.testing.assert_close(moved, rotate(x, positions + 3, full), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="rotary_dim"):
        rotate(x, positions, _inv_freq(6, 10.0).double(), 1.0, 8)
    with pytest.raises(ValueError, match="rotary_dim"):
        rotate(x, positions, inv_freq, 1.0, 3)
    with pytest.raises(ValueError, match="partial-rotary"):
        rotate(x, positions, _inv_freq(4, 10.0).double())


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_unrotate_is_exact_inverse(dtype, tol):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 2, 11, 32, generator=g, dtype=dtype)
    positions = torch.randint(0, 500, (3, 11), generator=g)
    inv_freq, scale = _inv_freq(32, 500000.0), 1.2
    torch.testing.assert_close(unrotate(rotate(x, positions, inv_freq, scale), positions, inv_freq, scale), x, rtol=tol, atol=tol)
    torch.testing.assert_close(rotate(unrotate(x, positions, inv_freq, scale), positions, inv_freq, scale), x, rtol=tol, atol=tol)
    assert not torch.allclose(rotate(x, positions, inv_freq, scale), x)


def test_norm_preserved_up_to_scale_and_broadcasting():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 9, 8, generator=g)  # [H, T, D] with positions [T]
    positions = torch.arange(5, 14)
    y = rotate(x, positions, _inv_freq(8, 100.0), 2.0)
    torch.testing.assert_close(y.norm(dim=-1), 2.0 * x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    per_head = torch.stack([rotate(x[h], positions, _inv_freq(8, 100.0), 2.0) for h in range(4)])
    torch.testing.assert_close(y, per_head)


def test_bad_shapes_are_rejected():
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="head dim"):
        rotate(x, torch.arange(5), _inv_freq(6, 10.0))
    with pytest.raises(ValueError, match="positions length"):
        rotate(x, torch.arange(4), _inv_freq(8, 10.0))
    with pytest.raises(ValueError, match="non-zero"):
        unrotate(x, torch.arange(5), _inv_freq(8, 10.0), 0.0)


def _prompted_batch(seed, prompt_lens, n_shared):
    """Rows = prompt_b + shared_b, left-padded to one length; returns ids, mask, and the shared ids alone."""
    g = torch.Generator().manual_seed(seed)
    total = max(prompt_lens) + n_shared
    shared = torch.randint(1, 512, (len(prompt_lens), n_shared), generator=g)
    ids = torch.zeros(len(prompt_lens), total, dtype=torch.long)
    mask = torch.zeros(len(prompt_lens), total, dtype=torch.long)
    for b, p in enumerate(prompt_lens):
        start = total - n_shared - p
        ids[b, start:total - n_shared] = torch.randint(1, 512, (p,), generator=g)
        ids[b, total - n_shared:] = shared[b]
        mask[b, start:] = 1
    return ids, mask, shared


def _positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _layer0_cache(model, ids, mask, positions):
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    return out.past_key_values.layers[0].keys


@pytest.mark.parametrize("arch,student_theta", [
    ("tiny-llama", None), ("tiny-llama", 777.0), ("tiny-qwen2", 5000.0), ("tiny-gemma3", 31.0),
])
def test_rephase_layer0_behind_prompt(arch, student_theta):
    """Layer-0 pre-RoPE keys depend only on the token, so re-phased teacher keys (behind a prompt) must equal
    the student's keys of the bare tokens — also when the student copy has another rope_theta."""
    teacher = tiny_model(arch, seed=5)
    overrides = {}
    if student_theta is not None:
        params = {k: dict(v) for k, v in teacher.config.rope_parameters.items()} if arch == "tiny-gemma3" \
            else dict(teacher.config.rope_parameters)
        layer_params = params[teacher.config.layer_types[0]] if arch == "tiny-gemma3" else params
        layer_params["rope_theta"] = student_theta
        overrides["rope_parameters"] = params
    student = tiny_model(arch, seed=5, **overrides)
    n_shared = 6  # below Gemma3's window, so its sliding layer 0 cache still holds every shared token
    ids, mask, shared = _prompted_batch(seed=9, prompt_lens=[5, 2], n_shared=n_shared)
    t_pos = _positions(mask)
    s_pos = torch.arange(n_shared).expand(2, n_shared)
    teacher_keys = _layer0_cache(teacher, ids, mask, t_pos)[..., -n_shared:, :]
    student_keys = _layer0_cache(student, shared, torch.ones_like(shared), s_pos)
    t_rope, s_rope = capture_kv(teacher, shared).rope[0], capture_kv(student, shared).rope[0]
    if student_theta is not None:
        assert not torch.allclose(t_rope[0], s_rope[0])
    moved = rephase(teacher_keys, t_pos[:, -n_shared:], t_rope, s_pos, s_rope)
    torch.testing.assert_close(moved, student_keys, rtol=0, atol=2e-5)
    # Without re-phasing the keys really differ (the prompt offsets the phase).
    assert (teacher_keys - student_keys).abs().max() > 1e-2


def test_captured_rope_per_layer_gemma3():
    model = tiny_model("tiny-gemma3")
    params = capture_kv(model, torch.arange(1, 6)[None]).rope
    head_dim = model.config.head_dim
    local = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    glob = 1.0 / (1000000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    torch.testing.assert_close(params[0][0], local)
    torch.testing.assert_close(params[1][0], glob)
    assert all(math.isclose(p.attention_scaling, 1.0) and p.rotary_dim == head_dim for p in params)


def test_same_convention_as_the_fused_loss():
    """kvfuse.loss rotates fused teacher keys itself; fed student keys rotated here from the same pre-RoPE
    keys (identity adapter, odd positions, scale ≠ 1), its key MSE must vanish and cos must be 1."""
    from kvfuse.loss import kv_distill_loss

    g = torch.Generator().manual_seed(12)
    L, B, H, T, D = 2, 2, 3, 7, 8
    pre = torch.randn(L, B, H, T, D, generator=g, dtype=torch.float64)
    positions = torch.randint(0, 900, (B, T), generator=g)
    inv_freq, scale = _inv_freq(D, 5000.0).double(), 1.25
    student_k = torch.stack([rotate(pre[l], positions, inv_freq, scale) for l in range(L)])
    values = torch.randn(L, B, H, T, D, generator=g, dtype=torch.float64)
    eye = torch.eye(H * D, dtype=torch.float64).expand(L, H * D, H * D)
    _, stats = kv_distill_loss(student_k, values, [pre], [values], [eye], [eye], torch.ones(B, 1, dtype=torch.float64),
                               torch.ones(B, T, dtype=torch.bool), positions, inv_freq, scale, backend="torch")
    torch.testing.assert_close(stats["k_mse"], torch.zeros(L, dtype=stats["k_mse"].dtype), atol=1e-12, rtol=0)
    torch.testing.assert_close(stats["cos"], torch.ones(L, dtype=stats["cos"].dtype), atol=1e-9, rtol=0)
