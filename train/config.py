"""Phase presets: train/configs/defaults.yaml (PLAN.zh.md §5) + phaseN.yaml + `--key value` overrides."""
from __future__ import annotations

from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# Keys that only some presets carry, or that the trainer fills in.
OPTIONAL_KEYS = {"zspace": False, "z_dim": 128, "z_loss": "mse", "teacher_store": None, "max_steps": None,
                 "output_dir": None, "entropy_target": "diversity", "router_temperature": 0.1, "router_groups": 1,
                 "router_k": 16, "phase": None}


def _read_yaml(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"config file {path} not found")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of keys to values")
    return data


def _scalar(text: str):
    """YAML scalar, except that numbers YAML 1.1 reads as strings (1e-2) become floats."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_overrides(tokens: list[str]) -> dict:
    """['--alpha', '0.6', '0.4', '--lora', 'true'] → {'alpha': [0.6, 0.4], 'lora': True} (values parsed as YAML)."""
    out: dict = {}
    key = None
    for token in tokens:
        if token.startswith("--"):
            key = token[2:].replace("-", "_")
            if "=" in key:
                key, value = key.split("=", 1)
                out[key] = _scalar(value)
                key = None
            else:
                out[key] = []
        elif key is None:
            raise ValueError(f"unexpected argument {token!r}: overrides look like --key value")
        else:
            out[key].append(_scalar(token))
    for k, v in list(out.items()):
        if isinstance(v, list):
            if not v:
                raise ValueError(f"--{k} needs a value")
            out[k] = v[0] if len(v) == 1 else v
    return out


def load_config(phase: int, config_path: str | None, override_tokens: list[str]) -> dict:
    config = dict(OPTIONAL_KEYS)
    config.update(_read_yaml(CONFIG_DIR / "defaults.yaml"))
    preset = _read_yaml(Path(config_path) if config_path else CONFIG_DIR / f"phase{phase}.yaml")
    overrides = parse_overrides(override_tokens)
    for source, values in (("preset", preset), ("command line", overrides)):
        unknown = sorted(set(values) - set(config))
        if unknown:
            raise ValueError(f"unknown {source} key(s) {unknown}; valid keys: {sorted(config)}")
        for key, value in values.items():
            default = config[key]
            if isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
                value = float(value)
            elif default is not None and not isinstance(value, type(default)) and not (
                    isinstance(default, list) and isinstance(value, (str, int, float))):
                raise ValueError(f"{source} value for {key!r} must be {type(default).__name__}, got {value!r}")
            config[key] = value
    config["phase"] = phase
    for key in ("teachers", "teacher_prompts", "alpha"):
        if config[key] is not None and not isinstance(config[key], list):
            config[key] = [config[key]]
    n_teachers = len(config["teachers"]) or len(config["teacher_prompts"])
    if config["teachers"] and len(config["teacher_prompts"]) not in (1, n_teachers):
        raise ValueError(f"{len(config['teacher_prompts'])} teacher_prompts for {n_teachers} teachers")
    if config["router_type"] == "fixed" and len(config["alpha"]) != n_teachers:
        raise ValueError(f"alpha {config['alpha']} has {len(config['alpha'])} weights for {n_teachers} teachers")
    if config["router_type"] not in ("fixed", "similarity", "learnable"):
        raise ValueError(f"router_type must be fixed, similarity or learnable, got {config['router_type']!r}")
    return config
