"""Store codecs (kvfuse.codecs): round trips within each codec's stated bound on random and real captured KV, the
packed int4 layout byte for byte, low-rank bases and the folded adapter, and the loss on compressed teachers."""
import pytest
import torch

from kvfuse.codecs import (LowRankKV, QuantizedKV, check_plain, decode_teachers, encode, encode_fp8, encode_int,
                           encode_lowrank, finite_flag, finite_parts, fit_lowrank_basis, fold_lowrank_adapter, gram,
                           pack_int4, parse_codec, raise_if_not_finite, scale_dtypes, stack_samples, stored_axis,
                           unpack_int4)
from kvfuse.loss import kv_distill_loss
from kvfuse.kernels.fused_kv_loss_op import FOLD_SCALE_LIMIT
from kvfuse.models.capture import capture_kv


def _kv(seed=0, shape=(3, 2, 19, 8), outliers=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen) * 2
    if outliers:      # keys carry a few large fixed channels (the reason for per-channel scales)
        x[..., 3] *= 20
    mask = torch.rand(shape[-2], generator=gen) > 0.25
    mask[0] = True
    return x, mask


def _group_stat(x, mask, axis, fn):
    """max/min/amax over the group the codec scales by, valid tokens only, broadcast back to x's shape."""
    valid = x[..., mask, :]
    if axis == "channel":
        return fn(valid, -2, keepdim=True)
    return fn(x, -1, keepdim=True)


def _fp8_bound(x, mask, axis):
    amax = _group_stat(x.abs(), mask, axis, lambda t, d, keepdim: t.amax(d, keepdim=keepdim))
    scale = amax / 448
    return torch.maximum(x.abs() * 2 ** -4, scale * 2 ** -10) * 1.01 + 1e-7


def _int_bound(x, mask, axis, kind):
    levels = {"int8": 255, "int4": 15, "int4d": 15}[kind]
    hi = _group_stat(x, mask, axis, lambda t, d, keepdim: t.amax(d, keepdim=keepdim))
    lo = _group_stat(x, mask, axis, lambda t, d, keepdim: t.amin(d, keepdim=keepdim))
    scale = (hi - lo) / levels
    if kind == "int8" and axis == "channel":
        # bf16 offset rounded down (< 2⁻⁷|min| below min: one step of 8 significant bits) and scale rounded up (< 2⁻⁷)
        scale = (hi - lo + lo.abs() * 2 ** -7) / levels * (1 + 2 ** -7)
    # fp16 token scales/offsets: the grid is off by their rounding (≤ 2⁻¹¹ relative each), `levels` steps at the far
    # end
    slack = 0 if axis == "channel" else 2 ** -10 * (levels * scale + lo.abs())
    return scale / 2 * 1.001 + slack + 1e-6


@pytest.mark.parametrize("kind", ["fp8", "int8", "int4", "int4d"])
@pytest.mark.parametrize("axis", ["channel", "token"])
def test_round_trip_on_random_kv_is_within_the_stated_bound(kind, axis):
    x, mask = _kv()
    q = encode(x, kind, axis, mask)
    assert q.shape == x.shape and q.kind == kind and q.axis == axis
    assert q.scale.dtype == scale_dtypes(kind, axis)[0]  # fp8, int8 per channel bfloat16, int4 float32, per token
    #                                                        float16
    err = (q.decode() - x).abs()[..., mask, :]
    bound = _fp8_bound(x, mask, axis) if kind == "fp8" else _int_bound(x, mask, axis, kind)
    bound = bound.expand_as(x)[..., mask, :]
    assert (err <= bound).all(), float((err - bound).max())
    # masked tokens carry nothing: exact zeros, except integer keys (a channel's offset is shared): finite
    masked = q.decode()[..., ~mask, :]
    if kind != "fp8" and axis == "channel":
        assert torch.isfinite(masked).all()
    else:
        assert torch.equal(masked, torch.zeros_like(masked))


def test_int4_bytes_are_the_documented_layout():
    # codes 0..15 laid out by hand: byte j = q[2j] | q[2j+1] << 4 (the even channel in the low nibble)
    codes = torch.tensor([[1, 2, 15, 0], [7, 8, 0, 15]], dtype=torch.uint8)
    assert pack_int4(codes).tolist() == [[0x21, 0x0F], [0x87, 0xF0]]
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)
    # a value grid the encoder reproduces exactly: per-token offset -1 and scale 0.5 (exact in fp16)
    x = torch.tensor([[[-0.5, 0.0, 6.5, -1.0], [2.5, 3.0, -1.0, 6.5]]])       # [1, T=2, D=4]
    q = encode_int(x, "token")
    assert q.data.tolist() == [[[0x21, 0x0F], [0x87, 0xF0]]]
    assert q.scale.tolist() == [[0.5, 0.5]] and q.offset.tolist() == [[-1.0, -1.0]]
    assert torch.equal(q.decode(), x)
    hand = QuantizedKV("int4", "token", torch.tensor([[[0x21, 0x0F]]], dtype=torch.uint8),
                       torch.tensor([[2.0]], dtype=torch.float16), torch.tensor([[10.0]], dtype=torch.float16))
    assert hand.decode().tolist() == [[[12.0, 14.0, 40.0, 10.0]]]


def test_int8_channel_grid_spans_each_channels_range_in_bf16():
    # offset rounded down and scale rounded up to bf16 values: min and max stay on the grid's span, and the step grows
    # by less than |min|·2⁻⁷ over the range (plus the scale's own rounding, < 2⁻⁷)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 2, 50, 16, generator=g) * torch.logspace(-2, 2, 16) + torch.linspace(-30, 30, 16)
    q = encode_int(x, "channel", kind="int8")
    hi, lo = x.amax(-2), x.amin(-2)
    s, o = q.scale.float(), q.offset.float()
    assert q.scale.dtype == q.offset.dtype == torch.bfloat16
    assert (o <= lo).all() and (o + 255 * s >= hi).all()
    assert (s <= (hi - lo + lo.abs() * 2 ** -7) / 255 * (1 + 2 ** -7)).all()
    assert ((q.decode() - x).abs() <= s[..., None, :] / 2 * (1 + 1e-5)).all()
    # a constant channel that bf16 holds exactly decodes exactly; one it does not, within half its small step
    const = torch.full((1, 6, 2), 1.0)
    const[..., 1] = 1.0 + 2 ** -10
    c = encode_int(const, "channel", kind="int8")
    assert torch.equal(c.decode()[..., 0], const[..., 0])
    assert ((c.decode()[..., 1] - const[..., 1]).abs() <= c.scale.float()[..., 1] / 2).all()


def test_int8_codes_are_one_byte_per_value_on_the_documented_grid():
    # per channel: offset = min, scale = (max − min)/255 over the valid tokens (both bf16 values here, so exact),
    # q = round((x − offset)/scale)
    x = torch.tensor([[[0.0, -2.0], [255.0, 0.0], [100.0, 508.0], [7.0, 9.0]]])   # [1, T=4, D=2]
    mask = torch.tensor([True, True, True, False])
    q = encode_int(x, "channel", mask, kind="int8")
    assert q.data.dtype == torch.uint8 and q.data.shape == x.shape and q.offset.dtype == torch.bfloat16
    assert q.scale.tolist() == [[1.0, 2.0]] and q.offset.tolist() == [[0.0, -2.0]]
    # the masked token: each channel's code nearest 0 (channel 0: 0 itself; channel 1: code 1, value 0)
    assert q.data.tolist() == [[[0, 0], [255, 1], [100, 255], [0, 1]]]
    assert torch.equal(q.decode(), torch.tensor([[[0.0, -2.0], [255.0, 0.0], [100.0, 508.0], [0.0, 0.0]]]))
    hand = QuantizedKV("int8", "token", torch.tensor([[[3, 200]]], dtype=torch.uint8),
                       torch.tensor([[0.5]], dtype=torch.float16), torch.tensor([[-1.0]], dtype=torch.float16))
    assert hand.decode().tolist() == [[[0.5, 99.0]]] and hand.shape == (1, 1, 2)
    # a float32 scale and offset (int8 stores written before the bf16 side data) decode as written
    legacy = QuantizedKV("int8", "channel", q.data, q.scale.float(), q.offset.float())
    assert torch.equal(legacy.decode(), q.decode()) and stored_axis(legacy.scale) == "channel"
    with pytest.raises(ValueError, match="int8 QuantizedKV needs an offset"):
        QuantizedKV("int8", "channel", q.data, q.scale)
    with pytest.raises(ValueError, match="int8 data must be torch.uint8"):
        QuantizedKV("int8", "channel", q.data.to(torch.int8), q.scale, q.offset)


def test_fp8_channel_scales_are_bf16_values_rounded_up():
    # per-channel fp8 scales are stored as bf16 (the kernels multiply in bf16), rounded up from amax/448 so that the
    # largest value of each channel still fits 448 without clipping; stores with float32 scales still decode
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 2, 40, 16, generator=g) * torch.logspace(-3, 3, 16)
    q = encode_fp8(x, "channel")
    amax = x.abs().amax(-2)
    assert q.scale.dtype == torch.bfloat16 and stored_axis(q.scale) == "channel"
    s = q.scale.to(torch.float32)
    assert (s >= amax / 448).all() and (s < amax / 448 * (1 + 2 ** -7)).all()
    assert ((x / s[..., None, :]).abs() <= 448).all()
    legacy = QuantizedKV("fp8", "channel", q.data, s, None)
    assert torch.equal(legacy.decode(), q.decode())
    # a batch of samples from before and after (a store resumed across the change) stacks to float32 scales
    batch = stack_samples([legacy, q], 40)
    assert batch.scale.dtype == torch.float32 and torch.equal(batch.decode()[:, 1], q.decode())
    with pytest.raises(ValueError, match="must be torch.bfloat16 or torch.float32"):
        QuantizedKV("fp8", "channel", q.data, q.scale.to(torch.float16), None)
    with pytest.raises(ValueError, match="must be torch.float32 of shape"):
        QuantizedKV("int4", "channel", torch.zeros(2, 4, 4, dtype=torch.uint8), torch.ones(2, 8, dtype=torch.bfloat16),
                    torch.zeros(2, 8, dtype=torch.bfloat16))


def test_fp8z_codes_the_distance_from_each_channels_mean_within_fp8s_bound():
    # fp8z: offset = the channel's mean over valid tokens (bf16, to nearest), scale = max |x − offset|/448 rounded up
    # to bf16; the error is fp8's bound around the offset, so channels far from 0 (keys' means) lose far less than fp8
    x, mask = _kv(6, shape=(3, 2, 23, 8))
    x = x * 0.3 + torch.linspace(-30, 40, 8)                 # channel means far larger than the spread around them
    q = encode(x, "fp8z", "channel", mask)
    assert q.kind == "fp8z" and q.data.dtype == torch.float8_e4m3fn
    assert q.scale.dtype == q.offset.dtype == torch.bfloat16
    mean = x[..., mask, :].mean(-2)
    assert torch.equal(q.offset, mean.to(torch.bfloat16))
    centred = x - q.offset.float().unsqueeze(-2)
    dev = centred[..., mask, :].abs().amax(-2)
    assert (q.scale.float() >= dev / 448).all() and (q.scale.float() < dev / 448 * (1 + 2 ** -7)).all()
    err = (q.decode() - x).abs()[..., mask, :]
    bound = torch.maximum(centred.abs() * 2 ** -4, q.scale.float().unsqueeze(-2) * 2 ** -10)[..., mask, :] * 1.01
    assert (err <= bound).all(), float((err - bound).max())
    fp8_err = (encode(x, "fp8", "channel", mask).decode() - x)[..., mask, :].square().sum()
    assert err.square().sum() < fp8_err / 20
    # a masked token holds the code nearest 0 − offset: finite, and 0 where 0 lies within 448 steps of the offset
    masked = q.decode()[..., ~mask, :]
    o, sc = q.offset.float().unsqueeze(-2).expand_as(masked), q.scale.float().unsqueeze(-2).expand_as(masked)
    near = o.abs() <= 448 * sc
    assert near.any() and (~near).any() and torch.isfinite(masked).all()
    assert (masked[near].abs() <= torch.maximum(o.abs() * 2 ** -4, sc * 2 ** -10)[near] * 1.01).all()
    assert torch.equal(masked[~near], (o - 448 * sc * o.sign())[~near])  # the far end of the grid towards 0
    # a batch pads each sample with its own such codes
    short = encode(x[..., :20, :], "fp8z", "channel", mask[:20])
    batch = stack_samples([q, short], 23)
    o, sc = short.offset.float(), short.scale.float()
    want = (-o / sc).clamp(-448, 448).to(torch.float8_e4m3fn).float() * sc + o
    torch.testing.assert_close(batch.decode()[:, 1, :, 20:], want.unsqueeze(-2).expand(3, 2, 3, 8), rtol=0, atol=0)
    assert torch.equal(batch.decode()[:, 0], q.decode())


def test_fp8_scales_and_the_zero_guard():
    x = torch.zeros(2, 5, 4)
    x[0, :, 1] = torch.tensor([0.0, 448.0, -224.0, 1.0, 2.0])
    q = encode_fp8(x, "channel")
    assert q.scale[0].tolist() == [1.0, 1.0, 1.0, 1.0]           # amax/448 = 1 on channel 1; all-zero groups: 1
    assert torch.equal(q.decode(), x)                             # 0, 448, −224, 1, 2 are fp8 values
    assert torch.equal(encode_fp8(torch.zeros(3, 4), "token").decode(), torch.zeros(3, 4))
    assert torch.equal(encode_int(torch.zeros(3, 4), "channel").decode(), torch.zeros(3, 4))


@pytest.mark.parametrize("axis", ["channel", "token"])
def test_int4d_is_int4_with_a_subtractive_dither(axis):
    """int4d rounds (x − offset)/scale + u and decodes (q − u)·scale + offset with int4's scales and offsets: the
    same bound, an error that no longer follows x (a channel's error along its tokens is uncorrelated with x),
    and constant groups still exact."""
    from kvfuse.codecs import int4_dither

    def lowbias32(x):                                       # Python integers: no wrapping to get wrong
        x ^= x >> 16
        x = x * 0x7FEB352D % 2 ** 32
        x ^= x >> 15
        x = x * 0x846CA68B % 2 ** 32
        return x ^ x >> 16

    import struct

    scale = torch.tensor([0.5, 1.0, 0.0123, 3.5e-5] * 16)                   # per channel: [D = 64]
    u = int4_dither(scale, "channel", 4096, 64).double()
    for t, d in ((0, 0), (1, 0), (0, 1), (4095, 63), (77, 5), (9, 2)):
        bits = struct.unpack("<I", struct.pack("<f", float(scale[d])))[0]
        assert float(u[t, d]) == (lowbias32((t * 0x9E3779B1 + d) % 2 ** 32 ^ bits) >> 8) / 2 ** 24 - 0.5
    assert float(u.min()) >= -0.5 and float(u.max()) < 0.5 and abs(float(u.var()) - 1 / 12) < 1e-3
    # no pattern along a channel's tokens or a token's channels (a Weyl sequence repeated within 1 % every 4 tokens)
    for lag_t, lag_d in ((1, 0), (4, 0), (0, 1), (0, 7)):
        a, b = u[:4096 - lag_t, :64 - lag_d], u[lag_t:, lag_d:]
        assert abs(float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])) < 0.02, (lag_t, lag_d)
    # and none between groups: each sample, layer and head draws its own (seeded by its scale)
    other = int4_dither(scale * 1.001, "channel", 4096, 64).double()
    assert abs(float(torch.corrcoef(torch.stack([u.flatten(), other.flatten()]))[0, 1])) < 0.02
    per_token = int4_dither(torch.tensor([0.5, 0.25], dtype=torch.float16), "token", 2, 64)
    assert per_token.shape == (2, 64) and not torch.equal(per_token[0], int4_dither(torch.tensor([0.25, 0.5]), "token",
                                                                                      2, 64)[0])
    x, mask = _kv(7)
    plain, dithered = encode_int(x, axis, mask), encode_int(x, axis, mask, kind="int4d")
    assert dithered.kind == "int4d" and torch.equal(dithered.scale, plain.scale)
    assert torch.equal(dithered.offset, plain.offset)
    assert not torch.equal(dithered.data, plain.data)
    # a ramp along the group (the tokens of a channel, or the channels of a token): round to nearest gives an error
    # that is a fixed function of x (the sawtooth round(y) − y of y = (x − offset)/scale), the dither one that is not
    ramp = torch.linspace(0, 1, 4096, dtype=torch.float64).float()
    ramp = ramp[:, None].expand(4096, 2) if axis == "channel" else ramp[None, :].expand(2, 4096)
    for q, dithered in ((encode_int(ramp, axis), False), (encode_int(ramp, axis, kind="int4d"), True)):
        y = ramp.double() / float(q.scale.flatten()[0])
        err = (q.decode().double() - ramp.double()) / float(q.scale.flatten()[0])
        c = float(torch.corrcoef(torch.stack([err.flatten(), (torch.round(y) - y).flatten()]))[0, 1])
        assert (abs(c) < 0.05) if dithered else (c > 0.999), c
    const = torch.full((2, 3, 4), 0.375)
    assert torch.equal(encode_int(const, axis, kind="int4d").decode(), const)


def test_finite_flag_on_every_fp8_byte_and_on_floats():
    """fp8 codes are tested on their bytes (no fp16 copy): every one of the 256 patterns, anywhere in the tensor,
    against torch's own conversion."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    for byte in range(256):
        t = torch.zeros(5, 7, dtype=torch.uint8)
        t[byte % 5, byte % 7] = byte
        t = t.view(torch.float8_e4m3fn)
        assert bool(finite_flag(t)) == bool(torch.isfinite(t.float()).all()), byte
    assert int(codes.view(torch.float8_e4m3fn).float().isnan().sum()) == 2          # 0x7F and 0xFF
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        assert bool(finite_flag(torch.randn(4, 6).to(dtype)))
        for bad in (float("nan"), float("inf"), -float("inf")):
            t = torch.randn(4, 6).to(dtype)
            t[2, 3] = bad
            assert not bool(finite_flag(t)) and not bool(finite_flag(t[1:].transpose(0, 1))), (dtype, bad)
    assert bool(finite_flag(torch.empty(0, 3))) and bool(finite_flag(torch.arange(5)))


def test_finite_parts_name_what_carries_an_entrys_finiteness():
    x, mask = _kv(1, shape=(2, 1, 6, 16))
    basis, _ = fit_lowrank_basis(gram(x, mask), rank=16)

    def names(entry, name=""):
        return [n for n, _ in finite_parts(entry, name)]
    assert finite_parts(x)[0][1] is x and names(x) == [""] and names(x, "teacher_k[0]") == ["teacher_k[0]"]
    assert names(encode_fp8(x, "channel")) == ["scale", "data"]                  # int4 codes are integers
    assert names(encode_int(x, "token"), "teacher_v[1]") == ["teacher_v[1].scale", "teacher_v[1].offset"]
    assert names(encode_lowrank(x, basis, None, mask), "t") == ["t.basis", "t.coeffs"]
    assert names(encode_lowrank(x, basis, "int4", mask), "t") == ["t.basis", "t.coeffs.scale", "t.coeffs.offset"]
    assert names(encode_lowrank(x, basis, "fp8", mask)) == ["basis", "coeffs.scale", "coeffs.data"]


def _same(a, b):
    """torch.equal, fp8 tensors compared byte for byte."""
    def raw(t):
        return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
    return torch.equal(raw(a), raw(b))


BAD = {"nan": (float("nan"), "NaN"), "inf": (float("inf"), r"\+Inf"), "-inf": (-float("inf"), "-Inf")}


def _poisoned(bad, where):
    """_kv(2) with `bad` at layer 1, head 0, channel 5 of token 4 (mask 1) or token 5 and 6 (mask 0, and token 6
    wholly non-finite), plus the clean copy."""
    x, mask = _kv(2)
    mask[4], mask[5], mask[6] = True, False, False
    dirty = x.clone()
    if where == "valid":
        dirty[1, 0, 4, 5] = BAD[bad][0]
    else:
        dirty[1, 0, 5, 5] = BAD[bad][0]
        dirty[:, :, 6] = BAD[bad][0]
    return dirty, x, mask


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("kind,axis", [("fp8", "channel"), ("fp8", "token"), ("fp8z", "channel"), ("int8", "channel"),
                                       ("int8", "token"), ("int4", "channel"), ("int4", "token"), ("int4d", "channel")])
def test_an_encoder_refuses_nan_or_inf_in_a_valid_token_naming_it_and_where(kind, axis, bad):
    """Neither codec can store it (fp8 stored a NaN as a NaN code and an Inf as ±448; int4 either as an ordinary
    code, the rest of its group at scale 1), so the encoder says what is where instead."""
    x, _, mask = _poisoned(bad, "valid")
    with pytest.raises(ValueError, match=rf"^{kind} encoding of t0/k \(keys\): {BAD[bad][1]} at layer 1, head 0, "
                                         r"token 4, channel 5 of shape \(3, 2, 19, 8\), a valid \(mask 1\) token"):
        encode(x, kind, axis, mask, name="t0/k (keys)")
    with pytest.raises(ValueError, match=rf"^{kind} encoding: {BAD[bad][1]} at layer 1, head 0, token 4, channel 5"):
        if kind in ("fp8", "fp8z"):
            encode_fp8(x, axis, mask, kind=kind)
        else:
            encode_int(x, axis, mask, kind=kind)


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("quant", [None, "fp8", "int4"])
def test_low_rank_encoding_refuses_nan_or_inf_in_a_valid_token_naming_it_and_where(quant, bad):
    x, clean, mask = _poisoned(bad, "valid")
    basis, _ = fit_lowrank_basis(gram(clean, mask), rank=16)
    codec = "lowrank:16" + (f"\\+{quant}" if quant else "")
    with pytest.raises(ValueError, match=rf"^{codec} encoding of v: {BAD[bad][1]} at layer 1, head 0, token 4, "
                                         r"channel 5 of shape \(3, 2, 19, 8\), a valid \(mask 1\) token"):
        encode_lowrank(x, basis, quant, mask, name="v")
    with pytest.raises(ValueError, match=rf"^low-rank basis fit of c: {BAD[bad][1]} at layer 1, head 0, token 4"):
        gram(x, mask, "c")


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_plain_check_refuses_nan_or_inf_in_a_valid_token_only(dtype, bad):
    """What the bf16 store runs instead of an encoder: the same verdict and message, padding not looked at."""
    x, _, mask = _poisoned(bad, "valid")
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(ValueError, match=rf"^plain {name} storage of t0/k \(keys\): {BAD[bad][1]} at layer 1, head 0, "
                                         r"token 4, channel 5 of shape \(3, 2, 19, 8\), a valid \(mask 1\) token"):
        check_plain(x.to(dtype), mask, name="t0/k (keys)")
    checks = []
    check_plain(x.to(dtype), mask, checks=checks)                   # deferred: nothing read until raise_if_not_finite
    with pytest.raises(ValueError, match=rf"^plain {name} storage: {BAD[bad][1]} at layer 1, head 0, token 4"):
        raise_if_not_finite(checks)
    dirty, _, mask = _poisoned(bad, "masked")
    check_plain(dirty.to(dtype), mask)
    # without a mask every token counts
    with pytest.raises(ValueError, match=r": \S+ at layer 0, head 0, token 6, channel 0 of shape"):
        check_plain(dirty.to(dtype))


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("codec", ["fp8", "int4", "int4d", "lowrank:16", "lowrank:16+fp8", "lowrank:16+int4"])
def test_nan_or_inf_on_masked_tokens_only_is_ignored(codec, bad):
    """Padding may hold anything: it takes no part in the statistics and decodes as a clean input's padding, every
    stored byte the same (under either group a store may use)."""
    dirty, clean, mask = _poisoned(bad, "masked")
    if codec.startswith("lowrank"):
        quant = parse_codec(codec).quant
        basis, _ = fit_lowrank_basis(gram(dirty, mask), rank=16)
        assert torch.equal(basis, fit_lowrank_basis(gram(clean, mask), rank=16)[0])
        pairs = [(encode_lowrank(dirty, basis, quant, mask), encode_lowrank(clean, basis, quant, mask))]
    else:
        pairs = [(encode(dirty, codec, axis, mask), encode(clean, codec, axis, mask)) for axis in ("channel", "token")]
    for got, want in pairs:
        assert all(_same(a, b) for a, b in zip(got.tensors(), want.tensors()))
        decoded = got.decode()
        assert torch.isfinite(decoded).all()
        assert torch.equal(decoded[..., mask, :], want.decode()[..., mask, :])


@pytest.mark.parametrize("kind", ["fp8", "int8", "int4", "int4d"])
@pytest.mark.parametrize("axis", ["channel", "token"])
def test_groups_without_a_valid_token_still_encode_to_zero(kind, axis):
    x, _ = _kv(4, shape=(2, 1, 5, 4))
    x[0, 0, 2] = float("nan")
    q = encode(x, kind, axis, torch.zeros(5, dtype=torch.bool))
    assert torch.equal(q.decode(), torch.zeros(2, 1, 5, 4))
    # int8 and int4 zero a masked token's own row; int4d gives every constant group scale 0 (q − u would move it)
    zero_scale = kind == "int4d" or kind in ("int8", "int4") and axis == "token"
    assert torch.equal(q.scale, torch.zeros_like(q.scale) if zero_scale else torch.ones_like(q.scale))


def test_a_per_channel_fp8_scale_beyond_the_kernels_decode_is_refused():
    # the fused loss decodes per-channel fp8 with one bf16 multiply by scale·2^112 (fused_kv_loss_op.FOLD_EXP)
    x = torch.ones(2, 3, 4)
    x[1, 2, 3] = 448.0 * FOLD_SCALE_LIMIT * 1.01
    with pytest.raises(ValueError, match=r"^fp8 encoding of k: a scale overflows or reaches 65536 \(\|x\| ≥ 2\.94e\+07\)"
                                         r".*the largest \|x\| on a valid token is 2\.965e\+07, at index \(1, 2, 3\)"):
        encode_fp8(x, "channel", name="k")
    x[1, 2, 3] = 448.0 * FOLD_SCALE_LIMIT * 0.99  # just below: stored, and decodes within fp8's bound
    q = encode_fp8(x, "channel")
    assert q.scale.float().max() < FOLD_SCALE_LIMIT
    assert abs(float(q.decode()[1, 2, 3]) / float(x[1, 2, 3]) - 1) < 2 ** -4


def test_a_per_channel_int8_scale_beyond_the_kernels_decode_is_refused():
    # the fused kernels decode per-channel int8 with one bf16 FMA by scale·2^112 (fused_kv_loss_op.FOLD_EXP)
    x = torch.zeros(2, 3, 4)
    x[1, 2, 3] = 255.0 * FOLD_SCALE_LIMIT * 1.01
    with pytest.raises(ValueError, match=r"^int8 encoding of v: a scale overflows or reaches 65536 \(a channel's range "
                                         r"≥ 1\.67e\+07\).*the largest \|x\| on a valid token is 1\.688e\+07, at index "
                                         r"\(1, 2, 3\)"):
        encode_int(x, "channel", name="v", kind="int8")
    x[1, 2, 3] = 255.0 * FOLD_SCALE_LIMIT * 0.99  # just below: stored, and decodes within int8's bound
    q = encode_int(x, "channel", kind="int8")
    assert q.scale.float().max() < FOLD_SCALE_LIMIT
    assert abs(float(q.decode()[1, 2, 3]) - float(x[1, 2, 3])) <= float(q.scale[1, 3]) / 2


def test_a_scale_that_overflows_is_still_named_as_such():
    with pytest.raises(ValueError, match=r"^fp8 encoding: a scale overflows torch.float16 \(\|x\| too large"):
        encode_fp8(torch.full((2, 3, 4), 1e9), "token")
    with pytest.raises(ValueError, match=r"^int4 encoding of k: a scale overflows torch.float16"):
        encode_int(torch.tensor([[-1e6, 1e6]]), "token", name="k")


def _sample(seed, T=9, teachers=((2, 8), (1, 16))):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(T, generator=gen) > 0.3
    mask[0], mask[-1] = True, False
    out = {"input_ids": torch.arange(T), "positions": torch.arange(T), "mask": mask, "labels_mask": mask.clone()}
    for i, (H, D) in enumerate(teachers):
        for kind in "kv":
            out[f"teacher{i}/{kind}"] = torch.randn(3, H, T, D, generator=gen)
    return out


@pytest.mark.parametrize("codec", ["bf16", "fp8", "int8", "int4", "int4d", "lowrank:16", "lowrank:16+fp8",
                                   "lowrank:16+int8", "lowrank:16+int4"])
def test_a_sample_is_encoded_with_one_host_read_and_its_bad_entry_named(codec, count_host_reads):
    """encode_sample reads the verdicts of all its entries at once (on the GPU a host read waits for the dump's
    kernels: one per sample, not one per entry or layer), and names the entry, keys or values, and where; bf16,
    which encodes nothing, too. Given a list it reads nothing: the verdicts wait there (the dump's builder)."""
    from kvfuse.teacher.compress import encode_sample, fit_bases

    parsed = parse_codec(codec)
    sample = _sample(0)
    bases = fit_bases([sample, _sample(1)], parsed) if parsed.lowrank else None
    with count_host_reads() as reads:
        clean = encode_sample(sample, parsed, bases)
    assert reads.n == 1
    checks = []
    with count_host_reads() as reads:
        deferred = encode_sample(sample, parsed, bases, checks)
    assert reads.n == 0 and len(checks) == 4 and all(_same(a, b) for a, b in zip(deferred.values(), clean.values()))
    bad = dict(sample)
    bad["teacher1/v"] = sample["teacher1/v"].clone()
    bad["teacher1/v"][2, 0, 0, 11] = float("inf")
    bad["teacher0/k"] = sample["teacher0/k"].clone()
    bad["teacher0/k"][:, :, ~sample["mask"]] = float("nan")                      # padding: ignored
    step = "plain float32 storage" if codec == "bf16" else "encoding"
    message = (rf"{step} of teacher1/v \(values\): \+Inf at layer 2, head 0, token 0, channel 11 of shape "
               r"\(3, 1, 9, 16\)")
    with pytest.raises(ValueError, match=message):
        encode_sample(bad, parsed, bases)
    checks = []
    encode_sample(bad, parsed, bases, checks)
    with pytest.raises(ValueError, match=message):
        raise_if_not_finite(checks)
    bad["teacher1/v"] = sample["teacher1/v"]
    # the padding's NaN is not stored: every codec, bf16 included, stores padding as it pads
    assert all(_same(a, b) for a, b in zip(encode_sample(bad, parsed, bases).values(), clean.values()))
    if parsed.lowrank:
        calib = dict(sample, **{"teacher0/v": sample["teacher0/v"].clone()})
        calib["teacher0/v"][1, 1, 0, 3] = float("nan")
        with pytest.raises(ValueError, match=r"^low-rank basis fit of teacher0/v of calibration sample 1: NaN at "
                                             r"layer 1, head 1, token 0, channel 3"):
            fit_bases([sample, calib], parsed)


def test_containers_refuse_a_wrong_layout():
    with pytest.raises(ValueError, match="int4 data must be torch.uint8"):
        QuantizedKV("int4", "token", torch.zeros(2, 4), torch.ones(2, dtype=torch.float16), torch.zeros(2))
    with pytest.raises(ValueError, match="scale must be torch.float16 of shape"):
        QuantizedKV("fp8", "token", torch.zeros(2, 4).to(torch.float8_e4m3fn), torch.ones(2))
    with pytest.raises(ValueError, match="no offset"):
        QuantizedKV("fp8", "channel", torch.zeros(2, 4).to(torch.float8_e4m3fn), torch.ones(4), torch.ones(4))
    with pytest.raises(ValueError, match="fp8z QuantizedKV needs an offset"):
        QuantizedKV("fp8z", "channel", torch.zeros(2, 4).to(torch.float8_e4m3fn), torch.ones(4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="fp8z is grouped per channel"):
        QuantizedKV("fp8z", "token", torch.zeros(2, 4).to(torch.float8_e4m3fn), torch.ones(2, dtype=torch.bfloat16),
                    torch.zeros(2, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="fp8z is grouped per channel"):
        encode(torch.zeros(2, 4), "fp8z", "token")
    with pytest.raises(ValueError, match="even head dim"):
        encode_int(torch.zeros(2, 3), "token")


@pytest.mark.parametrize("text,expected", [("bf16", "bf16"), ("fp8", "fp8"), ("fp8z", "fp8z"), ("int4", "int4"),
                                           ("int4d", "int4d"),
                                           ("int8", "int8"), ("lowrank:16+int4d", "lowrank:16+int4d"),
                                           ("lowrank:16+int8", "lowrank:16+int8"),
                                           ("lowrank:64", "lowrank:64"), ("lowrank:e0.99+int4", "lowrank:e0.99+int4"),
                                           ("lowrank:32+fp8", "lowrank:32+fp8")])
def test_codec_names_round_trip(text, expected):
    assert str(parse_codec(text)) == expected


@pytest.mark.parametrize("text", ["int16", "int8d", "int4dd", "lowrank", "lowrank:0", "lowrank:e1.5",
                                  "lowrank:64+int16", "fp8+int4", "fp8zz", "lowrank:16+fp8z"])
def test_bad_codec_names_say_what_is_accepted(text):
    with pytest.raises(ValueError, match="codec"):
        parse_codec(text)


def test_lowrank_basis_ranks_and_padding():
    gen = torch.Generator().manual_seed(1)
    L, H, T, D = 2, 2, 40, 16                                  # F = 32 features
    # layer 0: exactly rank 3; layer 1: full rank
    z = torch.randn(T, 3, generator=gen)
    f0 = z @ torch.randn(3, H * D, generator=gen)
    f1 = torch.randn(T, H * D, generator=gen)
    x = torch.stack([f0, f1]).view(L, T, H, D).transpose(1, 2)
    basis, ranks = fit_lowrank_basis(gram(x), energy=0.999)
    assert ranks[0] == 3 and ranks[1] > 20 and basis.shape == (L, 32, 32)     # width: max rank up to a multiple of 16
    assert torch.equal(basis[0, 3:], torch.zeros(29, 32))                       # rows past r_l are zero
    lr = encode_lowrank(x, basis, quant=None)
    assert lr.shape == x.shape and lr.coeffs.shape == (L, 1, T, 32)
    # a rank-3 layer is reproduced (up to the coefficients' bf16 rounding)
    torch.testing.assert_close(lr.decode()[0], x[0], rtol=0, atol=8e-3 * x[0].abs().max())
    basis16, ranks16 = fit_lowrank_basis(gram(x), rank=5)
    assert ranks16 == [5, 5] and basis16.shape == (L, 16, 32)
    with pytest.raises(ValueError, match="exactly one"):
        fit_lowrank_basis(gram(x))


def _loss_inputs(teachers, L, B, T, H_s=2, D_s=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sk = torch.randn(L, B, H_s, T, D_s, generator=gen)
    sv = torch.randn(L, B, H_s, T, D_s, generator=gen)
    w = [0.2 * torch.randn(L, H * D, H_s * D_s, generator=gen) for H, D in teachers]
    wv = [0.2 * torch.randn(L, H * D, H_s * D_s, generator=gen) for H, D in teachers]
    mask = torch.rand(B, T, generator=gen) > 0.2
    mask[0, 0] = True
    positions = torch.arange(T).expand(B, T)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, D_s, 2) / D_s)
    alpha = torch.full((B, len(teachers)), 1.0 / len(teachers))
    return sk, sv, w, wv, alpha, mask, positions, inv_freq


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_loss_on_quantised_teachers_equals_the_loss_on_their_decode(backend, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    L, B, T = 2, 2, 12
    teachers = [(2, 8), (1, 16)]
    sk, sv, w, wv, alpha, mask, pos, inv_freq = _loss_inputs(teachers, L, B, T)
    gen = torch.Generator().manual_seed(3)
    tk, tv = [], []
    for H, D in teachers:
        samples_k = [encode_fp8(torch.randn(L, H, n, D, generator=gen), "channel") for n in (T, T - 3)]
        samples_v = [encode_int(torch.randn(L, H, n, D, generator=gen), "token") for n in (T, T - 3)]
        tk.append(stack_samples(samples_k, T))
        tv.append(stack_samples(samples_v, T))
    plain_k, plain_v = decode_teachers(tk, tv)
    assert all(isinstance(x, torch.Tensor) for x in plain_k + plain_v)
    assert torch.equal(plain_v[0][:, 1, :, T - 3:], torch.zeros(L, 2, 3, 8))    # batch padding decodes to 0
    got, stats = kv_distill_loss(sk, sv, tk, tv, w, wv, alpha, mask, pos, inv_freq, backend=backend)
    want, ref = kv_distill_loss(sk, sv, plain_k, plain_v, w, wv, alpha, mask, pos, inv_freq, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats["k_mse"], ref["k_mse"], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_folded_lowrank_adapter_equals_the_explicit_product(backend, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    L, B, T, H, D = 2, 2, 10, 2, 16
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(L, H, 40, D, generator=gen)
    basis, _ = fit_lowrank_basis(gram(x), rank=16)
    samples = [encode_lowrank(torch.randn(L, H, n, D, generator=gen), basis, quant) for n, quant in
               ((T, "int4"), (T - 2, "int4"))]
    lowrank = stack_samples(samples, T)
    assert isinstance(lowrank, LowRankKV) and lowrank.shape == (L, B, H, T, D)
    sk, sv, w, wv, alpha, mask, pos, inv_freq = _loss_inputs([(H, D)], L, B, T)
    w, wv = [w[0].requires_grad_()], [wv[0].requires_grad_()]
    # keys and values share the basis here only to keep the test short; each has its own in a store
    explicit, _ = kv_distill_loss(sk, sv, [lowrank], [lowrank], w, wv, alpha, mask, pos, inv_freq, backend=backend)
    # the coefficients as a teacher of one head of width r, with W' = B·W
    z = lowrank.coefficients()
    assert z.shape == (L, B, 1, T, 16)
    folded, _ = kv_distill_loss(sk, sv, [z], [z], [fold_lowrank_adapter(lowrank.basis, w[0])],
                                [fold_lowrank_adapter(lowrank.basis, wv[0])], alpha, mask, pos, inv_freq,
                                backend=backend)
    torch.testing.assert_close(folded, explicit, rtol=2e-5, atol=1e-7)
    for a, b in zip(torch.autograd.grad(folded, w + wv), torch.autograd.grad(explicit, w + wv)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kind", ["int8", "int4", "int4d"])
def test_integer_keys_pad_to_each_channels_value_nearest_zero(kind):
    x = torch.tensor([[[[-1.0, 2.0], [1.0, 4.0], [0.5, 3.0]]]])   # [L=1, H=1, T=3, D=2]: channel 0 spans 0, 1 does not
    batch = stack_samples([encode_int(x, "channel", kind=kind), encode_int(x[:, :, :2], "channel", kind=kind)], 3)
    padded = batch.decode()[0, 1, 0, 2]                     # sample 1's padded token
    # int4d: the padded token's own dither moves it by under half a step more
    dither, step = kind == "int4d", 2.0 / (255 if kind == "int8" else 15)
    assert abs(float(padded[0])) <= step * (1 if dither else 0.5) + 1e-6
    assert abs(float(padded[1]) - 2.0) <= (step / 2 + 1e-6 if dither else 0.0)
    # each sample keeps its tokens' indices (right padding), which int4d's dither depends on
    assert torch.equal(batch.decode()[0, 0, 0], encode_int(x, "channel", kind=kind).decode()[0, 0])
    with pytest.raises(ValueError, match="mixes codecs"):
        stack_samples([encode_int(x, "channel"), encode_int(x, "channel", kind="int4d")], 2)


@pytest.mark.parametrize("kind", ["fp8", "fp8z", "int8", "int4", "int4d"])
def test_round_trip_on_real_captured_kv(kind, smollm2_model):
    model, tokenizer = smollm2_model
    ids = tokenizer("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
                    return_tensors="pt").input_ids
    cap = capture_kv(model, ids)
    keys = torch.stack(cap.keys)[:, 0]                      # [L, H, T, D] pre-RoPE
    values = torch.stack(cap.values)[:, 0]
    for x, axis in ((keys, "channel"), (values, "channel" if kind == "fp8z" else "token")):
        mask = torch.ones(x.shape[-2], dtype=torch.bool)
        q = encode(x, kind, axis, mask)
        err = (q.decode() - x).abs()
        if kind == "fp8z":  # fp8's bound around the channel's offset
            centred = x - q.offset.float().unsqueeze(-2)
            bound = torch.maximum(centred.abs() * 2 ** -4, q.scale.float().unsqueeze(-2) * 2 ** -10) * 1.01
        else:
            bound = _fp8_bound(x, mask, axis) if kind == "fp8" else _int_bound(x, mask, axis, kind)
        assert (err <= bound).all(), (axis, float((err - bound).max()))
        rel = float((q.decode() - x).square().sum() / x.square().sum())
        assert rel < {"fp8": 2e-3, "int8": 1e-4, "fp8z": 5e-4}.get(kind, 3e-2), (axis, rel)
        if kind == "fp8z" and axis == "channel" and x is keys:
            # SmolLM2's keys sit mostly in their channel means: fp8z's error a few times below fp8's
            fp8 = float((encode(x, "fp8", axis, mask).decode() - x).square().sum() / x.square().sum())
            assert rel < fp8 / 3, (rel, fp8)
