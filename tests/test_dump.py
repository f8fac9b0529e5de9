"""`python -m kvfuse dump` end to end on tiny models: store == online builder, kill + resume, refusals."""
import re
import signal
import subprocess
import sys

import pytest
import torch
from concurrent_runs import concurrently

from kvfuse.data import load_examples, resolve_prompt
from kvfuse.models import load
from kvfuse.teacher.builder import AlignmentSettings, Teacher, TeacherKVBuilder, build_pipelined
from kvfuse.teacher.store import StoreError, TeacherKVStore

ARGS = ["--teachers", "tiny-llama", "tiny-gemma3", "--teacher_prompts", "default", "cot", "--student", "tiny-qwen2",
        "--student_prompt", "default", "--seed", "3",
        "--max_length", "4096"]


def _dump(out, *extra, check=True):
    cmd = [sys.executable, "-m", "kvfuse", "dump", *ARGS, "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"dump failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def test_store_equals_online_builder_and_reports_bytes_per_token(tmp_path):
    for shard in ("0/2", "1/2"):
        proc = _dump(tmp_path, "--n_samples", "5", "--n_val", "1", "--shard", shard, "--batch_size", "2")
        assert "bytes/token" in proc.stdout and "tokens/s" in proc.stdout
    store = TeacherKVStore(tmp_path)
    train, val = load_examples("gsm8k", 5, 1, seed=3)
    assert sorted(store.sample_ids) == sorted(str(e.id) for e in train + val)
    teachers = [Teacher(n, resolve_prompt(p), *load(n)) for n, p in (("tiny-llama", "default"), ("tiny-gemma3", "cot"))]
    _, student_tok = load("tiny-qwen2")
    builder = TeacherKVBuilder(teachers, student_tok, resolve_prompt("default"), 3, AlignmentSettings(),
                               storage_dtype=torch.bfloat16)
    for sample_id, tensors in builder.build(train[:3]):
        stored = store.get(sample_id)
        assert set(stored) - {"id"} == set(tensors)
        for name, tensor in tensors.items():
            if name.startswith("teacher"):
                # Teachers ran in other batch compositions (padding changes BLAS blocking): equal up to one bf16
                # rounding step.
                torch.testing.assert_close(stored[name].float(), tensor.float(), rtol=8e-3, atol=1e-5)
            else:
                assert torch.equal(stored[name], tensor), name
    first = store[0]
    assert first["teacher0/k"].shape[0] == 3 and first["teacher1/k"].shape[1] == 1   # [L_s, H_t, T_s, D_t]
    assert first["teacher0/k"].dtype == torch.bfloat16 and first["mask"].any()
    # done shards are skipped, so a rerun is idempotent
    assert "nothing to do" in _dump(tmp_path, "--n_samples", "5", "--n_val", "1", "--shard", "0/2").stdout


def test_pipelined_build_equals_batch_by_batch_build():
    teachers = [Teacher(n, resolve_prompt(p), *load(n)) for n, p in (("tiny-llama", "default"), ("tiny-gemma3", "cot"))]
    _, student_tok = load("tiny-qwen2")
    builder = TeacherKVBuilder(teachers, student_tok, resolve_prompt("default"), 3, AlignmentSettings(),
                               max_length=4096)
    examples, _ = load_examples("gsm8k", 5, 0, seed=4)
    serial = [item for first in (0, 2, 4) for item in builder.build(examples[first:first + 2])]
    piped = [item for batch in build_pipelined(builder, examples, 2) for item in batch]
    assert [sid for sid, _ in piped] == [str(e.id) for e in examples] == [sid for sid, _ in serial]
    for (_, a), (_, b) in zip(serial, piped):
        assert set(a) == set(b)
        for name in a:
            assert a[name].device.type == "cpu" and torch.equal(a[name], b[name]), name


def test_unalignable_example_fails_before_any_teacher_runs():
    teacher_model, teacher_tok = load("tiny-llama")
    calls = []
    teacher_model.model.register_forward_hook(lambda *_: calls.append(1))
    _, student_tok = load("tiny-qwen2")
    builder = TeacherKVBuilder([Teacher("tiny-llama", "", teacher_model, teacher_tok)], student_tok, "", 3,
                               AlignmentSettings(fallback="none"), max_length=4096)
    good, _ = load_examples("gsm8k", 2, 0, seed=4)
    # the teacher renders another text for the second example: nothing can align
    other = type(good[0])(id="odd", question="zzzz qqqq", rationale="xxxx", answer="1")
    builder.teacher_view = lambda example, i: TeacherKVBuilder.teacher_view(
        builder, other if example.id == good[1].id else example, i)
    with pytest.raises(ValueError, match=f"example {good[1].id}, teacher 0 \\(tiny-llama\\): shared segments differ"):
        list(build_pipelined(builder, good, 2))
    assert calls == []


def _one_teacher_builder(**kwargs):
    teacher_model, teacher_tok = load("tiny-llama")
    _, student_tok = load("tiny-qwen2")
    builder = TeacherKVBuilder([Teacher("tiny-llama", "", teacher_model, teacher_tok)], student_tok, "", 3,
                               AlignmentSettings(), max_length=4096, **kwargs)
    return builder, teacher_model


@pytest.mark.parametrize("codec,step", [("bf16", "plain bfloat16 storage"), ("fp8", "fp8 encoding"),
                                        ("fp8z", "fp8z encoding"), ("int8", "int8 encoding"),
                                        ("lowrank:16+int4", "lowrank:16+int4 encoding")])
def test_a_teacher_that_produces_nan_is_refused_at_encoding_naming_the_example_entry_and_position(codec, step):
    from kvfuse.codecs import parse_codec
    from kvfuse.teacher.compress import encode_sample, fit_bases

    builder, teacher_model = _one_teacher_builder()
    examples, _ = load_examples("gsm8k", 2, 0, seed=4)
    parsed = parse_codec(codec)
    bases = fit_bases([t for _, t in builder.build(examples)], parsed) if parsed.lowrank else None
    builder.encode = lambda tensors, checks: encode_sample(tensors, parsed, bases, checks)
    assert len(builder.build(examples)) == 2
    teacher_model.model.layers[0].self_attn.k_proj.register_forward_hook(lambda m, i, out: out * float("nan"))
    message = (rf"^example {examples[0].id}: {re.escape(step)} of teacher0/k \(keys\): NaN at layer 0, head 0, "
               r"token \d+, channel 0 ")
    with pytest.raises(ValueError, match=message):
        builder.build(examples)
    with pytest.raises(ValueError, match=message):     # read by the copier thread
        list(build_pipelined(builder, examples, 2))


def test_plain_storage_refuses_values_that_overflow_float16_naming_the_example_and_position():
    """--dtype fp16 under codec bf16: a value the fp32 teacher KV holds but fp16 cannot is +Inf once cast."""
    from kvfuse.codecs import parse_codec
    from kvfuse.teacher.compress import encode_sample

    builder, teacher_model = _one_teacher_builder(storage_dtype=torch.float16)
    builder.encode = lambda tensors, checks: encode_sample(tensors, parse_codec("bf16"), checks=checks)
    examples, _ = load_examples("gsm8k", 2, 0, seed=4)

    def huge(module, inputs, out):
        out[..., 3] = 1e6
        return out
    # the teacher's last layer, which the layer map sends to the student's last (2) alone
    teacher_model.model.layers[-1].self_attn.v_proj.register_forward_hook(huge)
    message = (rf"^example {examples[0].id}: plain float16 storage of teacher0/v \(values\): \+Inf at layer 2, "
               r"head 0, token \d+, channel 3 of shape \(3, 2, \d+, 16\), a valid \(mask 1\) token")
    with pytest.raises(ValueError, match=message):
        builder.build(examples)
    with pytest.raises(ValueError, match=message):
        list(build_pipelined(builder, examples, 1))


def test_nan_only_in_masked_tokens_is_stored_as_zero_padding_that_the_loader_accepts(tmp_path):
    from kvfuse.codecs import parse_codec
    from kvfuse.teacher.builder import collate
    from kvfuse.teacher.compress import encode_sample
    from kvfuse.teacher.dump import dump_shard
    from kvfuse.teacher.loader import check_finite_teachers
    from kvfuse.teacher.store import StoreWriter

    builder, _ = _one_teacher_builder()
    examples, _ = load_examples("gsm8k", 3, 0, seed=4)
    prepare = builder.prepare

    def last_token_masked(batch):
        prepared = prepare(batch)
        for mask in prepared.masks:
            mask[-1] = False
        return prepared

    def nan_in_masked_tokens(tensors, checks):
        for name in ("teacher0/k", "teacher0/v"):
            tensors[name][:, :, ~tensors["mask"]] = float("nan")
        return encode_sample(tensors, parse_codec("bf16"), checks=checks)
    builder.prepare, builder.encode = last_token_masked, nan_in_masked_tokens
    built = builder.build(examples)
    assert all((t["teacher0/k"][:, :, -1] == 0).all() and (t["teacher0/v"][:, :, -1] == 0).all() for _, t in built)
    dump_shard(builder, examples, 2, StoreWriter(tmp_path, {"test": "dump-nan"}, 1), 0)
    store = TeacherKVStore(tmp_path)
    samples = [store.get(str(example.id)) for example in examples]
    for stored in samples:
        assert not stored["mask"][-1] and stored["mask"].any()
        for name in ("teacher0/k", "teacher0/v"):
            assert (stored[name][:, :, -1] == 0).all() and torch.isfinite(stored[name][:, :, stored["mask"]]).all()
            assert stored[name][:, :, stored["mask"]].abs().sum() > 0
    batch = collate(samples, n_teachers=1)
    assert check_finite_teachers(batch) is batch


@pytest.mark.parametrize("codec", ["bf16", "fp8"])
def test_encoding_adds_no_host_read_to_launch_and_one_per_batch_to_build_and_the_copier(codec, count_host_reads):
    """On the GPU a host read waits for the teacher forward: launch leaves the verdicts unread (the caller prepares
    the next batch meanwhile), build reads them with one host read per batch, build_pipelined in its copier thread
    (counted through Tensor.tolist, which the verdicts are read with), also one per batch."""
    from kvfuse.codecs import parse_codec
    from kvfuse.teacher.compress import encode_sample

    builder, _ = _one_teacher_builder()
    examples, _ = load_examples("gsm8k", 3, 0, seed=4)
    prepared = builder.prepare(examples)
    builder.launch(prepared)                  # first-call set-up reads out of the counts
    counts = []
    for encode in (None, lambda tensors, checks: encode_sample(tensors, parse_codec(codec), checks=checks)):
        builder.encode = encode
        with count_host_reads() as launch:
            launched = builder.launch(prepared)
        with count_host_reads() as build:
            builder.build(examples)
        with count_host_reads() as piped:
            assert sum(len(batch) for batch in build_pipelined(builder, examples, 2)) == 3
        counts.append((launch.n, build.n, piped.n))
    assert len(launched.checks) == 2 * len(examples)          # keys and values of one teacher, per example
    (launch_plain, build_plain, piped_plain), (launch_enc, build_enc, piped_enc) = counts
    assert (launch_enc - launch_plain, build_enc - build_plain, piped_enc - piped_plain) == (0, 1, 2), counts


def test_a_nan_example_stops_the_dump_before_its_shard_is_finished_and_a_rerun_redoes_it(tmp_path):
    """The verdicts are read in the copier, a batch after launch: the batches before the bad example are already
    being written when it is refused, and the shard must still not be finished (nor hold it)."""
    from kvfuse.codecs import parse_codec
    from kvfuse.teacher.compress import encode_sample
    from kvfuse.teacher.dump import dump_shard
    from kvfuse.teacher.store import StoreWriter

    builder, _ = _one_teacher_builder()
    examples, _ = load_examples("gsm8k", 5, 0, seed=4)
    bad_id = examples[3].id                   # the second of three batches

    def nan_in(tensors, checks):
        if torch.equal(tensors["input_ids"], builder.student_view(examples[3]).input_ids):
            tensors["teacher0/v"][1, 0, tensors["mask"].nonzero()[0, 0], 2] = float("nan")
        return encode_sample(tensors, parse_codec("bf16"), checks=checks)
    builder.encode = nan_in
    settings = {"test": "dump-nan-stops"}
    written = []
    with pytest.raises(ValueError, match=rf"^example {bad_id}: plain bfloat16 storage of teacher0/v \(values\): "
                                         r"NaN at layer 1, head 0, token \d+, channel 2 "):
        dump_shard(builder, examples, 2, StoreWriter(tmp_path, settings, 1), 0,
                   lambda built: written.extend(sid for sid, _ in built))
    assert written == [str(e.id) for e in examples[:2]]       # the batch before was built (and sent to be written)
    assert not list(tmp_path.glob("shard-*"))                 # nothing finished: no data file, no record
    with pytest.raises(StoreError, match="shard 0 of 1"):
        TeacherKVStore(tmp_path)
    builder.encode = lambda tensors, checks: encode_sample(tensors, parse_codec("bf16"), checks=checks)
    writer = StoreWriter(tmp_path, settings, 1)
    assert writer.unfinished_reason(0) is not None
    dump_shard(builder, examples, 2, writer, 0)
    assert TeacherKVStore(tmp_path).sample_ids == [str(e.id) for e in examples]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # no leftover tmp file


# SIGKILL at the worst spot: the shard's data file is in place but its JSON record is not. Deterministic, unlike
# killing from outside after watching the progress bar (a fast machine finished the shard first).
_KILL_BEFORE_SHARD_JSON = """
import os, signal, sys
from kvfuse import __main__ as cli
from kvfuse.teacher import store
write = store.atomic_write_text
def write_or_die(path, text):
    if path.name.startswith("shard-"):
        os.kill(os.getpid(), signal.SIGKILL)
    write(path, text)
store.atomic_write_text = write_or_die
sys.exit(cli.main(sys.argv[1:]))
"""


def test_killed_dump_resumes_with_every_sample_exactly_once(tmp_path):
    cmd = [sys.executable, "-c", _KILL_BEFORE_SHARD_JSON, "dump", *ARGS, "--out", str(tmp_path), "--n_samples", "12",
           "--shard", "0/2", "--batch_size", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (tmp_path / "shard-00000-of-00002.safetensors").exists()
    assert not (tmp_path / "shard-00000-of-00002.json").exists()
    with pytest.raises(StoreError, match="shard 0 of 2"):
        TeacherKVStore(tmp_path)
    _dump(tmp_path, "--n_samples", "12", "--shard", "1/2")
    _dump(tmp_path, "--n_samples", "12", "--shard", "0/2")
    store = TeacherKVStore(tmp_path)     # verifies every checksum
    ids = store.sample_ids
    assert len(ids) == len(set(ids)) == 12


def test_dump_refuses_to_mix_settings_and_bad_arguments(tmp_path):
    # the two refusals in folders of their own go alongside the first shard (tests/concurrent_runs.py)
    _, prompts, long = concurrently(
        lambda: _dump(tmp_path, "--n_samples", "2", "--shard", "0/2"),
        lambda: _dump(tmp_path / "b", "--n_samples", "2", "--teacher_prompts", "cot", check=False),
        lambda: _dump(tmp_path / "c", "--n_samples", "3", "--max_length", "40", check=False))
    proc = _dump(tmp_path, "--n_samples", "2", "--shard", "1/2", "--layer_map", "round", check=False)
    assert proc.returncode != 0 and "refusing to mix shards" in proc.stderr
    with pytest.raises(StoreError, match="shard 1 of 2 is missing"):
        TeacherKVStore(tmp_path)
    assert prompts.returncode == 2 and "one prompt per teacher" in prompts.stderr and "Traceback" not in prompts.stderr
    assert long.returncode == 2 and "more than max_length=40" in long.stderr and "never truncated" in long.stderr


def test_an_example_beyond_the_models_positions_is_refused_or_allowed_and_logged(caplog):
    teacher_model, teacher_tok = load("tiny-llama")
    _, student_tok = load("tiny-qwen2")
    examples, _ = load_examples("gsm8k", 2, 0, seed=4)
    teachers = [Teacher("tiny-llama", resolve_prompt("cot"), teacher_model, teacher_tok)]
    builder = TeacherKVBuilder(teachers, student_tok, resolve_prompt("default"), 3, max_length=4096,
                               student_max_positions=20)
    with pytest.raises(ValueError, match=f"example {examples[0].id}: the student sequence has \\d+ tokens, more than "
                                         "the model's 20 positions .*set allow_long_sequences"):
        builder.build(examples)
    builder.student_max_positions = None
    teacher_model.config.max_position_embeddings = 30
    with pytest.raises(ValueError, match=f"example {examples[0].id}: the teacher 0 \\(tiny-llama\\) sequence has "
                                         "\\d+ tokens, more than the model's 30 positions"):
        builder.build(examples)
    builder.allow_long_sequences = True
    with caplog.at_level("WARNING", logger="kvfuse.teacher.builder"):
        assert len(builder.build(examples)) == 2
    assert [r.getMessage().count("used anyway (allow_long_sequences)") for r in caplog.records] == [1, 1]


def test_rerunning_a_dump_repairs_a_damaged_finished_shard(tmp_path, capsys):
    import argparse

    from kvfuse.teacher import dump

    parser = argparse.ArgumentParser()
    dump.add_arguments(parser)

    def rerun(*extra):            # in this process: the same code as the CLI, without a fresh interpreter each time
        assert dump.run(parser.parse_args([*ARGS, "--out", str(tmp_path), "--n_samples", "2", *extra])) == 0
        return capsys.readouterr().out

    rerun()
    victim = tmp_path / "shard-00000-of-00001.safetensors"
    victim.write_bytes(victim.read_bytes()[:-40])
    out = rerun()
    assert "is damaged" in out and "bytes, its record says" in out and "rewriting it" in out
    assert len(TeacherKVStore(tmp_path)) == 2
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0x08                                   # a flipped tensor bit: only the full check sees it
    victim.write_bytes(bytes(data))
    assert "nothing to do" in rerun()
    out = rerun("--verify")
    assert "fails its sha256 check" in out and "rewriting it" in out
    assert len(TeacherKVStore(tmp_path)) == 2          # every digest checks again


def test_codec_dumps_are_smaller_share_one_basis_across_shards_and_refuse_another_codec(tmp_path):
    from kvfuse.codecs import LowRankKV, QuantizedKV

    common = ["--n_samples", "4", "--n_val", "1", "--batch_size", "2"]

    def lowrank(shard):
        return _dump(tmp_path / "lowrank", *common, "--codec", "lowrank:e0.95+fp8", "--calib", "2", "--shard", shard)
    # runs in different folders go side by side (tests/concurrent_runs.py); a store's shards one after the other
    _, first, int3 = concurrently(
        lambda: _dump(tmp_path / "int4", *common, "--codec", "int4"),
        lambda: lowrank("1/2"),
        lambda: _dump(tmp_path / "x", *common, "--codec", "int3", check=False))
    # int4d has int4's layout and names, but not its decode: a shard of one cannot join a store of the other
    second, int4d = concurrently(lambda: lowrank("0/2"),
                                 lambda: _dump(tmp_path / "int4", *common, "--codec", "int4d", check=False))
    assert "low-rank bases" in first.stdout and "low-rank bases" not in second.stdout  # fitted by the first writer
    int4, lowrank = TeacherKVStore(tmp_path / "int4"), TeacherKVStore(tmp_path / "lowrank")
    assert isinstance(int4[0]["teacher0/k"], QuantizedKV) and isinstance(lowrank[0]["teacher1/v"], LowRankKV)
    assert str(lowrank.codec) == "lowrank:e0.95+fp8" and lowrank.settings["calib"] == 2
    # what the same samples take in bf16: 2 bytes per teacher value, plus the same ids and masks
    bf16 = sum(2 * x.shape.numel() if name.startswith("teacher") else x.numel() * x.element_size()
               for item in int4 for name, x in item.items() if name != "id")
    assert int4.bytes < 0.5 * bf16
    assert int4d.returncode != 0 and "codec: 'int4' vs 'int4d'" in int4d.stderr
    assert int3.returncode == 2 and "unknown codec 'int3'" in int3.stderr
