"""The fused KV-distillation loss: Triton (interpreter) vs the torch reference, the reference vs float64 and
vs the contract written out as explicit per-layer / per-teacher loops."""
import math

import pytest
import torch
import triton
import triton.language as tl

from kvfuse.kernels.fused_kv_loss import _reduce_angle, _rope_cos_sin
from kvfuse.loss import kv_distill_loss

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def make_case(seed, heads, dtype=torch.float32, L=2, B=2, T=37, H_s=2, D_s=16, alpha_per_layer=False,
              strided=False, invf_per_layer=False):
    """Fresh random inputs with a padded mask; `strided` builds every tensor as a non-contiguous view."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    def act(L_, B_, H, T_, D):  # [L, B, H, T, D], optionally as a permuted / sliced view
        if strided:
            base = rnd(L_, B_, T_, H, 2 * D).to(dtype)
            return base.permute(0, 1, 3, 2, 4)[..., ::2]
        return rnd(L_, B_, H, T_, D).to(dtype)

    C = H_s * D_s
    tk = [act(L, B, h, T, d) for h, d in heads]
    tv = [act(L, B, h, T, d) for h, d in heads]

    def adapter(F):
        w = rnd(L, C, F, scale=F ** -0.5) if strided else rnd(L, F, C, scale=F ** -0.5)
        w = w.to(dtype).requires_grad_()
        return w, (w.transpose(1, 2) if strided else w)

    wk_leaf, wk = zip(*[adapter(h * d) for h, d in heads])
    wv_leaf, wv = zip(*[adapter(h * d) for h, d in heads])
    # Student tensors near the fused teacher signal plus noise, so cos is informative, not ~0.
    sk = act(L, B, H_s, T, D_s).float().requires_grad_()
    sv = act(L, B, H_s, T, D_s).float().requires_grad_()
    N = len(heads)
    a_shape = (B, L, N) if alpha_per_layer else (B, N)
    alpha = (torch.rand(*a_shape, generator=g) + 0.1).requires_grad_()
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[0, :3] = False          # left padding
    mask[-1, T - 5:] = False     # right padding
    positions = torch.cumsum(mask.long(), 1) + torch.arange(B)[:, None] * 3
    invf = 1.0 / (10000 ** (torch.arange(0, D_s, 2).float() / D_s))
    if invf_per_layer:
        invf = invf[None] * torch.linspace(0.5, 1.5, L)[:, None]
    leaves = dict(sk=sk, sv=sv, alpha=alpha, wk=list(wk_leaf), wv=list(wv_leaf))
    args = dict(student_k=sk.to(dtype), student_v=sv.to(dtype), teacher_k=tk, teacher_v=tv, w_k=list(wk),
                w_v=list(wv), alpha=alpha, mask=mask, positions=positions, inv_freq=invf)
    return args, leaves


def run(args, leaves, backend, **kw):
    loss, stats = kv_distill_loss(**args, backend=backend, **kw)
    inputs = [leaves["sk"], leaves["sv"], leaves["alpha"], *leaves["wk"], *leaves["wv"]]
    grads = torch.autograd.grad(loss, inputs)
    return loss.detach(), stats, grads


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


GRAD_NAMES = ["student_k", "student_v", "alpha"]


def assert_close(got, ref, tol, n_teachers):
    names = GRAD_NAMES + [f"w_k[{i}]" for i in range(n_teachers)] + [f"w_v[{i}]" for i in range(n_teachers)]
    assert rel(got[0], ref[0]) <= tol, ("loss", rel(got[0], ref[0]))
    for key in ("k_mse", "v_mse", "cos"):
        assert rel(got[1][key], ref[1][key]) <= tol, (key, rel(got[1][key], ref[1][key]))
    for name, a, b in zip(names, got[2], ref[2]):
        assert torch.isfinite(a).all(), name
        assert rel(a, b) <= tol, (name, rel(a, b))


CASES = [
    # seed, teacher heads, kwargs
    (1, [(2, 16)], dict()),
    (2, [(3, 8), (1, 32)], dict(alpha_per_layer=True, strided=True, invf_per_layer=True)),
    (3, [(3, 8), (1, 32), (2, 16)], dict(strided=True)),
    (4, [(3, 8), (1, 32), (2, 16), (4, 4)], dict(alpha_per_layer=True, T=21)),
    (5, [(1, 24), (2, 16)], dict(H_s=3, D_s=12, T=19)),  # D_s/2 = 6: padded halves, odd H_s
    (6, [(1, 8), (2, 4), (1, 16), (3, 4), (1, 4), (2, 8), (1, 12), (4, 2)], dict(T=9, L=1, alpha_per_layer=True)),
    (7, [(2, 16), (1, 32)], dict(D_s=32, T=19)),  # D_s/2 = 16 = PH: S, ∂L/∂S and G as TMA boxes too
]


@pytest.mark.parametrize("seed,heads,kw", CASES, ids=[f"N{len(c[1])}-{c[0]}" for c in CASES])
def test_triton_matches_torch_fp32(seed, heads, kw, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    args, leaves = make_case(seed, heads, **kw)
    extra = dict(attention_scaling=1.3, beta=0.7, lambda_k=1.1, lambda_v=0.6)
    if seed % 2 == 0:
        gen = torch.Generator().manual_seed(seed)
        extra["layer_weights"] = torch.rand(args["student_k"].shape[0], generator=gen) + 0.2
    ref = run(args, leaves, "torch", **extra)
    got = run(args, leaves, "triton", **extra)
    assert_close(got, ref, 1e-4, len(heads))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_matches_torch_half(dtype, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    heads = [(3, 8), (1, 32), (2, 16)]
    args, leaves = make_case(11 if dtype == torch.bfloat16 else 12, heads, dtype=dtype, alpha_per_layer=True,
                             strided=dtype == torch.float16)
    # The reference at fp32 on the same (rounded) half inputs: what the kernel's fp32 accumulation computes.
    ref_args = dict(args, student_k=args["student_k"].float(), student_v=args["student_v"].float(),
                    teacher_k=[x.float() for x in args["teacher_k"]], teacher_v=[x.float() for x in args["teacher_v"]],
                    w_k=[w.float() for w in args["w_k"]], w_v=[w.float() for w in args["w_v"]])
    ref = run(ref_args, leaves, "torch", attention_scaling=0.9)
    got = run(args, leaves, "triton", attention_scaling=0.9)
    assert_close(got, ref, 2e-2, len(heads))


def test_interpreter_bf16_upcast_switch_is_what_keeps_bf16_exact():
    """The kernel upcasts bf16 dot operands under TRITON_INTERPRET=1 (triton 3.9's interpreter mis-computes bf16
    tl.dot); on the GPU it keeps bf16 tensor-core operands."""
    from kvfuse.kernels.utils import dot_dtype
    bf = torch.bfloat16
    import os
    old = os.environ.get("TRITON_INTERPRET")
    try:
        os.environ["TRITON_INTERPRET"] = "1"
        assert dot_dtype([bf, bf])[1] == torch.float32
        os.environ["TRITON_INTERPRET"] = "0"
        assert dot_dtype([bf, bf])[1] == torch.bfloat16
        assert dot_dtype([bf, torch.float32])[1:] == (torch.float32, True)  # mixed: fp32 'ieee' products
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def test_mask_and_positions_in_any_dtype(monkeypatch):
    """The kernels read the mask and positions in the caller's dtypes (make_case: bool / int64; here also fp16 /
    fp32 and int32 / fp64) with no converted copy, and get the same numbers."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    heads = [(2, 16), (1, 32)]
    args, leaves = make_case(41, heads, D_s=32, T=19)
    assert args["mask"].dtype == torch.bool and args["positions"].dtype == torch.int64
    ref = run(args, leaves, "triton")
    assert_close(ref, run(args, leaves, "torch"), 1e-4, len(heads))
    for m_dtype, p_dtype in ((torch.float16, torch.int32), (torch.float32, torch.float64)):
        raw = dict(args, mask=args["mask"].to(m_dtype), positions=args["positions"].to(p_dtype))
        assert_close(run(raw, leaves, "triton"), ref, 1e-6, len(heads))


def test_other_tile_sizes_agree(monkeypatch):
    """Other interpreter tile shapes give the same numbers: tiles larger than the tensors (every mask path),
    K-chunks that do not divide a teacher head (24 = 16 + 8), and two student heads per program (the per-head
    reshape path of the cosine)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import kvfuse.kernels.fused_kv_loss as k
    heads = [(3, 8), (1, 24), (2, 16)]
    args, leaves = make_case(21, heads, alpha_per_layer=True, strided=True)
    ref = run(args, leaves, "torch")
    for fwd, dw in (({"BLOCK_T": 64, "BLOCK_K": 32, "HPP": 1, "WIDE": False},
                     {"BLOCK_F": 32, "BLOCK_C": 64, "BLOCK_T": 32}),
                    ({"BLOCK_T": 16, "BLOCK_K": 16, "HPP": 2, "WIDE": False},
                     {"BLOCK_F": 16, "BLOCK_C": 32, "BLOCK_T": 16})):
        monkeypatch.setattr(k, "INTERP_FWD", fwd)
        monkeypatch.setattr(k, "INTERP_DW", dw)
        assert_close(run(args, leaves, "triton"), ref, 1e-4, len(heads))


def test_torch_reference_vs_float64():
    heads = [(3, 8), (1, 32), (2, 16)]
    args, leaves = make_case(31, heads, alpha_per_layer=True, strided=True, invf_per_layer=True)
    ref = run(args, leaves, "torch", attention_scaling=1.2, beta=0.4)
    args64 = {k: ([x.double() for x in v] if isinstance(v, list) else
                  (v.double() if v.is_floating_point() else v)) for k, v in args.items()}
    got = run(args64, leaves, "torch", attention_scaling=1.2, beta=0.4)
    assert got[0].dtype == torch.float64
    assert_close(ref, got, 1e-5, len(heads))


def _definition(args, attention_scaling, lambda_k, lambda_v, beta, layer_weights, rotary=None):
    """The contract, term by term, in float64 loops (no shared code with kvfuse.loss). attention_scaling: a float
    or one per layer; rotary: None (full RoPE) or each layer's rotary dim (0 = NoPE)."""
    sk, sv = args["student_k"].double(), args["student_v"].double()
    L, B, H_s, T, D_s = sk.shape
    m = args["mask"].double()
    n = m.sum()
    alpha = args["alpha"].double()
    invf = args["inv_freq"].double()
    totals, weights = 0.0, 0.0
    for l in range(L):
        r = D_s if rotary is None else rotary[l]
        s_l = attention_scaling[l] if isinstance(attention_scaling, list) else attention_scaling
        theta = torch.cat([(invf[l] if invf.dim() == 2 else invf)[:r // 2]] * 2)
        ang = args["positions"].double()[:, None, :, None] * theta            # [B, 1, T, r]
        kf = torch.zeros(B, H_s, T, D_s, dtype=torch.float64)
        vf = torch.zeros_like(kf)
        for i, (xk, xv) in enumerate(zip(args["teacher_k"], args["teacher_v"])):
            a_i = alpha[:, l, i] if alpha.dim() == 3 else alpha[:, i]
            _, _, H_i, _, D_i = xk.shape
            flat_k = xk[l].double().permute(0, 2, 1, 3).reshape(B, T, H_i * D_i)
            flat_v = xv[l].double().permute(0, 2, 1, 3).reshape(B, T, H_i * D_i)
            yk = (flat_k @ args["w_k"][i][l].double()).reshape(B, T, H_s, D_s).permute(0, 2, 1, 3)
            yv = (flat_v @ args["w_v"][i][l].double()).reshape(B, T, H_s, D_s).permute(0, 2, 1, 3)
            turn, rest = yk[..., :r], yk[..., r:]
            rot_half = torch.cat([-turn[..., r // 2:], turn[..., :r // 2]], -1)
            yk = torch.cat([(turn * ang.cos() + rot_half * ang.sin()) * s_l, rest], -1)
            kf += a_i[:, None, None, None] * yk
            vf += a_i[:, None, None, None] * yv
        k_mse = (m[:, None, :, None] * (sk[l] - kf) ** 2).sum() / (n * H_s * D_s)
        v_mse = (m[:, None, :, None] * (sv[l] - vf) ** 2).sum() / (n * H_s * D_s)

        def cos(a, b):
            return (a * b).sum(-1) / torch.maximum(a.norm(dim=-1) * b.norm(dim=-1), torch.tensor(1e-8))

        c = (m[:, None, :] * 0.5 * (cos(sk[l], kf) + cos(sv[l], vf))).sum() / (n * H_s)
        w = 1.0 if layer_weights is None else float(layer_weights[l])
        totals += w * (lambda_k * k_mse + lambda_v * v_mse + beta * (1 - c))
        weights += w
    return totals / weights


def test_reference_matches_the_written_contract():
    heads = [(3, 8), (1, 32)]
    args, _ = make_case(41, heads, alpha_per_layer=True, invf_per_layer=True, strided=True)
    args = {k: ([x.double() for x in v] if isinstance(v, list) else
                (v.detach().double() if v.is_floating_point() else v)) for k, v in args.items()}
    lw = torch.tensor([0.3, 1.7], dtype=torch.float64)
    loss, _ = kv_distill_loss(**args, attention_scaling=1.4, lambda_k=0.8, lambda_v=1.3, beta=0.25, layer_weights=lw)
    want = _definition(args, 1.4, 0.8, 1.3, 0.25, lw)
    assert math.isclose(float(loss), float(want), rel_tol=1e-12)


def test_teachers_get_no_gradient_and_stats_are_detached(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    args, leaves = make_case(51, [(2, 16)])
    args["teacher_k"] = [x.clone().requires_grad_() for x in args["teacher_k"]]
    args["teacher_v"] = [x.clone().requires_grad_() for x in args["teacher_v"]]
    for backend in ("torch", "triton"):
        loss, stats = kv_distill_loss(**args, backend=backend)
        assert set(stats) == {"k_mse", "v_mse", "cos"}
        assert all(not v.requires_grad and v.shape == (2,) for v in stats.values())
        loss.backward()
        assert all(x.grad is None for x in args["teacher_k"] + args["teacher_v"])
        assert leaves["alpha"].grad is not None and torch.isfinite(leaves["alpha"].grad).all()
        leaves["alpha"].grad = None


def test_layer_weight_gradient_and_zero_alpha(monkeypatch):
    """∂L/∂w_l from the Triton backend matches autograd through the reference; an α of exactly 0 is fine."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    args, leaves = make_case(61, [(3, 8), (1, 32)])
    with torch.no_grad():
        leaves["alpha"][0, 1] = 0.0
    grads = []
    for backend in ("torch", "triton"):
        lw = torch.tensor([0.4, 1.6], requires_grad=True)
        loss, _ = kv_distill_loss(**args, layer_weights=lw, backend=backend)
        grads.append(torch.autograd.grad(loss, [lw, leaves["alpha"]]))
    assert rel(grads[1][0], grads[0][0]) < 1e-4
    assert rel(grads[1][1], grads[0][1]) < 1e-4


def test_triton_backward_runs_again_with_retain_graph(monkeypatch):
    """The saved gradient buffers are scaled out of place, so a retained graph gives the same gradients twice."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    args, leaves = make_case(71, [(2, 16)], T=9)
    loss, _ = kv_distill_loss(**args, backend="triton")
    first = torch.autograd.grad(2.0 * loss, [leaves["sk"], leaves["alpha"]], retain_graph=True)
    second = torch.autograd.grad(2.0 * loss, [leaves["sk"], leaves["alpha"]])
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_zero_fused_vectors_have_finite_matching_gradients(monkeypatch):
    """A student head no adapter writes to (all-zero columns) gives K_f = V_f = 0 there: cos's clamped
    denominator must give finite gradients, the same in both backends."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    heads = [(3, 8), (2, 16)]
    args, leaves = make_case(81, heads, alpha_per_layer=True)
    with torch.no_grad():
        for w in leaves["wk"] + leaves["wv"]:
            w[:, :, :16] = 0.0  # student head 0 (D_s = 16)
    ref = run(args, leaves, "torch", beta=0.9)
    got = run(args, leaves, "triton", beta=0.9)
    assert all(torch.isfinite(g).all() for g in ref[2])
    assert_close(got, ref, 1e-4, len(heads))


@pytest.mark.parametrize("rotary", [[8, 8], [0, 16], [16, 0], [10, 0]], ids=["partial", "nope-first", "nope-last",
                                                                          "partial-nope"])
def test_partial_rotary_nope_and_per_layer_scaling(rotary, monkeypatch):
    """Partial rotary (only the first r dims of each head rotate), NoPE layers (r = 0) and a per-layer
    attention_scaling: the reference equals the written contract in float64, and Triton equals the reference."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    heads = [(3, 8), (1, 24)]
    args, leaves = make_case(90 + sum(rotary), heads, alpha_per_layer=True, strided=True, invf_per_layer=True)
    r_max = max(rotary)
    args["inv_freq"] = args["inv_freq"][:, :r_max // 2].contiguous()
    scalings = [1.25, 0.8]
    kw = dict(attention_scaling=scalings, rotary_dim=rotary, beta=0.5)
    args64 = {k: ([x.detach().double() for x in v] if isinstance(v, list) else
                  (v.detach().double() if v.is_floating_point() else v)) for k, v in args.items()}
    loss64, _ = kv_distill_loss(**args64, **kw)
    want = _definition(args64, scalings, 1.0, 1.0, 0.5, None, rotary=rotary)
    assert math.isclose(float(loss64), float(want), rel_tol=1e-12)
    kw["attention_scaling"] = torch.tensor(scalings)
    assert_close(run(args, leaves, "triton", **kw), run(args, leaves, "torch", **kw), 1e-4, len(heads))


def test_rotary_dims_are_validated():
    args, _ = make_case(95, [(2, 16)])
    for bad, match in (([8], "entries for 2 layers"), (7, "even int"), ([4, 18], "layer 1"),
                       ("8", "None, an int")):
        with pytest.raises(ValueError, match=match):
            kv_distill_loss(**args, rotary_dim=bad)
    with pytest.raises(ValueError, match="attention_scaling has 3 entries"):
        kv_distill_loss(**args, attention_scaling=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="at most 8"):  # inv_freq covers only 8 rotary dims
        kv_distill_loss(**dict(args, inv_freq=args["inv_freq"][:4]), rotary_dim=16)


def test_triton_refuses_two_different_rotary_dims(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    args, _ = make_case(96, [(2, 16)])
    with pytest.raises(ValueError, match="one rotary dim"):
        kv_distill_loss(**args, rotary_dim=[8, 16], backend="triton")


def test_large_magnitude_cosine_is_one_on_both_backends(monkeypatch):
    """|S|, |K_f| ~ 1e10: sqrt(|a|²·|b|²) would overflow fp32 and give cos = 0; the contract's max(|a||b|, 1e-8)
    gives cos = 1 when the student equals the fused teacher."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from kvfuse.loss import fused_teacher_keys
    args, _ = make_case(97, [(2, 16)], L=1, B=1, T=5)
    args["mask"] = torch.ones(1, 5, dtype=torch.bool)
    eye = torch.eye(32)[None]
    big = 1e10
    args["teacher_k"] = [x * big for x in args["teacher_k"]]
    args["teacher_v"] = [x * big for x in args["teacher_v"]]
    args.update(w_k=[eye], w_v=[eye], alpha=torch.ones(1, 1))
    args["student_v"] = args["teacher_v"][0].clone()
    args["student_k"] = fused_teacher_keys(args["teacher_k"], [eye], args["alpha"], args["positions"],
                                           args["inv_freq"], 1.0, (2, 16))
    for backend in ("torch", "triton"):
        _, stats = kv_distill_loss(**args, backend=backend, check_finite=False)
        assert torch.allclose(stats["cos"], torch.ones(1), atol=1e-5), (backend, stats["cos"])


def test_both_backends_give_gradients_to_the_same_inputs(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    args, leaves = make_case(98, [(2, 16), (1, 8)], alpha_per_layer=True)
    args["teacher_k"] = [x.clone().requires_grad_() for x in args["teacher_k"]]
    scaling = torch.tensor([1.1, 0.9], requires_grad=True)
    got = {}
    for backend in ("torch", "triton"):
        lw = torch.tensor([0.5, 1.5], requires_grad=True)
        loss, _ = kv_distill_loss(**args, layer_weights=lw, attention_scaling=scaling, backend=backend)
        inputs = [leaves["sk"], leaves["sv"], leaves["alpha"], lw, scaling, *leaves["wk"], *leaves["wv"],
                  *args["teacher_k"]]
        got[backend] = [g is not None for g in torch.autograd.grad(loss, inputs, allow_unused=True)]
    assert got["torch"] == got["triton"]
    assert got["torch"][:4] == [True] * 4 and got["torch"][4] is False  # scaling: a constant of the model
    assert not any(got["torch"][-2:])                                     # teachers: never


class _LaunchSpy:
    """Wraps a @triton.jit kernel: records the keyword arguments of each launch, then launches it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("teacher_dim,student_dim,tma,epi", [(16, 32, True, True), (16, 16, True, False),
                                                            (6, 32, False, False)])
def test_each_load_path_is_taken_and_exact(teacher_dim, student_dim, tma, epi, monkeypatch):
    """TMA descriptors for the K-loop when every teacher/adapter row is 16-byte aligned, for S/∂S/G too when the
    pairs are the standard halves and D_s/2 is a power of two, plain pointers otherwise: each path equals the
    reference."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import kvfuse.kernels.fused_kv_loss as k
    fwd, dw = _LaunchSpy(k._fused_kv_fwd_kernel), _LaunchSpy(k._fused_kv_dw_kernel)
    monkeypatch.setattr(k, "_fused_kv_fwd_kernel", fwd)
    monkeypatch.setattr(k, "_fused_kv_dw_kernel", dw)
    heads = [(2, teacher_dim)]
    args, leaves = make_case(100 + teacher_dim + student_dim, heads, D_s=student_dim, T=19)
    got = run(args, leaves, "triton")
    assert {(c["USE_DESC"], c["EPI_DESC"]) for c in fwd.launches} == {(tma, epi)}
    assert {c["USE_DESC"] for c in dw.launches} == {tma}
    assert_close(got, run(args, leaves, "torch"), 1e-4, len(heads))


@pytest.mark.parametrize("teacher_dim,block_k", [(16, 16), (24, 16), (6, 16)], ids=["tma", "chunked", "pointers"])
def test_wide_product_equals_two_products(teacher_dim, block_k, monkeypatch):
    """WIDE (natural layout): one [BLOCK_K, 2·PH] adapter tile and one product per X tile, split into the two
    RoPE halves afterwards, gives the reference's numbers on the TMA path, with K-chunks that do not divide a head
    (24 = 16 + 8), and on the pointer path; it is taken only where the layout is natural."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import kvfuse.kernels.fused_kv_loss as k
    fwd = _LaunchSpy(k._fused_kv_fwd_kernel)
    monkeypatch.setattr(k, "_fused_kv_fwd_kernel", fwd)
    monkeypatch.setattr(k, "INTERP_FWD", {"BLOCK_T": 16, "BLOCK_K": block_k, "HPP": 1, "WIDE": True})
    heads = [(2, teacher_dim), (1, 16)]
    args, leaves = make_case(200 + teacher_dim, heads, D_s=32, T=19, alpha_per_layer=True)
    assert_close(run(args, leaves, "triton"), run(args, leaves, "torch"), 1e-4, len(heads))
    assert {c["WIDE"] for c in fwd.launches} == {True}
    fwd.launches.clear()
    args, leaves = make_case(300 + teacher_dim, heads, D_s=24, T=19)  # D_s/2 = 12: pair layout, no WIDE
    assert_close(run(args, leaves, "triton"), run(args, leaves, "torch"), 1e-4, len(heads))
    assert {c["WIDE"] for c in fwd.launches} == {False}


@pytest.mark.parametrize("misaligned_values", [False, True], ids=["one-launch", "two-launches"])
def test_keys_and_values_share_a_weight_gradient_launch(misaligned_values, monkeypatch):
    """A teacher's keys and values go through one weight-gradient launch (grid over 2·L layers) when their load
    paths match, through two when they do not (values not 16-byte aligned: pointer loads, keys: TMA); both equal
    the reference."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import kvfuse.kernels.fused_kv_loss as k
    dw = _LaunchSpy(k._fused_kv_dw_kernel)
    monkeypatch.setattr(k, "_fused_kv_dw_kernel", dw)
    heads = [(2, 16), (1, 32)]
    args, leaves = make_case(400, heads, D_s=32, T=19, alpha_per_layer=True)
    if misaligned_values:  # one element past an aligned base: the data pointer is no longer 16-byte aligned
        def shifted(x):
            return torch.empty(x.numel() + 1, dtype=x.dtype)[1:].view(x.shape).copy_(x)
        args = dict(args, teacher_v=[shifted(x) for x in args["teacher_v"]])
    assert_close(run(args, leaves, "triton"), run(args, leaves, "torch"), 1e-4, len(heads))
    got = [(c["KINDS"], c["USE_DESC"]) for c in dw.launches]
    assert got == ([(1, True), (1, False)] * 2 if misaligned_values else [(2, True)] * 2)


def test_tuned_launch_zeroes_the_partial_sums_the_tuning_runs_left():
    # The autotuner's benchmark runs of other configs store partial sums in slots the chosen config never writes;
    # the callers reduce the whole slot buffer, so those slots must be zero again before the chosen config runs.
    import triton
    from kvfuse.kernels import fused_kv_loss as K

    buf = torch.zeros(8)
    launched = []

    class Kernel:
        def __getitem__(self, grid):
            def run(buf, BLOCK, **launch_options):  # num_warps, num_stages, …
                launched.append((grid, BLOCK))
                buf[:grid[0]] = 1.0  # the chosen config's programs store into their own slots
            return run

    class Tuned:
        fn = Kernel()
        best_config = triton.Config({"BLOCK": 4})

        def __getitem__(self, grid):
            def tune(buf):
                buf.fill_(7.0)  # a config with smaller tiles, benchmarked last, wrote every slot
            return tune

    grid = lambda cfg: (8 // cfg["BLOCK"],)  # noqa: E731
    tuned, key = Tuned(), ("test", id(buf))
    try:
        assert K._launch_tuned(tuned, key, grid, dict(buf=buf), partials=(buf,)) == {"BLOCK": 4}
        assert buf.tolist() == [1.0, 1.0] + [0.0] * 6 and launched == [((2,), 4)]
        buf.fill_(-1.0)  # what a caller passed is not zeroed again once tuned: the caller's buffer is zero-filled
        K._launch_tuned(tuned, key, grid, dict(buf=buf), partials=(buf,))  # tuned already: straight launch
        assert buf.tolist() == [1.0, 1.0] + [-1.0] * 6 and len(launched) == 2
    finally:
        K._TUNED.pop((id(tuned), key), None)


def test_rope_angle_reduction_is_accurate_far_from_zero(monkeypatch):
    """The key pass reduces RoPE angles to [−π, π] before the SFU's sine and cosine (which are accurate only
    there): the reduced angle against the float64 remainder of the same fp32 angles, up to 2^20 rad — positions of
    a 1M-token context at frequency 1 — and cos/sin through it (numpy's here, the SFU's on a GPU)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    @triton.jit
    def reduce_kernel(ang_ptr, r_ptr, cos_ptr, sin_ptr, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        ang = tl.load(ang_ptr + i)
        tl.store(r_ptr + i, _reduce_angle(ang))
        c, s = _rope_cos_sin(ang)
        tl.store(cos_ptr + i, c)
        tl.store(sin_ptr + i, s)

    g = torch.Generator().manual_seed(0)
    ang = torch.cat([torch.rand(1024, generator=g) * 2 ** e for e in range(0, 21, 4)])
    ang = torch.cat([ang, -ang[:256], torch.tensor([0.0, math.pi, -math.pi, 2 * math.pi, 1e5 * math.pi])])
    ang = torch.nn.functional.pad(ang, (0, 8192 - len(ang)))
    r, c, s = torch.empty_like(ang), torch.empty_like(ang), torch.empty_like(ang)
    reduce_kernel[(1,)](ang, r, c, s, BLOCK=8192)
    exact = ang.double()
    rem = torch.remainder(exact + math.pi, 2 * math.pi) - math.pi
    # k = ⌊ang/2π + ½⌋ is rounded in fp32, so |r| may pass π by 2π·ulp(ang/2π)
    assert bool((r.abs() <= math.pi + 2 * 2 ** -23 * ang.abs() + 1e-6).all())
    # the remainder is only defined up to 2π at ±π
    assert float(torch.minimum((r.double() - rem).abs(), 2 * math.pi - (r.double() - rem).abs()).max()) < 1e-6
    err = max(float((c.double() - exact.cos()).abs().max()), float((s.double() - exact.sin()).abs().max()))
    assert err < 2e-6, err


def test_large_positions_match_the_reference(monkeypatch):
    """Positions deep into a long context (angles up to ~1e5 rad at the fastest frequency) on both backends."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    args, leaves = make_case(21, [(2, 16), (1, 32)], D_s=32, T=19)
    args["positions"] = args["positions"] + 100_000
    ref = run(args, leaves, "torch", attention_scaling=1.1)
    got = run(args, leaves, "triton", attention_scaling=1.1)
    assert_close(got, ref, 1e-4, 2)
