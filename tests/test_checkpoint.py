"""Checkpoints kvfuse can vouch for: sealed at save, verified before anything is unpickled, loaded weights-only,
`latest` confined to the checkpoint folder, fallback to the newest intact checkpoint, pruning that spares `latest`,
and metrics.jsonl that survives a torn last line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train import checkpoint
from train.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")

# A one-rank ZeRO-3 engine over a small model: `save` trains and saves steps 1 and 2 through train.checkpoint;
# `resume` loads what train.checkpoint picks. Both print the parameters as JSON on their last line.
_WORKER = """
import json, os, socket, sys
import torch, deepspeed
from train import checkpoint
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config={
    "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "steps_per_print": 10 ** 9})
mode, ckpt_dir = sys.argv[1], sys.argv[2]
def params():
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        return [p.detach().sum().item() for p in engine.module.parameters()]
out = {}
if mode == "save":
    for step in (1, 2):
        engine.backward(engine(torch.randn(1, 4)).sum())
        engine.step()
        checkpoint.save(engine, ckpt_dir, f"step{step:06d}", step)
        out[step] = params()
else:
    resumed = checkpoint.resume(engine, ckpt_dir, print)
    out = {"tag": resumed.tag, "step": resumed.client_state["step"], "params": params()}
print(json.dumps(out))
"""


def _worker(mode, ckpt_dir):
    proc = subprocess.run([sys.executable, "-c", _WORKER, mode, str(ckpt_dir)], capture_output=True, text=True,
                          timeout=300, env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint folder with sealed steps 1 and 2 of a real ZeRO-3 engine, and the parameters at each."""
    ckpt_dir = tmp_path_factory.mktemp("run") / "checkpoints"
    _, params = _worker("save", ckpt_dir)
    return ckpt_dir, params


def _copy(saved, tmp_path):
    import shutil

    ckpt_dir = tmp_path / "checkpoints"
    shutil.copytree(saved[0], ckpt_dir)
    return ckpt_dir


class _Payload:
    """Unpickling this runs code: it creates the file `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_crafted_latest_and_tampered_checkpoint_are_refused_and_the_previous_one_resumes_weights_only(
        saved, tmp_path):
    ckpt_dir = _copy(saved, tmp_path)
    assert (ckpt_dir / "latest").read_text() == "step000002"
    seal = json.loads((ckpt_dir / "step000002" / checkpoint.SEAL).read_text())
    assert seal["step"] == 2 and seal["resumable"] and any("optim_states" in name for name in seal["files"])
    victim = next((ckpt_dir / "step000002").glob("*model_states.pt"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    # `latest` points out of the run folder, at checkpoint files whose unpickling runs code
    marker, evil = tmp_path / "pwned", tmp_path / "evil"
    evil.mkdir()
    for name in (victim.name, "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        torch.save({"module": _Payload(marker)}, evil / name)
    (ckpt_dir / "latest").write_text("../evil")
    stdout, resumed = _worker("resume", ckpt_dir)
    assert not marker.exists()
    assert "names '../evil', not a checkpoint folder inside" in stdout
    assert f"{victim.name} fails its sha256 check" in stdout and "Resuming from step000001" in stdout
    assert resumed["tag"] == "step000001" and resumed["step"] == 1
    # the optimizer state and weights of step 1 came back through the weights-only unpickler
    assert resumed["params"] == pytest.approx(saved[1]["1"], abs=0)
    assert resumed["params"] != pytest.approx(saved[1]["2"], abs=0)


def test_crafted_latest_and_pickle_run_nothing(saved, tmp_path):
    ckpt_dir = _copy(saved, tmp_path)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"module": _Payload(marker)}, evil / "mp_rank_00_model_states.pt")
    for target in ("../evil", "../../" + str(evil), str(evil), "step000001/../../evil", "."):
        (ckpt_dir / "latest").write_text(target)
        with pytest.raises(CheckpointError, match="not a checkpoint folder inside"):
            checkpoint.read_latest(ckpt_dir)
        logged = []
        assert checkpoint.choose(ckpt_dir, logged.append) == ("step000002", 2)
        assert target[:40] in logged[0] and "Resuming from step000002" in logged[0]
    # a symbolic link in the folder is refused too, as `latest` and as a checkpoint
    (ckpt_dir / "latest").unlink()
    (ckpt_dir / "latest").symlink_to(evil / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="latest is not a regular file"):
        checkpoint.read_latest(ckpt_dir)
    (ckpt_dir / "step000009").symlink_to(evil)
    with pytest.raises(CheckpointError, match="step000009 is not a folder"):
        checkpoint.verify(ckpt_dir, "step000009")
    # someone who rewrote a checkpoint file *and* its seal still gets no code run: the load is weights-only
    victim = next((ckpt_dir / "step000002").glob("*model_states.pt"))
    torch.save({"module": _Payload(marker)}, victim)
    checkpoint.seal(ckpt_dir, "step000002", 2)
    checkpoint.verify(ckpt_dir, "step000002")
    with pytest.raises(CheckpointError, match=f"{victim} holds more than weights .* Unsupported global"):
        checkpoint._WeightsOnlyLoads(None).load(str(victim))
    assert not marker.exists()
    # (the payload is real: an unrestricted load would have run it)
    torch.load(victim, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("latest", [b"", b"  \n", b"step0000", b"\xff\xfe", None])
def test_empty_truncated_or_missing_latest_falls_back_by_name(tmp_path, latest):
    ckpt_dir = tmp_path / "checkpoints"
    for step in (1, 2):
        folder = ckpt_dir / f"step{step:06d}"
        folder.mkdir(parents=True)
        (folder / "state.pt").write_bytes(bytes([step]) * 10)
        checkpoint.seal(ckpt_dir, folder.name, step)
    if latest is None:
        (ckpt_dir / "latest").unlink()
    else:
        (ckpt_dir / "latest").write_bytes(latest)
    logged = []
    assert checkpoint.choose(ckpt_dir, logged.append) == ("step000002", 2)
    if latest is not None:
        assert str(ckpt_dir / "latest") in logged[0] or "step0000:" in logged[0]
    # a checkpoint cut short (its newest file shorter than sealed) is skipped, naming the file
    (ckpt_dir / "step000002" / "state.pt").write_bytes(b"\x02" * 4)
    logged.clear()
    assert checkpoint.choose(ckpt_dir, logged.append) == ("step000001", 1)
    assert "state.pt has 4 bytes, its seal says 10" in logged[0]
    # with nothing intact left the error names every checkpoint and why
    (ckpt_dir / "step000001" / "extra.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint .*step000001: .*files not in its seal \['extra.pt'\]"
                                              r".*step000002: .*4 bytes"):
        checkpoint.choose(ckpt_dir, logged.append)


def test_fresh_start_and_unsealed_or_nonresumable_checkpoints(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    assert checkpoint.choose(ckpt_dir, print) is None
    (ckpt_dir / "step000003").mkdir(parents=True)            # a save killed before its seal
    (ckpt_dir / "step000003" / "state.pt").write_bytes(b"x")
    logged = []
    assert checkpoint.choose(ckpt_dir, logged.append) is None  # no `latest`, nothing sealed: fresh start, saying so
    assert "step000003:" in logged[0] and "seal.json not found" not in logged[0] and "starting afresh" in logged[0]
    (ckpt_dir / "nonfinite-step000004").mkdir()
    checkpoint.seal(ckpt_dir, "nonfinite-step000004", 3, resumable=False)
    assert not (ckpt_dir / "latest").exists() and checkpoint.choose(ckpt_dir, print) is None


@pytest.mark.parametrize("keep", [0, 1, 2])
def test_prune_never_deletes_the_checkpoint_latest_names(tmp_path, keep):
    ckpt_dir = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        (ckpt_dir / f"step{step:06d}").mkdir(parents=True)
        checkpoint.seal(ckpt_dir, f"step{step:06d}", step)
    (ckpt_dir / "latest").write_text("step000003")             # e.g. a resume from 3 before step 4 is resealed
    deleted = checkpoint.prune(ckpt_dir, keep)
    left = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir())
    assert "step000003" in left and not set(deleted) & set(left)
    assert left == sorted({"step000003", *[f"step{s:06d}" for s in (4, 3, 2, 1)][:keep]})
    assert checkpoint.choose(ckpt_dir, print) == ("step000003", 3)


def test_torn_metrics_line_is_dropped_with_a_message_and_other_damage_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    events = [{"step": s, "split": "train", "loss": 1.0 / (s + 1)} for s in range(5)]
    good = "".join(json.dumps(e) + "\n" for e in events)
    path.write_text(good + json.dumps({"step": 5, "split": "train", "loss": 0.1})[:23])    # disk full mid-append
    logged = []
    checkpoint.trim_metrics(path, 3, logged.append)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2, 3]
    assert str(path) in logged[0] and "torn last line (23 bytes" in logged[0]
    checkpoint.trim_metrics(path, 0, logged.append)              # a fresh start keeps nothing
    assert path.read_text() == ""
    path.write_text(good.replace('"step": 2', '"step": 2,,'))
    with pytest.raises(ValueError, match=f"{path}, line 3: not a metrics event"):
        checkpoint.trim_metrics(path, 3, logged.append)
