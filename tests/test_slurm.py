"""The SLURM scripts run for real: a one-node cluster started by the test (scripts/slurm_local.py)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from kvfuse.teacher.store import TeacherKVStore

ROOT = Path(__file__).resolve().parent.parent
# scripts/ is a folder of tools, not a package: load the cluster helper from its file.
_spec = importlib.util.spec_from_file_location("slurm_local", ROOT / "scripts" / "slurm_local.py")
_slurm_local = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_slurm_local)
local_slurm, missing_tools = _slurm_local.local_slurm, _slurm_local.missing_tools

if missing_tools():
    pytest.fail(f"SLURM tools missing ({missing_tools()}): .ci/run installs slurm-wlm and munge", pytrace=False)


@pytest.fixture(scope="module")
def slurm():
    with local_slurm() as env:
        env["KVFUSE_PYTHON"] = sys.executable
        yield env


def test_dump_job_array_writes_every_shard_once(slurm, tmp_path):
    out = tmp_path / "store"
    cmd = ["sbatch", "--wait", "--array=0-3", f"--output={tmp_path}/dump-%a.out", str(ROOT / "scripts/dump_teacher_kv.sh"),
           "--out", str(out), "--teachers", "tiny-llama", "--teacher_prompts", "cot", "--student", "tiny-llama",
           "--n_samples", "8", "--max_length", "4096"]
    proc = subprocess.run(cmd, env=slurm, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("dump-*.out")))
    assert proc.returncode == 0, proc.stderr + logs
    assert sorted(p.name for p in out.glob("shard-*.json")) == [f"shard-0000{i}-of-00004.json" for i in range(4)]
    store = TeacherKVStore(out)
    assert len(store) == len(set(store.sample_ids)) == 8
    for i in range(4):
        assert f"shard {i}/4" in logs


def test_multi_teacher_training_job_runs_two_zero3_ranks(slurm, tmp_path):
    env = dict(slurm, KVFUSE_ROOT=str(ROOT), KVFUSE_CPU_RANKS="2", KVFUSE_GPUS_PER_NODE="0",
               PATH=f"{Path(sys.executable).parent}:{slurm['PATH']}")
    out = tmp_path / "run"
    cmd = ["sbatch", "--wait", f"--output={tmp_path}/train.out", str(ROOT / "scripts/run_router_training.sh"),
           "--model_name", "tiny-llama", "--teachers", "tiny-llama", "tiny-qwen2", "--teacher_prompts", "cot",
           "--router_type", "learnable", "--entropy_weight", "0.01", "--n_samples", "4", "--n_val", "2",
           "--effective_batch", "2", "--epochs", "1", "--max_length", "4096", "--n_generate", "1",
           "--generate_max_new_tokens", "4", "--output_dir", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    log = (tmp_path / "train.out").read_text() if (tmp_path / "train.out").exists() else ""
    assert proc.returncode == 0, proc.stderr + log[-4000:]
    assert "1 node(s) × 2 rank(s)" in log
    events = [line for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any('"split": "router"' in e for e in events) and (out / "report.html").exists()
