"""Head/dim adapters: structured inits, head matching, ridge fit, and a short training run with ridge init."""
import numpy as np
import pytest
import torch

from kvfuse.align.heads import (
    adapter_from_mix, dim_map, group_mean_adapter, group_mean_mix, head_gram, match_heads, replicate_adapter,
    replicate_mix, ridge_adapter, ridge_adapters, structured_adapter,
)
from kvfuse.align.layers import apply_layer_map, layer_map
from kvfuse.align.rope import rephase, rotate
from kvfuse.align.time import apply_alignment
from kvfuse.models.capture import capture_kv
from kvfuse.models.tiny import tiny_model


def _apply(w, kv):
    """Reference adapter application, head by head and dim by dim (no flattening tricks)."""
    b, h_t, t, d_t = kv.shape
    f_s = w.shape[1]
    out = torch.zeros(b, t, f_s, dtype=torch.float64)
    for h in range(h_t):
        for d in range(d_t):
            out += kv[:, h, :, d, None].double() * w[h * d_t + d].double()
    return out


def test_group_mean_adapter_averages_groups():
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(2, 6, 5, 8, generator=g)
    w = group_mean_adapter(6, 8, 3, 8, n_layers=2)
    assert w.shape == (2, 48, 24)
    torch.testing.assert_close(w[0], w[1])
    out = _apply(w[0], kv).view(2, 5, 3, 8).transpose(1, 2)
    expected = kv.double().view(2, 3, 2, 5, 8).mean(dim=2)
    torch.testing.assert_close(out, expected)
    mix = group_mean_mix(5, 2)  # not divisible: heads 0-2 → 0, 3-4 → 1
    torch.testing.assert_close(mix, torch.tensor([[1 / 3, 0], [1 / 3, 0], [1 / 3, 0], [0, 0.5], [0, 0.5]]))


def test_replicate_adapter_copies_heads_and_maps_dims():
    g = torch.Generator().manual_seed(1)
    kv = torch.randn(3, 2, 7, 12, generator=g)
    w = replicate_adapter(2, 12, 5, 8)[0]  # D 12 → 8: each RoPE half truncated separately
    out = _apply(w, kv).view(3, 7, 5, 8).transpose(1, 2)
    src = [(j * 2) // 5 for j in range(5)]
    for j, h in enumerate(src):
        torch.testing.assert_close(out[:, j, :, :4], kv[:, h, :, :4].double())
        torch.testing.assert_close(out[:, j, :, 4:], kv[:, h, :, 6:10].double())
    assert replicate_mix(2, 5).sum(dim=0).tolist() == [1.0] * 5
    with pytest.raises(ValueError, match="H_t <= H_s"):
        replicate_adapter(4, 8, 2, 8)
    with pytest.raises(ValueError, match="H_t >= H_s"):
        group_mean_adapter(2, 8, 4, 8)
    assert structured_adapter(4, 8, 2, 8).shape == structured_adapter(2, 8, 4, 8).transpose(1, 2).shape


def test_identity_dim_map_keeps_rope_pairs():
    """Padding the head dim with the pair-preserving identity commutes with RoPE at matched frequencies."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 9, 6, generator=g)
    m = dim_map(6, 10)
    inv_t = torch.tensor([1.0, 0.3, 0.05])
    inv_s = torch.tensor([1.0, 0.3, 0.05, 0.01, 0.002])
    pos = torch.arange(3, 12)
    torch.testing.assert_close(rotate(x, pos, inv_t) @ m, rotate(x @ m, pos, inv_s))
    with pytest.raises(ValueError, match="even"):
        dim_map(7, 8)


@pytest.mark.parametrize("d_t,r_t,d_s,r_s", [
    (16, 16, 8, 8),     # full rotary, smaller student head (Qwen 128 → 64 style)
    (16, 8, 8, 4),      # partial rotary on both sides (Phi-style teacher and student)
    (16, 4, 12, 12),    # Pythia-like 25 % teacher into a full-rotary student
    (8, 8, 16, 16),     # larger student head: each half zero-padded
])
def test_default_adapter_keeps_rotary_pairs_of_rephased_teacher_keys(d_t, r_t, d_s, r_s):
    """A teacher key re-phased to the student's positions and projected by the default adapter equals the
    student's RoPE applied to the projected pre-RoPE key: the adapter takes teacher pair (i, i + r_t/2) to student
    pair (i, i + r_s/2) at the same frequency, and pass-through dims to pass-through dims. The first-contiguous-dims
    map it replaced pairs dim i with a dim of another frequency and fails this."""
    g = torch.Generator().manual_seed(d_t + r_t + d_s + r_s)
    h_t, h_s, T = 4, 2, 9
    pre_t = torch.randn(2, h_t, T, d_t, generator=g, dtype=torch.float64)
    t_pos, s_pos = torch.randint(0, 300, (2, T), generator=g), torch.arange(3, 3 + T).expand(2, T)
    inv_t = 1.0 / (7.0 ** torch.arange(r_t // 2, dtype=torch.float64))
    inv_s = inv_t[: r_s // 2] if r_s <= r_t else torch.cat([inv_t, torch.rand(r_s // 2 - r_t // 2, generator=g)])
    w = structured_adapter(h_t, d_t, h_s, d_s, n_layers=1, rotary_dims=(r_t, r_s))[0].double()
    rephased = rephase(rotate(pre_t, t_pos, inv_t, 1.3, r_t), t_pos, (inv_t, 1.3, r_t), s_pos, (inv_t, 1.3, r_t))
    projected = _heads(_flat(rephased) @ w, h_s)
    # the student rotates at the teacher's frequencies where both rotate, unrotated where it does not
    keep = min(r_t, r_s) // 2
    expected_rotated = rotate(_heads(_flat(pre_t) @ w, h_s), s_pos, inv_s, 1.3, r_s)
    if r_s <= r_t:
        torch.testing.assert_close(projected, expected_rotated, rtol=1e-12, atol=1e-12)
    else:   # student slots beyond the teacher's rotary part hold pass-through teacher dims: compare the kept pairs
        idx = torch.cat([torch.arange(keep), r_s // 2 + torch.arange(keep)])
        torch.testing.assert_close(projected[..., idx], expected_rotated[..., idx], rtol=1e-12, atol=1e-12)
    naive = torch.zeros(d_t, d_s, dtype=torch.float64)
    naive[torch.arange(min(d_t, d_s)), torch.arange(min(d_t, d_s))] = 1.0
    w_naive = adapter_from_mix(group_mean_mix(h_t, h_s), naive)[0].double()
    if 0 < r_s < r_t:
        wrong = _heads(_flat(rephased) @ w_naive, h_s)
        assert (wrong - rotate(_heads(_flat(pre_t) @ w_naive, h_s), s_pos, inv_s, 1.3, r_s)).abs().max() > 1e-2


def test_per_layer_rotary_dims_and_bad_rotary_dims():
    w = structured_adapter(2, 8, 2, 8, n_layers=3, rotary_dims=(8, [8, 0, 4]))
    torch.testing.assert_close(w[0], torch.eye(16))
    torch.testing.assert_close(w[1], torch.eye(16))            # NoPE student layer: all dims pass through in order
    assert not torch.equal(w[2], torch.eye(16))                # pairs (i, i+4) → (i, i+2); dims 2, 3 of each half drop
    assert w[2][5, 3] == 1 and w[2][1, 1] == 1 and w[2][2].sum() == 0      # teacher dim 2 (slot 2) has no partner
    with pytest.raises(ValueError, match="r_s must be an even int"):
        dim_map(8, 8, rotary_dims=(8, 3))
    with pytest.raises(ValueError, match="n_layers=3"):
        structured_adapter(2, 8, 2, 8, n_layers=3, rotary_dims=(8, [8, 0]))


@pytest.mark.parametrize("d_t,d_s", [(16, 8), (8, 16), (12, 12)])
def test_orthogonal_dim_map(d_t, d_s):
    m = dim_map(d_t, d_s, "orthogonal", generator=torch.Generator().manual_seed(d_t)).double()
    gram = m @ m.T if d_t <= d_s else m.T @ m
    torch.testing.assert_close(gram, torch.eye(min(d_t, d_s), dtype=torch.float64), atol=1e-6, rtol=0)


def test_match_heads_recovers_a_permutation():
    g = torch.Generator().manual_seed(3)
    student = torch.softmax(torch.randn(2, 5, 9, 9, generator=g), dim=-1)  # [B, H, T, T] attention maps
    perm = [3, 0, 4, 1, 2]
    teacher = student[:, perm] + 0.01 * torch.rand(2, 5, 9, 9, generator=g)
    match = match_heads(teacher, student)
    assert match.assignment == [(t, perm[t]) for t in range(5)]
    w = adapter_from_mix(match.mix, dim_map(4, 4))[0]
    kv_t = torch.randn(1, 5, 3, 4, generator=g)
    out = _apply(w, kv_t).view(1, 3, 5, 4).transpose(1, 2)
    for t in range(5):
        torch.testing.assert_close(out[:, perm[t]], kv_t[:, t].double())


def test_match_heads_uneven_counts_use_every_head():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(3, 16, generator=g)
    teacher = torch.stack([base[0], base[2], base[1], base[2] + 0.05, base[0] + 0.05, base[1] + 0.05, base[2]])
    teacher = teacher + 0.01 * torch.randn(7, 16, generator=g)
    match = match_heads(teacher, base, head_axis=0)  # H_t = 7 > H_s = 3
    groups = {j: sorted(i for i, jj in match.assignment if jj == j) for j in range(3)}
    assert groups == {0: [0, 4], 1: [2, 5], 2: [1, 3, 6]}
    torch.testing.assert_close(match.mix.sum(dim=0), torch.ones(3))
    back = match_heads(base, teacher, head_axis=0)  # H_t = 3 < H_s = 7: replicate, every student head fed
    assert sorted(j for _, j in back.assignment) == list(range(7))
    assert {i for i, _ in back.assignment} == {0, 1, 2}


def test_head_gram_compares_heads_of_different_dims():
    g = torch.Generator().manual_seed(5)
    kv_s = torch.randn(2, 3, 10, 8, generator=g)
    rot = dim_map(8, 24, "orthogonal", generator=g)  # isometric lift: same Gram, different head dim
    kv_t = (kv_s @ rot)[:, [2, 0, 1]]
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 7:] = False
    match = match_heads(head_gram(kv_t, mask), head_gram(kv_s, mask))
    assert match.assignment == [(0, 2), (1, 0), (2, 1)]
    with pytest.raises(ValueError, match="pattern shape"):
        match_heads(kv_t, kv_s)


def test_ridge_adapter_against_float64_normal_equations():
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(57, 12, generator=g), torch.randn(57, 9, generator=g)
    lam = 0.05
    xd, yd = x.double().numpy(), y.double().numpy()
    reg = lam * np.trace(xd.T @ xd) / 12
    expected = np.linalg.solve(xd.T @ xd + reg * np.eye(12), xd.T @ yd)
    np.testing.assert_allclose(ridge_adapter(x, y, lam).numpy(), expected, rtol=1e-5, atol=1e-6)
    w_true = torch.randn(12, 9, generator=g)
    torch.testing.assert_close(ridge_adapter(x, x @ w_true, 0.0), w_true, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="rows"):
        ridge_adapter(x, y[:5])


def test_ridge_adapters_per_layer_uses_only_masked_tokens():
    g = torch.Generator().manual_seed(7)
    w_true = torch.randn(3, 2 * 6, 4 * 5, generator=g)
    teacher = [torch.randn(2, 2, 11, 6, generator=g) for _ in range(3)]
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[0, 8:] = False
    student = []
    for layer in range(3):
        s = (teacher[layer].permute(0, 2, 1, 3).reshape(2, 11, 12) @ w_true[layer]).view(2, 11, 4, 5).transpose(1, 2)
        s = s.clone()
        s[0, :, 8:] = 1e3 * torch.randn(4, 3, 5, generator=g)  # garbage in padded slots must not matter
        student.append(s)
    w = ridge_adapters(teacher, student, mask, lam=0.0)
    torch.testing.assert_close(w, w_true, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------- short training run

P, T, L_T = 5, 16, 4


def _pair():
    """A 'different checkpoint' teacher: the student's architecture with another layer count and RoPE base and
    weights perturbed by 30 % of their spread (Phase 3 style)."""
    student = tiny_model("tiny-qwen2", seed=2)
    teacher = tiny_model("tiny-qwen2", seed=2, num_hidden_layers=L_T, layer_types=["full_attention"] * L_T,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.3 * p.std() * torch.randn(p.shape, generator=g))
    return teacher, student


def _heads(x, h):
    b, t, f = x.shape
    return x.view(b, t, h, f // h).transpose(1, 2)


def _flat(x):
    b, h, t, d = x.shape
    return x.permute(0, 2, 1, 3).reshape(b, t, h * d)


def _run(init: str, beta: float, steps: int = 40):
    torch.manual_seed(0)
    teacher, student = _pair()
    n_s, h_s = student.config.num_hidden_layers, student.config.num_key_value_heads
    m = layer_map(L_T, n_s)
    a = torch.cat([torch.zeros(T, P), torch.eye(T)], dim=1)  # shifted identity: teacher sees a P-token prompt
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(1, 512, (1, P), generator=gen)

    def batch(b):
        ids = torch.randint(1, 512, (b, T), generator=gen)
        return ids, torch.cat([prompt.expand(b, P), ids], dim=1)

    def targets(teacher_ids):
        cap = capture_kv(teacher, teacher_ids)
        return (apply_layer_map(m, [apply_alignment(a, k) for k in cap.keys]),
                apply_layer_map(m, [apply_alignment(a, v) for v in cap.values]))

    def norms(ids):
        cap = capture_kv(student, ids)
        return (torch.stack([k.norm(dim=-1).mean() for k in cap.keys]).mean().item(),
                torch.stack([v.norm(dim=-1).mean() for v in cap.values]).mean().item())

    s_ids, t_ids = batch(8)
    tk, tv = targets(t_ids)
    calib = capture_kv(student, s_ids)
    f_t = tk.shape[2] * tk.shape[4]
    if init == "ridge":
        mask = torch.ones(8, T, dtype=torch.bool)
        w_k, w_v = ridge_adapters(list(tk), calib.keys, mask), ridge_adapters(list(tv), calib.values, mask)
    else:  # small random adapters: a start next to the trivial all-zero optimum
        w_k, w_v = (0.01 * torch.randn(n_s, f_t, f_t, generator=gen) for _ in range(2))
    w_k, w_v = torch.nn.Parameter(w_k), torch.nn.Parameter(w_v)
    held_out, _ = batch(8)
    before = norms(held_out)
    opt = torch.optim.Adam([*student.parameters(), w_k, w_v], lr=1e-3)
    student.train()
    for _ in range(steps):
        s_ids, t_ids = batch(4)
        tk, tv = targets(t_ids)
        cap = capture_kv(student, s_ids, requires_grad=True)
        loss = 0.0
        for layer in range(n_s):
            rope = cap.rope[layer]
            k_s, v_s = rotate(cap.keys[layer], cap.positions, *rope), cap.values[layer]
            k_hat = rotate(_heads(_flat(tk[layer]) @ w_k[layer], h_s), cap.positions, *rope)
            v_hat = _heads(_flat(tv[layer]) @ w_v[layer], h_s)
            mse = (k_s - k_hat).square().mean() + (v_s - v_hat).square().mean()
            cos = 0.5 * (torch.cosine_similarity(k_s, k_hat, dim=-1).mean() + torch.cosine_similarity(v_s, v_hat, dim=-1).mean())
            loss = loss + mse + beta * (1.0 - cos)
        opt.zero_grad()
        (loss / n_s).backward()
        opt.step()
    student.eval()
    after = norms(held_out)
    return after[0] / before[0], after[1] / before[1]


def test_ridge_init_keeps_student_kv_norms():
    """MSE + cosine from the ridge init: student K/V norms stay within ±20 % (measured: ~x1.09 / x1.07)."""
    k_ratio, v_ratio = _run("ridge", beta=1.0)
    print(f"ridge init, MSE+cos: K norm x{k_ratio:.3f}, V norm x{v_ratio:.3f}")
    assert 0.8 <= k_ratio <= 1.2 and 0.8 <= v_ratio <= 1.2


def test_norm_check_detects_collapse():
    """Control for the check above: pure MSE from near-zero adapters does collapse the student KV (measured:
    ~x0.2), so the ±20 % band is a real constraint. Pure MSE also drifts down from the ridge init once the fit
    is imperfect (measured ~x0.35 here) — the cosine term is what refuses the all-zero optimum."""
    k_ratio, v_ratio = _run("small", beta=0.0, steps=30)
    print(f"small init, pure MSE: K norm x{k_ratio:.3f}, V norm x{v_ratio:.3f}")
    assert max(k_ratio, v_ratio) < 0.5
