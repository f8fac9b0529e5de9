"""Store loader: worker processes deliver exactly the batches, in exactly the order, that inline reads give."""
import pytest
import torch

from kvfuse.teacher.builder import collate
from kvfuse.teacher.loader import store_loader
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


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_equal_inline_collate_in_order(tmp_path, workers):
    store = _store(tmp_path)
    id_batches = [["s1-4"], ["s0-0", "s1-2", "s0-3"], ["s0-1", "s1-0"], ["s1-1", "s0-4", "s0-2", "s1-3"]]
    got = list(store_loader(store, id_batches, n_teachers=2, pad_id=5, workers=workers))
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


def test_nan_in_a_stored_sample_is_named_through_the_worker(tmp_path):
    store = _store(tmp_path, poison_id="s1-2")
    loader = store_loader(store, [["s0-0"], ["s0-1", "s1-2"]], n_teachers=2, workers=1)
    with pytest.raises(ValueError, match=r"teacher_k\[0\] of samples \['s0-1', 's1-2'\] has NaN/Inf"):
        list(loader)
    with pytest.raises(ValueError, match="workers must be >= 0"):
        store_loader(store, [["s0-0"]], n_teachers=2, workers=-1)
