"""Hugging Face hub access for the command-line entry points: offline mode when the hub cannot be reached.

Without it, a model name that is neither a tiny, packaged nor local model costs about a minute of download
retries on a machine without network before the (clear) error arrives; in offline mode it arrives at once.
"""
from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlsplit

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def hub_reachable(endpoint: str, timeout: float = 2.0) -> bool:
    """True when a TCP connection to `endpoint`'s host opens within `timeout` seconds (DNS included)."""
    parts = urlsplit(endpoint)
    if not parts.hostname:
        raise ValueError(f"Hugging Face endpoint {endpoint!r} has no host name (check HF_ENDPOINT)")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    result = []

    def connect():
        try:
            socket.create_connection((parts.hostname, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    # Name resolution ignores socket timeouts; a daemon thread bounds the whole probe.
    probe = threading.Thread(target=connect, daemon=True, name="kvfuse-hub-probe")
    probe.start()
    probe.join(timeout)
    return bool(result and result[0])


def offline_unless_reachable(timeout: float = 2.0) -> bool:
    """Switch this process (and its children) to Hugging Face offline mode when the user has not chosen a mode
    (neither HF_HUB_OFFLINE nor TRANSFORMERS_OFFLINE is set) and the hub does not answer within `timeout`
    seconds. Returns whether the process is now offline. An explicit HF_HUB_OFFLINE=0 keeps it online unprobed."""
    from huggingface_hub import constants

    if any(name in os.environ for name in OFFLINE_VARIABLES):
        return bool(constants.HF_HUB_OFFLINE)
    if hub_reachable(constants.ENDPOINT, timeout):
        return False
    os.environ["HF_HUB_OFFLINE"] = "1"  # inherited by DeepSpeed ranks and other child processes
    # huggingface_hub read the variable when it was imported (just above, at the latest); transformers asks it.
    constants.HF_HUB_OFFLINE = True
    return True
