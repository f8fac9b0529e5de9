"""KVDistillLoss (the module) and kv_distill_loss's input validation."""
import pytest
import torch
from torch import nn

from kvfuse import KVDistillLoss, kv_distill_loss

L, B, T, H_S, D_S = 2, 2, 13, 2, 8
HEADS = [(4, 8), (1, 16)]


def batch(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    sk = r(L, B, H_S, T, D_S).requires_grad_()
    sv = r(L, B, H_S, T, D_S).requires_grad_()
    tk = [r(L, B, h, T, d) for h, d in HEADS]
    tv = [r(L, B, h, T, d) for h, d in HEADS]
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[:, 0] = True
    positions = torch.arange(T).expand(B, T)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D_S, 2).float() / D_S))
    return sk, sv, tk, tv, mask, positions, inv_freq


def functional_args(seed=0):
    sk, sv, tk, tv, mask, positions, inv_freq = batch(seed)
    g = torch.Generator().manual_seed(seed + 1)
    wk = [torch.randn(L, h * d, H_S * D_S, generator=g) for h, d in HEADS]
    wv = [torch.randn(L, h * d, H_S * D_S, generator=g) for h, d in HEADS]
    alpha = torch.rand(B, len(HEADS), generator=g)
    return dict(student_k=sk, student_v=sv, teacher_k=tk, teacher_v=tv, w_k=wk, w_v=wv, alpha=alpha, mask=mask,
                positions=positions, inv_freq=inv_freq)


# ------------------------------------------------------------------------------------------------ adapters
def test_default_init_is_the_rope_pair_keeping_structured_adapter():
    """The module's default adapters are kvfuse.align.heads.structured_adapter (one implementation): with a smaller
    student head dim, each student rotate-half pair (j, j + D_s/2) reads a teacher pair (i, i + D_t/2) — first
    halves from first halves, second from second — so a re-phased key keeps its rotary pairs; a contiguous-prefix
    truncation would feed dims 4..7 of the student from the teacher's first half."""
    from kvfuse.align.heads import structured_adapter
    mod = KVDistillLoss([(4, 16), (1, 16)], (2, 8), n_layers=3)
    for i, (h, d) in enumerate([(4, 16), (1, 16)]):
        want = structured_adapter(h, d, 2, 8, n_layers=3)
        torch.testing.assert_close(mod.w_k[i].data, want)
        torch.testing.assert_close(mod.w_v[i].data, want)
    w = mod.w_k[1][0]                                   # one teacher head of 16 dims -> two student heads of 8
    for hs in range(2):
        for j in range(4):
            first = w[:, hs * 8 + j].nonzero().flatten().tolist()
            second = w[:, hs * 8 + 4 + j].nonzero().flatten().tolist()
            assert first and second
            assert all(r % 16 < 8 for r in first) and all(r % 16 >= 8 for r in second)
            assert [r + 8 for r in first] == second
    partial = KVDistillLoss([(1, 16)], (1, 8), n_layers=1, rotary_dims=[(8, 4)])
    torch.testing.assert_close(partial.w_k[0].data, structured_adapter(1, 16, 1, 8, 1, rotary_dims=(8, 4)))
    with pytest.raises(ValueError, match="2 teachers"):
        KVDistillLoss([(1, 16), (1, 16)], (1, 8), n_layers=1, rotary_dims=[(8, 4)])


def test_module_owns_direct_adapter_parameters_and_explicit_init():
    init = [(torch.randn(L, h * d, H_S * D_S), torch.randn(L, h * d, H_S * D_S)) for h, d in HEADS]
    mod = KVDistillLoss(HEADS, (H_S, D_S), L, init=init)
    names = dict(mod.named_parameters())
    assert set(names) == {"w_k_0", "w_v_0", "w_k_1", "w_v_1"}
    torch.testing.assert_close(mod.w_k[1].detach(), init[1][0])
    assert mod.w_k[0].data_ptr() != init[0][0].data_ptr()  # copied, not aliased
    with pytest.raises(ValueError, match=r"init\[1\]\[0\]"):
        KVDistillLoss(HEADS, (H_S, D_S), L, init=[init[0], (torch.randn(L, 3, 16), init[1][1])])
    with pytest.raises(ValueError, match="init"):
        KVDistillLoss(HEADS, (H_S, D_S), L, init="ridge")
    with pytest.raises(ValueError, match="student_heads"):
        KVDistillLoss(HEADS, (H_S, 7), L)
    with pytest.raises(ValueError, match="teacher_heads"):
        KVDistillLoss([], (H_S, D_S), L)


# ------------------------------------------------------------------------------------------------- forward
def test_module_backends_agree_and_gradients_reach_adapters(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    sk, sv, tk, tv, mask, positions, inv_freq = batch(3)
    out = {}
    for backend in ("torch", "triton"):
        mod = KVDistillLoss(HEADS, (H_S, D_S), L, alpha=[0.3, 0.7], beta=0.5, backend=backend)
        with torch.no_grad():
            for w in mod.w_k + mod.w_v:
                w.add_(0.1 * torch.randn(w.shape, generator=torch.Generator().manual_seed(w.numel())))
        loss, stats = mod(sk, sv, tk, tv, mask, positions, inv_freq, attention_scaling=1.2)
        grads = torch.autograd.grad(loss, [sk, sv, *mod.parameters()])
        out[backend] = (loss.detach(), stats, grads)
    assert torch.allclose(out["torch"][0], out["triton"][0], rtol=1e-5)
    for a, b in zip(out["torch"][2], out["triton"][2]):
        assert (a - b).norm() <= 1e-4 * b.norm()
        assert b.abs().sum() > 0


def test_module_default_backend_on_cpu_is_torch_and_constant_alpha_is_normalised(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    sk, sv, tk, tv, mask, positions, inv_freq = batch(4)
    mod = KVDistillLoss(HEADS, (H_S, D_S), L, alpha=[[1.0, 3.0], [2.0, 2.0]])
    assert torch.allclose(mod.alpha_const, torch.tensor([[0.25, 0.75], [0.5, 0.5]]))
    loss, _ = mod(sk, sv, tk, tv, mask, positions, inv_freq)  # CPU, no interpreter: must pick torch
    alpha = torch.tensor([[0.25, 0.75], [0.5, 0.5]]).expand(B, L, 2)
    want, _ = kv_distill_loss(sk, sv, tk, tv, mod.w_k, mod.w_v, alpha, mask, positions, inv_freq)
    torch.testing.assert_close(loss, want)
    with pytest.raises(ValueError, match="alpha"):
        KVDistillLoss(HEADS, (H_S, D_S), L, alpha=[1.0, 2.0, 3.0])


class TinyRouter(nn.Module):
    """α from pooled student values: a learnable gate, as a router module would be."""

    def __init__(self, n):
        super().__init__()
        self.gate = nn.Linear(D_S, n)

    def forward(self, student_v, mask):
        pooled = (student_v.mean((0, 2)) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.gate(pooled).softmax(-1)


def test_router_module_is_registered_and_trained(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    sk, sv, tk, tv, mask, positions, inv_freq = batch(5)
    torch.manual_seed(0)
    mod = KVDistillLoss(HEADS, (H_S, D_S), L, router=TinyRouter(len(HEADS)), backend="triton")
    assert "router.gate.weight" in dict(mod.named_parameters())
    loss, _ = mod(sk, sv, tk, tv, mask, positions, inv_freq, router_inputs=(sv.detach(), mask.float()))
    loss.backward()
    assert mod.router.gate.weight.grad is not None and mod.router.gate.weight.grad.abs().sum() > 0
    loss2, _ = mod(sk, sv, tk, tv, mask, positions, inv_freq,
                   router_inputs={"student_v": sv.detach(), "mask": mask.float()})
    torch.testing.assert_close(loss2, loss.detach())
    with pytest.raises(ValueError, match="router_inputs"):
        mod(sk, sv, tk, tv, mask, positions, inv_freq)


# ---------------------------------------------------------------------------------------------- validation
def _with(args, **changes):
    out = dict(args)
    out.update(changes)
    return out


@pytest.mark.parametrize("change,match", [
    (lambda a: dict(teacher_k=[a["teacher_k"][0], a["teacher_k"][1][:, :, :, :-1]]), r"teacher_k\[1\]"),
    (lambda a: dict(teacher_v=[a["teacher_v"][0][..., :4], a["teacher_v"][1]]), r"teacher_v\[0\]"),
    (lambda a: dict(w_v=[a["w_v"][0], a["w_v"][1][:, :-1]]), r"w_v\[1\]"),
    (lambda a: dict(w_k=a["w_k"][:1]), r"w_k has 1 entries"),
    (lambda a: dict(student_v=a["student_v"][:, :1]), "student_v"),
    (lambda a: dict(student_k=a["student_k"].long()), "student_k"),
    (lambda a: dict(teacher_k=[a["teacher_k"][0].int(), a["teacher_k"][1]]), r"teacher_k\[0\]"),
    (lambda a: dict(alpha=a["alpha"][:, :1]), "alpha"),
    (lambda a: dict(alpha=torch.rand(B, L + 1, 2)), "alpha"),
    (lambda a: dict(mask=a["mask"][:, :-1]), "mask"),
    (lambda a: dict(positions=a["positions"][:1]), "positions"),
    (lambda a: dict(inv_freq=torch.rand(D_S)), "inv_freq"),
    (lambda a: dict(inv_freq=torch.rand(L + 1, D_S // 2)), "inv_freq"),
    (lambda a: dict(teacher_k=a["teacher_k"][0]), "list of tensors"),
    (lambda a: dict(teacher_k=[a["teacher_k"][0]] * 9, teacher_v=[a["teacher_v"][0]] * 9, w_k=[a["w_k"][0]] * 9,
                    w_v=[a["w_v"][0]] * 9, alpha=torch.rand(B, 9)), "1..8"),
    (lambda a: dict(mask=torch.zeros(B, T, dtype=torch.bool)), "mask selects no token"),
    (lambda a: dict(layer_weights=torch.ones(L + 1)), "layer_weights"),
    (lambda a: dict(layer_weights=torch.zeros(L)), "layer_weights"),
])
def test_bad_input_raises_value_error_naming_it(change, match):
    args = functional_args(7)
    with pytest.raises(ValueError, match=match):
        kv_distill_loss(**_with(args, **change(args)))


def test_odd_student_head_dim_is_rejected():
    args = functional_args(8)
    sk = torch.randn(L, B, 1, T, 7)
    with pytest.raises(ValueError, match="even"):
        kv_distill_loss(**_with(args, student_k=sk, student_v=sk))


@pytest.mark.parametrize("where", ["teacher_v[1]", "w_k[0]", "student_k", "alpha"])
def test_non_finite_input_is_named_unless_the_check_is_off(where):
    args = functional_args(9)
    bad = float("nan") if where != "w_k[0]" else float("inf")
    if where == "teacher_v[1]":
        t = args["teacher_v"][1].clone()
        t[1, 0, 0, 3, 2] = bad
        args["teacher_v"] = [args["teacher_v"][0], t]
    elif where == "w_k[0]":
        w = args["w_k"][0].clone()
        w[0, 5, 1] = bad
        args["w_k"] = [w, args["w_k"][1]]
    elif where == "student_k":
        args["student_k"] = args["student_k"].detach().clone()
        args["student_k"][0, 1, 0, 2, 0] = bad
    else:
        args["alpha"] = args["alpha"].clone()
        args["alpha"][1, 0] = bad
    pattern = where.replace("[", ".").replace("]", ".")
    with pytest.raises(ValueError, match=rf"non-finite values \(NaN/Inf\) in {pattern}"):
        kv_distill_loss(**args)
    loss, _ = kv_distill_loss(**args, check_finite=False)  # the caller opted out: the NaN/Inf propagates
    assert not torch.isfinite(loss)


def test_backend_choices(monkeypatch):
    args = functional_args(10)
    with pytest.raises(ValueError, match="backend"):
        kv_distill_loss(**args, backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA"):
        kv_distill_loss(**args, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    args64 = {k: ([x.double() for x in v] if isinstance(v, list) else (v.double() if v.is_floating_point() else v))
              for k, v in args.items()}
    with pytest.raises(ValueError, match="float64"):
        kv_distill_loss(**args64, backend="triton")
