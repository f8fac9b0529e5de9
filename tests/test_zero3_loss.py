"""KVDistillLoss under DeepSpeed ZeRO-3 with two real ranks (CPU, gloo): partitioned adapters are gathered inside
the module's forward and their gradients reach DeepSpeed's reducer — same loss and gradients as one process."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_zero3_two_ranks_match_single_process(tmp_path, free_port):
    assert importlib.util.find_spec("deepspeed"), "deepspeed (the [train] extra) is needed for this test"
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    assert launcher, "the deepspeed launcher is not on PATH"
    env = dict(os.environ, DS_ACCELERATOR="cpu", TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(free_port),
           str(ROOT / "tests" / "zero3_loss_worker.py"), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world"] == 2
    assert result["partitioned"], "adapters were not partitioned: the test would prove nothing"
    assert result["released_outside_forward"]
    for backend in ("torch", "triton"):
        res = result["backends"][backend]
        assert res["loss_err"] <= 1e-6, (backend, res)
        assert len(res["grad_err"]) == 4
        for name, err in res["grad_err"].items():
            assert res["grad_norm"][name] > 0, (backend, name)
            assert err <= 1e-5, (backend, name, err)
