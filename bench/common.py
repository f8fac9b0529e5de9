"""What every benchmark records beside its numbers (the commit, the device, CSV rows appended to a file), and the
rotated order of interleaved rounds."""
from __future__ import annotations

import csv
import io
import os
import platform
import subprocess
from pathlib import Path

import torch

from kvfuse.teacher.store import atomic_write_text


def commit() -> str:
    """KVFUSE_COMMIT when set (the GPU box gets a copy of the working tree whose git state can be stale), else the
    short hash of HEAD (+"-dirty" with uncommitted changes)."""
    if os.environ.get("KVFUSE_COMMIT"):
        return os.environ["KVFUSE_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, check=True)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu:{platform.processor() or platform.machine()} x{torch.get_num_threads()}"


def append_csv(path: str | Path, rows: list[dict]) -> Path:
    """Append rows (a header first when the file is new). A file whose header lacks some of the rows' columns (a
    benchmark that gained columns) is rewritten once with the union of both, its old rows left empty there, so
    that columns never shift under a header."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for row in rows for k in row))
    if path.exists():
        with open(path, newline="") as fh:
            old_rows = list(csv.DictReader(fh))
            fh.seek(0)
            old_fields = next(csv.reader(fh), [])
        merged = old_fields + [k for k in fields if k not in old_fields]
        if merged != old_fields:
            with open(path, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=merged, restval="")
                writer.writeheader()
                writer.writerows(old_rows)
        fields = merged
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, restval="")
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path


def replace_csv(path: str | Path, rows: list[dict]) -> Path:
    """The table at `path` replaced by `rows` in one rename, so that a reader, or another process that rewrites the
    same table (parallel trainers each summarising at their end), never sees it half written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(k for row in rows for k in row)), restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())
    return path


def rotated(names: list, r: int) -> list:
    """Round r's order: the names rotated by r, so that each takes every position over len(names) rounds (drift
    over a run, or a warm cache left by the one before, falls on every variant alike)."""
    k = r % len(names)
    return names[k:] + names[:k]
