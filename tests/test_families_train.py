"""Mixed-family training on CPU (Phase 3 and Phase 5): teachers of two families the trainer never saw before
(Qwen3 with q/k norms, Phi-3 with a fused qkv_proj and partial rotary), a student of a third (SmolLM3, whose
layer 1 is a NoPE layer, so the fused loss gets per-layer rotary dims [16, 0]), online and through the offline
store."""
import subprocess
import sys

import pytest
from concurrent_runs import concurrently, world_of_one_envs
from test_train import ROOT, _events, _train

TEACHERS = ["--teachers", "tiny-qwen3", "tiny-phi3", "--teacher_prompts", "cot", "cot"]
STUDENT = ["--model_name", "tiny-smollm3", "--student_layers", "all", "--max_steps", "2"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("families") / "store"
    dump = [sys.executable, "-m", "kvfuse", "dump", *TEACHERS, "--student", "tiny-smollm3", "--student_layers",
            "all", "--n_samples", "4", "--n_val", "2", "--dtype", "fp32", "--batch_size", "2", "--max_length",
            "4096", "--out", str(out)]
    proc = subprocess.run(dump, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _check_learns(out):
    train = _events(out, "train")
    assert len(train) == 2 and all(e["loss"] == e["loss"] and abs(e["loss"]) < float("inf") for e in train)
    val = _events(out, "val")
    assert val[-1]["ce"] != val[0]["ce"]          # the student's own weights moved, not only the adapters
    return train


def test_phase3_mixed_families_online_equals_offline(tmp_path, store):
    online_env, offline_env = world_of_one_envs(2)          # side by side (tests/concurrent_runs.py)
    concurrently(lambda: _train(tmp_path / "online", "--phase", "3", *TEACHERS, *STUDENT, env=online_env),
                 lambda: _train(tmp_path / "offline", "--phase", "3", *TEACHERS, *STUDENT, "--teacher_store",
                                str(store), env=offline_env))
    online = _check_learns(tmp_path / "online")
    assert all(len(e["k_mse"]) == 2 and e["k_mse"][1] > 0 for e in online)     # the NoPE layer is trained too
    offline = _check_learns(tmp_path / "offline")
    for a, b in zip(online, offline):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


def test_phase5_mixed_families_through_the_store(tmp_path, store):
    _train(tmp_path, "--phase", "5", *TEACHERS, *STUDENT, "--teacher_store", str(store), "--z_dim", "16")
    train = _check_learns(tmp_path)
    assert "z_loss" in train[-1]


def test_structured_init_keeps_partial_rotary_pairs(tmp_path):
    """The trainer's structured adapter init reads each side's rotary dims off the models (here a Phi-3 teacher,
    3/4 of each head rotating, and a StableLM student, 1/4): the adapters equal structured_adapter with those dims,
    not the full-rotary map. The session's set-up steps run up to the loss, without DeepSpeed or a process group."""
    import torch
    from dataclasses import replace

    from kvfuse.align.heads import structured_adapter
    from kvfuse.models import kv_heads, load
    from train.config import load_config
    from train.session import TrainingSession

    overrides = ["--teachers", "tiny-phi3", "--teacher_prompts", "cot", "--model_name", "tiny-stablelm",
                 "--student_layers", "all", "--adapter_init", "structured", "--alpha", "1.0", "--n_samples", "2",
                 "--n_val", "0", "--max_steps", "1", "--save_every", "0", "--output_dir", str(tmp_path)]
    session = TrainingSession.__new__(TrainingSession)   # __init__ asks the process group for rank and world size
    session.config = replace(load_config(3, None, overrides), device="cpu")
    session.rank, session.world, session.device, session.bf16 = 0, 1, torch.device("cpu"), False
    session._setup_data()
    student, heads = session._setup_models()
    init = session._adapter_init(student, heads)
    teacher, student_config = load("tiny-phi3")[0].config, load("tiny-stablelm")[0].config
    (h_t, d_t), (h_s, d_s) = kv_heads(teacher), kv_heads(student_config)
    r_t = int(d_t * teacher.rope_parameters["partial_rotary_factor"])
    r_s = int(d_s * student_config.rope_parameters["partial_rotary_factor"])
    L = student_config.num_hidden_layers
    assert (r_t, r_s) != (d_t, d_s)
    want = structured_adapter(h_t, d_t, h_s, d_s, n_layers=L, rotary_dims=([r_t] * L, [r_s] * L))
    assert torch.equal(init[0][0], want) and torch.equal(init[0][1], want)
    assert not torch.equal(want, structured_adapter(h_t, d_t, h_s, d_s, n_layers=L))
