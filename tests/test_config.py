"""The trainer's configuration and command line (train/config.py, train/main.py), without training: strict one-line
refusals, did-you-mean, every key documented and used, the --help text, and the resume data-order check."""
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from train import main as train_main
from train.config import CONFIG_DIR, KEYS, ConfigError, TrainConfig, describe_keys, load_config
from train.resume import ResumeRefused, check_data_order, data_order, write_data_order

ROOT = Path(__file__).resolve().parent.parent


def _refusal(capsys, *argv):
    """(exit code, stderr) of train/main.py's main on a bad command line: refused before anything starts."""
    rc = train_main.main(["--phase", "1", *argv])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--keep_checkpoints", "0"],
     "config key 'keep_checkpoints' = 0 is not allowed: must be >= 1 (save_every 0 saves none)"),
    (["--lr_full", "-1"], "config key 'lr_full' = -1.0 is not allowed: must be > 0"),
    (["--dtype", "fp16"], "config key 'dtype' = 'fp16' is not allowed: must be one of auto, bf16, fp32"),
    (["--max_steps", "0"], "config key 'max_steps' = 0 is not allowed: must be >= 1, or null for no limit"),
    (["--micro_batch", "0"], "config key 'micro_batch' = 0 is not allowed: must be >= 1"),
    (["--micro_batch", "two"], "config key 'micro_batch' = 'two' must be an integer"),
    (["--lora", "maybe"], "config key 'lora' = 'maybe' must be true or false"),
    (["--lr_lora", "inf"], "config key 'lr_lora' = inf must be a finite number"),
    (["--warmup_ratio", "1.5"], "config key 'warmup_ratio' = 1.5 is not allowed: must be in [0, 1]"),
    (["--alpha", "0.5", "-0.1"], "config key 'alpha' = [0.5, -0.1] is not allowed: must be >= 0"),
    (["--alpha", "1.0"], "config key 'alpha' = [1.0] has 1 weights for 2 teachers: give one weight per teacher"),
    (["--device", "tpu"], "config key 'device' = 'tpu' is not allowed: must be auto, cpu, cuda or cuda:N"),
    (["--lr_ful", "1e-4"], "unknown command line key(s) ['lr_ful']: lr_ful → did you mean lr_full?"),
    (["--no_such_key", "1"], "unknown command line key(s) ['no_such_key']: python train/main.py --help lists every key"),
])
def test_bad_values_are_refused_in_one_line(capsys, argv, message):
    rc, err = _refusal(capsys, *argv)
    assert rc == 2
    assert err == f"train/main.py (rank 0): error: {message}\n"


def test_cuda_without_a_gpu_is_named(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, err = _refusal(capsys, "--device", "cuda")
    assert rc == 2 and err == ("train/main.py (rank 0): error: config key 'device' = 'cuda' is not available: this "
                               "machine has no CUDA GPU visible to PyTorch; use --device cpu (or auto)\n")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    rc, err = _refusal(capsys, "--device", "cuda:1")
    assert rc == 2 and "config key 'device' = 'cuda:1' is not available: 1 CUDA GPU(s) visible" in err


def test_presets_build_a_frozen_typed_config():
    config = load_config(3, None, ["--lr_full", "1e-4", "--alpha", "1", "3", "--max_steps", "7"])
    assert (config.phase, config.lr_full, config.alpha, config.max_steps) == (3, 1e-4, [1.0, 3.0], 7)
    assert config.teachers == ["smollm2-135m-instruct", "gemma3-270m"]       # from phase3.yaml
    assert config.keep_checkpoints == 2 and config.lr_lora == 2e-4           # from defaults.yaml
    assert isinstance(config.lora_alpha, float)                              # YAML's 32 fitted to the key's type
    assert load_config(0, None, ["--teacher_prompts", "cot"]).teacher_prompts == ["cot"]   # one value, a list
    # prompt text with YAML syntax in it stays text
    prompts = load_config(0, None, ["--teacher_prompts", "Answer: think step by step", "--student_prompt",
                                    "a: b: c"])
    assert (prompts.teacher_prompts, prompts.student_prompt) == (["Answer: think step by step"], "a: b: c")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 3
    with pytest.raises(ConfigError, match="config key 'lr_full' = 0.0 is not allowed"):
        dataclasses.replace(config, lr_full=0.0)                               # every copy is checked too


def test_every_phase_preset_is_valid_and_a_preset_file_is_checked_like_the_command_line(tmp_path):
    for phase in range(6):
        assert load_config(phase, None, []).phase == phase
    bad = tmp_path / "mine.yaml"
    bad.write_text("lr_ful: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown preset key\(s\) \['lr_ful'\]: lr_ful → did you mean lr_full\?"):
        load_config(1, str(bad), [])
    bad.write_text("lr_full: [1\n")
    with pytest.raises(ConfigError, match=r"mine.yaml is not valid YAML: .*line 2") as info:
        load_config(1, str(bad), [])
    assert "\n" not in str(info.value)
    bad.write_text("phase: 3\n")
    with pytest.raises(ConfigError, match="preset key 'phase' is set by --phase"):
        load_config(1, str(bad), [])


def test_defaults_yaml_is_the_one_home_of_every_default_and_every_key_is_used():
    defaults = yaml.safe_load((CONFIG_DIR / "defaults.yaml").read_text())
    assert sorted(defaults) == sorted(set(KEYS) - {"phase"})
    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(TrainConfig))
    # each key is read by the trainer (the session, or main for device and output_dir)
    source = "".join((ROOT / "train" / name).read_text() for name in ("session.py", "main.py", "resume.py"))
    unused = [key for key in KEYS if not re.search(rf"\b(c|config|self\.config)\.{key}\b", source)]
    assert unused == []


def test_effective_batch_must_split_evenly_over_ranks():
    config = load_config(2, None, ["--effective_batch", "4", "--micro_batch", "2"])
    assert config.accumulation(1) == 2 and config.accumulation(2) == 1
    with pytest.raises(ConfigError, match=r"'effective_batch' = 4 is not allowed: must be a multiple of micro_batch "
                                          r"× ranks = 2 × 3 = 6"):
        config.accumulation(3)


def test_help_lists_every_key_with_its_default_and_every_phase():
    text = describe_keys()
    defaults = yaml.safe_load((CONFIG_DIR / "defaults.yaml").read_text())
    for key in set(KEYS) - {"phase"}:
        shown = yaml.safe_dump(defaults[key], default_flow_style=True).strip().removesuffix("...").strip()
        assert re.search(rf"^    --{key} {re.escape(shown)} +\S", text, re.M), key
    for group in ("loss:", "models:", "alignment:", "fusion and router:", "data and batches:", "optimisation:",
                  "evaluation:", "run and outputs:"):
        assert f"\n  {group}\n" in text
    for phase in range(6):
        assert f"\n  Phase {phase} — " in text
    assert "sets: teachers=[smollm2-135m-instruct, gemma3-270m]" in text          # from phase3.yaml
    # the script runs by its path, with no path edits, and prints the same text
    proc = subprocess.run([sys.executable, "train/main.py", "--help"], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0 and text in proc.stdout and "--phase {0,1,2,3,4,5}" in proc.stdout


def test_resume_is_refused_under_another_data_order(tmp_path):
    from kvfuse.data import Example

    config = load_config(2, None, [])
    examples = [Example(f"x-{i}", f"q{i}", f"r{i}", str(i)) for i in range(4)]
    order = data_order(config, 1, examples, None)
    write_data_order(tmp_path, order)
    check_data_order(tmp_path, order)                                       # same order: resumes
    other = data_order(dataclasses.replace(config, seed=1, micro_batch=2), 2, examples[::-1], None)
    with pytest.raises(ResumeRefused) as info:
        check_data_order(tmp_path, other)
    message = str(info.value)
    assert message.startswith(f"cannot resume from {tmp_path}: the data order differs in micro_batch (checkpoint 1, "
                              "now 2), seed (checkpoint 0, now 1), train_examples_sha256 (checkpoint ")
    assert "world_size (checkpoint 1, now 2); rerun with the checkpoint's values" in message
    assert "effective_batch" not in message and "dataset" not in message
    with pytest.raises(ResumeRefused, match="teacher_store"):
        check_data_order(tmp_path, data_order(config, 1, examples, "a-store-hash"))
    (tmp_path / "data_order.json").write_text("{")
    with pytest.raises(ResumeRefused, match="data_order.json is damaged"):
        check_data_order(tmp_path, order)
    (tmp_path / "data_order.json").unlink()
    with pytest.raises(ResumeRefused, match="data_order.json is missing"):
        check_data_order(tmp_path, order)
