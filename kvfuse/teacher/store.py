"""Offline teacher-KV store: sharded safetensors files plus JSON manifests (DESIGN.md §5).

Layout of a store directory::

    manifest.json                       settings + model fingerprints, number of shards (written once)
    shard-00003-of-00008.safetensors    tensors of the shard's samples, keys "<sample_id>/<name>"
    shard-00003-of-00008.json           the shard's sample ids, shapes, dtype, sha256 of the data file

A shard counts as finished only when its JSON exists: the data file is written to a temporary name and renamed
first, then the JSON the same way, so a job killed at any point leaves either a finished shard or leftovers that
the next run removes and redoes. Settings are compared on every write and every read, so shards made with
different settings never mix.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
STORAGE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class StoreError(RuntimeError):
    """A store that cannot be used as it is: missing or damaged file, mixed settings."""


def settings_hash(settings: Mapping[str, Any]) -> str:
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def shard_stem(index: int, n_shards: int) -> str:
    return f"shard-{index:05d}-of-{n_shards:05d}"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def parse_shard(spec: str) -> tuple[int, int]:
    """'I/N' → (I, N) with 0 ≤ I < N."""
    try:
        index_text, count_text = spec.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise ValueError(f"--shard must look like I/N (e.g. 3/8), got {spec!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard {spec!r}: need 0 <= I < N")
    return index, count


class StoreWriter:
    """Writes the shards of one store; one process per shard (a SLURM array task) is the intended use."""

    def __init__(self, root: str | os.PathLike, settings: Mapping[str, Any], n_shards: int):
        self.root = Path(root)
        self.settings = dict(settings)
        self.n_shards = int(n_shards)
        self.hash = settings_hash(self.settings)
        self.root.mkdir(parents=True, exist_ok=True)
        self._claim_manifest()

    def _claim_manifest(self) -> None:
        path = self.root / MANIFEST
        wanted = {"format": FORMAT_VERSION, "settings": self.settings, "settings_hash": self.hash,
                  "n_shards": self.n_shards}
        if not path.exists():
            # Several array tasks may race here; they all write the same content, and os.replace is atomic.
            _atomic_write_text(path, json.dumps(wanted, indent=2, sort_keys=True, default=str))
        found = _read_json(path)
        if found.get("settings_hash") != self.hash or found.get("n_shards") != self.n_shards:
            raise StoreError(
                f"{path} was made with other settings (hash {found.get('settings_hash')}, "
                f"{found.get('n_shards')} shards) than this dump (hash {self.hash}, {self.n_shards} shards); "
                f"refusing to mix shards. Differences: {_diff(found.get('settings', {}), self.settings)}. "
                "Use another output directory or delete this one.")

    def paths(self, index: int) -> tuple[Path, Path]:
        stem = shard_stem(index, self.n_shards)
        return self.root / f"{stem}.safetensors", self.root / f"{stem}.json"

    def is_finished(self, index: int) -> bool:
        data_path, meta_path = self.paths(index)
        if not meta_path.exists():
            return False
        meta = _read_json(meta_path)
        if meta.get("settings_hash") != self.hash:
            raise StoreError(f"{meta_path} belongs to other settings (hash {meta.get('settings_hash')} "
                             f"!= {self.hash}); refusing to mix shards")
        if not data_path.exists() or data_path.stat().st_size != meta.get("bytes"):
            return False
        return True

    def clean_leftovers(self, index: int) -> None:
        """Remove temporary files of a killed writer of this shard (and a data file without its JSON)."""
        data_path, meta_path = self.paths(index)
        for leftover in self.root.glob(f".{data_path.name}.tmp-*"):
            leftover.unlink()
        for leftover in self.root.glob(f".{meta_path.name}.tmp-*"):
            leftover.unlink()
        if data_path.exists() and not meta_path.exists():
            data_path.unlink()

    def write_shard(self, index: int, samples: Iterable[tuple[str, Mapping[str, torch.Tensor]]]) -> dict:
        """Write shard `index` from (sample_id, {name: tensor}) pairs; returns its JSON record."""
        if not 0 <= index < self.n_shards:
            raise ValueError(f"shard index {index} outside 0..{self.n_shards - 1}")
        self.clean_leftovers(index)
        data_path, meta_path = self.paths(index)
        tensors: dict[str, torch.Tensor] = {}
        records = []
        tokens = 0
        for sample_id, named in samples:
            if "/" in sample_id:
                raise ValueError(f"sample id {sample_id!r} must not contain '/'")
            shapes = {}
            for name, tensor in named.items():
                key = f"{sample_id}/{name}"
                if key in tensors:
                    raise ValueError(f"duplicate sample id {sample_id!r} in shard {index}")
                tensors[key] = tensor.detach().to("cpu").contiguous()
                shapes[name] = [list(tensor.shape), str(tensor.dtype).replace("torch.", "")]
            if "mask" in named:
                tokens += int(named["mask"].sum())
            records.append({"id": sample_id, "tensors": shapes})
        if not records:
            raise ValueError(f"shard {index} of {self.n_shards} got no samples (fewer samples than shards?)")
        tmp = data_path.with_name(f".{data_path.name}.tmp-{os.getpid()}")
        save_file(tensors, str(tmp), metadata={"settings_hash": self.hash})
        os.chmod(tmp, 0o644)  # readable by the training job's user, whoever ran the dump
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, data_path)
        meta = {"format": FORMAT_VERSION, "settings_hash": self.hash, "shard": index, "n_shards": self.n_shards,
                "samples": records, "bytes": data_path.stat().st_size, "sha256": sha256_file(data_path),
                "valid_tokens": tokens, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _atomic_write_text(meta_path, json.dumps(meta, indent=1))
        return meta


@dataclass(frozen=True)
class _Entry:
    shard: int
    sample_id: str
    names: tuple[str, ...]


class TeacherKVStore(torch.utils.data.Dataset):
    """Memory-mapped reader over a finished store; item i is {name: tensor} plus "id".

    Opening checks that every shard is present, made with the store's settings, and (verify=True) that each data
    file's sha256 matches its JSON: a damaged or missing shard is an error naming the file, never skipped data.
    """

    def __init__(self, root: str | os.PathLike, verify: bool = True, expect_settings: Mapping[str, Any] | None = None):
        self.root = Path(root)
        manifest_path = self.root / MANIFEST
        if not manifest_path.exists():
            raise StoreError(f"{manifest_path} not found: {self.root} is not a teacher-KV store "
                             "(make one with `python -m kvfuse dump`)")
        manifest = _read_json(manifest_path)
        self.settings = manifest["settings"]
        self.hash = manifest["settings_hash"]
        self.n_shards = int(manifest["n_shards"])
        if expect_settings is not None:
            mismatch = _diff(self.settings, dict(expect_settings), only=expect_settings.keys())
            if mismatch:
                raise StoreError(f"store {self.root} was made for other settings: {mismatch}")
        self._entries: list[_Entry] = []
        self._data_paths: list[Path] = []
        self.bytes = 0
        self.valid_tokens = 0
        for index in range(self.n_shards):
            stem = shard_stem(index, self.n_shards)
            data_path, meta_path = self.root / f"{stem}.safetensors", self.root / f"{stem}.json"
            if not meta_path.exists():
                raise StoreError(f"shard {index} of {self.n_shards} is missing or unfinished: {meta_path} not found "
                                 f"(rerun `python -m kvfuse dump ... --shard {index}/{self.n_shards}`)")
            if not data_path.exists():
                raise StoreError(f"shard data file {data_path} is missing (its manifest {meta_path.name} exists)")
            meta = _read_json(meta_path)
            if meta.get("settings_hash") != self.hash:
                raise StoreError(f"{meta_path} was made with other settings ({meta.get('settings_hash')} != "
                                 f"{self.hash}): mixed shards")
            size = data_path.stat().st_size
            if size != meta["bytes"]:
                raise StoreError(f"{data_path} has {size} bytes, its manifest says {meta['bytes']}: damaged file")
            if verify and sha256_file(data_path) != meta["sha256"]:
                raise StoreError(f"{data_path} fails its sha256 check: damaged file")
            self._data_paths.append(data_path)
            self.bytes += size
            self.valid_tokens += int(meta.get("valid_tokens", 0))
            for record in meta["samples"]:
                self._entries.append(_Entry(index, record["id"], tuple(record["tensors"])))
        seen: dict[str, int] = {}
        for entry in self._entries:
            if entry.sample_id in seen:
                raise StoreError(f"sample {entry.sample_id!r} appears in shards {seen[entry.sample_id]} and "
                                 f"{entry.shard}: duplicated data")
            seen[entry.sample_id] = entry.shard
        self._index = {entry.sample_id: i for i, entry in enumerate(self._entries)}
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def sample_ids(self) -> list[str]:
        return [entry.sample_id for entry in self._entries]

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(self.valid_tokens, 1)

    def _handle(self, shard: int):
        # Opened lazily per process (DataLoader workers fork), kept open: safe_open memory-maps the file.
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self._data_paths[shard]), framework="pt")
        return self._handles[shard]

    def __getitem__(self, i: int) -> dict[str, Any]:
        entry = self._entries[i]
        handle = self._handle(entry.shard)
        item: dict[str, Any] = {name: handle.get_tensor(f"{entry.sample_id}/{name}") for name in entry.names}
        item["id"] = entry.sample_id
        return item

    def get(self, sample_id: str) -> dict[str, Any]:
        if sample_id not in self._index:
            raise KeyError(f"sample {sample_id!r} is not in store {self.root}")
        return self[self._index[sample_id]]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


def _read_json(path: Path) -> dict:
    try:
        with open(path) as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise StoreError(f"{path} is not valid JSON ({err}): damaged manifest") from None


def _diff(a: Mapping[str, Any], b: Mapping[str, Any], only: Iterable[str] | None = None) -> str:
    keys = sorted(set(a) | set(b)) if only is None else sorted(only)
    parts = [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys if json.dumps(a.get(k), default=str, sort_keys=True)
             != json.dumps(b.get(k), default=str, sort_keys=True)]
    return "; ".join(parts) if parts else ""


def iter_shard_indices(n_items: int, index: int, n_shards: int) -> Iterator[int]:
    """Items of shard `index`: a strided slice, so shards stay balanced and the assignment is deterministic."""
    return iter(range(index, n_items, n_shards))
