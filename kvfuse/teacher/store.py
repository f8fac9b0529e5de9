"""Offline teacher-KV store: sharded safetensors files plus JSON manifests (DESIGN.md §5).

Layout of a store directory::

    manifest.json                       settings + model fingerprints, number of shards (written once)
    shard-00003-of-00008.safetensors    tensors of the shard's samples, keys "<sample_id>/<name>"
    shard-00003-of-00008.json           the shard's sample ids, shapes, dtype; sha256 of the data file's header,
                                        and sha256 over the sha256 of each 8 MiB chunk of each tensor's bytes,
                                        in file order (hashed in parallel: one sha256 stream runs at ~1.2 GB/s,
                                        below a 7B dump's rate of KV); the codec and the low-rank bases' sha256
    bases.safetensors                   low-rank codecs only: the per-(teacher, k|v) bases, written once by the
                                        first shard's writer (kvfuse.teacher.compress), checked against every
                                        shard's record on every open

Teacher KV is stored under the manifest's codec (`settings["codec"]`, kvfuse.codecs; a store without one is bf16):
its scales, offsets and coefficients are tensors of the shard like the data, so the same digests cover them, and
the reader hands out QuantizedKV / LowRankKV entries (kvfuse.teacher.compress.assemble). Mixing codecs or bases
across shards is refused, naming the shard and both values.

A shard is streamed to disk as its samples arrive (`ShardStream`): a teacher's KV is ~120 MB per 2k-token sample
for a 7B model, so a shard never waits in host memory. The safetensors header goes first in the file but is known
only at the end: its room is reserved from the declared samples and filled last, padded with spaces as the format
allows; tensors stay aligned to their item size through small "__pad<n>__" byte tensors. A shard counts as
finished when its JSON exists and the data file agrees with it (size, header digest, the header's offsets reaching
exactly the end of the file; `verify=True` also every tensor digest): the data file is written under a temporary
name and renamed, then the JSON the same way, so a job killed at any point leaves either a finished shard or
leftovers that the next run removes and redoes, and a finished shard damaged later is rewritten by the next run.
Every write loops until the operating system took every byte (one write() call moves at most ~2 GiB on Linux).
Settings are compared on every write and every read, so shards made with different settings never mix; the reader
recomputes the manifest's settings hash, so a manifest edited by hand is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors, save as save_safetensors

from kvfuse.codecs import Codec, parse_codec
from kvfuse.teacher.compress import Basis, assemble

MANIFEST = "manifest.json"
FORMAT_VERSION = 2   # 1: one sha256 over the whole data file (still read); 2: header and chunk digests
HASH_THREADS = min(8, os.cpu_count() or 1)
HASH_CHUNK = 8 << 20
SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL",
                      torch.float8_e4m3fn: "F8_E4M3"}
BASES = "bases.safetensors"
STORAGE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class StoreError(RuntimeError):
    """A store that cannot be used as it is: missing or damaged file, mixed settings."""


def store_codec(settings: Mapping[str, Any]) -> Codec:
    """The codec a store's settings record; stores from before codecs existed are bf16."""
    return parse_codec(settings.get("codec", "bf16"))


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


def write_all(fd: int, data, path: Path) -> None:
    """os.write until every byte landed: one call may take only part (Linux moves at most 0x7ffff000 bytes, and
    a signal or a nearly full disk can cut it short); a call that takes nothing is an error naming `path`."""
    view = memoryview(data).cast("B")
    done = 0
    while done < view.nbytes:
        n = os.write(fd, view[done:])
        if not n:
            raise OSError(f"writing {path}: the write took no bytes after {done} of {view.nbytes} (disk full?)")
        done += n


def atomic_write_text(path: Path, text: str) -> None:
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
        self.codec = store_codec(self.settings)
        self.bases_sha256: str | None = None     # set by claim_bases for low-rank codecs
        self.root.mkdir(parents=True, exist_ok=True)
        self._claim_manifest()

    def existing_bases(self) -> dict[str, Basis] | None:
        """The store's low-rank bases when an earlier writer (or array task) saved them, else None."""
        if not (self.root / BASES).exists():
            return None
        bases, self.bases_sha256 = read_bases(self.root)
        return bases

    def claim_bases(self, bases: Mapping[str, Basis]) -> dict[str, Basis]:
        """Save `bases` as the store's, unless another writer got there first: then theirs are returned and must be
        used, so that every shard of the store is encoded on one basis. The file appears complete or not at all
        (written under a temporary name, then hard-linked, which fails if the name exists)."""
        path = self.root / BASES
        meta = {name: {"heads": b.heads, "head_dim": b.head_dim, "ranks": list(b.ranks)} for name, b in bases.items()}
        payload = save_safetensors({name: b.basis.contiguous() for name, b in bases.items()},
                                   metadata={"bases": json.dumps(meta), "settings_hash": self.hash})
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        return self.existing_bases()

    def _claim_manifest(self) -> None:
        path = self.root / MANIFEST
        wanted = {"format": FORMAT_VERSION, "settings": self.settings, "settings_hash": self.hash,
                  "n_shards": self.n_shards}
        if not path.exists():
            # Several array tasks may race here; they all write the same content, and os.replace is atomic.
            atomic_write_text(path, json.dumps(wanted, indent=2, sort_keys=True, default=str))
        found = read_manifest(self.root)
        if found.get("settings_hash") != self.hash or found.get("n_shards") != self.n_shards:
            raise StoreError(
                f"{path} was made with other settings (hash {found.get('settings_hash')}, "
                f"{found.get('n_shards')} shards) than this dump (hash {self.hash}, {self.n_shards} shards); "
                f"refusing to mix shards. Differences: {_diff(found.get('settings', {}), self.settings)}. "
                "Use another output directory or delete this one.")

    def paths(self, index: int) -> tuple[Path, Path]:
        stem = shard_stem(index, self.n_shards)
        return self.root / f"{stem}.safetensors", self.root / f"{stem}.json"

    def unfinished_reason(self, index: int, verify: bool = False) -> str | None:
        """None when shard `index` is finished and intact, else why it must be (re)written. Cheap by default (size
        and header); `verify` also recomputes every tensor digest."""
        data_path, meta_path = self.paths(index)
        if not meta_path.exists():
            return f"{meta_path.name} not found"
        meta = _read_json(meta_path)
        check_shard_codec(meta_path, meta, self.codec, self.bases_sha256)
        if meta.get("settings_hash") != self.hash:
            raise StoreError(f"{meta_path} belongs to other settings (hash {meta.get('settings_hash')} "
                             f"!= {self.hash}); refusing to mix shards")
        try:
            check_shard(data_path, meta, verify)
        except StoreError as err:
            return str(err)
        return None

    def is_finished(self, index: int, verify: bool = False) -> bool:
        return self.unfinished_reason(index, verify) is None

    def clean_leftovers(self, index: int) -> None:
        """Remove temporary files of a killed writer of this shard (and a data file without its JSON)."""
        data_path, meta_path = self.paths(index)
        for leftover in self.root.glob(f".{data_path.name}.tmp-*"):
            leftover.unlink()
        for leftover in self.root.glob(f".{meta_path.name}.tmp-*"):
            leftover.unlink()
        if data_path.exists() and not meta_path.exists():
            data_path.unlink()

    def stream_shard(self, index: int, expected: Sequence[tuple[str, Sequence[str]]]) -> "ShardStream":
        """Open shard `index` for streaming; `expected` lists its samples in order: (sample_id, tensor names)."""
        if not 0 <= index < self.n_shards:
            raise ValueError(f"shard index {index} outside 0..{self.n_shards - 1}")
        if not expected:
            raise ValueError(f"shard {index} of {self.n_shards} got no samples (fewer samples than shards?)")
        if self.codec.lowrank and self.bases_sha256 is None:
            raise ValueError(f"codec {self.codec}: claim the store's low-rank bases (claim_bases) before writing shards")
        self.clean_leftovers(index)
        # (Re)writing: a finished shard found damaged goes, its JSON first, so that a kill in between leaves it
        # unfinished rather than a JSON describing a missing file.
        data_path, meta_path = self.paths(index)
        meta_path.unlink(missing_ok=True)
        data_path.unlink(missing_ok=True)
        return ShardStream(self, index, expected)

    def write_shard(self, index: int, samples: Sequence[tuple[str, Mapping[str, torch.Tensor]]]) -> dict:
        """Write shard `index` from (sample_id, {name: tensor}) pairs held in memory; returns its JSON record."""
        with self.stream_shard(index, [(sample_id, list(named)) for sample_id, named in samples]) as shard:
            for sample_id, named in samples:
                shard.add(sample_id, named)
        return shard.meta


class ShardStream:
    """One shard's data file, written sample by sample (see the module docstring); use as a context manager,
    leaving the block without an exception finishes the shard (header, fsync, rename, JSON)."""

    def __init__(self, writer: StoreWriter, index: int, expected: Sequence[tuple[str, Sequence[str]]]):
        self.writer, self.index = writer, index
        self.expected = [(str(sample_id), list(names)) for sample_id, names in expected]
        seen = set()
        for sample_id, _ in self.expected:
            if "/" in sample_id:
                raise ValueError(f"sample id {sample_id!r} must not contain '/'")
            if sample_id in seen:
                raise ValueError(f"duplicate sample id {sample_id!r} in shard {index}")
            seen.add(sample_id)
        self.data_path, self.meta_path = writer.paths(index)
        self.tmp = self.data_path.with_name(f".{self.data_path.name}.tmp-{os.getpid()}")
        # Room for the header: every entry at its longest (4-D shapes, 20-digit numbers), one pad per tensor.
        longest_entry = len('{"dtype":"BF16","shape":[],"data_offsets":[,]}') + 6 * 21 + 4
        n_tensors = sum(len(names) for _, names in self.expected)
        reserve = 64 + len(json.dumps({"settings_hash": writer.hash})) + n_tensors * (2 * longest_entry + 24)
        reserve += sum(len(json.dumps(f"{sid}/{name}")) + 1 for sid, names in self.expected for name in names)
        self.header_room = -(-reserve // 8) * 8           # tensor bytes start 8-aligned
        self.entries: dict[str, dict] = {}
        self.records: list[dict] = []
        self.offset = 0
        self.tokens = 0
        self.meta: dict | None = None
        self.digests: list[bytes] = []
        self.fh = open(self.tmp, "wb", buffering=0)
        self.fh.seek(8 + self.header_room)
        self.hasher = ThreadPoolExecutor(max_workers=HASH_THREADS, thread_name_prefix="kvfuse-sha256")
        self.flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvfuse-flush")
        self.flushing: Future | None = None
        self.hashing: list[Future] = []     # this sample's tensors
        self.previous: list[Future] = []    # the sample before

    def _put(self, key: str, tensor: torch.Tensor) -> None:
        itemsize = tensor.element_size()
        if self.offset % itemsize:
            self._put(f"__pad{len(self.entries)}__", torch.zeros(itemsize - self.offset % itemsize, dtype=torch.uint8))
        data = tensor.detach().contiguous()
        if data.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{key}: dtype {data.dtype} cannot be stored")
        raw = memoryview(data.view(torch.uint8).reshape(-1).numpy()) if data.numel() else memoryview(b"")
        # hashing and writing both release the GIL; chunks, so that one large tensor spreads over every thread
        self.hashing += [self.hasher.submit(_digest, raw[at:at + HASH_CHUNK])
                         for at in range(0, raw.nbytes, HASH_CHUNK)]
        write_all(self.fh.fileno(), raw, self.tmp)
        self.entries[key] = {"dtype": SAFETENSORS_DTYPES[data.dtype], "shape": list(data.shape),
                             "data_offsets": [self.offset, self.offset + raw.nbytes]}
        self.offset += raw.nbytes

    def add(self, sample_id: str, named: Mapping[str, torch.Tensor]) -> None:
        """Append one sample's tensors (on any device; host memory, pinned or not, avoids a copy)."""
        position = len(self.records)
        if position >= len(self.expected):
            raise ValueError(f"shard {self.index}: sample {sample_id!r} beyond the {len(self.expected)} declared")
        want_id, want_names = self.expected[position]
        if str(sample_id) != want_id or sorted(named) != sorted(want_names):
            raise ValueError(f"shard {self.index}: got sample {sample_id!r} with {sorted(named)}, expected "
                             f"{want_id!r} with {sorted(want_names)} (samples arrive in the declared order)")
        # widest items first, so a sample needs at most one pad (before the next sample's int64 tensors)
        for name in sorted(named, key=lambda n: (-named[n].element_size(), n)):
            self._put(f"{sample_id}/{name}", named[name].to("cpu"))
        # The disk works while the teachers run instead of all at close: a flusher thread syncs what has landed,
        # starting again whenever its last sync is done, while this thread goes on writing into the page cache.
        if self.flushing is None or self.flushing.done():
            if self.flushing is not None:
                self.flushing.result()
            self.flushing = self.flusher.submit(os.fdatasync, self.fh.fileno())
        # the previous sample's digests (this one's still hash): two samples' bytes held at most
        self.digests += [job.result() for job in self.previous]
        self.previous, self.hashing = self.hashing, []
        if "mask" in named:
            self.tokens += int(named["mask"].sum())
        self.records.append({"id": want_id, "tensors": {name: [list(t.shape), str(t.dtype).replace("torch.", "")]
                                                        for name, t in named.items()}})

    def close(self) -> dict:
        if len(self.records) != len(self.expected):
            raise ValueError(f"shard {self.index}: {len(self.records)} of {len(self.expected)} declared samples "
                             "written")
        self.digests += [job.result() for job in self.previous]
        self.previous = []
        header = json.dumps({"__metadata__": {"settings_hash": self.writer.hash}, **self.entries},
                            separators=(",", ":")).encode()
        if len(header) > self.header_room:
            raise RuntimeError(f"safetensors header of {len(header)} bytes outgrew its {self.header_room} reserved")
        header += b" " * (self.header_room - len(header))
        if self.flushing is not None:
            self.flushing.result()
        self.fh.seek(0)
        write_all(self.fh.fileno(), struct.pack("<Q", len(header)) + header, self.tmp)
        os.fsync(self.fh.fileno())
        self._shutdown()
        size, want = self.tmp.stat().st_size, 8 + self.header_room + self.offset
        if size != want:
            raise StoreError(f"{self.tmp} holds {size} bytes after writing shard {self.index}, expected {want}: "
                             "a write was lost")
        os.chmod(self.tmp, 0o644)  # readable by the training job's user, whoever ran the dump
        os.replace(self.tmp, self.data_path)
        self.meta = {"format": FORMAT_VERSION, "settings_hash": self.writer.hash, "codec": str(self.writer.codec),
                     "bases_sha256": self.writer.bases_sha256, "shard": self.index,
                     "n_shards": self.writer.n_shards, "samples": self.records,
                     "bytes": self.data_path.stat().st_size,
                     "header_sha256": hashlib.sha256(struct.pack("<Q", len(header)) + header).hexdigest(),
                     "tensor_sha256": hashlib.sha256(b"".join(self.digests)).hexdigest(), "valid_tokens": self.tokens,
                     "written_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_text(self.meta_path, json.dumps(self.meta, indent=1))
        return self.meta

    def _shutdown(self) -> None:
        self.flusher.shutdown()    # waits for a running sync before the file closes
        self.hasher.shutdown()
        self.fh.close()

    def abort(self) -> None:
        self._shutdown()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardStream":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.close()
        except BaseException:
            self.abort()
            raise


@dataclass(frozen=True)
class _Entry:
    shard: int
    sample_id: str
    names: tuple[str, ...]


class TeacherKVStore(torch.utils.data.Dataset):
    """Memory-mapped reader over a finished store; item i is {name: tensor} plus "id".

    Opening checks the manifest (see `read_manifest`), that every shard is present, made with the store's settings
    and agrees with its JSON record, and (verify=True) every digest: a damaged or missing shard is an error naming
    the file, never skipped data. Whether the store suits a training run is `provenance.open_store_for_run`'s job.
    """

    def __init__(self, root: str | os.PathLike, verify: bool = True):
        self.root = Path(root)
        manifest = read_manifest(self.root)
        self.settings = manifest["settings"]
        self.hash = manifest["settings_hash"]
        self.n_shards = manifest["n_shards"]
        self.codec = store_codec(self.settings)
        self.bases: dict[str, Basis] | None = None
        bases_sha256 = None
        self.bases_bytes = 0
        if self.codec.lowrank:
            self.bases, bases_sha256 = read_bases(self.root)
            self.bases_bytes = (self.root / BASES).stat().st_size
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
            meta = _read_json(meta_path)
            check_shard_codec(meta_path, meta, self.codec, bases_sha256)
            if meta.get("settings_hash") != self.hash:
                raise StoreError(f"{meta_path} was made with other settings ({meta.get('settings_hash')} != "
                                 f"{self.hash}): mixed shards")
            check_shard(data_path, meta, verify)
            size = data_path.stat().st_size
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
        item = assemble(item, self.codec, self.bases)
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


def check_shard_codec(meta_path: Path, meta: Mapping[str, Any], codec: Codec, bases_sha256: str | None) -> None:
    """Refuse a shard encoded with another codec or on other low-rank bases than its store, naming both values
    (checked before the settings hash, whose mismatch would not say what differs)."""
    found = meta.get("codec", "bf16")
    if found != str(codec):
        raise StoreError(f"{meta_path} was dumped with codec {found!r}, its store ({MANIFEST}) with {str(codec)!r}: "
                         "refusing to mix codecs across shards; re-dump the shard with the store's --codec")
    if codec.lowrank and meta.get("bases_sha256") != bases_sha256:
        raise StoreError(f"{meta_path} was encoded on low-rank bases with sha256 {meta.get('bases_sha256')}, but the "
                         f"store's {BASES} has sha256 {bases_sha256}: a damaged {BASES} or bases mixed across shards; "
                         "re-dump the store")


def read_bases(root: Path) -> tuple[dict[str, Basis], str]:
    """A low-rank store's bases and the sha256 of their file (which every shard's record must name)."""
    path = Path(root) / BASES
    if not path.exists():
        raise StoreError(f"{path} not found: a low-rank store keeps its bases there (re-dump the store)")
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    try:
        tensors = load_safetensors(raw)
        (header_len,) = struct.unpack("<Q", raw[:8])
        meta = json.loads(json.loads(raw[8:8 + header_len])["__metadata__"]["bases"])
        bases = {name: Basis(tensors[name], int(m["heads"]), int(m["head_dim"]), tuple(m["ranks"]))
                 for name, m in meta.items()}
    except Exception as err:  # any parse failure of a damaged file: name the file, not the parser's internals
        raise StoreError(f"{path} cannot be read ({type(err).__name__}: {err}): damaged bases file "
                         f"(sha256 {digest})") from None
    return bases, digest


def _digest(data) -> bytes:
    return hashlib.sha256(data).digest()


def check_shard(data_path: Path, meta: Mapping[str, Any], verify: bool) -> None:
    """Raise StoreError naming `data_path` unless it agrees with its JSON record `meta`: its size, and (format 2)
    the header's digest and the header's offsets ending exactly at the end of the file; `verify` also checks the
    digest of every byte. A write that lost bytes leaves a file its own header does not describe."""
    if not data_path.exists():
        raise StoreError(f"shard data file {data_path} is missing (its record {data_path.with_suffix('.json').name} "
                         "exists)")
    size = data_path.stat().st_size
    if size != meta.get("bytes"):
        raise StoreError(f"{data_path} has {size} bytes, its record says {meta.get('bytes')}: damaged file")
    if "sha256" in meta:                                  # format 1: one digest over the whole file
        if verify and sha256_file(data_path) != meta["sha256"]:
            raise StoreError(f"{data_path} fails its sha256 check: damaged file")
        return
    with open(data_path, "rb") as fh:
        length = fh.read(8)
        # a damaged length field can claim any size: read no more than the file holds
        head = length + fh.read(min(struct.unpack("<Q", length)[0], size) if len(length) == 8 else 0)
    if len(length) != 8 or hashlib.sha256(head).hexdigest() != meta.get("header_sha256"):
        raise StoreError(f"{data_path} fails its sha256 check (header): damaged file")
    # the header is intact, so its offsets can be trusted to find the tensors
    entries = json.loads(head[8:])
    spans = sorted(e["data_offsets"] for key, e in entries.items() if key != "__metadata__")
    end = len(head) + (spans[-1][1] if spans else 0)
    if end != size:
        raise StoreError(f"{data_path} has {size} bytes but its header describes {end}: damaged file")
    if not verify:
        return
    chunks = [(at, min(at + HASH_CHUNK, stop)) for start, stop in spans for at in range(start, stop, HASH_CHUNK)]
    with open(data_path, "rb") as fh, ThreadPoolExecutor(HASH_THREADS) as pool:
        def chunk_digest(chunk):
            return _digest(os.pread(fh.fileno(), chunk[1] - chunk[0], len(head) + chunk[0]))
        digests = list(pool.map(chunk_digest, chunks))
    if hashlib.sha256(b"".join(digests)).hexdigest() != meta.get("tensor_sha256"):
        raise StoreError(f"{data_path} fails its sha256 check: damaged file")


def read_manifest(root: Path) -> dict:
    """The store's manifest.json, checked: its fields are present, `n_shards` is a positive integer and the settings
    hash is recomputed from the settings (a hand-edited manifest is refused)."""
    path = Path(root) / MANIFEST
    if not path.exists():
        raise StoreError(f"{path} not found: {root} is not a teacher-KV store (make one with `python -m kvfuse dump`)")
    manifest = _read_json(path)
    missing = [key for key in ("settings", "settings_hash", "n_shards") if key not in manifest]
    if missing:
        raise StoreError(f"{path} lacks {missing}: damaged manifest")
    n_shards = manifest["n_shards"]
    if not isinstance(n_shards, int) or isinstance(n_shards, bool) or n_shards < 1:
        raise StoreError(f"{path}: n_shards is {n_shards!r}; a store has at least one shard: damaged manifest")
    if not isinstance(manifest["settings"], dict):
        raise StoreError(f"{path}: settings must be a mapping, got {type(manifest['settings']).__name__}")
    recomputed = settings_hash(manifest["settings"])
    if recomputed != manifest["settings_hash"]:
        raise StoreError(f"{path}: its settings hash to {recomputed}, not to the recorded {manifest['settings_hash']}:"
                         " the manifest was edited after the dump; re-dump the store instead")
    return manifest


def _read_json(path: Path) -> dict:
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StoreError(f"{path} is not valid JSON ({err}): damaged manifest") from None
    if not isinstance(data, dict):
        raise StoreError(f"{path} holds a {type(data).__name__}, not a JSON object: damaged manifest")
    return data


def differing_keys(a: Mapping[str, Any], b: Mapping[str, Any], only: Iterable[str] | None = None) -> list[str]:
    keys = sorted(set(a) | set(b)) if only is None else sorted(only)
    return [k for k in keys if json.dumps(a.get(k), default=str, sort_keys=True)
            != json.dumps(b.get(k), default=str, sort_keys=True)]


def _diff(a: Mapping[str, Any], b: Mapping[str, Any], only: Iterable[str] | None = None) -> str:
    return "; ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in differing_keys(a, b, only))


def iter_shard_indices(n_items: int, index: int, n_shards: int) -> Iterator[int]:
    """Items of shard `index`: a strided slice, so shards stay balanced and the assignment is deterministic."""
    return iter(range(index, n_items, n_shards))
