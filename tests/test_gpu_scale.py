"""The GPU-scale path end to end on the CPU at toy size (about 45 s of CPU): bench/gpu_scale.py trains two setups of
the matrix (tiny random Llama, 2 training items, one step each) and scores the untrained student's row,
bench/gpu_scale_eval.py scores each on 2 GSM8K questions, a second call skips what is finished,
bench/gpu_scale_report.py makes the tables, figures and the RESULTS.md section, and collect packs what a device
call brings back."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from bench import gpu_scale, gpu_scale_report

ROOT = Path(__file__).resolve().parent.parent
TOY = ["--only", "ce_only", "kv_fused", "--seeds", "0", "--parallel", "3", "--set", "model_name", "tiny-llama",
       "--set", "n_samples", "2", "--set", "n_val", "2", "--set", "micro_batch", "2", "--set", "effective_batch", "2",
       "--set", "eval_every", "1", "--set", "save_every", "1", "--set", "dtype", "auto", "--eval_limit", "2",
       "--eval_max_new_tokens", "4"]


def _runner(root: Path, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT), KVFUSE_GPU_SCALE=str(root))
    done = subprocess.run([sys.executable, "-m", "bench.gpu_scale", *args, *TOY], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_scale")
    _runner(root, "run")
    return root


def test_every_run_is_trained_and_scored_at_equal_tokens(root):
    results = {p.parent.name: json.loads(p.read_text()) for p in (root / "runs").glob("*/eval.json")}
    assert set(results) == {"base", "ce_only-seed0", "kv_fused-seed0"}
    for name in ("ce_only-seed0", "kv_fused-seed0"):
        r = results[name]
        assert r["gsm8k"]["n"] == 2 and 0.0 <= r["gsm8k"]["accuracy"] <= 1.0 and r["gsm8k"]["max_new_tokens"] == 4
        assert r["train_steps"] == 1 and r["train_tokens"] > 0
        assert [p["step"] for p in r["curve"]] == [0, 1] and r["curve"][-1]["tokens"] == r["train_tokens"]
        assert len(r["last_eval"]["cka_per_teacher"]) == 2 and "ce_gap" in r["last_eval"]
        assert f"--output_dir runs/gpu_scale/{name}" in r["command"] and "--seed 0" in r["command"]
        assert not (root / "runs" / name / "checkpoints").exists()     # scored: the resume state is gone
    # equal tokens: both setups of a seed train on the same items
    assert results["ce_only-seed0"]["train_tokens"] == results["kv_fused-seed0"]["train_tokens"]
    # the CE-only baseline really has no KV term, the CE + KV run does
    assert results["ce_only-seed0"]["config"]["lambda_k"] == 0.0 and results["ce_only-seed0"]["config"]["delta"] == 1
    assert results["kv_fused-seed0"]["config"]["lambda_k"] == 1.0
    assert results["kv_fused-seed0"]["last_eval"]["val_kv_loss"] > 0 == results["ce_only-seed0"]["last_eval"][
        "val_kv_loss"]
    assert "setup" not in results["base"] and results["base"]["gsm8k"]["n"] == 2
    with gzip.open(root / "runs" / "kv_fused-seed0" / "gsm8k_generations.jsonl.gz", "rt") as fh:
        assert [json.loads(line)["id"] for line in fh] == ["gsm8k-0", "gsm8k-1"]


def test_a_second_call_skips_finished_runs(root):
    """Finished runs (eval.json written) are not touched again; the runner says so and starts nothing. (A trained but
    unscored run is only scored: every run passes through that state in the fixture's call.)"""
    before = {p: p.stat().st_mtime_ns for p in (root / "runs").glob("*/*") if p.is_file()}
    out = _runner(root, "run")
    assert "training" not in out and "evaluating" not in out and "finished: done 3; 0 failed" in out
    assert before == {p: p.stat().st_mtime_ns for p in (root / "runs").glob("*/*") if p.is_file()}


def test_report_tables_figures_and_results_section(root, tmp_path):
    text = gpu_scale_report.section(root, tmp_path / "img")
    assert "| ce_only (1) |" in text and "| kv_fused (1) |" in text and "| kv_single (0) | not run |" in text
    assert "The untrained student scores" in text
    assert "`python train/main.py --phase 1" in text and "--seed S" in text
    assert (tmp_path / "img" / "gpu_scale_baseline.png").stat().st_size > 0
    assert not (tmp_path / "img" / "gpu_scale_router.png").exists()            # no run of that question: no figure
    doc = tmp_path / "RESULTS.md"
    doc.write_text(f"keep above\n{gpu_scale_report.BEGIN}\nOLD-SECTION\n{gpu_scale_report.END}\nkeep below\n")
    gpu_scale_report.write_section(doc, text)
    written = doc.read_text()
    assert written.startswith("keep above\n") and written.endswith("keep below\n") and "OLD-SECTION" not in written
    assert text in written


def test_results_md_has_the_section_and_claims_nothing_without_runs(tmp_path):
    doc = (ROOT / "docs" / "RESULTS.md").read_text()
    assert doc.count(gpu_scale_report.BEGIN) == 1 and doc.count(gpu_scale_report.END) == 1
    assert gpu_scale_report.section(tmp_path, tmp_path / "img") == gpu_scale_report.NOT_RUN


def test_collect_packs_the_numbers_first(root, tmp_path):
    tars = gpu_scale.collect(root, tmp_path / "out")
    names = [n for t in tars for n in tarfile.open(t).getnames()]
    assert "runs/kv_fused-seed0/eval.json" in names and "runs/base/eval.json" in names
    assert names.index("runs/kv_fused-seed0/eval.json") < names.index("runs/kv_fused-seed0/report.html")
    assert all(t.stat().st_size <= 15 * 2 ** 20 for t in tars)


@pytest.mark.parametrize("setup", gpu_scale.MATRIX, ids=lambda s: s.name)
def test_every_setup_of_the_matrix_is_a_valid_trainer_config(setup, tmp_path):
    """The full-size commands the GPU runs get: every key known and in range (checked at start-up there, which
    would cost device minutes), one epoch of the shared 5400 items, and the losses the matrix promises."""
    from train.config import load_config
    from train.main import parse_args

    run = gpu_scale.Run(setup, 0, tmp_path)
    args, overrides = parse_args(run.trainer_args())
    config = load_config(args.phase, None, overrides)
    assert (config.dataset, config.n_samples, config.epochs, config.dtype) == ("gsm_symbolic", 5400, 1, "bf16")
    assert config.export_student and config.student_layers == "all" and config.n_generate == 0
    kv = config.lambda_k > 0 and config.lambda_v > 0
    assert kv == (setup.name != "ce_only")
    assert config.delta_final == {"ce_only": 1.0, "sft_plus_kv": 1.0, "kv_only": 0.0}.get(setup.name, 0.1)
    assert config.delta == (1.0 if setup.name in ("ce_only", "sft_plus_kv") else 0.0)
    assert len(config.teachers or config.teacher_prompts) == (1 if setup.name == "kv_single" else 2)
    assert config.router_type == ("learnable" if setup.name == "cross_learnable" else "fixed")


def test_runs_are_spread_over_gpus_and_capped_per_gpu():
    # six runs on one H200 ran out of memory (32–55 GB each): at most per_gpu on a GPU, the least busy one first
    assert gpu_scale.pick_gpu([], 2, 2) == (True, 0)
    assert gpu_scale.pick_gpu([0], 2, 2) == (True, 1)
    assert gpu_scale.pick_gpu([0, 1, 1], 2, 2) == (True, 0)
    assert gpu_scale.pick_gpu([0, 1, 0, 1], 2, 2)[0] is False
    assert gpu_scale.pick_gpu([None], 1, 2) == (True, None) and gpu_scale.pick_gpu([None, None], 1, 2)[0] is False
    assert gpu_scale.pick_gpu([None] * 5, 0, 2) == (True, None)  # no GPU (the CPU toy runs): no cap


def test_runs_finished_in_an_earlier_session_count_as_done(tmp_path):
    # the repository keeps each finished run's eval.json (bench/results/gpu_scale); a fresh machine adopts them
    source, root = tmp_path / "kept", tmp_path / "root"
    (source / "runs" / "ce_only-seed0").mkdir(parents=True)
    (source / "runs" / "ce_only-seed0" / "eval.json").write_text("{}")
    (source / "runs" / "cross_fixed-seed1").mkdir(parents=True)  # failed there: config only, not adopted
    (source / "runs" / "cross_fixed-seed1" / "config.yaml").write_text("seed: 1\n")
    assert gpu_scale.adopt_finished(source, root) == ["ce_only-seed0"]
    runs = {r.name: r.state() for r in gpu_scale.all_runs(root, ["ce_only", "cross_fixed"], [0, 1], {})}
    assert runs["ce_only-seed0"] == "done" and runs["cross_fixed-seed1"] == "pending"
    assert runs["ce_only-seed1"] == "pending"
    assert gpu_scale.adopt_finished(source, root) == []  # already there: nothing copied again
    with pytest.raises(SystemExit, match="no runs/ folder"):
        gpu_scale.adopt_finished(tmp_path / "nowhere", root)
    with pytest.raises(SystemExit):
        gpu_scale.main(["plan", "--per_gpu", "0"])


def test_start_adopts_and_the_detached_runner_does_not_look_again(tmp_path, monkeypatch):
    # the detached runner runs from a copy of the tree without runs/ folders: given --done_from it stopped at once
    # ("no runs/ folder there"), so `start` adopts into the root and passes everything else on
    source, root = tmp_path / "kept", tmp_path / "root"
    (source / "runs" / "ce_only-seed0").mkdir(parents=True)
    (source / "runs" / "ce_only-seed0" / "eval.json").write_text("{}")
    started = []
    monkeypatch.setattr(gpu_scale, "start_detached", lambda r, argv: started.append((r, argv)))
    argv = ["start", "--done_from", str(source), "--only", "ce_only", "--per_gpu", "2", f"--done_from={source}"]
    assert gpu_scale.main(argv + ["--root", str(root)]) == 0
    assert (root / "runs" / "ce_only-seed0" / "eval.json").is_file()
    (runner_root, runner_argv), = started
    assert runner_root == root and "--done_from" not in " ".join(runner_argv)
    assert runner_argv[:4] == ["--only", "ce_only", "--per_gpu", "2"] and runner_argv[-2:] == ["--root", str(root)]


def test_plan_predicts_only_the_runs_left(tmp_path, capsys):
    # runs finished here or in --done_from are listed as done and left out of the predicted time
    kept = tmp_path / "kept"
    for name in ("base", "ce_only-seed0", "ce_only-seed1"):
        (kept / "runs" / name).mkdir(parents=True)
        (kept / "runs" / name / "eval.json").write_text("{}")
    root = tmp_path / "root"
    assert gpu_scale.main(["plan", "--root", str(root), "--only", "ce_only", "--parallel", "1"]) == 0
    every = capsys.readouterr().out
    assert gpu_scale.main(["plan", "--root", str(root), "--only", "ce_only", "--parallel", "1",
                           "--done_from", str(kept)]) == 0
    left = capsys.readouterr().out
    assert "for the 4 runs to do" in every and "for the 1 runs to do" in left
    assert left.count("[done elsewhere]") == 3 and "ce_only-seed2" in left
    minutes = [float(out.split("predicted: ")[1].split(" min")[0]) for out in (every, left)]
    assert minutes[1] < minutes[0] / 2
    assert not root.exists()  # plan writes nothing
