"""Fixtures shared across test files. Each packaged real model is loaded once per test session (seconds each, and
a one-off conversion of minutes on a fresh machine) instead of once per test that needs it; tests must not modify
these models (they come in eval mode; capture hooks are removed after use)."""
from __future__ import annotations


import pytest

from kvfuse.net import free_port


@pytest.fixture(name="free_port")
def free_port_fixture() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on: for a launcher's rendezvous, or a connection sure to be
    refused. A fixed port would collide with another test run on the same machine."""
    return free_port()


def _load_packaged(alias: str):
    from kvfuse.models.load import load

    model, tokenizer = load(alias)
    model.requires_grad_(False)  # a test that tries to train a shared model fails loudly instead of changing it
    return model, tokenizer


@pytest.fixture(scope="session")
def smollm2_model():
    """(model, tokenizer) of the packaged SmolLM2-135M-Instruct, fp32 on the CPU."""
    return _load_packaged("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma3_model():
    """(model, tokenizer) of the packaged Gemma 3 270M, fp32 on the CPU."""
    return _load_packaged("gemma3-270m")


@pytest.fixture
def count_host_reads(monkeypatch):
    """`with count_host_reads() as reads: ...` counts in `reads.n` the reads of device values by the host (on the
    GPU each waits for every kernel queued before it): aten._local_scalar_dense (item, bool(), int() of a tensor)
    on this thread, where the dispatch mode is active, and Tensor.tolist on any thread (a worker's reads too)."""
    from contextlib import contextmanager

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    active: list[Reads] = []
    tolist = torch.Tensor.tolist

    def counted_tolist(t):
        for reads in active:
            reads.n += 1
        return tolist(t)
    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)

    @contextmanager
    def count():
        reads = Reads()
        active.append(reads)
        try:
            with reads:
                yield reads
        finally:
            active.remove(reads)
    return count
