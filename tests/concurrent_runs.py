"""Independent subprocess runs of one test, started side by side instead of one after the other.

A tiny-model run spends most of its wall time starting up (imports, model and DeepSpeed set-up), which keeps about
one core busy; on the 2-core CI machine two such runs together take little more wall time than one. Only runs whose
inputs do not depend on each other go together; `concurrently` waits for every one of them (no timing, no polling)
and hands back each one's own result, so the assertions that follow are those of the one-after-the-other version.
"""
from __future__ import annotations

import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any


def concurrently(*calls: Callable[[], Any], at_once: int | None = None) -> list[Any]:
    """Runs the calls in threads (each typically waits on a subprocess), `at_once` of them at a time (default: all),
    and returns their results in order; once all have ended, the first call that raised (in argument order) raises
    here."""
    with ThreadPoolExecutor(max_workers=min(len(calls), at_once or len(calls))) as pool:
        futures = [pool.submit(call) for call in calls]
    return [future.result() for future in futures]


def world_of_one_envs(n: int) -> list[dict[str, str]]:
    """Environment entries that make each of `n` concurrent `python train/main.py` runs a world of one, as it makes
    itself without them, but on rendezvous ports that differ from each other: every port is held at once while they
    are picked, so siblings cannot draw the same one (DeepSpeed's CPU shared-memory names include the port too)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        ports = [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
    return [{"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            for port in ports]


def distinct_ports(n: int) -> list[int]:
    """`n` TCP ports of 127.0.0.1, free now and different from each other."""
    return [int(env["MASTER_PORT"]) for env in world_of_one_envs(n)]
