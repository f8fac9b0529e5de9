"""The O(T)-memory Triton attention KL (interpreter on CPU) vs the materialised torch reference, the reference's
gradients vs float64, the one-pass backward's variants, and the operator under torch.compile."""
import math

import pytest
import torch

from kvfuse.attention import attention_kl, attention_kl_reference
from kvfuse.kernels import attention_kl as kernels

def make_case(seed, B, Hq, Hkv, T, D, dtype=torch.float32, strided=False):
    """Fresh random q, k_s, k_f (k_f near k_s so the KL is informative) and a mask with left padding on row 0,
    right padding on the last row and random holes elsewhere; `strided` returns non-contiguous views."""
    g = torch.Generator().manual_seed(seed)

    def rnd(H, scale=1.0):
        if strided:  # [B, T, H, 2D] storage viewed as [B, H, T, D] with a stride-2 last axis
            return (torch.randn(B, T, H, 2 * D, generator=g) * scale).permute(0, 2, 1, 3)[..., ::2]
        return torch.randn(B, H, T, D, generator=g) * scale

    q = rnd(Hq, 1.5)
    k_s = rnd(Hkv, 1.5)
    k_f = k_s + rnd(Hkv, 0.7)
    mask = torch.rand(B, T, generator=g) > 0.15
    mask[0, :4] = False
    mask[-1, T - 6:] = False
    mask[0, 4] = True
    leaves = [x.to(dtype).requires_grad_() for x in (q, k_s, k_f)]
    return leaves, mask


def loss_and_grads(leaves, mask, backend, scale=None):
    loss = attention_kl(*leaves, mask, scale=scale, backend=backend)
    return loss.detach(), torch.autograd.grad(loss, leaves)


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def assert_matches(got, ref, tol):
    assert torch.isfinite(got[0]), "loss"
    assert rel(got[0], ref[0]) <= tol, ("loss", rel(got[0], ref[0]))
    for name, a, b in zip(("q_s", "k_s", "k_f"), got[1], ref[1]):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        assert rel(a, b) <= tol, (name, rel(a, b))


# GQA groups 1, 2, 3, 6, 8; T never a multiple of the 16-token interpreter tile; D a power of two, even or odd.
SHAPES = [(2, 2, 2, 37, 16), (2, 4, 2, 45, 13), (1, 6, 2, 29, 16), (1, 6, 1, 31, 24), (2, 8, 1, 33, 8)]


@pytest.mark.parametrize("B,Hq,Hkv,T,D", SHAPES)
def test_fp32_matches_reference(B, Hq, Hkv, T, D):
    leaves, mask = make_case(10 + T, B, Hq, Hkv, T, D)
    assert_matches(loss_and_grads(leaves, mask, "triton"), loss_and_grads(leaves, mask, "torch"), 1e-4)


@pytest.mark.parametrize("B,Hq,Hkv,T,D", [SHAPES[1], SHAPES[3]])
def test_bf16_matches_reference(B, Hq, Hkv, T, D):
    leaves, mask = make_case(20 + T, B, Hq, Hkv, T, D, dtype=torch.bfloat16)
    assert_matches(loss_and_grads(leaves, mask, "triton"), loss_and_grads(leaves, mask, "torch"), 2e-2)


@pytest.mark.parametrize("block_m,block_n", [(32, 16), (16, 32)])
def test_strided_inputs_fully_masked_sample_and_uneven_tiles(block_m, block_n, monkeypatch):
    """Non-contiguous views, a batch row with no valid token at all, an explicit scale, and query/key tiles of
    different sizes (the key-major backward starts at a query tile that straddles the key tile, or a key tile
    spans several query tiles)."""
    monkeypatch.setitem(kernels.INTERP_BLOCKS, "BLOCK_M", block_m)
    monkeypatch.setitem(kernels.INTERP_BLOCKS, "BLOCK_N", block_n)
    leaves, mask = make_case(3, 3, 6, 3, 41, 16, strided=True)
    assert not leaves[0].is_contiguous()
    mask[1] = False
    got = loss_and_grads(leaves, mask, "triton", scale=0.3)
    ref = loss_and_grads(leaves, mask, "torch", scale=0.3)
    assert_matches(got, ref, 1e-4)
    assert float(got[1][0][1].abs().max()) == 0.0 and float(got[1][2][1].abs().max()) == 0.0


def _rows_reference64(q, k_s, k_f, mask, scale):
    """Per-row KL in float64, materialised (0 on rows without an allowed key)."""
    B, H, T, D = q.shape
    group = H // k_s.shape[1]
    q, ks, kf = (x.double() for x in (q, k_s, k_f))
    ks, kf = ks.repeat_interleave(group, 1), kf.repeat_interleave(group, 1)
    m = mask.bool()
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None, None] & m[:, None, None, :] & m[:, None, :, None]
    ls = (scale * q @ ks.transpose(-1, -2)).masked_fill(~allowed, -math.inf)
    lf = (scale * q @ kf.transpose(-1, -2)).masked_fill(~allowed, -math.inf)
    lps = torch.log_softmax(ls, -1).nan_to_num(neginf=0.0)
    lpf = torch.log_softmax(lf, -1).nan_to_num(neginf=0.0)
    return torch.where(allowed, lps.exp() * (lps - lpf), 0.0).nan_to_num().sum(-1)


def test_row_kl_and_arbitrary_upstream_gradient_vs_float64():
    """The operator itself (through its autograd.Function): every row's KL (zero on padded queries) and the
    gradients of a random weighting of the rows, against float64."""
    leaves, mask = make_case(5, 2, 6, 3, 35, 16)
    scale = 1 / 4
    rows, _ = kernels.attention_kl_rows(*leaves, mask.to(torch.int8), scale)
    leaves64 = [x.detach().double().requires_grad_() for x in leaves]
    rows64 = _rows_reference64(*leaves64, mask, scale)
    assert rows.shape == rows64.shape and rows.dtype == torch.float32
    assert rel(rows, rows64) <= 1e-5
    assert float(rows.detach()[0, :, :4].abs().max()) == 0.0
    w = torch.randn(rows.shape, generator=torch.Generator().manual_seed(9))
    got = torch.autograd.grad((rows * w).sum(), leaves)
    ref = torch.autograd.grad((rows64 * w.double()).sum(), leaves64)
    for name, a, b in zip(("q_s", "k_s", "k_f"), got, ref):
        assert rel(a, b) <= 1e-5, (name, rel(a, b))


def test_reference_gradients_match_float64():
    """The reference in fp32 vs the same function in float64, and float64 gradients vs finite differences."""
    leaves, mask = make_case(7, 2, 4, 2, 13, 8)
    got = loss_and_grads(leaves, mask, "torch")
    leaves64 = [x.detach().double().requires_grad_() for x in leaves]
    ref = loss_and_grads(leaves64, mask, "torch")
    assert rel(got[0], ref[0]) <= 1e-6
    for a, b in zip(got[1], ref[1]):
        assert rel(a, b) <= 1e-5
    small = [x.detach()[:1, :, :6, :4].double().requires_grad_() for x in leaves]
    valid = mask[:1, :6].clone()
    valid[0, :2] = False
    valid[0, 3] = True
    assert torch.autograd.gradcheck(lambda a, b, c: attention_kl_reference(a, b, c, valid, 0.5), small)


def test_identical_keys_give_zero_and_single_token():
    leaves, mask = make_case(11, 1, 4, 2, 19, 16)
    q, k, _ = (x.detach() for x in leaves)
    assert float(attention_kl(q, k, k, mask, backend="triton")) == pytest.approx(0.0, abs=1e-6)
    one = torch.ones(1, 1, dtype=torch.bool)
    x = torch.randn(1, 2, 1, 16, generator=torch.Generator().manual_seed(12))
    # One allowed key: P = Q = 1 whatever the logits; KL = E − lse_s + lse_f cancels to ~ulp(logit) in fp32.
    assert float(attention_kl(x, x[:, :1], x[:, 1:], one, backend="triton")) == pytest.approx(0.0, abs=1e-5)


def test_auto_backend_mixed_dtypes_and_bad_input(monkeypatch):
    leaves, mask = make_case(13, 1, 4, 2, 21, 16)
    q, k_s, k_f = (x.detach() for x in leaves)
    assert torch.equal(attention_kl(q, k_s, k_f, mask, backend="auto"), attention_kl(q, k_s, k_f, mask))
    # bf16 student tensors with fp32 fused keys run at the promoted dtype (fp32), gradient dtypes preserved.
    qb = q.bfloat16().requires_grad_()
    loss = attention_kl(qb, k_s.bfloat16(), k_f, mask, backend="triton")
    (gq,) = torch.autograd.grad(loss, qb)
    assert gq.dtype == torch.bfloat16 and torch.isfinite(gq).all()
    assert rel(loss, attention_kl(qb.detach(), k_s.bfloat16(), k_f, mask)) <= 1e-4
    with pytest.raises(ValueError, match="backend must be one of"):
        attention_kl(q, k_s, k_f, mask, backend="cuda")
    with pytest.raises(ValueError, match="float64"):
        attention_kl(q.double(), k_s.double(), k_f.double(), mask, backend="triton")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            attention_kl(q, k_s, k_f, mask, backend="triton")


@pytest.fixture
def launches(monkeypatch):
    """Records (kernel name, ATOMIC_DQ) of every kernel launch, launching them as usual."""
    seen = []
    launch = kernels._launch

    def spy(name, grid_of, args, meta):
        seen.append((name, meta.get("ATOMIC_DQ")))
        return launch(name, grid_of, args, meta)

    monkeypatch.setattr(kernels, "_launch", spy)
    return seen


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def _weighted_rows_case(seed, B, Hq, Hkv, T, D, scale):
    """Inputs, the op's row statistics, a random upstream gradient and the float64 gradients it gives."""
    leaves, mask = make_case(seed, B, Hq, Hkv, T, D)
    q, k_s, k_f = (x.detach() for x in leaves)
    mask8 = mask.to(torch.int8)
    _, stats = kernels.attention_kl_forward(q, k_s, k_f, mask8, scale)
    w = torch.randn(B, Hq, T, generator=torch.Generator().manual_seed(seed + 1))
    leaves64 = [x.double().requires_grad_() for x in (q, k_s, k_f)]
    ref = torch.autograd.grad((_rows_reference64(*leaves64, mask, scale) * w.double()).sum(), leaves64)
    return (q, k_s, k_f, mask8, scale, w, stats), ref


@pytest.mark.parametrize("split", [1, 2, 3, 6])
def test_one_pass_backward_every_group_split_vs_float64(split, launches):
    """The one-pass kernel with the GQA group of 6 query heads shared by 1, 2, 3 or 6 programs per KV head: one
    launch (∂q by atomics), and ∂q, ∂k_s, ∂k_f of a random row weighting equal to float64's."""
    args, ref = _weighted_rows_case(21, 1, 6, 1, 35, 16, 0.3)
    launches.clear()
    got = kernels.attention_kl_backward(*args, split=split)
    assert launches == [("bwd_lean", True)]  # the default one-pass variant
    for name, a, b in zip(("q", "k_s", "k_f"), got, ref):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        assert rel(a, b) <= 1e-5, (name, split, rel(a, b))
    with pytest.raises(ValueError, match="must divide the GQA group"):
        kernels.attention_kl_backward(*args, split=4)


def test_group_split_fills_the_gpu():
    # ≥ 4 programs per SM on 132 SMs = 528, with 64-key tiles and 2 KV heads of 6 query heads each:
    assert kernels.group_split(1, 2, 6, 32768, 132) == 1      # 1024 (key tile, KV head) pairs
    assert kernels.group_split(1, 2, 6, 16384, 132) == 2      # 512 pairs: 2 programs per pair give 1024
    assert kernels.group_split(1, 2, 6, 8192, 132) == 3       # 256 pairs: 2 would give 512
    assert kernels.group_split(1, 2, 6, 4096, 132) == 6       # 128 pairs: 3 would give 384
    # Nothing divides further than the group.
    assert kernels.group_split(1, 1, 1, 64, 132) == 1


def test_deterministic_mode_uses_the_atomic_free_path(launches, deterministic):
    """Under torch.use_deterministic_algorithms(True), ∂q comes from the query-major kernel and the key-major one
    runs without atomics; the gradients still equal float64's."""
    args, ref = _weighted_rows_case(23, 2, 4, 2, 29, 16, 0.25)
    launches.clear()
    got = kernels.attention_kl_backward(*args)
    assert launches == [("dq", None), ("bwd", False)]
    for name, a, b in zip(("q", "k_s", "k_f"), got, ref):
        assert rel(a, b) <= 1e-5, (name, rel(a, b))


@pytest.mark.parametrize("wanted", [(True, False, False), (False, False, True), (False, True, False)])
def test_gradients_reach_exactly_the_inputs_that_ask(wanted, launches):
    """Both backends give gradients to the same inputs; only the kernels needed run (q alone: the query-major
    kernel; keys alone: the key-major one without atomics)."""
    leaves, mask = make_case(25, 1, 4, 2, 23, 8)
    grads = {}
    for backend in ("torch", "triton"):
        xs = [x.detach().requires_grad_(r) for x, r in zip(leaves, wanted)]
        launches.clear()
        attention_kl(*xs, mask, backend=backend).backward()
        grads[backend] = [x.grad for x in xs]
    assert [g is not None for g in grads["triton"]] == list(wanted)
    assert [g is not None for g in grads["torch"]] == list(wanted)
    for a, b in zip(grads["triton"], grads["torch"]):
        if b is not None:
            assert rel(a, b) <= 1e-4
    assert launches[0] == ("fwd", None)
    assert launches[1:] == ([("dq", None)] if wanted[0] else [("bwd", False)])


def test_operators_pass_opcheck():
    leaves, mask = make_case(27, 1, 4, 2, 11, 8)
    mask8 = mask.to(torch.int8)
    torch.library.opcheck(kernels.attention_kl_fwd.default, tuple(x.detach() for x in leaves) + (mask8, 0.35))
    q, k_s, k_f = (x.detach() for x in leaves)
    _, stats = kernels.attention_kl_fwd(q, k_s, k_f, mask8, 0.35)
    dkl = torch.randn(stats.shape[1:], generator=torch.Generator().manual_seed(28))
    for need_q, need_k in ((True, True), (False, True), (True, False)):
        torch.library.opcheck(kernels.attention_kl_bwd.default, (q, k_s, k_f, mask8, 0.35, dkl, stats, need_q, need_k))


def _kl_step(q, k_s, k_f, mask, backend):
    return attention_kl(q, k_s, k_f, mask, backend=backend)


def test_compiled_fullgraph_matches_eager_without_graph_breaks():
    """torch.compile(fullgraph=True) traces attention_kl(backend="triton") as the operator: no graph break, and
    the compiled loss and gradients equal the eager ones (the same kernels run)."""
    leaves, mask = make_case(29, 2, 4, 2, 27, 16)
    explained = torch._dynamo.explain(_kl_step)(*leaves, mask, "triton")
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    compiled = torch.compile(_kl_step, fullgraph=True, backend="aot_eager")
    got = compiled(*leaves, mask, "triton")
    got_grads = torch.autograd.grad(got, leaves)
    ref = _kl_step(*leaves, mask, "triton")
    ref_grads = torch.autograd.grad(ref, leaves)
    assert torch.equal(got.detach(), ref.detach())
    for a, b in zip(got_grads, ref_grads):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_mask_raises_in_eager_and_gives_zero_when_compiled(backend):
    """The empty-mask check reads the device, so it runs in eager mode only; compiled, such a mask is a
    well-defined 0 loss with zero gradients."""
    leaves, mask = make_case(31, 1, 2, 1, 9, 8)
    empty = torch.zeros_like(mask)
    with pytest.raises(ValueError, match="selects no token"):
        attention_kl(*leaves, empty, backend=backend)
    torch._dynamo.reset()
    compiled = torch.compile(_kl_step, fullgraph=True, backend="aot_eager")
    loss = compiled(*leaves, empty, backend)
    grads = torch.autograd.grad(loss, leaves)
    assert float(loss.detach()) == 0.0
    assert all(float(g.abs().max()) == 0.0 for g in grads)


def test_operator_rejects_what_the_kernels_cannot_take():
    q, k = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
    mask8 = torch.ones(1, 6, dtype=torch.int8)
    with pytest.raises(ValueError, match="does not fit q"):
        kernels.attention_kl_fwd(q, torch.randn(1, 3, 6, 8), torch.randn(1, 3, 6, 8), mask8, 0.5)
    with pytest.raises(ValueError, match="share one dtype"):
        kernels.attention_kl_fwd(q, k.bfloat16(), k.bfloat16(), mask8, 0.5)
    with pytest.raises(ValueError, match="mask must be int8"):
        kernels.attention_kl_fwd(q, k, k, mask8.bool(), 0.5)
    with pytest.raises(ValueError, match="k_s = k_f"):
        kernels.attention_kl_fwd(q, k, k[:, :1], mask8, 0.5)
    with pytest.raises(ValueError, match="different devices"):
        kernels.attention_kl_fwd(q, k, k, mask8.to("meta"), 0.5)


@pytest.fixture
def tma_reduce(monkeypatch):
    """Triton 3.9's interpreter has no TMA reduction (descriptor atomic_add): give its builder one, an add into
    the box's in-bounds elements (what cp.reduce.async.bulk .add does), so the TMA ∂q variants run on the CPU."""
    from triton.runtime import interpreter

    def create_descriptor_reduce(self, kind, desc, value, indices):
        assert kind == interpreter._ir.DESCRIPTOR_REDUCE_KIND.ADD, kind
        ptrs, mask = desc.materialize_pointers(indices)
        old = self.create_masked_load(ptrs, mask, None, None, False)
        return interpreter._interpreter.store(ptrs.data, old.data + value.data, mask.data)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_descriptor_reduce", create_descriptor_reduce,
                        raising=False)


# (B, Hq, Hkv, T, D, split, block_m, block_n): T odd (∂qᵀ rows padded to a multiple of 4) or a multiple of 4,
# tiles of equal and unequal sizes, D = 13 (q's strides not 16-byte aligned: q falls back to pointer loads).
VARIANT_CASES = [(1, 6, 1, 35, 16, 2, 16, 16), (2, 4, 2, 29, 16, 1, 32, 16), (1, 4, 1, 44, 13, 4, 16, 32)]


@pytest.mark.parametrize("variant", ["lean", "tma_dq", "tma"])
@pytest.mark.parametrize("case", VARIANT_CASES)
def test_tma_backward_variants_vs_float64(variant, case, launches, tma_reduce, monkeypatch):
    """The backward variants (lean elementwise form; ∂q by bulk reduction into a transposed buffer; q by TMA
    loads): one launch of the variant's kernel with the expected flags, gradients of a random row weighting equal
    to float64's."""
    B, Hq, Hkv, T, D, split, block_m, block_n = case
    monkeypatch.setitem(kernels.INTERP_BLOCKS, "BLOCK_M", block_m)
    monkeypatch.setitem(kernels.INTERP_BLOCKS, "BLOCK_N", block_n)
    args, ref = _weighted_rows_case(31 + T, B, Hq, Hkv, T, D, 0.3)
    flags = kernels.bwd_variant_flags(args[0], kernels._meta(args[0]), variant)
    assert flags == (2 if variant == "tma" and D != 13 else 0, variant != "lean", True)
    launches.clear()
    got = kernels.attention_kl_backward(*args, split=split, variant=variant)
    name = "bwd_tma" if flags[0] else "bwd_tma_dq" if flags[1] else "bwd_lean"
    assert launches == [(name, True)]
    for name, a, b in zip(("q", "k_s", "k_f"), got, ref):
        assert a.dtype == torch.float32 and a.shape == b.shape and a.is_contiguous(), name
        assert rel(a, b) <= 1e-5, (name, variant, case, rel(a, b))


@pytest.mark.parametrize("variant", ["lean", "tma_dq", "tma"])
def test_tma_variants_through_attention_kl_padded_masks(variant, launches, tma_reduce, monkeypatch):
    """The module switches BWD_VARIANT and FWD_VARIANT (what the bench sweeps) route attention_kl through the
    variants (forward with TMA key tiles for "tma"); padded rows (left, right, holes, a fully masked batch row)
    match the torch reference."""
    monkeypatch.setattr(kernels, "BWD_VARIANT", variant)
    monkeypatch.setattr(kernels, "FWD_VARIANT", "tma" if variant == "tma" else "ptr")
    leaves, mask = make_case(41, 3, 6, 2, 27, 16)
    mask[1] = False
    launches.clear()
    got = loss_and_grads(leaves, mask, "triton", scale=0.4)
    assert launches == [("fwd_tma" if variant == "tma" else "fwd", None), (f"bwd_{variant}", True)]
    ref = loss_and_grads(leaves, mask, "torch", scale=0.4)
    assert_matches(got, ref, 1e-4)
    assert float(got[1][0][1].abs().max()) == 0.0


def test_tma_variants_step_aside_where_tma_cannot_run(monkeypatch):
    """On the GPU the TMA variants run only for half-precision products with D a power of two; the fp32 'ieee'
    path and other D keep the pointer kernel."""
    monkeypatch.setattr(kernels, "interpreting", lambda: False)
    q = torch.zeros(1, 2, 8, 128)
    half = dict(IEEE=False, D=128, BLOCK_D=128)
    assert kernels.bwd_variant_flags(q, half, "tma") == (2, True, True)
    assert kernels.bwd_variant_flags(q, dict(half, IEEE=True), "tma") == (0, False, False)
    assert kernels.bwd_variant_flags(q, dict(half, IEEE=True), "lean") == (0, False, False)
    assert kernels.bwd_variant_flags(q, dict(half, D=96), "tma_dq") == (0, False, True)
    assert kernels.bwd_variant_flags(q[..., ::2], dict(half, D=64, BLOCK_D=64), "tma") == (0, True, True)
    assert kernels.bwd_variant_flags(q.transpose(1, 2), half, "tma") == (1, True, True)
    assert kernels.bwd_variant_flags(q, half, "lean") == (0, False, True)
    assert kernels.bwd_variant_flags(q, half, "ptr") == (0, False, False)


def test_tma_variant_reads_a_permuted_q_through_a_4d_descriptor(launches, tma_reduce):
    """q stored [B, T, H, D] and viewed [B, H, T, D] is TMA-ready but its rows do not collapse to one stride: the
    "tma" variant reads it through the 4-D descriptor (Q_TMA = 1); gradients equal float64's."""
    args, ref = _weighted_rows_case(51, 2, 4, 2, 27, 16, 0.3)
    q = args[0].permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    assert torch.equal(q, args[0]) and not q.is_contiguous()
    assert kernels.bwd_variant_flags(q, kernels._meta(q), "tma") == (1, True, True)
    launches.clear()
    got = kernels.attention_kl_backward(q, *args[1:], split=2, variant="tma")
    assert launches == [("bwd_tma", True)]
    for name, a, b in zip(("q", "k_s", "k_f"), got, ref):
        assert rel(a, b) <= 1e-5, (name, rel(a, b))


def test_bench_sweeps_every_backward_variant_on_cpu(tmp_path, monkeypatch, tma_reduce):
    """bench_attention_kl's logic on the CPU (interpreter; CUDA calls, timing and the GPU-only checks stubbed):
    the variant checks run and pass, and the CSV holds a numeric row per (variant, T, mode) with its config."""
    import csv
    import functools

    import triton.testing

    from bench import bench_attention_kl as bench

    monkeypatch.setattr(bench, "DEVICE", "cpu")
    for name, value in (("synchronize", lambda: None), ("memory_allocated", lambda: 0),
                        ("reset_peak_memory_stats", lambda: None), ("max_memory_allocated", lambda: 0),
                        ("empty_cache", lambda: None), ("get_device_name", lambda: "cpu smoke")):
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (fn(), 1.0)[1])
    monkeypatch.setattr(bench, "matmul_peak", lambda: 1e15)
    monkeypatch.setattr(bench, "make_inputs", functools.partial(bench.make_inputs, H=4, H_kv=2, D=16))
    monkeypatch.setattr(bench, "check", lambda log: 0.0)
    monkeypatch.setattr(bench, "check_compiled", lambda log: True)
    checked = []
    small = (dict(T=21, B=2, H=4, H_kv=2, D=16),)

    def check_variants(log, variants):
        checked.extend(variants)
        return functools.partial(bench.check_variants.__wrapped__, shapes=small)(log, variants)

    check_variants.__wrapped__ = bench.check_variants
    monkeypatch.setattr(bench, "check_variants", check_variants)
    assert bench.run(tmp_path, [24], ["triton"], [], ("ptr", "tma_dq", "tma", "det"))
    assert checked == ["ptr", "tma_dq", "tma", "det"]
    rows = list(csv.DictReader(open(tmp_path / "attention_kl_cpu_smoke.csv")))
    assert sorted((r["variant"], r["mode"]) for r in rows) == sorted(
        (v, m) for v in ("triton", "triton-ptr", "triton-tma_dq", "triton-tma", "triton-det")
        for m in ("fwd", "full"))
    assert all(float(r["ms"]) == 1.0 and r["T"] == "24" for r in rows)
    assert kernels.BWD_VARIANT == "lean" and not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize("permuted", [False, True])
@pytest.mark.parametrize("block_m,block_n", [(16, 16), (32, 16), (16, 32)])
def test_tma_forward_vs_float64(permuted, block_m, block_n, launches, monkeypatch):
    """The forward with TMA key tiles (rows descriptor for contiguous keys, 4-D for keys stored [B, T, H, D]):
    row KL and statistics equal the pointer forward's, and KL equals float64's, at odd T with padded rows."""
    monkeypatch.setitem(kernels.INTERP_BLOCKS, "BLOCK_M", block_m)
    monkeypatch.setitem(kernels.INTERP_BLOCKS, "BLOCK_N", block_n)
    leaves, mask = make_case(61, 2, 6, 2, 37, 16)
    q, k_s, k_f = (x.detach() for x in leaves)
    if permuted:
        k_s, k_f = (k.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3) for k in (k_s, k_f))
    mask8 = mask.to(torch.int8)
    assert kernels.fwd_k_tma(k_s, k_f, kernels._meta(q), "tma") == (1 if permuted else 2)
    launches.clear()
    kl, stats = kernels.attention_kl_forward(q, k_s, k_f, mask8, 0.3)
    monkeypatch.setattr(kernels, "FWD_VARIANT", "tma")
    kl_t, stats_t = kernels.attention_kl_forward(q, k_s, k_f, mask8, 0.3)
    assert launches == [("fwd", None), ("fwd_tma", None)]
    assert torch.allclose(kl_t, kl, atol=1e-6, rtol=1e-5) and torch.allclose(stats_t, stats, atol=1e-5, rtol=1e-5)
    ref = _rows_reference64(q.double(), k_s.double(), k_f.double(), mask, 0.3)
    assert rel(kl_t, ref) <= 1e-5


def test_tma_forward_steps_aside_where_tma_cannot_run(monkeypatch):
    monkeypatch.setattr(kernels, "interpreting", lambda: False)
    k = torch.zeros(1, 2, 8, 128)
    half = dict(IEEE=False, D=128, BLOCK_D=128)
    assert kernels.fwd_k_tma(k, k, half, "tma") == 2
    assert kernels.fwd_k_tma(k, k.transpose(1, 2), half, "tma") == 1
    assert kernels.fwd_k_tma(k, k[..., ::2], dict(half, D=64, BLOCK_D=64), "tma") == 0
    assert kernels.fwd_k_tma(k, k, dict(half, IEEE=True), "tma") == 0
    assert kernels.fwd_k_tma(k, k, half, "ptr") == 0


def test_bench_leaves_out_a_variant_that_fails_its_check(monkeypatch, tma_reduce):
    """A variant that raises (e.g. does not compile on the GPU) or misses the tolerance is logged and left out;
    the others are still checked and returned for timing."""
    from bench import bench_attention_kl as bench

    monkeypatch.setattr(bench, "DEVICE", "cpu")
    flags = kernels.bwd_variant_flags

    def broken(q, meta, variant=None):
        if (variant or kernels.BWD_VARIANT) == "tma":
            raise RuntimeError("no TMA here")
        return flags(q, meta, variant)

    monkeypatch.setattr(kernels, "bwd_variant_flags", broken)
    logged = []
    passed = bench.check_variants(logged.append, ["tma", "lean"], shapes=(dict(T=19, B=1, H=4, H_kv=2, D=16),))
    assert passed == ["lean"]
    assert any("variant tma" in m and "FAILED" in m for m in logged)
    assert any("variant lean" in m and "passed" in m for m in logged)
