"""Host-side ceilings of the dump and the store reader on this machine: device→host copies (pageable fresh,
pageable reused, pinned), sha256, and file writes with and without fsync. One CSV row per probe.

    python -m bench.probe_host_io --mb 1024 --csv $OUT/host_io.csv
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

from bench.common import append_csv, commit, device_name


def rate(fn, nbytes: int, repeats: int = 3) -> float:
    """Best GB/s over `repeats` calls."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1024)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the write probes write")
    parser.add_argument("--csv", default=str(ROOT / "bench/results/host_io.csv"))
    args = parser.parse_args()
    n = args.mb << 20
    probes = {}
    host = torch.randint(0, 255, (n,), dtype=torch.uint8)
    if torch.cuda.is_available():
        gpu = host.cuda()
        reused = torch.empty(n, dtype=torch.uint8)
        reused.fill_(1)
        pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)

        def synced(fn):
            def run():
                fn()
                torch.cuda.synchronize()
            return run
        probes["d2h pageable, fresh"] = rate(synced(lambda: gpu.cpu()), n)
        probes["d2h pageable, reused"] = rate(synced(lambda: reused.copy_(gpu)), n)
        probes["d2h pinned, reused"] = rate(synced(lambda: pinned.copy_(gpu, non_blocking=True)), n)
        probes["d2h pinned, cached alloc"] = rate(synced(
            lambda: torch.empty(n, dtype=torch.uint8, pin_memory=True).copy_(gpu, non_blocking=True)), n)
    view = memoryview(host.numpy())
    probes["sha256"] = rate(lambda: hashlib.sha256(view).digest(), n)
    probes["host memcpy, fresh"] = rate(lambda: host.clone(), n)
    path = Path(args.dir) / f"kvfuse-probe-{os.getpid()}"

    def write(sync: bool):
        def run():
            with open(path, "wb", buffering=0) as fh:
                fh.write(view)
                if sync:
                    os.fsync(fh.fileno())
        return run
    probes["file write, no fsync"] = rate(write(False), n)
    probes["file write + fsync"] = rate(write(True), n)
    path.unlink()
    name = device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"{name}, {args.mb} MB, writes to {args.dir}")
    for probe, gbps in probes.items():
        print(f"{probe:28s} {gbps:7.2f} GB/s")
    append_csv(args.csv, [{"device": name, "commit": commit(), "mb": args.mb, "probe": probe,
                           "gb_per_s": round(gbps, 3)} for probe, gbps in probes.items()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
