"""The fused loss on compressed teachers (kvfuse.codecs): the Triton kernels decode fp8 / int8 / int4 in registers
(TMA and pointer paths, per-channel and per-token scales) and run a low-rank teacher as its coefficients with the
folded adapter; each must equal the torch loss on the explicitly decoded teachers to fp32 tolerance, also compiled."""
import re

import pytest
import torch
import triton
import triton.language as tl

from kvfuse.codecs import LowRankKV, QuantizedKV, encode, encode_fp8, encode_int
from kvfuse.kernels.fused_kv_loss import CODEC_FP8_CHANNEL, _codec_buffer, _fp8_to_bf16, _int8_to_bf16, _x_tile
from kvfuse.kernels.fused_kv_loss_op import (CODEC_CODES, FOLD_EXP, FOLD_SCALE_LIMIT, FP8_OFFSET_EXP, INT8_OFFSET_EXP,
                                             TeacherStorage, fold_side_data)
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
    if kind == "fp8z":  # per channel only (its offset is a channel's mean)
        axis = "channel"
    if kind in ("fp8/f32", "int8/f32"):  # per-channel side data as stores written before hold it: float32 (the
        kind = kind[:-4]                  # kernels' fp32 decode)
        q = encode(x, kind, axis, mask[:, None, :])
        if axis == "channel":
            return QuantizedKV(kind, axis, q.data, q.scale.float(), None if q.offset is None else q.offset.float())
        return q
    return encode(x, kind, axis, mask[:, None, :])


def _loss(args, backend):
    leaves = [args["student_k"], args["student_v"], args["alpha"], *args["w_k"], *args["w_v"]]
    loss, stats = kv_distill_loss(**args, backend=backend, beta=0.6, attention_scaling=1.2)
    return loss.detach(), stats, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("heads,D_s,block", [([(2, 32), (1, 64)], 32, 32),   # TMA boxes (int4 rows of 16 bytes)
                                             ([(2, 16), (3, 8)], 16, None),  # pointer loads, masked int4 bytes
                                             # TMA boxes of 64 dims over heads of 32 and 96: chunks overhang a head
                                             # (the GPU's 128-dim chunks over the packaged model's heads of 64)
                                             ([(2, 32), (1, 96)], 32, 64)],
                         ids=["descriptors", "pointers", "overhang"])
@pytest.mark.parametrize("kind", ["fp8", "fp8/f32", "fp8z", "int8", "int8/f32", "int4", "int4d"])
def test_quantised_teachers_equal_their_decode(kind, heads, D_s, block, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import kvfuse.kernels.fused_kv_loss as k
    if block:  # int4 TMA boxes need ≥ 16 bytes: 32 dims per K-chunk (the GPU configs use 64 or more)
        monkeypatch.setattr(k, "INTERP_FWD", dict(k.INTERP_FWD, BLOCK_K=block))
        monkeypatch.setattr(k, "INTERP_DW", dict(k.INTERP_DW, BLOCK_F=block))
    args = _case(3, heads, D_s)
    mask = args["mask"]
    # keys per channel, values per token (int4's store layout), and the other way round for the second teacher
    axes = [("channel", "token"), ("token", "channel")]
    enc = dict(args, teacher_k=[_encode(x, kind, axes[i][0], mask) for i, x in enumerate(args["teacher_k"])],
               teacher_v=[_encode(x, kind, axes[i][1], mask) for i, x in enumerate(args["teacher_v"])])
    dec = dict(args, teacher_k=[x.decode() for x in enc["teacher_k"]], teacher_v=[x.decode() for x in enc["teacher_v"]])
    got = _loss(enc, "triton")
    assert_close(got, _loss(dec, "torch"), 1e-4, len(heads))
    assert_close(_loss(enc, "torch"), _loss(dec, "torch"), 1e-6, len(heads))
    # the codec really ran: the loss on the original teachers differs by more than fp32 rounding
    assert abs(float(got[0]) - float(_loss(args, "torch")[0])) > 1e-6


@pytest.mark.parametrize("quant", [None, "int8", "int4", "int4d"])
def test_low_rank_teacher_runs_folded(quant, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    heads = [(2, 16), (1, 32)]
    args = _case(5, heads, 16)
    g = torch.Generator().manual_seed(9)
    L, B, _, T, _ = args["teacher_k"][0].shape

    def low_rank(h, d, r=16):
        basis = torch.linalg.qr(torch.randn(L, h * d, r, generator=g))[0].transpose(1, 2).contiguous()
        z = torch.randn(L, B, 1, T, r, generator=g) * args["mask"][None, :, None, :, None]
        coeffs = z if quant is None else encode(z, quant, "token", args["mask"][:, None, :])
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


@pytest.mark.parametrize("where,kind", [("teacher_k[0].scale", "fp8"), ("teacher_v[1].data", "fp8"),
                                        ("teacher_v[0].offset", "int4"), ("teacher_k[1].offset", "int8"),
                                        ("teacher_k[1].coeffs.scale", "fp8"), ("teacher_k[1].basis", "fp8")])
def test_a_non_finite_part_of_a_compressed_teacher_is_named(where, kind, monkeypatch):
    """The check reads what `finite_parts` names (fp8 codes as bytes) and raises before the kernel runs."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    heads = [(2, 16), (1, 32)]
    args = _case(4, heads, 16)
    mask = args["mask"]
    enc = dict(args, teacher_k=[_encode(x, kind, "channel", mask) for x in args["teacher_k"]],
               teacher_v=[_encode(x, kind, "token", mask) for x in args["teacher_v"]])
    if "coeffs" in where or "basis" in where:
        L, B, _, T, _ = args["teacher_k"][1].shape
        z = torch.randn(L, B, 1, T, 16) * mask[None, :, None, :, None]
        enc["teacher_k"][1] = LowRankKV(encode_fp8(z, "token", mask[:, None, :]), torch.randn(L, 16, 32), 1, 32)
    entry, part = where.split(".", 1)
    t = enc[entry[:9]][int(entry[10])]
    for name in part.split("."):
        t = getattr(t, name)
    (t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t).view(-1)[t.numel() // 2] = \
        0xFF if t.dtype == torch.float8_e4m3fn else float("nan")
    with pytest.raises(ValueError, match=rf"non-finite values \(NaN/Inf\) in {re.escape(where)};"):
        kv_distill_loss(**enc, backend="triton")


@pytest.mark.parametrize("kind", ["fp8", "int8"])
@pytest.mark.parametrize("where", ["teacher_k[0].scale", "teacher_v[1].scale"])
def test_a_bf16_scale_past_the_kernels_fold_is_named_before_the_kernel(where, kind, monkeypatch):
    """A caller's own per-channel fp8 or int8 entry (the encoders refuse such scales) with a bf16 scale of 2^16 would
    decode to Inf through the Triton kernels' fold (`fold_side_data`), whatever the student's dtype: it is named
    instead; the torch backend, which decodes explicitly, takes it."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    args = _case(5, [(2, 16), (1, 32)], 16)
    mask = args["mask"]
    enc = dict(args, teacher_k=[_encode(x, kind, "channel", mask) for x in args["teacher_k"]],
               teacher_v=[_encode(x, kind, "channel", mask) for x in args["teacher_v"]])
    entry = enc[where[:9]][int(where[10])]
    t = entry.scale
    assert t.dtype == torch.bfloat16
    t.view(-1)[t.numel() // 2] = FOLD_SCALE_LIMIT
    bf16 = dict(enc, student_k=args["student_k"].detach().bfloat16(), student_v=args["student_v"].detach().bfloat16())
    for student in (bf16, enc):
        with pytest.raises(ValueError, match=rf"{re.escape(where)}: a scale reaches 65536 .*float32 scales, or use "
                                             r"backend='torch'"):
            kv_distill_loss(**student, backend="triton")
    assert torch.isfinite(kv_distill_loss(**bf16, backend="torch")[0])


@pytest.mark.parametrize("codec,codec_v", [(("fp8", "token"), ("fp8", "token")),
                                           (("fp8", "channel"), ("fp8", "token")),
                                           (("fp8", "channel"), ("fp8", "channel")),
                                           (("int4", "channel"), ("int4", "token"))])
def test_fp8_token_weight_gradients_run_unpipelined(codec, codec_v):
    # triton 3.6 miscompiles the pipelined fp8 per-token decode of the weight gradient on sm_90a (bench/NOTES.md):
    # any launch holding such a teacher gets one-stage configs, every other coded launch the tuned list at its own
    # stage counts — both less the two 4-warp tiles left out for every compressed teacher (seen wrong at the
    # packaged model's shapes)
    import kvfuse.kernels.fused_kv_loss as k
    from kvfuse.kernels.fused_kv_loss_op import CODEC_CODES
    kept = k._prune_dw(k._DW_CONFIGS_GPU, {"CODEC": CODEC_CODES[codec], "CODEC_V": CODEC_CODES[codec_v]})
    listed = [c for c in k._DW_CONFIGS_GPU if (c.kwargs["BLOCK_F"], c.kwargs["BLOCK_C"], c.kwargs["BLOCK_T"],
                                               c.num_warps) not in ((128, 64, 64, 4), (64, 128, 128, 4))]
    assert len(listed) == len(k._DW_CONFIGS_GPU) - 2
    if ("fp8", "token") in (codec, codec_v):
        assert [(c.kwargs, c.num_warps) for c in kept] == [(c.kwargs, c.num_warps) for c in listed]
        assert {c.num_stages for c in kept} == {1}
        return
    assert [(c.kwargs, c.num_warps, c.num_stages) for c in kept] == \
        [(c.kwargs, c.num_warps, c.num_stages) for c in listed] and 1 not in {c.num_stages for c in kept}


@pytest.mark.parametrize("codecs", [(("int4d", "channel"), ("int4", "channel")), (("int4d", "token"),),
                                    (("int4", "channel"), ("fp8", "channel")), ("plain",)])
def test_dithered_forward_leaves_out_its_miscompiled_tile(codecs):
    # triton 3.6 miscompiles the pipelined dithered decode of the forward at 64 x 128 tiles over 4 warps on sm_90a
    # (bench/NOTES.md): launches with a dithered teacher never get that tile, all others the full list
    import kvfuse.kernels.fused_kv_loss as k
    from kvfuse.kernels.fused_kv_loss_op import CODEC_CODES
    codes = tuple(CODEC_CODES.get(c, 0) for c in codecs)
    meta = {"H_S": 2, "PH": 64, "EPI_DESC": False, "NATURAL": True, "CODECS": codes}
    full = [c for c in k._FWD_CONFIGS_GPU if c.kwargs["HPP"] == 1]
    kept = k._prune_fwd(k._FWD_CONFIGS_GPU, meta)
    tile = [(c.kwargs["BLOCK_T"], c.kwargs["BLOCK_K"], c.num_warps) for c in kept]
    if any(c[0] == "int4d" for c in codecs):
        assert (64, 128, 4) not in tile and len(kept) == len(full) - 1
    else:
        assert (64, 128, 4) in tile and [c.kwargs for c in kept] == [c.kwargs for c in full]


@triton.jit
def _decode_fp8_bits(src, scale, dst, N: tl.constexpr, SCALED: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(dst + i, _fp8_to_bf16(tl.load(src + i), tl.load(scale + i) if SCALED else None, SCALED))


@pytest.mark.parametrize("scale", [None, 1.0, 2.0 ** -100, 3.2e4, 0.0123, 7.1e-3, 271.0])
def test_fp8_codes_to_bf16_by_bits_is_exact_for_every_code(scale):
    # the kernels' fp8 decode (_fp8_to_bf16: the forward by its folded bf16 scale, the weight gradient unscaled)
    # against torch's e4m3 → float32 · scale → bf16 on all 254 finite codes, bit for bit: zeros of both signs,
    # subnormal codes (exponent 0), the largest normals, products near bf16's smallest normal (2^-100 · 2^-9
    # · 2^-8) and scales up to just below FOLD_SCALE_LIMIT; the folded decode gives value·scale·2^-8
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the inline PTX on a GPU, its spelling in the interpreter
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]  # 0x7F and 0xFF are e4m3's NaN, which the codec never writes
    # a stored scale is a bf16 value; it differs from element to element (by powers of two, which keep the products'
    # range), so a code paired with its neighbour's scale shows
    s = (torch.tensor(1.0 if scale is None else scale) * 2.0 ** (torch.arange(256) % 3 - 1)).to(torch.bfloat16)
    if scale is None:
        s = torch.ones(256, dtype=torch.bfloat16)
    assert s.float().max() < FOLD_SCALE_LIMIT
    src = torch.zeros(256, dtype=torch.uint8)
    src[:codes.numel()] = codes
    dst = torch.empty(256, dtype=torch.bfloat16, device=dev)
    # one warp: eight codes per thread, as in the kernels' tiles (the weight gradient's decode takes four at once)
    folded = s * 2.0 ** FOLD_EXP  # as fold_side_data folds it
    _decode_fp8_bits[(1,)](src.to(dev).view(torch.float8_e4m3fn), folded.to(dev), dst, N=256,
                           SCALED=scale is not None, num_warps=1)
    want = (codes.view(torch.float8_e4m3fn).to(torch.float32) * s[:codes.numel()].to(torch.float32)).to(torch.bfloat16)
    if scale is not None:
        want = want * 2.0 ** -8  # exact: a power of two, and every product here stays a normal bf16
    got = dst[:codes.numel()].cpu()
    bad = (got.view(torch.int16) != want.view(torch.int16)).nonzero().flatten()
    assert bad.numel() == 0, [(hex(int(codes[i])), float(got[i]), float(want[i])) for i in bad[:8]]


@triton.jit
def _folded_tile(x, sc, of, out, sx0, sx1, sx2, sx3, l, b, hi, t0, d0, B, T, H_I, D_I: tl.constexpr,
                 CODEC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    xt = _x_tile(x, sc, of, sx0, sx1, sx2, sx3, l, b, hi, t0, d0, B, T, H_I, D_I, CODEC, False, BLOCK_T, BLOCK_K,
                 False, True)
    i = tl.arange(0, BLOCK_T)[:, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
    tl.store(out + i, xt)


@pytest.mark.parametrize("kind", ["fp8", "fp8z", "int8"])
def test_folded_side_data_decodes_each_tile_to_the_value_times_a_power_of_two(kind, monkeypatch):
    # the kernels' bf16 decode of per-channel fp8, fp8z and int8 (scales times 2^112, offsets times 2^-8 or 2^-21,
    # `fold_side_data`, in the codec buffer as bf16 pairs, read back at the teacher's offsets behind another
    # teacher's float32 side data): each tile, ragged rows and chunks past the head included, is the torch decode rounded to bf16 times
    # 2^-8 (fp8, fp8z) or 2^-21 (int8), bit for bit. (The product with it runs on bf16 tensor cores only, which the
    # interpreter's tl.dot cannot run: the GPU checks it, check_configs.)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    L, B, H, T, D = 2, 2, 3, 21, 32
    g = torch.Generator().manual_seed(7)
    mask = torch.rand(B, T, generator=g) > 0.2
    x = torch.randn(L, B, H, T, D, generator=g) * torch.logspace(-3, 2, D) + torch.linspace(-40, 3, D)
    code = CODEC_CODES[kind, "channel"]
    q = encode(x, kind, "channel", mask[None, :, None, :])
    assert q.scale.dtype == torch.bfloat16
    other = torch.rand(L, B, H, D, generator=g)                   # a float32-side-data teacher ahead of it
    # (fp8z has no float32 form: the teacher ahead is fp8's)
    ahead = CODEC_CODES["fp8" if kind == "fp8z" else kind, "channel/f32"]
    keys = TeacherStorage([q.data, q.data], (ahead, code), [other, q.scale],
                          [None if kind != "int8" else other, q.offset])
    keys, _ = fold_side_data(keys, TeacherStorage.plain([]))
    assert keys.scale[0] is other and keys.scale[1].dtype == torch.bfloat16
    buf, offs = _codec_buffer(keys.scale, keys.offset, 2, torch.empty(1))
    want = (q.decode().to(torch.bfloat16).float() * 2.0 ** (-21 if kind == "int8" else -8)).to(torch.bfloat16)
    data = q.data.contiguous()
    for l, b, hi, t0, d0 in [(0, 0, 0, 0, 0), (1, 1, 2, 16, 16), (1, 0, 1, 8, 0), (0, 1, 2, 16, 24)]:
        out = torch.empty(16, 16, dtype=torch.bfloat16)
        _folded_tile[(1,)](data, buf[offs[1][0]:], buf[offs[1][1]:], out, *data.stride()[:4], l, b, hi, t0, d0, B, T,
                           H, D, code, 16, 16)
        ref = torch.zeros(16, 16, dtype=torch.bfloat16)
        rows, cols = want[l, b, hi, t0:t0 + 16, d0:d0 + 16].shape
        ref[:rows, :cols] = want[l, b, hi, t0:t0 + 16, d0:d0 + 16]
        assert torch.equal(out.view(torch.int16), ref.view(torch.int16)), (l, b, hi, t0, d0)


@triton.jit
def _decode_fp8z_bits(src, scale, offset, dst, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(dst + i, _fp8_to_bf16(tl.load(src + i), tl.load(scale + i), True, tl.load(offset + i), True))


def _bf16_nearest(x: torch.Tensor) -> torch.Tensor:
    """float64 x rounded once to bfloat16, to nearest even (torch's float64 → bf16 goes through float32)."""
    c = x.float().to(torch.bfloat16)
    cands = torch.stack([torch.nextafter(c, torch.full_like(c, -float("inf"))), c,
                         torch.nextafter(c, torch.full_like(c, float("inf")))])
    dist = (cands.double() - x).abs()
    nearest = dist == dist.min(0).values
    odd = cands.view(torch.int16) & 1
    return cands.gather(0, torch.where(nearest, odd, 2).argmin(0, keepdim=True))[0]  # a tie goes to the even one


@pytest.mark.parametrize("scale,offset", [(1.0, 0.0), (0.0123, -1.57), (7.1e-3, 0.3), (271.0, -3e4), (3.2e4, 1e6),
                                          (2.0 ** -100, 3 * 2.0 ** -95), (2.0 ** -20, 2.0 ** -10)])
def test_fp8z_codes_to_bf16_by_bits_are_exact_for_every_code(scale, offset):
    # fp8z's decode (_fp8_to_bf16 with the offset in its FMA) against code·scale + offset computed exactly and
    # rounded once to bf16, times 2^-8, bit for bit on all 254 finite codes: offsets of either sign, near and far
    # from the codes' span, products near bf16's smallest normal, scales up to just below FOLD_SCALE_LIMIT
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the inline PTX on a GPU, its spelling in the interpreter
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]
    n = codes.numel()
    s = (torch.tensor(scale) * 2.0 ** (torch.arange(256) % 3 - 1)).to(torch.bfloat16)
    o = (torch.tensor(offset) * 2.0 ** (torch.arange(256) % 2)).to(torch.bfloat16)
    assert s.float().max() < FOLD_SCALE_LIMIT
    src = torch.zeros(256, dtype=torch.uint8)
    src[:n] = codes
    dst = torch.empty(256, dtype=torch.bfloat16, device=dev)
    _decode_fp8z_bits[(1,)](src.to(dev).view(torch.float8_e4m3fn), (s * 2.0 ** FOLD_EXP).to(dev),
                            (o * 2.0 ** FP8_OFFSET_EXP).to(dev), dst, N=256, num_warps=1)
    exact = codes.view(torch.float8_e4m3fn).double() * s[:n].double() + o[:n].double()
    want = _bf16_nearest(exact)
    assert (want == 0).logical_or(want.float().abs() >= 2.0 ** -118).all()  # normal after ·2^-8
    want = want * 2.0 ** -8
    got = dst[:n].cpu()
    bad = (got.view(torch.int16) != want.view(torch.int16)).nonzero().flatten()
    assert bad.numel() == 0, [(hex(int(codes[i])), float(got[i]), float(want[i])) for i in bad[:8]]


@triton.jit
def _decode_int8_bits(src, scale, offset, dst, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(dst + i, _int8_to_bf16(tl.load(src + i), tl.load(scale + i), tl.load(offset + i)))


@pytest.mark.parametrize("scale,offset", [(1.0, 0.0), (1.0, -128.0), (2.0 ** -100, -3 * 2.0 ** -95),
                                          (0.0123, -1.57), (7.1e-3, 0.3), (255.0, -3e4), (3.2e4, 1e6),
                                          (2.0 ** -20, 2.0 ** -10)])
def test_int8_codes_to_bf16_by_bits_are_exact_for_every_code(scale, offset):
    # the kernels' int8 decode (_int8_to_bf16: the code's byte as bf16 bits, one FMA by the folded scale and offset)
    # against torch's code·scale + offset in fp32 → bf16 on all 256 codes, bit for bit, times 2^-21: the codes
    # either side of 128 (subnormal / normal bits), products near bf16's smallest normal, scales up to just below
    # FOLD_SCALE_LIMIT, offsets of either sign and far from the grid's span
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the inline PTX on a GPU, its spelling in the interpreter
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    # bf16 side data differing from code to code by powers of two, so a code paired with its neighbour's shows
    s = (torch.tensor(scale) * 2.0 ** (torch.arange(256) % 3 - 1)).to(torch.bfloat16)
    o = (torch.tensor(offset) * 2.0 ** (torch.arange(256) % 2)).to(torch.bfloat16)
    assert s.float().max() < FOLD_SCALE_LIMIT
    dst = torch.empty(256, dtype=torch.bfloat16, device=dev)
    _decode_int8_bits[(1,)](codes.to(dev), (s * 2.0 ** FOLD_EXP).to(dev), (o * 2.0 ** INT8_OFFSET_EXP).to(dev), dst,
                            N=256, num_warps=1)
    want = (codes.to(torch.float32) * s.to(torch.float32) + o.to(torch.float32)).to(torch.bfloat16) * 2.0 ** -21
    assert (want == 0).logical_or(want.float().abs() >= 2.0 ** -126).all()  # normal: ·2^-21 was exact
    got = dst.cpu()
    bad = (got.view(torch.int16) != want.view(torch.int16)).nonzero().flatten()
    assert bad.numel() == 0, [(int(codes[i]), float(got[i]), float(want[i])) for i in bad[:8]]


def test_side_data_folds_in_one_launch_for_every_teacher_of_both_kinds(monkeypatch):
    # fold_side_data: per-channel fp8(z) and int8 scales (bf16) times 2^112, fp8z and int8 offsets times 2^-8 and
    # 2^-21, exactly; float32 side data, per-token groups and plain teachers untouched; one multi-tensor multiply for
    # all of them
    L, B, H, T, D = 2, 2, 2, 16, 32
    g = torch.Generator().manual_seed(3)
    x = torch.randn(L, B, H, T, D, generator=g) * 3 - 1
    i8, f8, i4 = encode_int(x, "channel", kind="int8"), encode_fp8(x, "channel"), encode_int(x, "token")
    f8z = encode_fp8(x, "channel", kind="fp8z")
    f8_32 = QuantizedKV("fp8", "channel", f8.data, f8.scale.float(), None)
    keys = TeacherStorage([i8.data, f8.data, x, f8z.data],
                          (CODEC_CODES["int8", "channel"], CODEC_CODES["fp8", "channel"], 0,
                           CODEC_CODES["fp8z", "channel"]),
                          [i8.scale, f8.scale, None, f8z.scale], [i8.offset, None, None, f8z.offset])
    values = TeacherStorage([i4.data, f8_32.data, i8.data], (CODEC_CODES["int4", "token"],
                            CODEC_CODES["fp8", "channel/f32"], CODEC_CODES["int8", "channel"]),
                            [i4.scale, f8_32.scale, i8.scale], [i4.offset, None, i8.offset])
    calls = []
    real = torch._foreach_mul
    monkeypatch.setattr(torch, "_foreach_mul", lambda *a: calls.append(len(a[0])) or real(*a))
    k, v = fold_side_data(keys, values)
    assert calls == [7]
    assert k.data is keys.data and v.data is values.data and (k.codecs, v.codecs) == (keys.codecs, values.codecs)
    assert torch.equal(k.scale[0], i8.scale * 2.0 ** 112) and torch.equal(k.offset[0], i8.offset * 2.0 ** -21)
    assert torch.equal(k.scale[1], f8.scale * 2.0 ** 112) and k.offset[1] is None and k.scale[2] is None
    assert torch.equal(k.scale[0].float() * 2.0 ** -112, i8.scale.float())  # exact: powers of two
    assert torch.equal(k.offset[0].float() * 2.0 ** 21, i8.offset.float())
    assert torch.equal(k.scale[3], f8z.scale * 2.0 ** 112) and torch.equal(k.offset[3], f8z.offset * 2.0 ** -8)
    assert torch.equal(k.offset[3].float() * 2.0 ** 8, f8z.offset.float())
    assert v.scale[0] is i4.scale and v.offset[0] is i4.offset and v.scale[1] is f8_32.scale
    assert torch.equal(v.scale[2], i8.scale * 2.0 ** 112) and torch.equal(v.offset[2], i8.offset * 2.0 ** -21)
    plain = TeacherStorage.plain([x])
    assert fold_side_data(plain, plain) == (plain, plain) and calls == [7]
