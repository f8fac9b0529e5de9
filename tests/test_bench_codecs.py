"""The codec paths of the training-step and dump benchmarks (issue 16 speed targets), end to end at toy size on the
CPU: one store per codec, a CSV row per codec and stage, the stores' bytes per token ordered bf16 > fp8 > int4, and
the store-fed batch / streamed shard equal to the inline read / serial build; and the stores and key-code study of
`codec_quality halves`."""
from __future__ import annotations

import csv
import gzip
import json
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
                                "--csv", str(out), "--profile", str(tmp_path / "profiles")])
    assert rc == 0                                   # every codec's prefetched batch equals its inline read
    rows = _rows(out)
    assert [r["variant"] for r in rows if r["codec"] == ""] == ["ce_only"]
    fed = {r["codec"]: r for r in rows if r["variant"] == "kv_fused+store(1)"}
    resident = {r["codec"]: r for r in rows if r["variant"] == "kv_fused(torch)"}
    assert sorted(fed) == sorted(resident) == ["bf16", "fp8", "int4"]
    for codec in ("bf16", "fp8", "int4"):  # the per-operator tables of each codec's resident and store-fed steps
        assert "Self CPU" in (tmp_path / "profiles" / f"train_step_profile_{codec}.txt").read_text()
        assert "Self CPU" in (tmp_path / "profiles" / f"train_step_profile_{codec}_store.txt").read_text()
        # the store-fed steps' timeline: the loader's thread beside the training thread
        with gzip.open(tmp_path / "profiles" / f"train_step_trace_{codec}_store.json.gz") as fh:
            events = json.load(fh)["traceEvents"]
        assert len({e["tid"] for e in events if e.get("ph") == "X"}) >= 2
    assert [r["codec"] for r in rows if r["variant"] == "kv_eager(torch)"] == ["bf16"]
    for r in rows:
        assert float(r["step_ms"]) > 0 and math.isfinite(float(r["step_ms"]))
    store = {c: float(r["store_bytes_per_token"]) for c, r in fed.items()}
    kv = {c: float(r["kv_bytes_per_token"]) for c, r in fed.items()}
    assert store["int4"] < store["fp8"] < store["bf16"]
    # teacher KV alone per token, two teachers of 64 features each, keys and values: bf16 2 B per value; fp8 1 B
    # plus key and value scales per channel (bf16, once per sample of 16 tokens); int4 half a byte plus scales and
    # offsets, per channel for keys and per token (fp16) for values
    L = 4   # tiny-llama's layers
    values = L * 2 * (2 * 32 + 4 * 16)   # k and v, both teachers
    assert kv["bf16"] == 2 * values
    assert kv["fp8"] == values + 2 * L * (2 * 32 + 4 * 16) * 2 / 16
    assert kv["int4"] == values / 2 + 2 * (L * (2 * 32 + 4 * 16) * 4 / 16 + L * (2 + 4) * 2)
    assert all(r["prefetched_equals_inline"] == "True" for r in fed.values())
    assert all(float(r["reader_wait_ms"]) >= 0 for r in fed.values())
    assert {r["reader_wait_ms"] for r in resident.values()} == {""}
    # the loss got the compressed entries as training passes them (not decoded by the bench): per codec, one warm-up
    # pair and one timed step each for kv_fused and kv_fused+store, three profiled kv_fused steps and five store-fed
    # ones (two before the profile), plus kv_eager on bf16
    assert seen.count((("QuantizedKV", "fp8"),) * 2) == seen.count((("QuantizedKV", "int4"),) * 2) == 14
    assert seen.count((("Tensor", "torch.float32"),) * 2) == 17
    assert len(seen) == 45
    assert not list(tmp_path.glob("kvfuse-bench-store-*"))  # the stores are removed


def test_train_step_bench_interleaves_rounds(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    out = tmp_path / "train_step.csv"
    rc = bench_train_step.main(["--student", "tiny-llama", "--teachers", "2x32", "--batch", "2", "--seq", "16",
                                "--steps", "1", "--store_prefetch", "1", "--codecs", "bf16", "fp8", "--rounds", "2",
                                "--csv", str(out)])
    assert rc == 0
    rows = _rows(out)
    # each round: CE only, then the codecs in an order rotated by one; overheads against the round's own CE only
    order = [(r["round"], r["variant"], r["codec"]) for r in rows]
    assert order == [("0", "ce_only", ""), ("0", "kv_fused(torch)", "bf16"), ("0", "kv_eager(torch)", "bf16"),
                     ("0", "kv_fused+store(1)", "bf16"), ("0", "kv_fused(torch)", "fp8"),
                     ("0", "kv_fused+store(1)", "fp8"),
                     ("1", "ce_only", ""), ("1", "kv_fused(torch)", "fp8"), ("1", "kv_fused+store(1)", "fp8"),
                     ("1", "kv_fused(torch)", "bf16"), ("1", "kv_eager(torch)", "bf16"),
                     ("1", "kv_fused+store(1)", "bf16")]
    base = {r["round"]: float(r["step_ms"]) for r in rows if r["variant"] == "ce_only"}
    for r in rows:
        assert float(r["overhead_vs_ce"]) == pytest.approx(float(r["step_ms"]) / base[r["round"]] - 1, abs=1e-3)
    with pytest.raises(SystemExit):
        bench_train_step.main(["--rounds", "0"])


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


def test_replace_csv_swaps_the_whole_table_and_leaves_no_temporary(tmp_path):
    from bench.common import replace_csv

    path = tmp_path / "table.csv"
    replace_csv(path, [{"a": 1, "b": 2}, {"a": 3, "b": 4}])
    before = path.stat().st_ino
    replace_csv(path, [{"a": 5, "c": 6}])      # narrower and with another column: the old header does not survive
    assert path.read_text().splitlines() == ["a,c", "5,6"]
    assert path.stat().st_ino != before          # a new file renamed over the old one, not the old one rewritten
    assert [f.name for f in tmp_path.iterdir()] == ["table.csv"]


def _fp32_store(root):
    from kvfuse.teacher.store import StoreWriter

    gen = torch.Generator().manual_seed(0)
    samples = []
    for j, T in enumerate((11, 6)):
        mask = torch.rand(T, generator=gen) > 0.3
        mask[0] = True
        sample = {"input_ids": torch.arange(T), "positions": torch.arange(T), "mask": mask,
                  "labels_mask": mask.clone()}
        for i, (H, D) in enumerate(((2, 8), (1, 16))):
            for kind in "kv":
                x = torch.randn(3, H, T, D, generator=gen) * (1 + 4 * torch.rand(D, generator=gen))
                sample[f"teacher{i}/{kind}"] = x.masked_fill(~mask.unsqueeze(-1), float("nan"))
        samples.append((f"s{j}", sample))
    StoreWriter(root, {"teachers": ["a", "b"], "dtype": "fp32"}, 1).write_shard(0, samples)
    return samples


def _bf16_teacher_entries(store, samples):
    """(entry name, its fp32 source, what the bf16 store `store` holds for it, the sample's mask) of every teacher
    entry of `samples` (as _fp32_store wrote them); the store must be a bf16 one."""
    from kvfuse.teacher.store import TeacherKVStore

    written = TeacherKVStore(store)
    assert written.settings["codec"] == "bf16"
    for i, (_, sample) in enumerate(samples):
        got = written[i]
        for name, x in sample.items():
            if name.startswith("teacher"):
                assert got[name].dtype == torch.bfloat16
                yield name, x, got[name], sample["mask"]


@pytest.mark.parametrize("kind", ["k", "v"])
def test_int4_half_store_rounds_only_its_half(tmp_path, kind):
    """codec_quality halves: the half store holds int4 round trips (as the codec encodes them) in one half and the
    plain bf16 tensor in the other, on valid tokens; masked tokens, NaN in the source, are stored finite."""
    from bench.codec_quality import int4_half_store
    from kvfuse.codecs import encode_int, store_axis

    samples = _fp32_store(tmp_path / "fp32")
    int4_half_store(tmp_path / "fp32", tmp_path / "half", kind)
    for name, x, got, valid in _bf16_teacher_entries(tmp_path / "half", samples):
        assert torch.isfinite(got).all()
        plain = x[..., valid, :].to(torch.bfloat16)
        if name.endswith("/" + kind):
            want = encode_int(x, store_axis(kind, "int4"), valid).decode(torch.float32)[..., valid, :]
            want = want.to(torch.bfloat16)
            assert not torch.equal(want, plain)
        else:
            want = plain
        assert torch.equal(got[..., valid, :], want), name


@pytest.mark.parametrize("bits", [3, 8])
def test_int_round_trip_store_holds_each_channels_grid(tmp_path, bits):
    """codec_quality roundtrip: every teacher entry holds, on valid tokens, values within half a step of the source
    on a grid of 2^bits levels per (layer, head, channel) spanning that channel's valid range; masked tokens (NaN in
    the source) are stored as zeros."""
    from bench.codec_quality import int_round_trip_store

    samples = _fp32_store(tmp_path / "fp32")
    int_round_trip_store(tmp_path / "fp32", tmp_path / "rt", bits)
    for name, x, got, valid in _bf16_teacher_entries(tmp_path / "rt", samples):
        y = got.float()
        assert (y[..., ~valid, :] == 0).all()
        xv, yv = x[..., valid, :], y[..., valid, :]
        lo, hi = xv.amin(-2, keepdim=True), xv.amax(-2, keepdim=True)
        half_step = (hi - lo) / (2 * (2 ** bits - 1))
        assert ((yv - xv).abs() <= half_step + yv.abs() * 2.0 ** -8 + 1e-6).all(), name
        if bits == 3:  # a grid bf16 resolves (at 8 bits its own rounding is of a step's size)
            levels = ((yv - lo) / (2 * half_step)).round()                 # each value's grid index
            assert levels.min() >= 0 and levels.max() <= 2 ** bits - 1
            assert not torch.equal(yv, xv.to(torch.bfloat16).float())


def test_int4_key_variants_measure_the_codec_itself(tmp_path):
    """The study's reference rows are the codec's own int4 errors (same grid, same statistics); 5 bits and the
    MSE-best clip can only lower the keys' on these inputs."""
    from bench.codec_quality import _int4_key_variants
    from kvfuse.codecs import encode_int

    samples = _fp32_store(tmp_path / "fp32")
    rows = {r["variant"]: r["rel_mse"] for r in _int4_key_variants(tmp_path / "fp32")}
    for kind, axis, label in (("k", "channel", "int4 per channel (the codec)"),
                              ("v", "token", "int4 per token (the codec)")):
        err = energy = 0.0
        for _, sample in samples:
            valid = sample["mask"]
            for name in (f"teacher0/{kind}", f"teacher1/{kind}"):
                x = sample[name]
                y = encode_int(x, axis, valid).decode(torch.float32)
                err += float((y - x)[..., valid, :].double().square().sum())
                energy += float(x[..., valid, :].double().square().sum())
        # the codec stores its scales in fp32 (keys) or fp16 (values): same grid up to the scale's rounding
        assert rows[label] == pytest.approx(err / energy, rel=1e-5 if kind == "k" else 3e-3), label
    assert rows["5 bits per channel"] < rows["int4 per channel (the codec)"] / 3
    assert rows["int4, MSE-best clip of 16"] <= rows["int4 per channel (the codec)"]


def test_codec_distill_items_resize_a_phase_without_changing_its_defaults():
    """`distill --items TRAIN VAL`: the dump and the runs take those item counts and keep the phase's training
    options; the CPU-sized defaults stay as they were for the next call."""
    from bench.codec_quality import PHASE_RUNS, _size, main

    before = {k: dict(v) for k, v in PHASE_RUNS.items()}
    assert _size(2, (48, 16)) == dict(PHASE_RUNS[2], n_samples=48, n_val=16)
    assert _size(2, None) == PHASE_RUNS[2] and PHASE_RUNS == before
    with pytest.raises(SystemExit):  # two numbers or none
        main(["distill", "--codecs", "bf16", "--items", "48"])


@pytest.mark.parametrize("argv, says", [
    (["distill", "--codecs", "bf16", "--items", "0", "16"], "--items needs at least one train"),
    (["roundtrip", "--bits", "1"], "--bits must be 2..16"),
    (["roundtrip", "--bits", "8", "--items", "48", "-1"], "--items needs at least one train")])
def test_codec_quality_refuses_bad_sizes_by_name(argv, says, capsys):
    from bench.codec_quality import main

    with pytest.raises(SystemExit):
        main(argv)
    assert says in capsys.readouterr().err


def test_codec_gaps_name_a_table_that_is_not_one_and_a_missing_reference(tmp_path):
    from bench.codec_quality import main

    (tmp_path / "other.csv").write_text("device,tokens,ms\nH200,4096,1.0\n")
    with pytest.raises(SystemExit, match=r"other.csv: not a distill table, no column codec, phase, seed, steps"):
        main(["gaps", "--csv", str(tmp_path / "other.csv"), "--out", str(tmp_path / "g.png")])
    (tmp_path / "alone.csv").write_text("phase,codec,seed,steps,val_kv_last\n1,fp8,0,10,1.0\n")
    with pytest.raises(SystemExit, match="has a bf16 run of its setting, length and seed"):
        main(["gaps", "--csv", str(tmp_path / "alone.csv"), "--out", str(tmp_path / "g.png")])
    assert not (tmp_path / "g.png").exists()


def test_codec_gaps_pair_each_run_with_the_bf16_run_of_its_setting_length_and_seed(tmp_path, capsys):
    """`codec_quality gaps`: a run's gap is against the bf16 run of the same setting (CPU fp32, or a device's rows),
    length and seed; other phases and unpaired runs stay out."""
    import csv

    from bench.codec_quality import main

    def table(path, rows, extra=()):
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["phase", "codec", "seed", "steps", "val_kv_last", *extra])
            w.writeheader()
            w.writerows(rows)
    cpu = [dict(phase=1, codec="bf16", seed=0, steps=10, val_kv_last=1.0),
           dict(phase=1, codec="fp8", seed=0, steps=10, val_kv_last=1.03),
           dict(phase=1, codec="bf16", seed=1, steps=10, val_kv_last=2.0),
           dict(phase=1, codec="fp8", seed=1, steps=10, val_kv_last=2.02),
           dict(phase=1, codec="fp8", seed=2, steps=10, val_kv_last=9.0),     # no bf16 run of seed 2
           dict(phase=2, codec="bf16", seed=0, steps=8, val_kv_last=1.0),
           dict(phase=2, codec="fp8", seed=0, steps=8, val_kv_last=5.0)]
    gpu = [dict(phase=1, codec="bf16", seed=0, steps=10, val_kv_last=4.0, device="H200", student_dtype="bf16"),
           dict(phase=1, codec="fp8", seed=0, steps=10, val_kv_last=4.4, device="H200", student_dtype="bf16")]
    table(tmp_path / "cpu.csv", cpu)
    table(tmp_path / "gpu.csv", gpu, ("device", "student_dtype"))
    assert main(["gaps", "--csv", str(tmp_path / "cpu.csv"), str(tmp_path / "gpu.csv"), "--codecs", "fp8",
                 "--out", str(tmp_path / "gaps.png")]) == 0
    out = capsys.readouterr().out
    assert "CPU, fp32 student            10 steps +2.00 % (seeds 2)" in out
    assert "H200, bf16 student           10 steps +10.00 % (seeds 1)" in out
    assert (tmp_path / "gaps.png").stat().st_size > 0


def test_fused_loss_codec_rounds_rotate_and_pair():
    """The fused-loss codec bench's rounds: every codec takes every position over len(names) rounds, and each is
    compared with bf16 of its own round (a slow round for all must not read as a slow codec)."""
    from bench.bench_fused_loss import kernel_family, paired_ratios
    from bench.common import rotated
    names = ["bf16", "fp8", "int4"]
    orders = [rotated(names, r) for r in range(3)]
    assert orders == [["bf16", "fp8", "int4"], ["fp8", "int4", "bf16"], ["int4", "bf16", "fp8"]]
    assert all(sorted(o.index(n) for o in orders) == [0, 1, 2] for n in names)
    assert rotated(names, 4) == orders[1]
    rows = [dict(codec="bf16", round=0, full_ms=4.0), dict(codec="fp8", round=0, full_ms=4.4),
            dict(codec="bf16", round=1, full_ms=5.0), dict(codec="fp8", round=1, full_ms=5.0),
            dict(codec="int4", round=1, full_ms=6.0)]
    ratios = paired_ratios(rows, "full_ms")
    assert ratios == {"fp8": [pytest.approx(1.1), 1.0], "int4": [1.2]}
    assert [kernel_family(n) for n in ("_fused_kv_fwd_kernel", "_fused_kv_dw_kernel_0d1d", "void at::reduce_kernel")] \
        == ["fwd", "dw", "other"]


def _finished_distill_run(out, codec: str, seed: int, last: float, stamp: str | None = None) -> None:
    """A Phase-1 run folder as `codec_quality distill` leaves it (report, val KV at steps 0 and 10, the commit it
    trained with when `stamp`), and its store's shard summary."""
    from bench.codec_quality import _slug

    d = out / f"p1-{_slug(codec)}-seed{seed}"
    d.mkdir(parents=True)
    (d / "report.html").write_text("")
    (d / "metrics.jsonl").write_text("".join(json.dumps({"split": "val", "step": s, "kv_loss": v, "cka_mean": 0.9})
                                             + "\n" for s, v in ((0, 2.0), (10, last))))
    if stamp:
        (d / "commit.txt").write_text(stamp + "\n")
    store = out / f"store-p1-{_slug(codec)}"
    store.mkdir(exist_ok=True)
    (store / "shard-00000-of-00001.json").write_text(json.dumps({"bytes": 1000, "valid_tokens": 10}))


def test_distill_summary_merges_into_its_table_and_keeps_each_runs_commit(tmp_path, monkeypatch):
    """`codec_quality summarise` recomputes the rows of the runs in its folder and keeps every other row of the
    table (a folder that lost some runs must not narrow the table); a row's commit is the one its run trained with
    (commit.txt), or the table's when a run from before it gives the same result, else "unknown"."""
    import bench.codec_quality as cq

    results, out = tmp_path / "results", tmp_path / "runs"
    results.mkdir()
    monkeypatch.setattr(cq, "RESULTS", results)

    head = "phase,codec,seed,steps,val_kv_first,val_kv_last,cka_last,store_bytes_per_token,commit\n"
    (results / "codec_distill.csv").write_text(
        head + "1,bf16,0,10,2.0,1.0,0.9,100.0,aaaaaaa\n"       # its run is still there, same result: commit kept
        "1,int4,0,10,2.0,1.5,0.9,30.0,bbbbbbb\n"                 # no run in the folder: kept as it is
        "1,int8,0,10,2.0,1.2,0.9,55.0,ccccccc\n")                # rerun with new code: replaced
    _finished_distill_run(out, "bf16", 0, 1.0)
    _finished_distill_run(out, "int8", 0, 1.01, stamp="ddddddd")
    _finished_distill_run(out, "fp8", 0, 1.3)                   # a run from before commit.txt, not in the table
    assert cq.main(["summarise", "--phases", "1", "--seeds", "0", "--codecs", "bf16", "int8", "fp8", "int4",
                    "--out", str(out)]) == 0
    rows = {r["codec"]: r for r in _rows(results / "codec_distill.csv")}
    assert set(rows) == {"bf16", "int4", "int8", "fp8"}
    assert rows["bf16"]["commit"] == "aaaaaaa" and rows["int4"]["commit"] == "bbbbbbb"
    assert rows["int4"]["val_kv_last"] == "1.5" and rows["int4"]["store_bytes_per_token"] == "30.0"
    assert rows["int8"]["commit"] == "ddddddd" and float(rows["int8"]["val_kv_last"]) == 1.01
    assert float(rows["int8"]["store_bytes_per_token"]) == 100.0
    assert rows["fp8"]["commit"] == "unknown"


def test_distill_summary_keeps_a_newer_row_over_a_run_from_older_code(tmp_path, monkeypatch):
    """A run left in the folder by older code (its commit an ancestor of the row's) must not replace the table's
    row when its result differs; a run from newer code does replace it."""
    import subprocess

    import bench.codec_quality as cq

    repo, results, out = tmp_path / "repo", tmp_path / "results", tmp_path / "runs"
    results.mkdir()
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run([*git, "init", "-q"], check=True)
    hashes = []
    for i in range(3):
        subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", f"c{i}"], check=True)
        hashes.append(subprocess.run([*git, "rev-parse", "--short", "HEAD"], check=True, capture_output=True,
                                     text=True).stdout.strip())
    old, mid, new = hashes
    monkeypatch.setattr(cq, "RESULTS", results)
    monkeypatch.setattr(cq, "ROOT", repo)
    _finished_distill_run(out, "bf16", 0, 1.00003, stamp=old)
    _finished_distill_run(out, "int8", 0, 1.2, stamp=new)
    head = "phase,codec,seed,steps,val_kv_first,val_kv_last,cka_last,store_bytes_per_token,commit\n"
    (results / "codec_distill.csv").write_text(head + f"1,bf16,0,10,2.0,1.0,0.9,100.0,{mid}\n"
                                                      f"1,int8,0,10,2.0,1.1,0.9,55.0,{mid}\n")
    assert cq.main(["summarise", "--phases", "1", "--seeds", "0", "--codecs", "bf16", "int8", "--out", str(out)]) == 0
    rows = {r["codec"]: r for r in _rows(results / "codec_distill.csv")}
    assert (rows["bf16"]["commit"], float(rows["bf16"]["val_kv_last"])) == (mid, 1.0)
    assert (rows["int8"]["commit"], float(rows["int8"]["val_kv_last"])) == (new, 1.2)


def test_every_codec_of_the_reconstruction_study_gets_its_own_colour():
    from bench.codec_quality import CODECS, codec_colours

    colours = codec_colours(["bf16", *CODECS, "fp8"])
    assert list(colours) == ["bf16", *CODECS] and len(set(colours.values())) == len(colours) > 10
