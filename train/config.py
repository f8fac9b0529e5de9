"""The run's configuration: train/configs/defaults.yaml + phaseN.yaml (or --config FILE) + `--key value` overrides,
checked once at start-up into a frozen, typed `TrainConfig`.

defaults.yaml is the one home of every default; `TrainConfig` holds each key's type, meaning and allowed values.
A key that is unknown, of the wrong type or out of range is refused with one line naming the key, the value and
what is allowed.
"""
from __future__ import annotations

import difflib
import math
import re
import textwrap
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
PHASES = range(6)


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the key, the value and what is allowed."""


# ------------------------------------------------------------------------------------------------------ checks
# A check is (predicate, words for the allowed values); the words end up in the error message and in --help.

def _at_least(low, note: str = ""):
    return (lambda v: v >= low), f">= {low:g}{note}"


def _above(low):
    return (lambda v: v > low), f"> {low:g}"


def _fraction():
    return (lambda v: 0.0 <= v <= 1.0), "in [0, 1]"


def _one_of(*choices):
    return (lambda v: v in choices), "one of " + ", ".join(map(str, choices))


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def _device():
    return (lambda v: _DEVICE.fullmatch(v) is not None), "auto, cpu, cuda or cuda:N"


def _key(group: str, meaning: str, check=None):
    return field(metadata={"group": group, "help": meaning, "check": check})


LOSS, MODELS, ALIGN, ROUTER, DATA, OPTIM, EVAL, RUN = (
    "loss", "models", "alignment", "fusion and router", "data and batches", "optimisation", "evaluation",
    "run and outputs")


@dataclass(frozen=True)
class TrainConfig:
    # --- loss (the plan's §5 defaults) ---
    lambda_k: float = _key(LOSS, "weight of the key MSE (λ_K)", _at_least(0.0))
    lambda_v: float = _key(LOSS, "weight of the value MSE (λ_V)", _at_least(0.0))
    beta: float = _key(LOSS, "weight of the K/V cosine term (β)", _at_least(0.0))
    gamma: float = _key(LOSS, "attention-KL weight (γ) before its warm-in", _at_least(0.0))
    delta: float = _key(LOSS, "rationale cross-entropy weight (δ) before its warm-in", _at_least(0.0))
    gamma_final: float = _key(LOSS, "γ reached at the end of its linear warm-in", _at_least(0.0))
    delta_final: float = _key(LOSS, "δ reached at the end of its linear warm-in", _at_least(0.0))
    warmin_start: float = _key(LOSS, "fraction of training after which γ and δ ramp to their final values",
                               _fraction())
    layer_warmup_steps: float = _key(LOSS, "fraction of training that distils only the first third of the layers",
                                     _fraction())
    zspace: bool = _key(LOSS, "distil in a learnt common space Z instead of head-to-head adapters (Phase 5)")
    z_dim: int = _key(LOSS, "width of the Z space", _at_least(1))
    z_loss: str = _key(LOSS, "loss in Z space", _one_of("mse", "cosine", "barlow", "cca"))
    # --- models ---
    model_name: str = _key(MODELS, "the student (and the teacher when `teachers` is empty): packaged alias, "
                                   "tiny-*, HF id, folder or .gguf")
    student_layers: str = _key(MODELS, "keep all of model_name's layers, or every other one",
                               _one_of("all", "every_other"))
    teachers: list[str] = _key(MODELS, "teacher model names; empty: model_name under each of teacher_prompts")
    teacher_prompts: list[str] = _key(MODELS, "one prompt per teacher (or one for all): default, cot or literal "
                                              "text")
    student_prompt: str = _key(MODELS, "the student's prompt: default, cot or literal text")
    lora: bool = _key(MODELS, "train LoRA adapters on q/k/v/o instead of the full student")
    lora_r: int = _key(MODELS, "LoRA rank", _at_least(1))
    lora_alpha: float = _key(MODELS, "LoRA scaling α", _above(0.0))
    adapter_init: str = _key(MODELS, "per-teacher K/V adapter start: ridge fit on calibration data, or "
                                     "structured (group-mean / replicate heads)", _one_of("ridge", "structured"))
    calibration_samples: int = _key(MODELS, "training examples (from the end) used to fit ridge adapters and "
                                            "similarity-router prototypes", _at_least(1))
    # --- alignment ---
    layer_map: str = _key(ALIGN, "student-to-teacher layer map", _one_of("interpolate", "round", "ratio_mean"))
    align_threshold: float = _key(ALIGN, "IoU below which a token pair is not aligned", _fraction())
    align_fallback: str = _key(ALIGN, "what a student token without an aligned teacher token gets",
                               _one_of("nearest", "none"))
    trim_whitespace: bool = _key(ALIGN, "ignore leading/trailing whitespace of tokens when aligning")
    # --- fusion and router ---
    router_type: str = _key(ROUTER, "how teachers are weighted", _one_of("fixed", "similarity", "learnable"))
    alpha: list[float] = _key(ROUTER, "the fixed router's teacher weights (normalised)", _at_least(0.0))
    entropy_weight: float = _key(ROUTER, "learnable router: weight of the entropy term", _at_least(0.0))
    entropy_target: str = _key(ROUTER, "learnable router: push α towards uniform or towards one teacher",
                               _one_of("diversity", "specialise"))
    router_groups: int = _key(ROUTER, "learnable router: layer groups with their own α (1: one α for all layers)",
                              _at_least(1))
    router_temperature: float = _key(ROUTER, "similarity router: softmax temperature", _above(0.0))
    router_k: int = _key(ROUTER, "similarity router: first valid tokens pooled into a feature", _at_least(1))
    lr_router: float = _key(ROUTER, "learnable router's learning rate", _above(0.0))
    # --- data and batches ---
    dataset: str = _key(DATA, "gsm8k (GSM8K test), gsm_symbolic (the shipped GSM-style training set), or a JSONL "
                              "path with question / rationale / answer fields")
    n_samples: int = _key(DATA, "training examples", _at_least(1))
    n_val: int = _key(DATA, "validation examples (0: no evaluation)", _at_least(0))
    seed: int = _key(DATA, "seed of the split, the batch order and every random initialisation", _at_least(0))
    max_length: int = _key(DATA, "longest student sequence; a longer example is an error, never truncated",
                           _at_least(1))
    allow_long_sequences: bool = _key(DATA, "use examples longer than a model's max_position_embeddings (logged) "
                                            "instead of refusing them")
    micro_batch: int = _key(DATA, "examples per rank per forward", _at_least(1))
    effective_batch: int = _key(DATA, "examples per optimizer step over all ranks (a multiple of micro_batch × "
                                      "ranks; the gradient accumulation follows)", _at_least(1))
    epochs: int = _key(DATA, "passes over the training examples", _at_least(1))
    max_steps: typing.Optional[int] = _key(DATA, "stop after this many optimizer steps (null: no limit)",
                                           _at_least(1, ", or null for no limit"))
    teacher_store: typing.Optional[str] = _key(DATA, "read teacher KV from this offline store (python -m kvfuse "
                                                     "dump) instead of running the teachers")
    eval_teacher_store: typing.Optional[str] = _key(
        DATA, "evaluate (KV loss, KV CKA) against this store's teacher KV instead of teacher_store's, e.g. the bf16 "
              "store of a run trained from a compressed one; it must hold the same examples (null: teacher_store)")
    store_prefetch: int = _key(DATA, "store batches read ahead by a background thread (0: inline)", _at_least(0))
    # --- optimisation ---
    lr_full: float = _key(OPTIM, "student learning rate (full fine-tuning)", _above(0.0))
    lr_lora: float = _key(OPTIM, "learning rate of LoRA weights and of the K/V adapters", _above(0.0))
    warmup_ratio: float = _key(OPTIM, "fraction of steps of linear LR warm-up before the cosine decay", _fraction())
    clip_grad: float = _key(OPTIM, "gradient-norm clipping (0: none)", _at_least(0.0))
    gradient_checkpointing: bool = _key(OPTIM, "recompute each student layer in backward (kvfuse's own, KV-safe)")
    zero_stage: int = _key(OPTIM, "DeepSpeed ZeRO stage", _one_of(0, 1, 2, 3))
    dtype: str = _key(OPTIM, "weights and compute: auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32",
                      _one_of("auto", "bf16", "fp32"))
    loss_backend: str = _key(OPTIM, "KV loss implementation: auto (Triton on CUDA), torch or triton",
                             _one_of("auto", "torch", "triton"))
    device: str = _key(OPTIM, "auto (CUDA when a GPU is visible), cpu, cuda or cuda:N", _device())
    # --- evaluation ---
    eval_every: int = _key(EVAL, "evaluate every N optimizer steps (and at the end)", _at_least(1))
    n_generate: int = _key(EVAL, "validation examples generated at the end for accuracy / ROUGE-L / BLEU (0: none)",
                           _at_least(0))
    generate_max_new_tokens: int = _key(EVAL, "longest generation", _at_least(1))
    # --- run and outputs ---
    output_dir: typing.Optional[str] = _key(RUN, "run directory (null: runs/phaseN)")
    export_student: bool = _key(RUN, "write the trained student as a Hugging Face folder <output_dir>/student at the "
                                     "end")
    save_every: int = _key(RUN, "checkpoint every N steps and at the end (0: never)", _at_least(0))
    keep_checkpoints: int = _key(RUN, "newest checkpoints kept (each holds the optimizer state)",
                                 _at_least(1, " (save_every 0 saves none)"))
    phase: int = _key(RUN, "the phase preset (set by --phase)", _one_of(*PHASES))

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            _check_value(f.name, getattr(self, f.name), hints[f.name], f.metadata["check"])
        n_teachers = len(self.teachers) or len(self.teacher_prompts)
        if not self.teacher_prompts:
            raise ConfigError("config key 'teacher_prompts' = [] is not allowed: give at least one prompt")
        if self.teachers and len(self.teacher_prompts) not in (1, n_teachers):
            raise ConfigError(f"config key 'teacher_prompts' = {self.teacher_prompts} has "
                              f"{len(self.teacher_prompts)} prompts for {n_teachers} teachers: give 1 or {n_teachers}")
        if self.router_type == "fixed" and len(self.alpha) != n_teachers:
            raise ConfigError(f"config key 'alpha' = {self.alpha} has {len(self.alpha)} weights for {n_teachers} "
                              "teachers: give one weight per teacher")
        if self.router_type == "fixed" and sum(self.alpha) <= 0:
            raise ConfigError(f"config key 'alpha' = {self.alpha} must have a positive sum")

    def accumulation(self, world_size: int) -> int:
        """Micro-batches accumulated per optimizer step on each of `world_size` ranks."""
        per_micro = self.micro_batch * world_size
        if self.effective_batch % per_micro:
            raise ConfigError(f"config key 'effective_batch' = {self.effective_batch} is not allowed: must be a "
                              f"multiple of micro_batch × ranks = {self.micro_batch} × {world_size} = {per_micro}")
        return self.effective_batch // per_micro

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


KEYS = tuple(f.name for f in fields(TrainConfig))


def _check_value(key: str, value, hint, check) -> None:
    optional = typing.get_origin(hint) is typing.Union
    if optional:
        if value is None:
            return
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        item = typing.get_args(hint)[0]
        if not isinstance(value, list) or not all(_is(x, item) for x in value):
            raise ConfigError(f"config key {key!r} = {value!r} must be a list of {_type_words(item)}")
        values = value
    else:
        if not _is(value, hint):
            raise ConfigError(f"config key {key!r} = {value!r} must be {_type_words(hint)}"
                              + (" or null" if optional else ""))
        values = [value]
    if check is not None:
        ok, allowed = check
        for v in values:
            if not ok(v):
                raise ConfigError(f"config key {key!r} = {value!r} is not allowed: must be {allowed}")


def _is(value, kind) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, kind) and not isinstance(value, bool)


def _type_words(kind) -> str:
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}[kind]


def _coerce(value, hint):
    """YAML's reading of a value, fitted to the key's type where that loses nothing: an int for a float key, one
    value for a list key."""
    if typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        item = typing.get_args(hint)[0]
        value = value if isinstance(value, list) else [value]
        return [float(x) if item is float and _is(x, float) else x for x in value]
    if hint is float and _is(value, float):
        return float(value)
    return value


# ------------------------------------------------------------------------------------------------------ sources

def _read_yaml(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of keys to values")
    return data


def _scalar(text: str):
    """One command-line value read as a YAML scalar (true, 3, 1e-4, null); text that YAML would read as a mapping,
    a list or not at all (prompt text such as "Answer: think") stays the text it is."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, (dict, list)):
        return text
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
            raise ConfigError(f"unexpected argument {token!r}: overrides look like --key value")
        else:
            out[key].append(_scalar(token))
    for k, v in list(out.items()):
        if isinstance(v, list):
            if not v:
                raise ConfigError(f"--{k} needs a value")
            out[k] = v[0] if len(v) == 1 else v
    return out


def _refuse_unknown(source: str, keys) -> None:
    unknown = sorted(set(keys) - set(KEYS))
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, KEYS, n=1)
        if close:
            hints.append(f"{key} → did you mean {close[0]}?")
    hint = "; ".join(hints) if hints else "python train/main.py --help lists every key"
    raise ConfigError(f"unknown {source} key(s) {unknown}: {hint}")


def preset_path(phase: int) -> Path:
    return CONFIG_DIR / f"phase{phase}.yaml"


def load_config(phase: int, config_path: str | None, override_tokens: list[str]) -> TrainConfig:
    """defaults.yaml, then the phase preset (or `config_path`), then the command line; checked into a TrainConfig."""
    if phase not in PHASES:
        raise ConfigError(f"--phase {phase} is not allowed: must be one of {', '.join(map(str, PHASES))}")
    defaults_path = CONFIG_DIR / "defaults.yaml"
    values = _read_yaml(defaults_path)
    _refuse_unknown(f"{defaults_path.name}", values)
    missing = sorted(set(KEYS) - set(values) - {"phase"})
    if missing:
        raise ConfigError(f"{defaults_path} lacks key(s) {missing}: every key has its default there")
    preset = _read_yaml(Path(config_path) if config_path else preset_path(phase))
    overrides = parse_overrides(override_tokens)
    for source, layer in (("preset", preset), ("command line", overrides)):
        _refuse_unknown(source, layer)
        if "phase" in layer:
            raise ConfigError(f"{source} key 'phase' is set by --phase")
        values.update(layer)
    values["phase"] = phase
    hints = typing.get_type_hints(TrainConfig)
    return TrainConfig(**{k: _coerce(v, hints[k]) for k, v in values.items()})


# ------------------------------------------------------------------------------------------------------ help

def _preset_summary(path: Path) -> tuple[str, dict]:
    """(the preset's leading comment as one paragraph, the keys it sets)."""
    lines = path.read_text().splitlines()
    words = []
    for line in lines:
        if not line.startswith("#"):
            break
        words.append(line.lstrip("# ").strip())
    return " ".join(w for w in words if w), _read_yaml(path)


def describe_keys() -> str:
    """Every key with its default (defaults.yaml) and meaning, grouped; then what each phase preset does."""
    defaults = _read_yaml(CONFIG_DIR / "defaults.yaml")
    out = ["config keys (override any with --key value; lists take several values, e.g. --alpha 0.6 0.4):"]
    group = None
    for f in fields(TrainConfig):
        if f.name == "phase":
            continue
        if f.metadata["group"] != group:
            group = f.metadata["group"]
            out.append(f"\n  {group}:")
        default = yaml.safe_dump(defaults.get(f.name), default_flow_style=True).strip().removesuffix("...").strip()
        allowed = f.metadata["check"][1] if f.metadata["check"] else ""
        meaning = f.metadata["help"] + (f" [{allowed}]" if allowed and "one of" in allowed else "")
        out.append(textwrap.fill(meaning, width=118, initial_indent=f"    --{f.name} {default}".ljust(40) + " ",
                                 subsequent_indent=" " * 41))
    out.append("\nphases (train/configs/phaseN.yaml on top of defaults.yaml):")
    for phase in PHASES:
        text, sets = _preset_summary(preset_path(phase))
        settings = ", ".join(f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                             for k, v in sets.items())
        out.append(textwrap.fill(text, width=118, initial_indent="  ", subsequent_indent="    "))
        out.append(textwrap.fill(f"sets: {settings}", width=118, initial_indent="      ",
                                 subsequent_indent="        "))
    return "\n".join(out)
