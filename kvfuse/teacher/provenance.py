"""What a teacher-KV store was made for, and the check that a run is the same thing.

The dump records in the store's settings (and so in its settings hash): the student's fingerprint (tokenizer and
config: the stored token ids and layer count depend on nothing else), each teacher's fingerprint, the dataset's
content (sha256 over the examples used, in order, with their split) and every alignment setting. A trainer reading
the store recomputes what it can of these from its own run and refuses a store that differs, naming the fields, and
takes its examples and splits from the store instead of re-deriving them from its own config.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping, Sequence

import torch

from kvfuse.data import Example, load_examples
from kvfuse.models import PACKAGED_MODELS, TINY_CONFIGS, fingerprint
from kvfuse.models.identity import canonical_config
from kvfuse.teacher.store import StoreError, TeacherKVStore, differing_keys, read_manifest

# Settings a store must record to be checked against a run; stores from before they existed are refused.
FINGERPRINT_KEYS = ("student_fingerprint", "teacher_fingerprints", "dataset_sha256", "examples")
# The dump flags that fix each setting a run cannot take from the store.
DUMP_FLAGS = {"teachers": "--teachers", "teacher_prompts": "--teacher_prompts", "student_prompt": "--student_prompt",
              "student_layers": "--student_layers", "student_fingerprint": "--student",
              "teacher_fingerprints": "--teachers", "alignment": "--layer_map/--align_threshold/--align_fallback/"
              "--trim_whitespace", "dataset_sha256": "--dataset", "allow_long_sequences": "--allow_long_sequences"}


def dataset_fingerprint(train: Sequence[Example], val: Sequence[Example]) -> str:
    """sha256 over every field of every example, in order, split by split."""
    canonical = json.dumps({split: [[ex.id, ex.question, ex.rationale, ex.answer] for ex in examples]
                            for split, examples in (("train", train), ("val", val))}, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def student_fingerprint(tokenizer, config) -> str:
    """sha256 over the tokenizer (its full tokenizers JSON, special tokens and chat template) and the model config:
    what the stored token ids, positions and layer mixing depend on. The student's weights are not part of it (a
    store serves any weights of the same architecture and tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} is not a fast tokenizer; "
                         "a store's student fingerprint needs its tokenizers JSON")
    parts = [backend.to_str(), json.dumps(tokenizer.special_tokens_map, sort_keys=True),
             str(getattr(tokenizer, "chat_template", None)), canonical_config(config)]
    digest = hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]
    return f"{config.model_type}-{digest}"


def teacher_fingerprint(name: str, model: torch.nn.Module | None = None) -> str | None:
    """A teacher's fingerprint: from its name where the name identifies the weights (packaged GGUFs, random shapes,
    tiny test models), else by hashing `model`'s weights; None when neither is possible without loading the model."""
    if name in PACKAGED_MODELS or name in TINY_CONFIGS or name.startswith("random:"):
        return fingerprint(name)
    return fingerprint(model) if model is not None else None


def store_examples(store_root, dataset: str, log=print) -> tuple[list[Example], list[Example]]:
    """The store's own (train, val) examples: the split the dump made (its n_samples, n_val and seed) of `dataset`,
    checked against the store's example ids and content hash. `dataset` is the run's dataset name or path: the
    store must have been made from these very examples."""
    manifest = read_manifest(store_root)
    settings = manifest["settings"]
    missing = [key for key in FINGERPRINT_KEYS if key not in settings]
    if missing:
        raise StoreError(f"store {store_root} records no {', '.join(missing)} (made by an older kvfuse): it cannot be "
                         "checked against this run; re-dump it with `python -m kvfuse dump`")
    try:
        train, val = load_examples(dataset, settings["n_samples"], settings["n_val"], settings["seed"])
    except ValueError as err:
        raise StoreError(f"store {store_root} cannot be trained on dataset {dataset!r}: {err} (the store holds the "
                         f"split n_samples {settings['n_samples']}, n_val {settings['n_val']}, seed "
                         f"{settings['seed']} of {settings['dataset']!r})") from err
    ids = {"train": [str(ex.id) for ex in train], "val": [str(ex.id) for ex in val]}
    if ids != settings["examples"] or dataset_fingerprint(train, val) != settings["dataset_sha256"]:
        raise StoreError(f"store {store_root} was made from other examples than dataset {dataset!r} gives now "
                         f"(the dump's dataset {settings['dataset']!r}, n_samples {settings['n_samples']}, n_val "
                         f"{settings['n_val']}, seed {settings['seed']}): differing field dataset_sha256; re-dump "
                         "with --dataset naming this run's data")
    log(f"training on the store's examples: {len(train)} train, {len(val)} val (the dump's n_samples "
        f"{settings['n_samples']}, n_val {settings['n_val']}, seed {settings['seed']}; the run's own n_samples, n_val "
        "and seed are not used)" + ("; it holds no validation examples, so nothing is evaluated (dump with --n_val N "
                                   "to evaluate)" if not val else ""))
    return train, val


def open_store_for_run(store_root, run: Mapping[str, Any], log=print) -> TeacherKVStore:
    """The store at `store_root`, opened (every digest checked) only if its settings agree with every key of `run`;
    else a StoreError naming each differing field with both values and the dump flags that make a matching store.
    A teacher fingerprint of None in `run` (a teacher that would have to be loaded to be hashed) is not compared."""
    settings = read_manifest(store_root)["settings"]
    run = dict(run)
    if "teacher_fingerprints" in run:
        stored = settings.get("teacher_fingerprints") or []
        prints = list(run["teacher_fingerprints"])
        for i, value in enumerate(prints):
            if value is None and i < len(stored):
                log(f"teacher {i}'s weights are not re-hashed for the store check (only packaged, tiny and random "
                    "models are fingerprinted by name); its name and prompt are compared")
                prints[i] = stored[i]
        run["teacher_fingerprints"] = prints
    differing = differing_keys(settings, run, only=run.keys())
    if differing:
        fields = "; ".join(f"{key}: store {settings.get(key)!r} vs run {run[key]!r}" for key in differing)
        flags = sorted({DUMP_FLAGS.get(key, f"--{key}") for key in differing})
        raise StoreError(f"store {store_root} was made for other settings: differing fields {differing} ({fields}); "
                         f"re-dump with {' '.join(flags)} matching this run")
    return TeacherKVStore(store_root)
