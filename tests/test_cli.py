"""`python -m kvfuse`: help without heavy imports, and offline failure for unknown model names without hub retries."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kvfuse import hub
from kvfuse.__main__ import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ["torch", "transformers", "deepspeed", "triton", "matplotlib", "huggingface_hub"]


def _env(**changes) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in hub.OFFLINE_VARIABLES + ("HF_ENDPOINT",)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update(changes)
    return env


def test_top_level_help_imports_no_heavy_library():
    """`--help` must not pay for torch/transformers/deepspeed (seconds each): check what it imported."""
    code = ("import sys, json\nfrom kvfuse.__main__ import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n"
            f"    pass\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), check=True)
    lines = result.stdout.strip().splitlines()
    assert json.loads(lines[-1]) == []
    text = "\n".join(lines[:-1])
    for name, command in COMMANDS.items():
        assert name in text
    assert "add_arguments" not in text  # written for users, not for developers of the package
    assert "warn" not in result.stderr.lower(), result.stderr


def test_command_help_fills_in_only_that_command(capsys):
    parser = build_parser("report")
    args = parser.parse_args(["report", "runs/x", "--out", "r.html", "--png_dir", "png"])
    assert (args.command, args.run_dir, args.out, args.png_dir) == ("report", "runs/x", "r.html", "png")
    with pytest.raises(SystemExit):  # dump's options were never added (its module, torch and all, not imported)
        parser.parse_args(["dump", "--teachers", "tiny-llama"])
    assert "unrecognized arguments: --teachers tiny-llama" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser(None).parse_args(["no-such-command"])
    assert "invalid choice: 'no-such-command'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- offline behaviour

def test_hub_reachable_probes_one_tcp_connection(free_port):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        assert hub.hub_reachable(f"http://127.0.0.1:{server.getsockname()[1]}", timeout=5.0)
    assert not hub.hub_reachable(f"http://127.0.0.1:{free_port}", timeout=5.0)
    with pytest.raises(ValueError, match="HF_ENDPOINT"):
        hub.hub_reachable("not a url")


def test_offline_unless_reachable_respects_an_explicit_choice(monkeypatch):
    from huggingface_hub import constants

    def no_probe(*args, **kwargs):
        raise AssertionError("probed the hub although the user chose a mode")

    monkeypatch.setattr(hub, "hub_reachable", no_probe)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert hub.offline_unless_reachable() is False and os.environ["HF_HUB_OFFLINE"] == "0"


def test_offline_unless_reachable_switches_off_an_unreachable_hub(monkeypatch):
    from huggingface_hub import constants

    for name in hub.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "hub_reachable", lambda endpoint, timeout: False)
    assert hub.offline_unless_reachable() is True
    assert os.environ["HF_HUB_OFFLINE"] == "1" and constants.HF_HUB_OFFLINE is True
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "hub_reachable", lambda endpoint, timeout: True)
    assert hub.offline_unless_reachable() is False and "HF_HUB_OFFLINE" not in os.environ


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "unreachable"}], ids=["offline", "probe"])
def test_unknown_model_fails_at_once_with_the_clear_message(tmp_path, free_port, env):
    """No hub retries: HF_HUB_OFFLINE=1 set by the user, or set by the CLI after one refused connection."""
    if env.get("HF_ENDPOINT") == "unreachable":
        env = {"HF_ENDPOINT": f"http://127.0.0.1:{free_port}"}
    cmd = [sys.executable, "-m", "kvfuse", "dump", "--teachers", "kvfuse-test/not-a-model", "--teacher_prompts",
           "default", "--student", "tiny-llama", "--n_samples", "2", "--out", str(tmp_path / "store")]
    result = subprocess.run(cmd, capture_output=True, text=True, env=_env(**env), cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "python -m kvfuse dump: error: cannot load model 'kvfuse-test/not-a-model'" in result.stderr
    assert "not in the local Hugging Face cache" in result.stderr and "tiny-llama" in result.stderr
    assert "Retrying" not in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "store").exists()


def test_trainer_unknown_model_fails_at_once_with_the_clear_message(tmp_path, free_port):
    """train/main.py goes offline the same way when the hub does not answer."""
    cmd = [sys.executable, str(ROOT / "train/main.py"), "--phase", "1", "--model_name", "kvfuse-test/not-a-model",
           "--output_dir", str(tmp_path / "run")]
    env = _env(HF_ENDPOINT=f"http://127.0.0.1:{free_port}", DS_ACCELERATOR="cpu")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "error: cannot load model 'kvfuse-test/not-a-model'" in result.stderr
    assert "not in the local Hugging Face cache" in result.stderr
    assert "Retrying" not in result.stderr and "Traceback" not in result.stderr


def test_trainer_help_prints_no_deepspeed_warning():
    """DeepSpeed warns when it guesses the accelerator; `--help` must not import it at all."""
    env = {k: v for k, v in _env().items() if k != "DS_ACCELERATOR"}
    result = subprocess.run([sys.executable, str(ROOT / "train/main.py"), "--help"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0 and "--phase" in result.stdout
    assert "WARNING" not in result.stderr and "accelerator" not in result.stderr, result.stderr


def test_every_dump_option_says_what_it_does():
    import argparse

    from kvfuse.teacher.dump import add_arguments
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    silent = [a.option_strings[0] for a in parser._actions
              if a.option_strings and a.option_strings[0] != "-h" and not (a.help or "").strip()]
    assert not silent, f"dump options without help text: {silent}"
