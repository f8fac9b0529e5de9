"""bench/stage_models.py: pieces that fit a call, byte-exact re-assembly on the other side, damaged pieces caught,
every step idempotent, and the GPU side's "already converted" check agreeing with this machine's cache."""
from __future__ import annotations

import random

import pytest

from bench import stage_models as sm


@pytest.fixture()
def sources(tmp_path):
    rng = random.Random(0)
    out = []
    for name, size in (("a.bin", 2500), ("b.bin", 7000), ("c.bin", 10)):
        path = tmp_path / "src" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(bytes(rng.randrange(256) for _ in range(size)))
        out.append(sm.Source(f"blobs/{name}", path, "blob"))
    return out


def _split(tmp_path, sources, budget=3000, piece=2000):
    # call_limit chosen so that the budget for pieces is `budget` bytes whatever the repository's tree weighs
    limit = budget + sm.tree_bytes() + sm.MARGIN
    return sm.split(tmp_path / "stage", piece_bytes=piece, call_limit=limit, sources=sources)


def test_plan_fills_calls_in_order_within_the_budget():
    sizes = {"x": 2500, "y": 7000}
    calls = sm.plan_pieces(list(sizes.items()), budget=3000, piece_bytes=2000)
    assert [sum(p["bytes"] for p in c) for c in calls] == [3000, 3000, 3000, 500]
    assert all(p["bytes"] <= 2000 for c in calls for p in c)
    # the first file is whole before the second starts, and the pieces tile each file exactly
    for name, size in sizes.items():
        pieces = [p for c in calls for p in c if p["file"] == name]
        assert [p["offset"] for p in pieces] == [sum(q["bytes"] for q in pieces[:i]) for i in range(len(pieces))]
        assert sum(p["bytes"] for p in pieces) == size
    assert [p["file"] for p in calls[0]] == ["x", "x", "y"] and [p["file"] for p in calls[1]] == ["y", "y"]


def test_split_then_receive_reassembles_byte_exact_and_is_idempotent(tmp_path, sources):
    manifest = _split(tmp_path, sources)
    calls = sorted((tmp_path / "stage").glob("call*"))
    assert len(calls) == len(manifest["calls"]) == 4
    for call in calls:
        carried = sum(p.stat().st_size for p in call.iterdir() if p.name != "manifest.json")
        assert carried <= 3000
    home = tmp_path / "home"
    # calls may arrive in any order; a file is assembled once all of its pieces are there
    states = []
    for call in reversed(calls):
        m, new = sm.receive_pieces(call, home)
        assert new
        states.append(sm.assemble_ready(m, home))
    assert states[0]["blobs/a.bin"] == "waiting 0/2 pieces" and states[0]["blobs/c.bin"] == "ready"
    assert set(states[-1].values()) == {"ready"}
    for src in sources:
        assert (home / "files" / src.name).read_bytes() == src.path.read_bytes()
    # again: nothing new is copied, the assembled files are kept as they are
    before = {p: p.stat().st_mtime_ns for p in (home / "files").rglob("*") if p.is_file()}
    for call in calls:
        assert sm.receive_pieces(call, home)[1] == []
    assert set(sm.assemble_ready(manifest, home).values()) == {"ready"}
    assert before == {p: p.stat().st_mtime_ns for p in (home / "files").rglob("*") if p.is_file()}


def test_damaged_piece_is_refused_and_nothing_bad_is_kept(tmp_path, sources):
    _split(tmp_path, sources)
    call = tmp_path / "stage" / "call01"
    piece = next(p for p in sorted(call.iterdir()) if p.name != "manifest.json")
    data = bytearray(piece.read_bytes())
    data[len(data) // 2] ^= 0xFF
    piece.write_bytes(bytes(data))
    home = tmp_path / "home"
    with pytest.raises(sm.StageError, match="wrong sha256"):
        sm.receive_pieces(call, home)
    assert not (home / "pieces" / piece.name).exists()
    assert not list((home / "pieces").glob("*.tmp"))


def test_damaged_piece_already_at_home_is_caught_at_assembly_and_replaced_by_a_good_one(tmp_path, sources):
    manifest = _split(tmp_path, sources)
    home = tmp_path / "home"
    for call in sorted((tmp_path / "stage").glob("call*")):
        sm.receive_pieces(call, home)
    first = manifest["calls"][0][0]["id"]
    good = (home / "pieces" / first).read_bytes()
    (home / "pieces" / first).write_bytes(b"\0" + good[1:])     # damaged on disk after it was received
    with pytest.raises(sm.StageError, match="re-assembled .* wrong sha256"):
        sm.assemble_ready(manifest, home)
    m, new = sm.receive_pieces(tmp_path / "stage" / "call01", home)   # the call again: the piece is checked, replaced
    assert first in new
    assert set(sm.assemble_ready(m, home).values()) == {"ready"}


def test_pieces_of_another_split_are_refused(tmp_path, sources):
    _split(tmp_path, sources)
    home = tmp_path / "home"
    sm.receive_pieces(tmp_path / "stage" / "call01", home)
    sources[0].path.write_bytes(b"changed")
    other = tmp_path / "other"
    sm.split(other, piece_bytes=2000, call_limit=3000 + sm.tree_bytes() + sm.MARGIN, sources=sources)
    with pytest.raises(sm.StageError, match="another split"):
        sm.receive_pieces(other / "call01", home)


def test_split_refuses_a_call_budget_the_tree_fills(tmp_path, sources):
    with pytest.raises(sm.StageError, match="no room"):
        sm.split(tmp_path / "stage", call_limit=sm.tree_bytes(), sources=sources)


def test_gpu_side_sees_this_machines_conversion_as_done(smollm2_model):
    """receive skips a model whose cache record names the GGUF it brings: the record this machine's conversion
    wrote names the same sha256 that split puts in the manifest."""
    from kvfuse.models.packaged import converted_from, packaged_gguf
    from kvfuse.teacher.store import sha256_file

    gguf = packaged_gguf("smollm2-135m-instruct", work=None)
    assert converted_from("smollm2-135m-instruct") == sha256_file(gguf)


def _gguf_sources(tmp_path, alias, path):
    return [sm.Source(f"gguf/{alias}.gguf", path, "gguf", alias)]


def test_receive_converts_in_the_background_and_reports_it(tmp_path, monkeypatch):
    """The real SmolLM2 GGUF staged into a fresh model cache: receive returns while the conversion runs, status
    says so, and the cache then holds the model converted from exactly the staged file."""
    from kvfuse.models.packaged import converted_from, packaged_gguf
    from kvfuse.teacher.store import sha256_file

    monkeypatch.setenv("KVFUSE_CACHE", str(tmp_path / "cache"))
    gguf = packaged_gguf("smollm2-135m-instruct", work=None)
    manifest = _split(tmp_path, _gguf_sources(tmp_path, "smollm2-135m-instruct", gguf), budget=60_000_000,
                      piece=40_000_000)
    home = tmp_path / "home"
    for c in range(1, len(manifest["calls"]) + 1):
        out = sm.receive(tmp_path / "stage" / f"call{c:02d}", home)
    assert out["models"]["smollm2-135m-instruct"].startswith("converting")
    assert sm.status(home)["models"]["smollm2-135m-instruct"] in ("converting", "ready")
    assert sm.wait_converted(home, timeout_s=600)["models"] == {"smollm2-135m-instruct": "ready"}
    assert converted_from("smollm2-135m-instruct") == sha256_file(gguf)
    # once converted, receiving again starts nothing
    assert sm.receive(tmp_path / "stage" / "call01", home)["models"] == {"smollm2-135m-instruct": "ready"}


def test_a_failed_background_conversion_is_reported_not_retried(tmp_path, monkeypatch, sources):
    monkeypatch.setenv("KVFUSE_CACHE", str(tmp_path / "cache"))
    broken = sources[1].path                       # random bytes, not a GGUF
    _split(tmp_path, _gguf_sources(tmp_path, "smollm2-135m-instruct", broken), budget=60_000, piece=40_000)
    home = tmp_path / "home"
    assert sm.receive(tmp_path / "stage" / "call01", home)["models"]["smollm2-135m-instruct"].startswith("converting")
    with pytest.raises(sm.StageError, match="converting smollm2-135m-instruct failed: .*remove .*failed to try again"):
        sm.wait_converted(home, timeout_s=600)
    assert sm.status(home)["models"]["smollm2-135m-instruct"].startswith("conversion failed")
    with pytest.raises(sm.StageError, match="failed"):
        sm.receive(tmp_path / "stage" / "call01", home)
