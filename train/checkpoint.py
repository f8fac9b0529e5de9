"""Checkpoints kvfuse can vouch for: sealed with a sha256 manifest at save, verified before anything is unpickled
at resume, loaded with `torch.load(weights_only=True)`; and the run's metrics.jsonl trimmed to the checkpoint.

Layout of `<run>/checkpoints`::

    step000004/                      one DeepSpeed checkpoint (its files as DeepSpeed names them)
    step000004/kvfuse-checkpoint.json   the seal: step, whether it is a resume point, size and sha256 of every file
    latest                           the tag of the newest sealed resume point, written after its seal

Resume reads `latest` as a bare tag (letters, digits, `_.-`; the folder must sit directly in the checkpoint folder,
no symbolic links), so `../../elsewhere` is refused before any file is opened. A checkpoint is used only when every
file it holds is in its seal with the recorded size and digest, and nothing else is there. When `latest` is missing,
empty, malformed or names a checkpoint that fails, the newest intact resume point is used, with a message naming
what was skipped and why.

What stays trusted: DeepSpeed unpickles its files, here through torch's weights-only unpickler, which rebuilds
tensors, containers and plain values and only three DeepSpeed classes, `ZeroStageEnum` (an int enum) and the
loss scalers `LossScaler` and `DynamicLossScaler` (plain objects whose attributes are restored), so no code from
the checkpoint runs. The tensor values
themselves, and the seal, are trusted as they are: the seal proves the files are those this trainer wrote only
against damage, not against someone who can write the run folder (they can rewrite the seal too).
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from kvfuse.teacher.store import atomic_write_text, sha256_file

SEAL = "kvfuse-checkpoint.json"
LATEST = "latest"
SEAL_FORMAT = 1
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class CheckpointError(RuntimeError):
    """No checkpoint in the run folder can be used (each one skipped is named with its reason)."""


@dataclass(frozen=True)
class Resumed:
    tag: str
    path: Path
    client_state: dict


def _files(folder: Path) -> dict[str, Path]:
    """Every entry under `folder` by relative path; a symbolic link or anything but a regular file or folder is
    refused (DeepSpeed would follow it out of the run folder)."""
    out = {}
    for current, dirs, names in os.walk(folder):
        for name in dirs + names:
            path = Path(current) / name
            if path.is_symlink():
                raise CheckpointError(f"{path} is a symbolic link")
            if name in names:
                if not path.is_file():
                    raise CheckpointError(f"{path} is not a regular file")
                out[path.relative_to(folder).as_posix()] = path
    return out


def seal(ckpt_dir: Path, tag: str, step: int, resumable: bool = True) -> Path:
    """Write checkpoint `tag`'s seal (rank 0, after every rank's files are written); a resume point then becomes
    `latest`."""
    folder = Path(ckpt_dir) / tag
    files = {rel: {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
             for rel, path in sorted(_files(folder).items()) if rel != SEAL}
    atomic_write_text(folder / SEAL, json.dumps({"format": SEAL_FORMAT, "tag": tag, "step": step,
                                             "resumable": resumable, "files": files}, indent=1))
    if resumable:
        atomic_write_text(Path(ckpt_dir) / LATEST, tag)
    return folder / SEAL


def save(engine, ckpt_dir: Path, tag: str, step: int, resumable: bool = True,
         add_files: Callable[[Path], None] | None = None) -> None:
    """engine.save_checkpoint on every rank, then the seal and `latest` on rank 0 (DeepSpeed's own `latest` is not
    written: it would name the checkpoint before its seal exists). add_files(folder) writes the caller's own files
    into the checkpoint folder on rank 0 before the seal, so the manifest covers them too."""
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)
    dist.barrier()
    if dist.get_rank() == 0:
        if add_files is not None:
            add_files(Path(ckpt_dir) / tag)
        seal(ckpt_dir, tag, step, resumable)
    dist.barrier()


def verify(ckpt_dir: Path, tag: str) -> dict:
    """The seal of checkpoint `tag` when the folder holds exactly the files it lists, each with its size and
    sha256; else CheckpointError saying what is wrong. Reads no file outside `ckpt_dir/tag`."""
    folder = Path(ckpt_dir) / tag
    if folder.is_symlink() or not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder")
    seal_path = folder / SEAL
    if seal_path.is_symlink() or not seal_path.is_file():
        raise CheckpointError(f"{seal_path} not found (a save that did not finish, or not made by kvfuse)")
    try:
        record = json.loads(seal_path.read_text())
        listed = record["files"]
        step = int(record["step"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{seal_path} is damaged ({err!r})") from None
    present = {rel for rel in _files(folder) if rel != SEAL}
    if present != set(listed):
        extra, missing = sorted(present - set(listed)), sorted(set(listed) - present)
        raise CheckpointError(f"{folder}: files not in its seal {extra}, files missing {missing}")
    for rel, want in sorted(listed.items()):
        path = folder / rel
        size = path.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(f"{path} has {size} bytes, its seal says {want['bytes']}")
        if sha256_file(path) != want["sha256"]:
            raise CheckpointError(f"{path} fails its sha256 check")
    return dict(record, step=step)


def read_latest(ckpt_dir: Path) -> str:
    """The tag `latest` names, refused (CheckpointError) unless it is a bare name of a folder directly inside
    `ckpt_dir`; nothing else is opened."""
    path = Path(ckpt_dir) / LATEST
    if path.is_symlink() or not path.is_file():
        raise CheckpointError(f"{path} is not a regular file")
    with open(path, "rb") as fh:
        raw = fh.read(4096)
    try:
        tag = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} holds no checkpoint name (not ASCII)") from None
    if not tag:
        raise CheckpointError(f"{path} is empty")
    if not _TAG.fullmatch(tag) or tag in (".", ".."):
        raise CheckpointError(f"{path} names {tag[:80]!r}, not a checkpoint folder inside {ckpt_dir}")
    return tag


def choose(ckpt_dir: Path, log: Callable[[str], None]) -> tuple[str, int] | None:
    """(tag, step) of the checkpoint to resume from, or None for a fresh start (no `latest` and no sealed resume
    point). `latest` first; when it fails, the newest intact resume point, logging what was skipped and why."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    skipped: list[str] = []
    first = None
    if (ckpt_dir / LATEST).exists() or (ckpt_dir / LATEST).is_symlink():
        try:
            first = read_latest(ckpt_dir)
            record = verify(ckpt_dir, first)
            if record.get("resumable"):
                return first, record["step"]
            skipped.append(f"{first}: not a resume point")
        except CheckpointError as err:
            skipped.append(f"{first or LATEST}: {err}")
    candidates, sealed = [], False
    for folder in sorted(ckpt_dir.iterdir()):
        if folder.name == first or folder.is_symlink() or not folder.is_dir() or not _TAG.fullmatch(folder.name):
            continue
        try:
            record = verify(ckpt_dir, folder.name)
        except CheckpointError as err:
            skipped.append(f"{folder.name}: {err}")
            sealed |= (folder / SEAL).is_file()
            continue
        if record.get("resumable"):
            candidates.append((record["step"], folder.name))
    if candidates:
        step, tag = max(candidates)
        if skipped:
            log(f"checkpoints skipped: {'; '.join(skipped)}. Resuming from {tag} (step {step}), the newest intact one")
        return tag, step
    if skipped and not sealed and first is None and not (ckpt_dir / LATEST).exists():
        # no save ever finished (the first one was cut short): as if there were no checkpoint
        log(f"no resumable checkpoint in {ckpt_dir} ({'; '.join(skipped)}): starting afresh")
    elif skipped:
        raise CheckpointError(f"no intact checkpoint to resume from in {ckpt_dir}: {'; '.join(skipped)}. Delete the "
                              "folder (or pick another output_dir) to start afresh")
    return None


# DeepSpeed classes inside its checkpoints (ZeRO optimizer state); both are data, no code runs to rebuild them.
def _deepspeed_safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [DynamicLossScaler, LossScaler, ZeroStageEnum]


class _WeightsOnlyLoads:
    """Stands in for the engine's checkpoint engine while loading: every torch.load is weights-only (DeepSpeed
    0.19's own engine passes weights_only=False and has no option for it)."""

    def __init__(self, inner):
        self._inner = inner

    def load(self, path, map_location=None):
        try:
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            reason = next((line.strip() for line in str(err).splitlines() if "Unsupported" in line), str(err)[:300])
            raise CheckpointError(f"{path} holds more than weights and plain data, refused by the weights-only "
                                  f"loader: {reason}") from None

    def __getattr__(self, name):
        return getattr(self._inner, name)


def resume(engine, ckpt_dir: Path, log: Callable[[str], None],
           accept: Callable[[Path], None] | None = None) -> Resumed | None:
    """Load the checkpoint `choose` picks (on rank 0; every rank loads the same tag) into `engine`, weights-only;
    None for a fresh start. accept(folder) runs on rank 0 before anything is loaded and refuses the checkpoint by
    raising a CheckpointError (e.g. one trained under another data order)."""
    picked: list = [None]
    if dist.get_rank() == 0:
        try:
            picked = [choose(ckpt_dir, log)]
            if picked[0] is not None and accept is not None:
                accept(Path(ckpt_dir) / picked[0][0])
        except CheckpointError as err:
            picked = [err]      # every rank raises it, none waits for a tag that will not come
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(picked, src=0)
    if isinstance(picked[0], CheckpointError):
        raise picked[0]
    if picked[0] is None:
        return None
    tag, _ = picked[0]
    inner = engine.checkpoint_engine
    engine.checkpoint_engine = _WeightsOnlyLoads(inner)
    try:
        path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    finally:
        engine.checkpoint_engine = inner
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {Path(ckpt_dir) / tag}")
    return Resumed(tag, Path(path), client_state)


def prune(ckpt_dir: Path, keep: int) -> list[str]:
    """Delete sealed resume points beyond the newest `keep`, never the one `latest` names; returns the tags
    deleted. Unsealed folders (a save cut short) are left for the next save of that tag to overwrite."""
    ckpt_dir = Path(ckpt_dir)
    try:
        protected = read_latest(ckpt_dir)
    except CheckpointError:
        protected = None
    sealed = []
    for folder in ckpt_dir.iterdir():
        seal_path = folder / SEAL
        if folder.is_symlink() or not seal_path.is_file():
            continue
        try:
            record = json.loads(seal_path.read_text())
            if record.get("resumable"):
                sealed.append((int(record["step"]), folder.name))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue    # a damaged seal: never a resume point, and not ours to judge further here
    sealed.sort(reverse=True)
    doomed = [tag for _, tag in sealed[max(keep, 0):] if tag != protected]
    for tag in doomed:
        shutil.rmtree(ckpt_dir / tag)
    return doomed


def trim_metrics(path: Path, step: int, log: Callable[[str], None]) -> None:
    """After a resume at `step`, keep the events of metrics.jsonl up to `step` (none for a fresh start): none lost,
    none doubled. A torn last line (a write cut short by a kill or a full disk) is dropped with a message; any
    other unreadable line is an error naming the file and the line."""
    path = Path(path)
    if not path.exists():
        return
    raw = path.read_bytes()
    lines, complete = raw.split(b"\n"), raw.endswith(b"\n")
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
            event_step = int(event["step"])
        except (ValueError, KeyError, TypeError) as err:
            if number == len(lines) and not complete:
                log(f"{path}: dropped its torn last line ({len(line)} bytes, an interrupted write)")
                continue
            raise ValueError(f"{path}, line {number}: not a metrics event ({err})") from None
        if step > 0 and event_step <= step:
            kept.append(line)
    atomic_write_text(path, "".join(line.decode() + "\n" for line in kept))
