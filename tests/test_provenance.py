"""A store knows what it was made for: student, teachers, dataset content and settings are fingerprinted at dump,
and a run that differs is refused by field name; a run takes its examples and splits from the store."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvfuse.data import load_examples
from kvfuse.models import load
from kvfuse.teacher.dump import add_arguments, dump_settings
from kvfuse.teacher.provenance import open_store_for_run, store_examples, student_fingerprint, teacher_fingerprint
from kvfuse.teacher.store import StoreError, StoreWriter

ROOT = Path(__file__).resolve().parent.parent


def _dump_args(*extra):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--teachers", "tiny-llama", "tiny-llama", "--teacher_prompts", "default", "cot",
                              "--out", "unused", *extra])


def _store(root, student="tiny-qwen2", dataset="gsm8k", n_samples=5, n_val=2, seed=3):
    """A store with the settings `python -m kvfuse dump` records (the tensors are stand-ins: nothing here reads
    them but the store's own checks)."""
    args = _dump_args("--student", student, "--dataset", dataset, "--n_samples", str(n_samples), "--n_val",
                      str(n_val), "--seed", str(seed))
    model, tokenizer = load(student)
    train, val = load_examples(dataset, n_samples, n_val, seed)
    settings = dump_settings(args, [teacher_fingerprint(n) for n in args.teachers],
                             student_fingerprint(tokenizer, model.config), train, val)
    samples = [(str(ex.id), {"mask": torch.ones(3, dtype=torch.bool), "teacher0/k": torch.zeros(2, 1, 3, 4)})
               for ex in train + val]
    StoreWriter(root, settings, 1).write_shard(0, samples)
    return settings


def _run_settings(settings, student="tiny-qwen2"):
    model, tokenizer = load(student)
    keys = ("teachers", "teacher_prompts", "student_prompt", "student_layers", "alignment", "allow_long_sequences")
    return dict({k: settings[k] for k in keys}, student_fingerprint=student_fingerprint(tokenizer, model.config),
                teacher_fingerprints=[teacher_fingerprint(n) for n in settings["teachers"]])


def test_a_store_for_another_student_or_teacher_is_refused_by_name(tmp_path):
    settings = _store(tmp_path)
    assert len(open_store_for_run(tmp_path, _run_settings(settings))) == 7
    with pytest.raises(StoreError, match=r"differing fields \['student_fingerprint'\] \(student_fingerprint: store "
                                         r"'qwen2-.*' vs run 'llama-.*'\); re-dump with --student"):
        open_store_for_run(tmp_path, _run_settings(settings, student="tiny-llama"))
    other_teacher = dict(_run_settings(settings), teacher_fingerprints=[teacher_fingerprint("tiny-gemma3")] * 2)
    with pytest.raises(StoreError, match=r"differing fields \['teacher_fingerprints'\].*re-dump with --teachers"):
        open_store_for_run(tmp_path, other_teacher)
    # a teacher that would have to be loaded to be hashed is compared by name and prompt only, and said so
    logged = []
    unhashed = dict(_run_settings(settings), teacher_fingerprints=[None, teacher_fingerprint("tiny-llama")])
    assert len(open_store_for_run(tmp_path, unhashed, logged.append)) == 7
    assert "teacher 0's weights are not re-hashed" in logged[0]


def test_student_fingerprint_covers_the_tokenizer_and_the_config():
    model, tokenizer = load("tiny-llama")
    base = student_fingerprint(tokenizer, model.config)
    again, again_tokenizer = load("tiny-llama")
    assert student_fingerprint(again_tokenizer, again.config) == base             # stable across loads
    tokenizer.add_tokens(["<extra-token>"])
    assert student_fingerprint(tokenizer, model.config) != base
    _, tokenizer = load("tiny-llama")
    model.config.num_hidden_layers += 1
    assert student_fingerprint(tokenizer, model.config) != base


def test_runs_use_the_stores_examples_and_refuse_another_datasets(tmp_path):
    train, _ = load_examples("gsm8k", 8, 0, seed=0)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"question": e.question, "rationale": e.rationale, "answer": e.answer}) + "\n"
                            for e in train))
    _store(tmp_path / "store", dataset=str(data), n_samples=4, n_val=2, seed=1)
    logged = []
    got_train, got_val = store_examples(tmp_path / "store", str(data), logged.append)
    want_train, want_val = load_examples(str(data), 4, 2, seed=1)        # the dump's split, whatever the run's is
    assert got_train == want_train and got_val == want_val
    assert "the store's examples: 4 train, 2 val" in logged[0]
    # same file name, other content: KV of the first dataset must not meet the gold of the second
    data.write_text(data.read_text().replace(train[0].answer, train[0].answer + "0", 1))
    with pytest.raises(StoreError, match=r"made from other examples than dataset .*data.jsonl.*dataset_sha256"):
        store_examples(tmp_path / "store", str(data))
    data.write_text(data.read_text().split("\n", 3)[0] + "\n")
    with pytest.raises(StoreError, match="cannot be trained on dataset .* exceeds"):
        store_examples(tmp_path / "store", str(data))


def test_a_store_without_fingerprints_asks_for_a_re_dump(tmp_path):
    StoreWriter(tmp_path, {"teachers": ["tiny-llama"], "n_samples": 2}, 1).write_shard(
        0, [("a", {"mask": torch.ones(2, dtype=torch.bool)})])
    with pytest.raises(StoreError, match="records no student_fingerprint, teacher_fingerprints, dataset_sha256, "
                                         "examples .*re-dump it"):
        store_examples(tmp_path, "gsm8k")


def test_the_trainer_takes_the_stores_split_and_refuses_another_students_store(tmp_path):
    # the store holds the split n_samples 5 / n_val 2 / seed 3, not the run's 4 / 2 / 0
    _store(tmp_path / "store")
    cmd = [sys.executable, str(ROOT / "train/main.py"), "--phase", "1", "--model_name", "tiny-llama",
           "--teacher_store", str(tmp_path / "store"), "--output_dir", str(tmp_path / "run"), "--max_length", "4096",
           "--n_samples", "4", "--n_val", "2"]
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "the store's examples: 5 train, 2 val" in proc.stdout + proc.stderr
    assert "made for other settings: differing fields ['student_fingerprint']" in proc.stderr
    assert "re-dump with --student" in proc.stderr
