"""The fused loss on compressed teachers (kvfuse.codecs): the Triton kernels decode fp8 / int4 in registers (TMA and
pointer paths, per-channel and per-token scales) and run a low-rank teacher as its coefficients with the folded
adapter; each must equal the torch loss on the explicitly decoded teachers to fp32 tolerance, also compiled."""
import pytest
import torch

from kvfuse.codecs import LowRankKV, encode_fp8, encode_int4
from kvfuse.kernels.fused_kv_loss_op import CODEC_CODES
from kvfuse.loss import kv_distill_loss

from test_fused_kv_loss import assert_close


def _case(seed, heads, D_s, T=21, L=2, B=2, H_s=2):
    g = torch.Generator().manual_seed(seed)
    tk = [torch.randn(L, B, h, T, d, generator=g) * 1.5 for h, d in heads]
    tv = [torch.randn(L, B, h, T, d, generator=g) for h, d in heads]
    wk = [(torch.randn(L, h * d, H_s * D_s, generator=g) / (h * d) ** 0.5).requires_grad_() for h, d in heads]
    wv = [(torch.randn(L, h * d, H_s * D_s, generator=g) / (h * d) ** 0.5).requires_grad_() for h, d in heads]
    sk = torch.randn(L, B, H_s, T, D_s, generator=g).requires_grad_()
    sv = torch.randn(L, B, H_s, T, D_s, generator=g).requires_grad_()
    alpha = torch.rand(B, len(heads), generator=g).softmax(-1).requires_grad_()
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :3] = False
    mask[1, T - 4:] = False
    pos = torch.cumsum(mask.long(), 1)
    invf = 1.0 / (10000 ** (torch.arange(0, D_s, 2).float() / D_s))
    return dict(student_k=sk, student_v=sv, teacher_k=tk, teacher_v=tv, w_k=wk, w_v=wv, alpha=alpha, mask=mask,
                positions=pos, inv_freq=invf)


def _encode(x, kind, axis, mask):
    return (encode_fp8 if kind == "fp8" else encode_int4)(x, axis, mask[:, None, :])


def _loss(args, backend):
    leaves = [args["student_k"], args["student_v"], args["alpha"], *args["w_k"], *args["w_v"]]
    loss, stats = kv_distill_loss(**args, backend=backend, beta=0.6, attention_scaling=1.2)
    return loss.detach(), stats, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("heads,D_s", [([(2, 32), (1, 64)], 32),   # TMA boxes (int4 rows of 16 bytes)
                                       ([(2, 16), (3, 8)], 16)],   # pointer loads, masked int4 byte columns
                         ids=["descriptors", "pointers"])
@pytest.mark.parametrize("kind", ["fp8", "int4"])
@pytest.mark.parametrize("dw_path", ["post", "xg_post", "xg"])
def test_quantised_teachers_equal_their_decode(kind, heads, D_s, dw_path, monkeypatch):
    """The whole loss and its gradients with each weight-gradient formulation (fused_kv_loss.DW_PATH)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import kvfuse.kernels.fused_kv_loss as k
    monkeypatch.setattr(k, "DW_PATH", dw_path)
    if D_s == 32:  # int4 TMA boxes need ≥ 16 bytes: 32 dims per K-chunk (the GPU configs use 64 or more)
        monkeypatch.setattr(k, "INTERP_FWD", dict(k.INTERP_FWD, BLOCK_K=32))
        monkeypatch.setattr(k, "INTERP_DW", dict(k.INTERP_DW, BLOCK_F=32))
    args = _case(3, heads, D_s)
    mask = args["mask"]
    # keys per channel, values per token (the store's layout), and the other way round for the second teacher
    axes = [("channel", "token"), ("token", "channel")]
    enc = dict(args, teacher_k=[_encode(x, kind, axes[i][0], mask) for i, x in enumerate(args["teacher_k"])],
               teacher_v=[_encode(x, kind, axes[i][1], mask) for i, x in enumerate(args["teacher_v"])])
    dec = dict(args, teacher_k=[x.decode() for x in enc["teacher_k"]], teacher_v=[x.decode() for x in enc["teacher_v"]])
    got = _loss(enc, "triton")
    assert_close(got, _loss(dec, "torch"), 1e-4, len(heads))
    assert_close(_loss(enc, "torch"), _loss(dec, "torch"), 1e-6, len(heads))
    # the codec really ran: the loss on the original teachers differs by more than fp32 rounding
    assert abs(float(got[0]) - float(_loss(args, "torch")[0])) > 1e-6


@pytest.mark.parametrize("quant", [None, "int4"])
def test_low_rank_teacher_runs_folded(quant, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    heads = [(2, 16), (1, 32)]
    args = _case(5, heads, 16)
    g = torch.Generator().manual_seed(9)
    L, B, _, T, _ = args["teacher_k"][0].shape

    def low_rank(h, d, r=16):
        basis = torch.linalg.qr(torch.randn(L, h * d, r, generator=g))[0].transpose(1, 2).contiguous()
        z = torch.randn(L, B, 1, T, r, generator=g) * args["mask"][None, :, None, :, None]
        coeffs = z if quant is None else encode_int4(z, "token", args["mask"][:, None, :])
        return LowRankKV(coeffs, basis, h, d)

    enc = dict(args, teacher_k=[low_rank(h, d) for h, d in heads], teacher_v=[low_rank(h, d) for h, d in heads])
    dec = dict(args, teacher_k=[x.decode() for x in enc["teacher_k"]], teacher_v=[x.decode() for x in enc["teacher_v"]])
    assert_close(_loss(enc, "triton"), _loss(dec, "torch"), 1e-4, len(heads))


def test_compressed_teachers_trace_with_no_graph_break(monkeypatch):
    """A compiled trainer fed by a codec store: torch.compile(fullgraph=True) of the loss on int4 keys and fp8
    values traces with no graph break and gives the eager loss and gradients."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch._dynamo.reset()
    args = _case(3, [(2, 16), (1, 32)], 16)
    mask = args["mask"]
    enc = dict(args, teacher_k=[_encode(x, "int4", "channel", mask) for x in args["teacher_k"]],
               teacher_v=[_encode(x, "fp8", "token", mask) for x in args["teacher_v"]])

    def f(student_k, alpha):
        return kv_distill_loss(**dict(enc, student_k=student_k, alpha=alpha), backend="triton")[0]

    explained = torch._dynamo.explain(f)(args["student_k"], args["alpha"])
    assert explained.graph_break_count == 0, explained.break_reasons
    leaves = [args["student_k"], args["alpha"], *args["w_k"], *args["w_v"]]
    eager = f(args["student_k"], args["alpha"])
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(args["student_k"], args["alpha"])
    assert torch.equal(eager, compiled)
    for a, b in zip(torch.autograd.grad(compiled, leaves), torch.autograd.grad(eager, leaves)):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    torch._dynamo.reset()


def _dw_case(seed, heads, T, kind, axes, C2=32):
    """Teachers, G and α for the weight-gradient kernel alone: padded masks (G zero on padded tokens), odd T."""
    g = torch.Generator().manual_seed(seed)
    L, B = 2, 3
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :2] = False
    mask[2, T - 5:] = False
    xs = [torch.randn(L, B, h, T, d, generator=g) * 1.3 for h, d in heads]
    enc = [_encode(x, kind, axis, mask) for x, axis in zip(xs, axes)]
    ws = [torch.randn(L, h * d, C2, generator=g) / (h * d) ** 0.5 for h, d in heads]
    G = torch.randn(L, B, T, C2, generator=g) * mask[None, :, :, None]
    alpha = torch.rand(B, L, len(heads), generator=g)
    alpha[1, 0, 0] = 0.0  # a zero weight still needs its ∂α
    return enc, ws, G, alpha


def _dw_reference(dec, ws, G, alpha, g_out):
    """∂W_i = g Σ_b α_i(b) M_i(b), ∂α_i(b) = g <W_i, M_i(b)>, M_i(b)[l] = X_i(l, b)ᵀ G(l, b) in float64."""
    dws, dal = [], []
    for i, (x, w) in enumerate(zip(dec, ws)):
        L, B, H, T, D = x.shape
        xf = x.double().permute(0, 1, 3, 2, 4).reshape(L, B, T, H * D)
        m = torch.einsum("lbtf,lbtc->lbfc", xf, G.double())
        a = alpha[..., i].double()  # [B, L]
        dws.append(g_out * torch.einsum("bl,lbfc->lfc", a, m))
        dal.append(g_out * torch.einsum("lfc,lbfc->bl", w.double(), m))
    return dws, torch.stack(dal, -1)


@pytest.mark.parametrize("path", ["xg", "xg_post", "gx", "post"])
@pytest.mark.parametrize("kind", ["fp8", "int4"])
@pytest.mark.parametrize("layout", ["descriptors", "pointers"])
def test_weight_gradient_paths_equal_decoded_reference(path, kind, layout, monkeypatch):
    """Every weight-gradient formulation (DW_PATH) of a compressed teacher, both scale layouts (a per-channel and a
    per-token teacher in one call), TMA and pointer loads, odd T with padded tokens, tiles that do not divide T,
    C' or the head dim (pointers): ∂W and ∂α equal the float64 reference on the explicitly decoded teachers."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import kvfuse.kernels.fused_kv_loss as k
    monkeypatch.setattr(k, "DW_PATH", path)
    if layout == "descriptors":  # int4 TMA boxes need ≥ 16 bytes: 32 dims per tile
        heads, C2 = [(2, 32), (1, 64)], 32
        monkeypatch.setattr(k, "INTERP_DW", {"BLOCK_F": 32, "BLOCK_C": 16, "BLOCK_T": 16})
    else:
        heads, C2 = [(2, 24), (3, 8)], 40
        monkeypatch.setattr(k, "INTERP_DW", {"BLOCK_F": 16, "BLOCK_C": 32, "BLOCK_T": 16})
    enc, ws, G, alpha = _dw_case(11, heads, 23, kind, ["channel", "token"], C2)
    launched = []
    kernel = k._fused_kv_dw_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(**kw):
                launched.append((kw["DW_T"], kw["USE_DESC"], kw["CODEC"]))
                return kernel[grid](**kw)
            return launch
    monkeypatch.setattr(k, "_fused_kv_dw_kernel", Spy())
    g_out = torch.tensor([0.7])
    L, B, _, _ = G.shape
    part = torch.zeros(len(enc), L, B, *k.alpha_slots([(x.shape[2], x.shape[4]) for x in enc], C2))
    dws = k.fused_kv_loss_backward([x.data for x in enc], ws, alpha, G, g_out, True, part,
                                   codecs=[CODEC_CODES[x.kind, x.axis] for x in enc], scales=[x.scale for x in enc],
                                   offsets=[getattr(x, "offset", None) for x in enc])
    dal = part.sum((3, 4)).permute(2, 1, 0)  # [B, L, N]
    want = {"xg": (0, 0), "xg_post": (3, 0), "gx": (1, 1), "post": (2, 1)}[path]
    assert [t for t, _, _ in launched] == list(want)
    assert {u for _, u, _ in launched} == {layout == "descriptors"}
    ref_w, ref_a = _dw_reference([x.decode() for x in enc], ws, G, alpha, 0.7)
    # fp32 accumulation, tolerance relative to each gradient's largest entry (the int4 post-GEMM offset term of
    # "xg_post" subtracts two sums about as large as the result: about one bit of fp32 more than the others)
    for got, ref in zip([*dws, dal], [*ref_w, ref_a]):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
