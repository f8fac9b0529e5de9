"""The SLURM scripts run for real: a one-node cluster started by the test (scripts/slurm_local.py)."""
import subprocess
import sys
from pathlib import Path

import pytest

from kvfuse.teacher.store import TeacherKVStore

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from slurm_local import local_slurm, missing_tools  # noqa: E402

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
