"""Store batches: the prefetch thread delivers exactly the batches, in exactly the order, that inline reads give."""
import pytest
import torch

from kvfuse.codecs import finite_parts
from kvfuse.teacher.builder import collate
from kvfuse.teacher.loader import store_batches
from kvfuse.teacher.store import StoreWriter, TeacherKVStore


def _sample(gen, T, poison=False):
    k = torch.randn(3, 2, T, 8, generator=gen).to(torch.bfloat16)
    if poison:
        k[1, 0, T // 2, 3] = float("nan")
    return {"teacher0/k": k, "teacher0/v": torch.randn(3, 2, T, 8, generator=gen).to(torch.bfloat16),
            "teacher1/k": torch.randn(3, 1, T, 16, generator=gen).to(torch.bfloat16),
            "teacher1/v": torch.randn(3, 1, T, 16, generator=gen).to(torch.bfloat16),
            "mask": torch.rand(T, generator=gen) > 0.2, "labels_mask": torch.rand(T, generator=gen) > 0.5,
            "positions": torch.arange(T) + 3, "input_ids": torch.randint(0, 500, (T,), generator=gen)}


def _store(root, poison_id=None):
    gen = torch.Generator().manual_seed(7)
    writer = StoreWriter(root, {"test": "loader"}, 2)
    for shard in range(2):
        ids = [f"s{shard}-{j}" for j in range(5)]
        writer.write_shard(shard, [(i, _sample(gen, int(torch.randint(4, 30, (1,), generator=gen)), i == poison_id))
                                   for i in ids])
    return TeacherKVStore(root)


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_batches_equal_inline_collate_in_order(tmp_path, prefetch):
    store = _store(tmp_path)
    id_batches = [["s1-4"], ["s0-0", "s1-2", "s0-3"], ["s0-1", "s1-0"], ["s1-1", "s0-4", "s0-2", "s1-3"]]
    got = list(store_batches(store, id_batches, n_teachers=2, pad_id=5, prefetch=prefetch))
    assert len(got) == len(id_batches)
    for ids, batch in zip(id_batches, got):
        want = collate([dict(store.get(i)) for i in ids], 2, pad_id=5)
        assert batch["ids"] == ids
        for key, value in want.items():
            if key == "ids":
                continue
            pairs = zip(value, batch[key]) if isinstance(value, list) else [(value, batch[key])]
            for a, b in pairs:
                assert a.dtype == b.dtype and torch.equal(a, b), key


def test_nan_in_a_stored_sample_is_named_at_its_turn(tmp_path):
    store = _store(tmp_path, poison_id="s1-2")
    batches = store_batches(store, [["s0-0"], ["s0-1", "s1-2"], ["s0-3"]], n_teachers=2, prefetch=2)
    assert next(batches)["ids"] == ["s0-0"]       # the batch before the damaged one still arrives
    with pytest.raises(ValueError, match=r"teacher_k\[0\] of samples \['s0-1', 's1-2'\] has NaN/Inf"):
        next(batches)
    with pytest.raises(ValueError, match="prefetch must be >= 0"):
        next(store_batches(store, [["s0-0"]], n_teachers=2, prefetch=-1))


def test_collate_pads_with_zeros_into_fresh_memory():
    gen = torch.Generator().manual_seed(3)
    samples = [_sample(gen, 5), _sample(gen, 9)]
    batch = collate(samples, 2)
    for i in range(2):
        k = batch["teacher_k"][i]
        assert torch.equal(k[:, 0, :, :5], samples[0][f"teacher{i}/k"]) and not k[:, 0, :, 5:].any()
        assert torch.equal(k[:, 1], samples[1][f"teacher{i}/k"])


@pytest.mark.parametrize("micro_batch", [1, 2, 3])
def test_a_sample_with_an_empty_alignment_mask_is_refused_by_id_at_any_micro_batch(micro_batch):
    gen = torch.Generator().manual_seed(5)
    samples = [dict(_sample(gen, 6 + b), id=f"s{b}") for b in range(micro_batch)]
    samples[-1]["mask"] = torch.zeros_like(samples[-1]["mask"])
    with pytest.raises(ValueError, match=f"sample 's{micro_batch - 1}': its alignment mask is empty"):
        collate(samples, 2)


@pytest.mark.parametrize("codec", ["fp8z", "int8", "int4", "int4d", "lowrank:16+fp8"])
def test_codec_store_batches_stay_compressed_and_decode_like_their_samples(tmp_path, codec):
    from kvfuse.codecs import decode, parse_codec
    from kvfuse.teacher.compress import encode_sample, fit_bases

    gen = torch.Generator().manual_seed(11)
    samples = [(f"s{j}", {n: (t.float() if n.startswith("teacher") else t) for n, t in
                          _sample(gen, int(torch.randint(4, 30, (1,), generator=gen))).items()}) for j in range(5)]
    writer = StoreWriter(tmp_path, {"test": "loader", "codec": codec}, 1)
    bases = writer.claim_bases(fit_bases([t for _, t in samples], parse_codec(codec))) if "lowrank" in codec else None
    writer.write_shard(0, [(sid, encode_sample(t, parse_codec(codec), bases)) for sid, t in samples])
    store = TeacherKVStore(tmp_path)
    ids = [["s3", "s0"], ["s1", "s4", "s2"]]
    for batch_ids, batch in zip(ids, store_batches(store, ids, n_teachers=2, prefetch=1)):
        lengths = [len(store.get(i)["input_ids"]) for i in batch_ids]
        for kind in ("teacher_k", "teacher_v"):
            for i, entry in enumerate(batch[kind]):
                assert not isinstance(entry, torch.Tensor)                  # compressed until the loss
                x = decode(entry)
                assert x.shape[1] == len(batch_ids) and x.shape[3] == max(lengths) and torch.isfinite(x).all()
                for b, (sid, n) in enumerate(zip(batch_ids, lengths)):
                    one = decode(store.get(sid)[f"teacher{i}/{kind[-1]}"])
                    torch.testing.assert_close(x[:, b, :, :n], one, rtol=1e-6, atol=1e-6)


def _codec_store(root, codec, poison=None):
    """Five samples s0..s4 stored under `codec`; poison = (sample id, stored tensor name, value) written into one
    element of that tensor before it is stored (a NaN fp8 code: the byte 0x7F)."""
    from kvfuse.codecs import parse_codec
    from kvfuse.teacher.compress import encode_sample, fit_bases

    gen = torch.Generator().manual_seed(13)
    samples = [(f"s{j}", {n: (t.float() if n.startswith("teacher") else t) for n, t in
                          _sample(gen, int(torch.randint(4, 30, (1,), generator=gen))).items()}) for j in range(5)]
    writer = StoreWriter(root, {"test": "loader", "codec": codec}, 1)
    bases = writer.claim_bases(fit_bases([t for _, t in samples], parse_codec(codec))) if "lowrank" in codec else None
    encoded = [(sid, encode_sample(t, parse_codec(codec), bases)) for sid, t in samples]
    if poison is not None:
        sid, name, value = poison
        t = dict(encoded)[sid][name]
        (t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t).view(-1)[t.numel() // 2] = value
    writer.write_shard(0, encoded)
    return TeacherKVStore(root)


@pytest.mark.parametrize("codec,stored,value,named", [
    ("fp8", "teacher0/k.scale", float("nan"), r"teacher_k\[0\]\.scale"),
    ("fp8", "teacher1/v.scale", float("inf"), r"teacher_v\[1\]\.scale"),
    ("fp8", "teacher0/v", 0x7F, r"teacher_v\[0\]\.data"),
    ("int4", "teacher1/k.offset", float("nan"), r"teacher_k\[1\]\.offset"),
    ("lowrank:16+fp8", "teacher1/k.scale", float("nan"), r"teacher_k\[1\]\.coeffs\.scale"),
    ("bf16", "teacher1/v", float("nan"), r"teacher_v\[1\]"),
    ("bf16", "teacher0/k", float("inf"), r"teacher_k\[0\]"),
    ("bf16", "teacher0/k", -float("inf"), r"teacher_k\[0\]"),
])
def test_a_non_finite_part_of_a_stored_entry_is_named_with_its_samples(tmp_path, codec, stored, value, named):
    store = _codec_store(tmp_path, codec, ("s2", stored, value))
    batches = store_batches(store, [["s0", "s1"], ["s3", "s2"]], n_teachers=2, prefetch=1)
    assert next(batches)["ids"] == ["s0", "s1"]
    with pytest.raises(ValueError, match=rf"^{named} of samples \['s3', 's2'\] has NaN/Inf values$"):
        next(batches)


@pytest.mark.parametrize("codec", ["bf16", "fp8", "int4", "int4d", "lowrank:16", "lowrank:16+fp8",
                                   "lowrank:16+int4"])
def test_a_clean_batch_passes_with_one_host_sync_and_no_full_size_temporary(tmp_path, monkeypatch, codec):
    """Every host read of a device value (item, bool, int, float: aten._local_scalar_dense; tolist, which on the CPU
    bypasses the dispatcher) is counted, and every tensor an op creates (views aside) measured."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from kvfuse.teacher.loader import check_finite_teachers

    class Watch(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.syncs, self.created = 0, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.syncs += func is torch.ops.aten._local_scalar_dense.default
            inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
            for o in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in inputs:
                    self.created.append(o.numel())
            return out

    # built before tolist is counted: encoding the store reads its finite checks with tolist too
    batch = collate([dict(_codec_store(tmp_path, codec).get(f"s{j}")) for j in (3, 0, 4)], 2)
    tolist = torch.Tensor.tolist

    def counted_tolist(t):
        watch.syncs += 1
        return tolist(t)
    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    with Watch() as watch:                     # the counter sees a per-part check
        bool(torch.ones(3).all())
    assert watch.syncs == 1
    with Watch() as watch:
        assert check_finite_teachers(batch) is batch
    n_parts = sum(len(finite_parts(t)) for kind in ("teacher_k", "teacher_v") for t in batch[kind])
    smallest = min(t.numel() for kind in ("teacher_k", "teacher_v") for e in batch[kind] for _, t in finite_parts(e))
    assert watch.syncs == 1 and max(watch.created) <= n_parts < smallest, (watch.syncs, max(watch.created))
