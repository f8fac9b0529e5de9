"""The codec paths of the training-step and dump benchmarks (issue 16 speed targets), end to end at toy size on the
CPU: one store per codec, a CSV row per codec and stage, the stores' bytes per token ordered bf16 > fp8 > int4, and
the store-fed batch / streamed shard equal to the inline read / serial build."""
from __future__ import annotations

import csv
import math
import threading

import pytest
import torch

from bench import bench_dump, bench_train_step
from kvfuse.loss import KVDistillLoss


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a small shared machine two spinning OpenMP threads made these toy steps 10× slower
    (and the test's time erratic); the benchmarks' code paths are the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_train_step_bench_codecs(tmp_path, monkeypatch):
    seen = []                                        # what the loss got as teacher keys, per call
    forward = KVDistillLoss.forward

    def spy(self, student_k, student_v, teacher_k, *args, **kwargs):
        seen.append(tuple((type(t).__name__, t.kind if hasattr(t, "kind") else str(t.dtype)) for t in teacher_k))
        return forward(self, student_k, student_v, teacher_k, *args, **kwargs)
    monkeypatch.setattr(KVDistillLoss, "forward", spy)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    out = tmp_path / "train_step.csv"
    rc = bench_train_step.main(["--student", "tiny-llama", "--teachers", "2x32,4x16", "--batch", "2", "--seq", "16",
                                "--steps", "1", "--store_prefetch", "1", "--codecs", "bf16", "fp8", "int4",
                                "--csv", str(out)])
    assert rc == 0                                   # every codec's prefetched batch equals its inline read
    rows = _rows(out)
    assert [r["variant"] for r in rows if r["codec"] == ""] == ["ce_only"]
    fed = {r["codec"]: r for r in rows if r["variant"] == "kv_fused+store(1)"}
    resident = {r["codec"]: r for r in rows if r["variant"] == "kv_fused(torch)"}
    assert sorted(fed) == sorted(resident) == ["bf16", "fp8", "int4"]
    assert [r["codec"] for r in rows if r["variant"] == "kv_eager(torch)"] == ["bf16"]
    for r in rows:
        assert float(r["step_ms"]) > 0 and math.isfinite(float(r["step_ms"]))
    store = {c: float(r["store_bytes_per_token"]) for c, r in fed.items()}
    kv = {c: float(r["kv_bytes_per_token"]) for c, r in fed.items()}
    assert store["int4"] < store["fp8"] < store["bf16"]
    # teacher KV alone per token, two teachers of 64 features each, keys and values: bf16 2 B per value; fp8 1 B
    # plus the key scales per channel (fp32, once per sample of 16 tokens) and the value scales per token (fp16);
    # int4 half a byte plus scales and offsets
    L = 4   # tiny-llama's layers
    values = L * 2 * (2 * 32 + 4 * 16)   # k and v, both teachers
    assert kv["bf16"] == 2 * values
    assert kv["fp8"] == values + L * (2 * 32 + 4 * 16) * 4 / 16 + L * (2 + 4) * 2
    assert kv["int4"] == values / 2 + 2 * (L * (2 * 32 + 4 * 16) * 4 / 16 + L * (2 + 4) * 2)
    assert all(r["prefetched_equals_inline"] == "True" for r in fed.values())
    assert all(float(r["reader_wait_ms"]) >= 0 for r in fed.values())
    assert {r["reader_wait_ms"] for r in resident.values()} == {""}
    # the loss got the compressed entries as training passes them (not decoded by the bench): per codec, one warm-up
    # pair and one timed step each for kv_fused and kv_fused+store, plus kv_eager on bf16
    assert seen.count((("QuantizedKV", "fp8"),) * 2) == seen.count((("QuantizedKV", "int4"),) * 2) == 6
    assert seen.count((("Tensor", "torch.float32"),) * 2) == 9
    assert len(seen) == 21
    assert not list(tmp_path.glob("kvfuse-bench-store-*"))  # the stores are removed


def test_train_step_bench_times_a_step_beside_each_part_of_the_reader(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    out = tmp_path / "train_step.csv"
    rc = bench_train_step.main(["--student", "tiny-llama", "--teachers", "2x32", "--batch", "2", "--seq", "16",
                                "--steps", "1", "--store_prefetch", "1", "--interference", "--csv", str(out)])
    assert rc == 0
    beside = [r for r in _rows(out) if " beside " in r["variant"]]
    parts = ("collate", "copy", "copy+flags", "copy+read", "copy+check", "copy+record", "loader")
    assert [r["variant"] for r in beside] == [f"kv_fused beside {part}" for part in parts]
    assert {r["cuda_segment_allocs"] for r in _rows(out)} == {""}          # a CPU run has no device allocator
    assert all(r["codec"] == "bf16" and float(r["step_ms"]) > 0 for r in beside)
    assert not [t for t in threading.enumerate() if t.name == "kvfuse-bench-reader"]   # every reader stopped


def test_dump_bench_codecs(tmp_path):
    out = tmp_path / "dump.csv"
    rc = bench_dump.main(["--teacher", "tiny-llama", "--student", "tiny-llama", "--seq", "24", "--n", "2",
                          "--batch", "2", "--repeats", "1", "--codecs", "bf16", "fp8", "int4", "--csv", str(out),
                          "--store_dir", str(tmp_path)])
    assert rc == 0                                   # every codec's streamed shard equals its serial build
    rows = _rows(out)
    assert [r["stage"] for r in rows if r["codec"] == "-"] == ["bare forward"]
    stages = ["serial build", "  prepare (CPU)", "  launch (device)", "    until it returns", "  copy to host",
              "write_shard (held)", "dump (streamed)", "  last batch built", "store read"]
    per_codec = {c: [r for r in rows if r["codec"] == c] for c in ("bf16", "fp8", "int4")}
    assert len(rows) == 1 + 3 * len(stages)
    bytes_per_token = {}
    for c, group in per_codec.items():
        assert [r["stage"] for r in group] == stages
        assert {r["dump_equals_serial"] for r in group} == {"True"}
        assert len({r["bytes_per_token"] for r in group}) == 1
        bytes_per_token[c] = float(group[0]["bytes_per_token"])
        dump = next(r for r in group if r["stage"] == "dump (streamed)")
        assert float(dump["seconds"]) > 0 and float(dump["tokens_per_s"]) > 0
        launch, returns = (float(next(r for r in group if r["stage"] == s)["seconds"]) for s in stages[2:4])
        assert 0 < returns <= launch
    assert 0 < bytes_per_token["int4"] < bytes_per_token["fp8"] < bytes_per_token["bf16"]
    assert not list(tmp_path.glob("kvfuse-bench-dump-*"))   # the shards are removed


def test_append_csv_widens_an_older_header(tmp_path):
    from bench.common import append_csv

    path = tmp_path / "rows.csv"
    append_csv(path, [{"a": 1, "b": 2}])
    append_csv(path, [{"a": 3, "b": 4, "codec": "fp8"}])
    append_csv(path, [{"a": 5, "b": 6, "codec": "int4"}])
    assert path.read_text().splitlines() == ["a,b,codec", "1,2,", "3,4,fp8", "5,6,int4"]
