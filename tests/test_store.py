"""Offline teacher-KV store: bit-exact round trip, damage detection, refusal to mix settings, resume."""
import pytest
import torch

from kvfuse.teacher.store import StoreError, StoreWriter, TeacherKVStore, parse_shard

SETTINGS = {"teachers": ["tiny-llama"], "student": "tiny-qwen2", "dtype": "bf16", "layer_map": "interpolate"}


def _samples(seed, ids, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    for sample_id in ids:
        T = int(torch.randint(5, 23, (1,), generator=gen))
        yield sample_id, {
            "teacher0/k": torch.randn(3, 2, T, 8, generator=gen).to(dtype),
            "teacher0/v": torch.randn(3, 2, T, 8, generator=gen).to(dtype),
            "mask": torch.rand(T, generator=gen) > 0.2,
            "positions": torch.arange(T) + 4,
            "input_ids": torch.randint(0, 500, (T,), generator=gen),
        }


def _write_store(root, n_shards=3, settings=SETTINGS, seed=0):
    writer = StoreWriter(root, settings, n_shards)
    expected = {}
    for shard in range(n_shards):
        samples = list(_samples(seed + shard, [f"s{shard}-{j}" for j in range(4)]))
        expected.update({sid: t for sid, t in samples})
        writer.write_shard(shard, samples)
    return expected


def test_round_trip_is_bit_exact(tmp_path):
    expected = _write_store(tmp_path)
    store = TeacherKVStore(tmp_path)
    assert len(store) == len(expected) == 12
    for sample_id, tensors in expected.items():
        got = store.get(sample_id)
        for name, tensor in tensors.items():
            assert got[name].dtype == tensor.dtype
            assert torch.equal(got[name].view(torch.uint8) if tensor.dtype == torch.bfloat16 else got[name],
                               tensor.view(torch.uint8) if tensor.dtype == torch.bfloat16 else tensor), name
    assert store.bytes_per_token > 0
    loader = torch.utils.data.DataLoader(store, batch_size=None, num_workers=2)
    assert sorted(item["id"] for item in loader) == sorted(expected)


def test_flipped_byte_names_the_file(tmp_path):
    _write_store(tmp_path)
    victim = tmp_path / "shard-00001-of-00003.safetensors"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x10
    victim.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="shard-00001-of-00003.safetensors.*sha256"):
        TeacherKVStore(tmp_path)


def test_missing_and_truncated_shards_are_errors(tmp_path):
    _write_store(tmp_path)
    (tmp_path / "shard-00002-of-00003.json").unlink()
    with pytest.raises(StoreError, match="shard 2 of 3 is missing"):
        TeacherKVStore(tmp_path)
    _write_store(tmp_path / "b")
    victim = tmp_path / "b" / "shard-00000-of-00003.safetensors"
    victim.write_bytes(victim.read_bytes()[:-7])
    with pytest.raises(StoreError, match="shard-00000-of-00003.safetensors has .* bytes"):
        TeacherKVStore(tmp_path / "b", verify=False)


def test_mixed_settings_are_refused(tmp_path):
    _write_store(tmp_path)
    other = dict(SETTINGS, layer_map="round")
    with pytest.raises(StoreError, match="layer_map: 'interpolate' vs 'round'"):
        StoreWriter(tmp_path, other, 3)
    with pytest.raises(StoreError, match="other settings"):
        StoreWriter(tmp_path, SETTINGS, 4)
    # A shard JSON smuggled in from another store is caught by the reader.
    _write_store(tmp_path / "other", settings=other)
    for suffix in ("json", "safetensors"):
        name = f"shard-00001-of-00003.{suffix}"
        (tmp_path / name).write_bytes((tmp_path / "other" / name).read_bytes())
    with pytest.raises(StoreError, match="mixed shards"):
        TeacherKVStore(tmp_path)


def test_resume_skips_finished_and_redoes_half_written(tmp_path):
    writer = StoreWriter(tmp_path, SETTINGS, 2)
    writer.write_shard(0, list(_samples(0, ["a", "b"])))
    assert writer.is_finished(0) and not writer.is_finished(1)
    # A killed writer leaves a temp file and maybe a data file without its JSON: both are redone.
    data_path, meta_path = writer.paths(1)
    (tmp_path / f".{data_path.name}.tmp-999").write_bytes(b"partial")
    data_path.write_bytes(b"half")
    writer.clean_leftovers(1)
    assert not data_path.exists() and not list(tmp_path.glob(".*tmp-*"))
    writer.write_shard(1, list(_samples(1, ["c"])))
    store = TeacherKVStore(tmp_path)
    assert sorted(store.sample_ids) == ["a", "b", "c"]


def test_duplicates_and_bad_specs(tmp_path):
    writer = StoreWriter(tmp_path, SETTINGS, 2)
    writer.write_shard(0, list(_samples(0, ["a"])))
    writer.write_shard(1, list(_samples(1, ["a"])))
    with pytest.raises(StoreError, match="sample 'a' appears in shards 0 and 1"):
        TeacherKVStore(tmp_path)
    with pytest.raises(ValueError, match="I/N"):
        parse_shard("3")
    with pytest.raises(ValueError, match="0 <= I < N"):
        parse_shard("4/4")
    assert parse_shard("2/5") == (2, 5)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="manifest.json is not valid JSON"):
        TeacherKVStore(tmp_path)


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="not a teacher-KV store"):
        TeacherKVStore(tmp_path)


def test_streamed_shard_keeps_every_tensor_aligned_and_reads_with_safetensors(tmp_path):
    import json
    import struct

    from safetensors import safe_open

    samples = list(_samples(5, ["a", "b", "c"]))     # odd lengths: bool masks leave the offset unaligned
    StoreWriter(tmp_path, SETTINGS, 1).write_shard(0, samples)
    path = tmp_path / "shard-00000-of-00001.safetensors"
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    assert (8 + n) % 8 == 0
    sizes = {"BF16": 2, "I64": 8, "BOOL": 1, "U8": 1}
    spans = sorted(entry["data_offsets"] for key, entry in header.items() if key != "__metadata__")
    assert spans[0][0] == 0 and spans[-1][1] == len(raw) - 8 - n            # no hole, nothing after
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    for key, entry in header.items():
        if key != "__metadata__":
            assert entry["data_offsets"][0] % sizes[entry["dtype"]] == 0, key
    assert any(key.startswith("__pad") for key in header)
    with safe_open(str(path), framework="pt") as fh:
        for sample_id, tensors in samples:
            for name, tensor in tensors.items():
                assert torch.equal(fh.get_tensor(f"{sample_id}/{name}"), tensor)


def test_streamed_shard_refuses_surprises_and_leaves_nothing_when_aborted(tmp_path):
    writer = StoreWriter(tmp_path, SETTINGS, 1)
    (a, ta), (b, tb) = _samples(0, ["a", "b"])
    with pytest.raises(ValueError, match="got sample 'b' .* expected 'a'"):
        with writer.stream_shard(0, [("a", list(ta)), ("b", list(tb))]) as shard:
            shard.add(b, tb)
    with pytest.raises(ValueError, match="1 of 2 declared samples written"):
        with writer.stream_shard(0, [("a", list(ta)), ("b", list(tb))]) as shard:
            shard.add(a, ta)
    assert not writer.is_finished(0) and not list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob(".*"))
    with pytest.raises(ValueError, match="duplicate sample id 'a'"):
        writer.stream_shard(0, [("a", ["mask"]), ("a", ["mask"])])


def test_flipped_header_byte_and_format_1_shards(tmp_path):
    import hashlib
    import json

    from safetensors.torch import save_file

    _write_store(tmp_path)
    victim = tmp_path / "shard-00002-of-00003.safetensors"
    data = bytearray(victim.read_bytes())
    data[20] = ord(" ") if data[20] != ord(" ") else ord("\t")    # still valid JSON, another header
    victim.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="shard-00002-of-00003.safetensors fails its sha256"):
        TeacherKVStore(tmp_path)
    # A store written before streaming (one sha256 over the whole file) is still read and checked.
    old = tmp_path / "v1"
    writer = StoreWriter(old, SETTINGS, 1)
    samples = list(_samples(1, ["x", "y"]))
    data_path, meta_path = writer.paths(0)
    save_file({f"{sid}/{name}": t for sid, named in samples for name, t in named.items()}, str(data_path),
              metadata={"settings_hash": writer.hash})
    meta = {"format": 1, "settings_hash": writer.hash, "shard": 0, "n_shards": 1,
            "samples": [{"id": sid, "tensors": {n: [list(t.shape), str(t.dtype)[6:]] for n, t in named.items()}}
                        for sid, named in samples],
            "bytes": data_path.stat().st_size, "sha256": hashlib.sha256(data_path.read_bytes()).hexdigest()}
    meta_path.write_text(json.dumps(meta))
    assert torch.equal(TeacherKVStore(old).get("y")["mask"], samples[1][1]["mask"])
    data_path.write_bytes(data_path.read_bytes()[:-1] + b"\x00")
    meta_path.write_text(json.dumps(dict(meta, bytes=data_path.stat().st_size)))
    with pytest.raises(StoreError, match="fails its sha256"):
        TeacherKVStore(old)


def test_chunked_digests_cover_every_byte(tmp_path, monkeypatch):
    from kvfuse.teacher import store as store_module

    monkeypatch.setattr(store_module, "HASH_CHUNK", 48)    # tensors span many chunks, with ragged last chunks
    expected = _write_store(tmp_path, n_shards=1)
    loaded = TeacherKVStore(tmp_path)
    assert all(torch.equal(loaded.get(sid)["positions"], t["positions"]) for sid, t in expected.items())
    victim = tmp_path / "shard-00000-of-00001.safetensors"
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0x01                                         # inside the last chunk of the last tensor
    victim.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="fails its sha256"):
        TeacherKVStore(tmp_path)


def test_hand_edited_manifest_and_zero_shards_are_refused(tmp_path):
    import json

    _write_store(tmp_path)
    path = tmp_path / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps(dict(manifest, settings=dict(SETTINGS, student="tiny-llama"))))
    with pytest.raises(StoreError, match="manifest.json: its settings hash to .* edited after the dump"):
        TeacherKVStore(tmp_path)
    path.write_text(json.dumps(dict(manifest, n_shards=0)))
    with pytest.raises(StoreError, match="manifest.json: n_shards is 0; a store has at least one shard"):
        TeacherKVStore(tmp_path)
    path.write_text(json.dumps({"settings": SETTINGS}))
    with pytest.raises(StoreError, match=r"manifest.json lacks \['settings_hash', 'n_shards'\]"):
        TeacherKVStore(tmp_path)


def test_short_writes_are_completed_and_a_write_that_takes_nothing_is_an_error(tmp_path, monkeypatch):
    import os

    real_write = os.write
    calls = []

    def short_write(fd, data):       # the kernel takes at most 100 bytes per call, as it may
        calls.append(len(data))
        return real_write(fd, bytes(memoryview(data)[:100]))

    monkeypatch.setattr(os, "write", short_write)
    expected = _write_store(tmp_path, n_shards=1)
    monkeypatch.setattr(os, "write", real_write)
    assert max(calls) > 100                                      # the writer was cut short, and carried on
    store = TeacherKVStore(tmp_path)                             # every digest checks
    assert all(torch.equal(store.get(sid)["input_ids"], t["input_ids"]) for sid, t in expected.items())

    monkeypatch.setattr(os, "write", lambda fd, data: 0)         # a full disk that does not say so
    writer = StoreWriter(tmp_path / "full", SETTINGS, 1)
    with pytest.raises(OSError, match=r"writing .*shard-00000-of-00001.safetensors.tmp-\d+: the write took no bytes"):
        writer.write_shard(0, list(_samples(0, ["a"])))
    monkeypatch.setattr(os, "write", real_write)
    assert not writer.is_finished(0) and not list((tmp_path / "full").glob("*.safetensors")) \
        and not list((tmp_path / "full").glob(".*"))


def _lose_a_write(path):
    """The damage an unchecked short write did: the file ends early, and its record was taken from the file."""
    import json

    data = path.read_bytes()
    path.write_bytes(data[:-40])
    meta_path = path.with_suffix(".json")
    meta_path.write_text(json.dumps(dict(json.loads(meta_path.read_text()), bytes=len(data) - 40)))


def test_finished_means_size_header_and_digests_agree(tmp_path):
    _write_store(tmp_path, n_shards=2)
    writer = StoreWriter(tmp_path, SETTINGS, 2)
    assert writer.is_finished(0) and writer.is_finished(1, verify=True)
    victim = tmp_path / "shard-00000-of-00002.safetensors"
    _lose_a_write(victim)
    assert "but its header describes" in writer.unfinished_reason(0)
    with pytest.raises(StoreError, match="shard-00000-of-00002.safetensors has .* bytes but its header describes"):
        TeacherKVStore(tmp_path, verify=False)
    # a flipped tensor byte passes the cheap check and fails the full one
    other = tmp_path / "shard-00001-of-00002.safetensors"
    data = bytearray(other.read_bytes())
    data[-5] ^= 0x04
    other.write_bytes(bytes(data))
    assert writer.is_finished(1) and "fails its sha256 check" in writer.unfinished_reason(1, verify=True)
    # rewriting a damaged shard replaces it
    writer.write_shard(0, list(_samples(0, [f"s0-{j}" for j in range(4)])))
    writer.write_shard(1, list(_samples(1, [f"s1-{j}" for j in range(4)])))
    assert len(TeacherKVStore(tmp_path)) == 8


# ------------------------------------------------------------------------------------------------ codec stores
def _codec_store(root, codec, seed=0, n_shards=2, settings=SETTINGS):
    """A store of `codec` written as the dump writes it: samples encoded by kvfuse.teacher.compress, low-rank bases
    fitted on the first samples and claimed before any shard."""
    from kvfuse.codecs import parse_codec
    from kvfuse.teacher.compress import encode_sample, fit_bases

    codec = parse_codec(codec)
    writer = StoreWriter(root, dict(settings, codec=str(codec)), n_shards)
    shards = [[(sid, dict(t, labels_mask=t["mask"].clone(), **{"teacher0/k": t["teacher0/k"].float(),
                                                               "teacher0/v": t["teacher0/v"].float()}))
               for sid, t in _samples(seed + shard, [f"s{shard}-{j}" for j in range(3)])] for shard in range(n_shards)]
    bases = writer.claim_bases(fit_bases([t for _, t in shards[0]], codec)) if codec.lowrank else None
    written = {}
    for shard, samples in enumerate(shards):
        encoded = [(sid, encode_sample(t, codec, bases)) for sid, t in samples]
        writer.write_shard(shard, encoded)
        written.update(encoded)
    return written, bases


def _tensor_span(path, key):
    import json
    import struct

    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    start, end = json.loads(raw[8:8 + n])[key]["data_offsets"]
    return 8 + n + start, 8 + n + end


@pytest.mark.parametrize("codec", ["fp8", "fp8z", "int8", "int4", "int4d", "lowrank:16+int4d", "lowrank:16+int8",
                                   "lowrank:e0.9"])
def test_codec_store_round_trip_hands_out_compressed_entries(tmp_path, codec):
    from kvfuse.codecs import LowRankKV, QuantizedKV

    written, bases = _codec_store(tmp_path, codec)
    store = TeacherKVStore(tmp_path)
    assert str(store.codec) == codec and len(store) == 6
    for sid, named in written.items():
        got = store.get(sid)
        for entry in ("teacher0/k", "teacher0/v"):
            value = got[entry]
            assert isinstance(value, LowRankKV if codec.startswith("lowrank") else QuantizedKV)
            assert value.shape == (3, 2, named["mask"].shape[0], 8)
            raw = value.coeffs if isinstance(value, LowRankKV) else value
            data = raw if isinstance(raw, torch.Tensor) else raw.data
            assert torch.equal(data.view(torch.uint8), named[entry].view(torch.uint8))
            if isinstance(raw, QuantizedKV):
                assert torch.equal(raw.scale, named[entry + ".scale"])
                assert (raw.offset is None) == (raw.kind == "fp8")
                assert raw.offset is None or torch.equal(raw.offset, named[entry + ".offset"])
            if isinstance(value, LowRankKV):
                assert torch.equal(value.basis, bases[entry].basis)
    if codec.startswith("lowrank"):
        assert store.bases_bytes > 0


@pytest.mark.parametrize("codec,v_axis", [("fp8", "channel"), ("fp8z", "channel"), ("int8", "channel"),
                                          ("int4", "token"), ("int4d", "token")])
def test_stores_group_keys_per_channel_and_values_as_their_codec_says(tmp_path, codec, v_axis):
    from kvfuse.codecs import scale_dtypes

    written, _ = _codec_store(tmp_path, codec, n_shards=1)
    store = TeacherKVStore(tmp_path)
    for sid, named in written.items():
        got = store.get(sid)
        assert got["teacher0/k"].axis == "channel" and got["teacher0/v"].axis == v_axis
        assert named["teacher0/v.scale"].dtype == scale_dtypes(codec, v_axis)[0]
        T = named["mask"].shape[0]
        assert named["teacher0/v.scale"].shape == ((3, 2, T) if v_axis == "token" else (3, 2, 8))


def test_an_fp8_store_with_per_token_values_reads_back_as_written(tmp_path):
    # fp8 stores written before values went per channel hold float16 per-token value scales
    from kvfuse.codecs import decode, encode_fp8, parse_codec
    from kvfuse.teacher.compress import encode_sample

    writer = StoreWriter(tmp_path, dict(SETTINGS, codec="fp8"), 1)
    samples = []
    for sid, t in _samples(0, ["a", "b"]):
        named = encode_sample(dict(t, labels_mask=t["mask"].clone()), parse_codec("fp8"))
        old = encode_fp8(t["teacher0/v"].float(), "token", t["mask"][None, None, :])
        named.update({"teacher0/v": old.data, "teacher0/v.scale": old.scale})
        samples.append((sid, named, old))
    writer.write_shard(0, [(sid, named) for sid, named, _ in samples])
    store = TeacherKVStore(tmp_path)
    for sid, _, old in samples:
        got = store.get(sid)["teacher0/v"]
        assert got.axis == "token" and torch.equal(decode(got), decode(old))


@pytest.mark.parametrize("codec", ["fp8", "int8"])
def test_a_store_with_float32_channel_side_data_reads_back_as_written(codec, tmp_path):
    # fp8 and int8 stores written before the bf16 side data hold float32 per-channel scales (and int8 offsets): read
    # as written, and the fused loss takes them on its fp32 decode path (codec code "channel/f32")
    from kvfuse.codecs import QuantizedKV, decode, parse_codec
    from kvfuse.kernels.fused_kv_loss_op import CODEC_CODES, codec_code
    from kvfuse.teacher.compress import encode_sample

    writer = StoreWriter(tmp_path, dict(SETTINGS, codec=codec), 1)
    samples = []
    sides = (".scale",) if codec == "fp8" else (".scale", ".offset")
    for sid, t in _samples(0, ["a", "b"]):
        named = encode_sample(dict(t, labels_mask=t["mask"].clone()), parse_codec(codec))
        for entry in ("teacher0/k", "teacher0/v"):
            for side in sides:
                named[entry + side] = named[entry + side].to(torch.float32) * (1 + 2 ** -12)  # not a bf16 value
        samples.append((sid, named))
    writer.write_shard(0, samples)
    store = TeacherKVStore(tmp_path)
    for sid, named in samples:
        got = store.get(sid)["teacher0/k"]
        old = QuantizedKV(codec, "channel", named["teacher0/k"], named["teacher0/k.scale"],
                          named.get("teacher0/k.offset"))
        assert got.scale.dtype == torch.float32 and torch.equal(decode(got), decode(old))
        assert codec_code(got.kind, got.axis, got.scale.dtype) == CODEC_CODES[codec, "channel/f32"]


def test_a_scale_of_no_codec_dtype_is_named():
    from kvfuse.codecs import stored_axis

    with pytest.raises(ValueError, match=r"teacher1/v\.scale is torch\.float64: a stored scale is float32"):
        stored_axis(torch.ones(3, dtype=torch.float64), "teacher1/v")


def test_flipped_byte_in_a_scale_tensor_is_caught_by_verify_and_by_the_reader(tmp_path):
    _codec_store(tmp_path, "int4")
    victim = tmp_path / "shard-00001-of-00002.safetensors"
    start, end = _tensor_span(victim, "s1-1/teacher0/v.scale")
    data = bytearray(victim.read_bytes())
    data[(start + end) // 2] ^= 0x04
    victim.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="shard-00001-of-00002.safetensors fails its sha256"):
        TeacherKVStore(tmp_path)
    writer = StoreWriter(tmp_path, dict(SETTINGS, codec="int4"), 2)
    assert writer.is_finished(1) and "fails its sha256" in writer.unfinished_reason(1, verify=True)   # dump --verify


def test_mixing_codecs_across_shards_is_refused_naming_the_shard_and_both_codecs(tmp_path):
    _codec_store(tmp_path / "a", "fp8")
    _codec_store(tmp_path / "b", "int4")
    for suffix in ("json", "safetensors"):
        name = f"shard-00001-of-00002.{suffix}"
        (tmp_path / "a" / name).write_bytes((tmp_path / "b" / name).read_bytes())
    with pytest.raises(StoreError, match="shard-00001-of-00002.json was dumped with codec 'int4', its store "
                                         r"\(manifest.json\) with 'fp8'"):
        TeacherKVStore(tmp_path / "a")
    with pytest.raises(StoreError, match="codec 'int4'.* 'fp8'"):
        StoreWriter(tmp_path / "a", dict(SETTINGS, codec="fp8"), 2).is_finished(1)
    with pytest.raises(StoreError, match="codec: 'fp8' vs 'int4'"):               # a dump with another --codec
        StoreWriter(tmp_path / "a", dict(SETTINGS, codec="int4"), 2)


def test_lowrank_bases_are_claimed_once_checksummed_and_never_mixed(tmp_path):
    from kvfuse.codecs import parse_codec
    from kvfuse.teacher.compress import fit_bases

    _, bases = _codec_store(tmp_path / "a", "lowrank:16+fp8")
    _codec_store(tmp_path / "b", "lowrank:16+fp8", seed=7)              # same settings, other calibration data
    # a second writer (another array task) gets the bases already saved, not its own fit
    other = fit_bases([{k: (t.float() if k.startswith("teacher") else t) for k, t in named.items()}
                       for _, named in _samples(9, ["z"])], parse_codec("lowrank:16+fp8"))
    writer = StoreWriter(tmp_path / "a", dict(SETTINGS, codec="lowrank:16+fp8"), 2)
    claimed = writer.claim_bases(other)
    assert torch.equal(claimed["teacher0/k"].basis, bases["teacher0/k"].basis)
    assert not torch.equal(other["teacher0/k"].basis, bases["teacher0/k"].basis)
    # a shard encoded on other bases, beside the store's own
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("manifest.json", "bases.safetensors", "shard-00000-of-00002.json", "shard-00000-of-00002.safetensors"):
        (mixed / name).write_bytes((tmp_path / "a" / name).read_bytes())
    for name in ("shard-00001-of-00002.json", "shard-00001-of-00002.safetensors"):
        (mixed / name).write_bytes((tmp_path / "b" / name).read_bytes())
    with pytest.raises(StoreError, match="shard-00001-of-00002.json was encoded on low-rank bases with sha256 "
                                         "[0-9a-f]{64}, but the store's bases.safetensors has sha256 [0-9a-f]{64}"):
        TeacherKVStore(mixed)
    # a flipped byte in the bases file: every shard's record disagrees with it
    victim = tmp_path / "a" / "bases.safetensors"
    start, end = _tensor_span(victim, "teacher0/v")
    data = bytearray(victim.read_bytes())
    data[start + 5] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="shard-00000-of-00002.json was encoded on low-rank bases"):
        TeacherKVStore(tmp_path / "a")
