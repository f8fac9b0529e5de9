"""What the order of the training batches depends on, saved beside each checkpoint and compared before a resume.

A resume skips the micro-batches the checkpoint already trained on by arithmetic over the seeded order; under another
seed, micro-batch, world size, effective batch or data set that arithmetic would silently skip the wrong batches.
So each checkpoint folder holds `data_order.json`, and a resume whose order differs is refused, naming the keys —
before any checkpoint file is read (a ZeRO checkpoint of another world size would fail inside DeepSpeed first).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from train.checkpoint import CheckpointError

DATA_ORDER_FILE = "data_order.json"


class ResumeRefused(CheckpointError):
    """The checkpoint was trained under another data order (or cannot say which)."""


def data_order(config, world_size: int, train_examples, store_hash: str | None) -> dict:
    """The values the batch order is a function of. `train_examples` in split order; `store_hash` the teacher
    store's settings hash (None when teachers run online)."""
    digest = hashlib.sha256()
    for ex in train_examples:
        digest.update(json.dumps([ex.id, ex.question, ex.rationale, ex.answer]).encode())
    return {"seed": config.seed, "micro_batch": config.micro_batch, "world_size": world_size,
            "effective_batch": config.effective_batch, "dataset": config.dataset, "n_samples": config.n_samples,
            "n_val": config.n_val, "train_examples_sha256": digest.hexdigest()[:16], "teacher_store": store_hash}


def write_data_order(checkpoint: Path, order: dict) -> None:
    (Path(checkpoint) / DATA_ORDER_FILE).write_text(json.dumps(order, indent=1, sort_keys=True) + "\n")


def check_data_order(checkpoint: Path, order: dict) -> None:
    """ResumeRefused naming every key whose value differs between the checkpoint and this run."""
    path = Path(checkpoint) / DATA_ORDER_FILE
    if not path.is_file():
        raise ResumeRefused(f"cannot resume from {checkpoint}: {path.name} is missing, so whether it was trained on "
                            "this run's data order is unknown; start a new output_dir")
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ResumeRefused(f"cannot resume from {checkpoint}: {path} is damaged ({err})") from None
    changed = [key for key in sorted(set(saved) | set(order)) if saved.get(key) != order.get(key)]
    if changed:
        diffs = ", ".join(f"{key} (checkpoint {saved.get(key)!r}, now {order.get(key)!r})" for key in changed)
        raise ResumeRefused(f"cannot resume from {checkpoint}: the data order differs in {diffs}; rerun with the "
                            "checkpoint's values or start a new output_dir")
