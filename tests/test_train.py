"""The trainer end to end on tiny models: outputs, 2-rank ZeRO-3 == one process, exact resume after SIGKILL,
online == offline teachers, and every bad input the trainer promises to name."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from concurrent_runs import concurrently, world_of_one_envs

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--phase", "1", "--model_name", "tiny-llama", "--n_samples", "4", "--n_val", "2", "--max_length", "4096",
        "--generate_max_new_tokens", "4", "--n_generate", "1", "--eval_every", "2", "--save_every", "2",
        "--lr_full", "1e-4", "--lr_lora", "1e-3"]
ENV = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")


def _train(out, *extra, launcher=None, check=True, timeout=600, env=None):
    """`env`: entries added to ENV (world_of_one_envs, for runs that go side by side)."""
    cmd = (launcher or [sys.executable]) + [str(ROOT / "train/main.py"), *TINY, "--output_dir", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**ENV, **(env or {})}, cwd=ROOT)
    return _checked(proc) if check else proc


def _checked(proc):
    if proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


def _events(out, split):
    return [e for e in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if e["split"] == split]


def _own_run(args_of):
    """Marks a test that checks one training run of its own, `_train(out, *args_of(**its parameters))`; the fixture
    `own_run` hands it (out, the finished process). The runs of every such test of this module that the session
    selected start together when the first of them needs its run (`_own_runs`), side by side
    (tests/concurrent_runs.py); each test fails on its own run's failure, with _train's message, as before."""
    def mark(test):
        test.own_run_args = args_of
        return test
    return mark


def _params(item):
    return item.callspec.params if hasattr(item, "callspec") else {}


@pytest.fixture(scope="module")
def _own_runs(request, tmp_path_factory):
    items = [item for item in request.session.items
             if item.path == request.path and hasattr(getattr(item, "function", None), "own_run_args")]
    outs = {item.nodeid: tmp_path_factory.mktemp(item.name.replace("[", "-").replace("]", "")) for item in items}
    envs = world_of_one_envs(len(items))
    procs = concurrently(*(lambda item=item, env=env: _train(outs[item.nodeid], *item.function.own_run_args(
        **_params(item)), check=False, env=env) for item, env in zip(items, envs)), at_once=2)
    return {item.nodeid: (outs[item.nodeid], proc) for item, proc in zip(items, procs)}


@pytest.fixture
def own_run(request, _own_runs, tmp_path):
    """(out, process) of this test's run (see _own_run); a test the session did not list runs it here, alone."""
    if request.node.nodeid not in _own_runs:
        return tmp_path, _train(tmp_path, *request.function.own_run_args(**_params(request.node)))
    out, proc = _own_runs[request.node.nodeid]
    return out, _checked(proc)


@_own_run(lambda: [])
def test_one_process_run_writes_every_output(own_run):
    tmp_path, proc = own_run
    assert "FutureWarning" not in proc.stderr  # DeepSpeed's use of deprecated torch collectives, once per step
    train = _events(tmp_path, "train")
    assert [e["step"] for e in train] == [1, 2, 3, 4]
    assert all(len(e["k_mse"]) == 4 and e["tokens_per_s"] > 0 and e["grad_norm"] > 0 for e in train)
    val = _events(tmp_path, "val")
    assert [e["step"] for e in val] == [0, 2, 4] and "accuracy" in val[-1] and "rouge_l" in val[-1]
    assert val[-1]["kv_loss"] < val[0]["kv_loss"]            # it learns
    # ... and the student itself learns, not only the adapters: its weights move (with gradient checkpointing on)
    assert val[-1]["ce"] != val[0]["ce"] and val[-1]["cka_mean"] != val[0]["cka_mean"]
    # adapter-free KV similarity, one per teacher and student layer; same model under two prompts: clearly related
    assert [len(row) for row in val[-1]["cka"]] == [4, 4] and 0.3 < val[-1]["cka_mean"] <= 1.0
    for name in ("config.yaml", "report.html", "alignment_teacher0.png", "layer_map_teacher1.png"):
        assert (tmp_path / name).exists(), name
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step000004"
    assert list((tmp_path / "tb").iterdir())


def test_two_zero3_ranks_match_one_process(tmp_path):
    deepspeed = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
    one_env, two_env = world_of_one_envs(2)     # the two-rank run's launcher gets its rendezvous port as an argument
    concurrently(
        lambda: _train(tmp_path / "one", "--effective_batch", "2", "--micro_batch", "1", env=one_env),
        lambda: _train(tmp_path / "two", "--effective_batch", "2", "--micro_batch", "1",
                       launcher=[deepspeed, "--num_gpus", "2", "--master_port", two_env["MASTER_PORT"]]))
    one, two = _events(tmp_path / "one", "train"), _events(tmp_path / "two", "train")
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["k_mse"] == pytest.approx(a["k_mse"], rel=1e-4, abs=1e-9)
    for a, b in zip(_events(tmp_path / "one", "val"), _events(tmp_path / "two", "val")):
        assert b["kv_loss"] == pytest.approx(a["kv_loss"], rel=1e-4)


# Dies by SIGKILL the moment step 4 has been logged but not yet saved: the worst spot, since metrics.jsonl already
# holds a step that the newest checkpoint (step 3) does not. Polling from outside raced the run on fast machines.
_KILL_BEFORE_SAVING_STEP_4 = """
import os, signal, sys
from train import main, session
save = session.TrainingSession.save
def save_or_die(self, step):
    if step == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    save(self, step)
session.TrainingSession.save = save_or_die
sys.exit(main.main(sys.argv[1:]))
"""


def _killed_before_saving_step_4(out, *extra, env=None):
    """A real process, SIGKILLed by itself at the spot above."""
    cmd = [sys.executable, "-c", _KILL_BEFORE_SAVING_STEP_4, *TINY, "--output_dir", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**ENV, **(env or {})}, cwd=ROOT)


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    extra = ["--epochs", "2", "--save_every", "1", "--eval_every", "100"]
    out = tmp_path / "killed"
    full_env, killed_env = world_of_one_envs(2)
    _, proc = concurrently(lambda: _train(tmp_path / "full", *extra, env=full_env),
                           lambda: _killed_before_saving_step_4(out, *extra, env=killed_env))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step000003"
    assert [e["step"] for e in _events(out, "train")] == [1, 2, 3, 4]    # step 4 logged, never saved
    proc = _train(out, *extra)
    assert "resumed from" in proc.stdout + proc.stderr
    full, resumed = _events(tmp_path / "full", "train"), _events(out, "train")
    assert [e["step"] for e in resumed] == list(range(1, 9))       # nothing lost, nothing doubled
    assert sorted(p.name for p in (out / "checkpoints").glob("step*")) == ["step000007", "step000008"]
    for a, b in zip(full, resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6), (a["step"], a["loss"], b["loss"])
    # another seed orders the batches differently: resuming would skip the wrong ones, so it is refused by name
    proc = _train(out, *extra, "--seed", "1", check=False)
    assert proc.returncode == 2 and "the data order differs in seed (checkpoint 0, now 1)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_codec_store_trains_identically_after_a_resume(tmp_path):
    """From a low-rank + int4 store (bases, quantised coefficients): killed before saving step 4, resumed, the
    losses equal an uninterrupted run's; validation reads a second (bf16) store of the same examples."""
    stores = {codec: tmp_path / f"store-{codec.replace(':', '_').replace('+', '_')}"
              for codec in ("lowrank:16+int4", "bf16")}

    def dump(codec):
        cmd = [sys.executable, "-m", "kvfuse", "dump", "--teachers", "tiny-llama", "tiny-llama", "--teacher_prompts",
               "default", "cot", "--student", "tiny-llama", "--n_samples", "4", "--n_val", "2", "--codec", codec,
               "--calib", "2", "--max_length", "4096", "--out", str(stores[codec])]
        subprocess.run(cmd, check=True, capture_output=True, timeout=300, cwd=ROOT)
    concurrently(*(lambda codec=codec: dump(codec) for codec in stores))
    extra = ["--epochs", "2", "--save_every", "1", "--eval_every", "100", "--teacher_store",
             str(stores["lowrank:16+int4"]), "--eval_teacher_store", str(stores["bf16"])]
    out = tmp_path / "killed"
    full_env, killed_env = world_of_one_envs(2)
    full, proc = concurrently(lambda: _train(tmp_path / "full", *extra, env=full_env),
                              lambda: _killed_before_saving_step_4(out, *extra, env=killed_env))
    assert "evaluating against the teacher KV of" in full.stdout + full.stderr
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    proc = _train(out, *extra)
    assert "resumed from" in proc.stdout + proc.stderr
    done, resumed = _events(tmp_path / "full", "train"), _events(out, "train")
    assert [e["step"] for e in resumed] == list(range(1, 9))
    for a, b in zip(done, resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6), (a["step"], a["loss"], b["loss"])
    assert _events(out, "val")[-1]["kv_loss"] == pytest.approx(_events(tmp_path / "full", "val")[-1]["kv_loss"],
                                                               rel=1e-6)


def test_online_and_offline_teachers_give_the_same_loss(tmp_path):
    store = tmp_path / "store"
    dump = [sys.executable, "-m", "kvfuse", "dump", "--teachers", "tiny-llama", "tiny-llama", "--teacher_prompts",
            "default", "cot", "--student", "tiny-llama", "--n_samples", "4", "--n_val", "2", "--dtype", "fp32",
            "--batch_size", "1", "--max_length", "4096", "--out", str(store)]
    online_env, offline_env, other_env = world_of_one_envs(3)
    # the online run needs no store: it goes alongside the dump; the two runs that read the store, after it
    concurrently(lambda: subprocess.run(dump, check=True, capture_output=True, timeout=300, cwd=ROOT),
                 lambda: _train(tmp_path / "online", "--max_steps", "2", env=online_env))
    _, other = concurrently(
        lambda: _train(tmp_path / "offline", "--max_steps", "2", "--teacher_store", str(store), env=offline_env),
        # a store made for other settings is refused by name (asserted below)
        lambda: _train(tmp_path / "other", "--max_steps", "1", "--teacher_store", str(store), "--student_prompt",
                       "cot", check=False, env=other_env))
    for split in ("train", "val"):
        for a, b in zip(_events(tmp_path / "online", split), _events(tmp_path / "offline", split)):
            key = "loss" if split == "train" else "kv_loss"
            assert b[key] == pytest.approx(a[key], rel=1e-5)
    # a store made for other settings is refused by name
    assert other.returncode == 2 and "made for other settings" in other.stderr and "student_prompt" in other.stderr


def test_bad_inputs_are_named_and_nothing_is_truncated(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    envs = world_of_one_envs(4)
    long, empty_run, key, nan = concurrently(
        lambda: _train(tmp_path / "long", "--max_length", "50", check=False, env=envs[0]),
        lambda: _train(tmp_path / "empty", "--dataset", str(empty), check=False, env=envs[1]),
        lambda: _train(tmp_path / "key", "--no_such_key", "1", check=False, env=envs[2]),
        lambda: _train(tmp_path / "nan", "--lr_full", "1e30", "--lr_lora", "1e30", "--adapter_init", "ridge",
                       check=False, env=envs[3]))
    assert long.returncode == 2 and "more than max_length=50" in long.stderr and "Traceback" not in long.stderr
    assert empty_run.returncode == 2 and "empty" in empty_run.stderr
    assert key.returncode == 2 and "unknown command line key(s) ['no_such_key']" in key.stderr
    # A diverging run stops with a checkpoint and a message naming the step and the layer.
    assert nan.returncode == 2 and "non-finite" in nan.stderr and "step" in nan.stderr, nan.stderr[-2000:]
    assert list((tmp_path / "nan" / "checkpoints").iterdir())


def test_unalignable_teacher_is_a_clear_error():
    from types import SimpleNamespace

    from kvfuse.data import load_examples
    from kvfuse.models import load
    from kvfuse.teacher.builder import Teacher, TeacherKVBuilder

    model, tok = load("tiny-llama")
    slow = SimpleNamespace(is_fast=False, name_or_path="a-slow-tokenizer", chat_template=None, pad_token_id=0)
    builder = TeacherKVBuilder([Teacher("slow", "Solve.", model, slow)], tok, "Solve.", 4, max_length=4096)
    train, _ = load_examples("gsm8k", 1, 0)
    with pytest.raises(ValueError, match="a-slow-tokenizer.*not a fast tokenizer"):
        builder.build(train)


@pytest.mark.parametrize("extra", [
    ["--phase", "0"],
    ["--phase", "4", "--teachers", "tiny-llama", "tiny-qwen2", "--teacher_prompts", "cot", "--router_type",
     "similarity", "--router_groups", "1"],
    ["--phase", "4", "--teachers", "tiny-llama", "tiny-gemma3", "--teacher_prompts", "cot", "--router_groups", "2",
     "--gamma_final", "0.05", "--delta_final", "0.1", "--warmin_start", "0.0"],
    ["--phase", "5", "--teachers", "tiny-llama", "tiny-gemma3", "--teacher_prompts", "cot", "--z_dim", "16",
     "--z_loss", "barlow"],
], ids=["phase0", "phase4-similarity", "phase4-learnable-layers-kl-ce", "phase5-barlow"])
@_own_run(lambda extra: [*extra, "--student_layers", "every_other"])
def test_every_phase_preset_trains(own_run, extra):
    tmp_path, _ = own_run
    train = _events(tmp_path, "train")
    phase = extra[1]
    # 4 examples: Phase 0 steps one at a time for 1 epoch; Phases 4/5 take all 4 per step for 2 epochs
    assert [e["step"] for e in train] == ([1, 2, 3, 4] if phase == "0" else [1, 2])
    learnable = "--router_type" not in extra
    for e in train:
        # >= 0, not > 0: in Phase 0 student and teacher are one model, so layer 0's KV (a function of the shared
        # tokens alone) matches exactly, and the layer warm-up weighs only that layer at first
        assert math.isfinite(e["loss"]) and e["kv_loss"] >= 0 and e["grad_norm"] >= 0
        # the logged loss is the sum of its logged terms: each term the step reports is the one it trained on
        terms = e["kv_loss"] + e["gamma"] * e.get("attn_kl", 0.0) + e["delta"] * e.get("ce", 0.0)
        if phase == "4" and learnable:
            terms -= 0.01 * e["router_entropy"]                                 # entropy_weight, diversity target
        assert e["loss"] == pytest.approx(terms, rel=1e-5, abs=1e-9)
        if phase == "5":                     # the Z loss is the layer-weighted mean of its per-layer values
            assert len(e["z_loss"]) == 2 and "k_mse" not in e
            weighted = sum(w * z for w, z in zip(e["layer_weights"], e["z_loss"])) / sum(e["layer_weights"])
            assert e["kv_loss"] == pytest.approx(weighted, rel=1e-5)
        else:
            assert len(e["k_mse"]) == len(e["v_mse"]) == len(e["cos"]) == 2
    val = _events(tmp_path, "val")
    assert val[-1]["ce"] != val[0]["ce"]               # the student itself learns under every phase's objective
    routers = _events(tmp_path, "router")
    if phase == "4":
        assert [r["step"] for r in routers] == [1, 2]
        for r in routers:
            alpha = torch.tensor(r["alpha"])    # the step's last micro-batch: [1, N], or [1, L, N] layer-aware
            layer_aware = extra[extra.index("--router_groups") + 1] == "2"
            assert alpha.shape == ((1, 2, 2) if layer_aware else (1, 2))
            assert torch.allclose(alpha.sum(-1), torch.ones(alpha.shape[:-1])) and (alpha >= 0).all()
    else:
        assert routers == []
    if "--gamma_final" in extra:
        # γ and δ warm in from 0 (so the first step has neither term), then both terms are trained on
        assert (train[0]["gamma"], train[0]["delta"]) == (0.0, 0.0) and "attn_kl" not in train[0]
        assert train[-1]["gamma"] > 0 and train[-1]["delta"] > 0
        assert train[-1]["attn_kl"] > 0 and train[-1]["ce"] > 0
    if phase == "5":
        assert (tmp_path / "zspace_embedding.png").exists()


@_own_run(lambda: ["--lora", "true", "--lora_r", "4", "--lora_alpha", "8", "--max_steps", "2"])
def test_lora_run_trains_only_lora_and_the_kv_adapters(own_run):
    import re

    tmp_path, proc = own_run
    trainable, total = (int(x.replace(",", "")) for x in re.search(
        r"trainable parameters: student ([\d,]+) of ([\d,]+) \(LoRA\)", proc.stdout + proc.stderr).groups())
    assert 0 < trainable < total / 10
    config = (tmp_path / "config.yaml").read_text()
    assert "lora: true" in config
    train = _events(tmp_path, "train")
    assert len(train) == 2 and train[0]["lr"] > 0
    val = _events(tmp_path, "val")
    assert val[-1]["kv_loss"] > 0 and val[-1]["ce"] != val[0]["ce"]      # the LoRA weights reach the student's LM


def test_a_failed_checkpoint_save_names_the_disk(tmp_path):
    # torch.save on a full disk raises only "unexpected pos …"; the trainer must say what that likely means.
    from types import SimpleNamespace

    from train.session import TrainingSession

    class FullDisk:
        def save_checkpoint(self, *args, **kwargs):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2496 vs 2388")

    with pytest.raises(RuntimeError, match=r"step000003 .* unexpected pos .* GB free there: a full disk\?"):
        TrainingSession.save(SimpleNamespace(engine=FullDisk(), ckpt_dir=tmp_path), 3)


def test_the_recipe_steps_in_process(tmp_path, monkeypatch):
    """TrainingSession's steps one by one in this process (a gloo world of one): construction loads nothing,
    setup() builds the run, loss_step() is the model's forward under the step's loss weights, train() runs the
    loop, cleanup() closes the writers."""
    import torch.distributed as dist
    from dataclasses import replace

    from kvfuse.net import free_port
    from train.config import load_config
    from train.main import init_distributed

    for key, value in {"DS_ACCELERATOR": "cpu", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    overrides = [*TINY[2:], "--n_val", "1", "--max_steps", "2", "--save_every", "0", "--output_dir", str(tmp_path)]
    config = replace(load_config(1, None, overrides), device="cpu")
    init_distributed("cpu")
    from train.session import TrainingSession

    session = TrainingSession(config)
    try:
        assert not hasattr(session, "model") and not tmp_path.joinpath("config.yaml").exists()
        session.setup()
        assert (session.start_step, session.accum, session.total_steps) == (0, 1, 2)
        assert (tmp_path / "config.yaml").exists() and (tmp_path / "alignment_teacher1.png").exists()
        batch = next(session.train_batches(0))
        loss, logs, weights, lw = session.loss_step(batch, 0)
        assert lw.tolist() == [1.0, 1.0, 0.0, 0.0]          # the first third of 4 layers, rounded up, at step 0
        again, _ = session.model(batch, layer_weights=lw, weights=weights)
        assert loss.item() == pytest.approx(again.item(), rel=1e-6) and loss.item() > 0
        assert session.train() == 0
        assert [e["step"] for e in _events(tmp_path, "train")] == [1, 2]
        assert session.tb is not None
    finally:
        session.cleanup()
        dist.destroy_process_group()
    assert session.tb is None


@pytest.mark.parametrize("extra", [
    ["--phase", "4", "--teachers", "tiny-llama", "tiny-gemma3", "--teacher_prompts", "cot", "--router_groups", "2"],
    ["--phase", "5", "--teachers", "tiny-llama", "tiny-gemma3", "--teacher_prompts", "cot", "--z_dim", "16",
     "--z_loss", "barlow"],
], ids=["phase4-learnable-router", "phase5-zspace"])
@_own_run(lambda extra: [*extra, "--student_layers", "every_other", "--dtype", "bf16", "--save_every", "0"])
def test_bf16_engine_trains_and_evaluates_the_learned_modules(own_run, extra):
    # A bf16 DeepSpeed engine casts every module it holds (router, Z maps, adapters) to bf16 while KV may arrive in
    # fp32: the GPU-scale Phase 4 runs failed on that at their first evaluation (router), and Phase 5 did the same
    # (Z maps) until each module computed in its own parameter dtype.
    tmp_path, _ = own_run
    train, val = _events(tmp_path, "train"), _events(tmp_path, "val")
    assert train and val and all(math.isfinite(e["loss"]) for e in train)
    assert all(math.isfinite(e["kv_loss"]) for e in val)
