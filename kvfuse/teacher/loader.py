"""Training batches read from an offline teacher-KV store ahead of the step that needs them, onto its device.

A 1.5B student step consumes ~170 KB of stored KV per token, 1.4 GB per 8k-token batch. A background thread reads
the memory-mapped samples, collates them straight into pinned host memory (torch's large copies run on several
cores and release the GIL), copies the batch to the GPU on a CUDA stream of its own and checks it for NaN/Inf there,
so the training thread only waits on an event. Threads and not DataLoader worker processes: a worker's batch
crosses into the trainer through shared memory and is copied once more into pinned memory by a single thread,
which on the H100 made the step twice as slow as the step alone (bench/NOTES.md).
The order is exactly the caller's (resume-safe); an error (a damaged sample, NaN) is raised at its batch's turn.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator, Sequence

import torch

from kvfuse.codecs import finite_flag, finite_parts, is_encoded
from kvfuse.teacher.builder import collate
from kvfuse.teacher.store import TeacherKVStore


def check_finite_teachers(batch: dict[str, Any]) -> dict[str, Any]:
    """Refuse a batch whose teacher KV holds NaN/Inf, naming the entries, their parts and the samples (a corrupt
    teacher poisons every step). One flag per part (`finite_flag`: no copy, no full-size temporary) and one host
    sync per batch, because on the GPU this runs on the loader's stream while the training step runs."""
    named = [(name, t) for kind in ("teacher_k", "teacher_v") for i, entry in enumerate(batch[kind])
             for name, t in finite_parts(entry, f"{kind}[{i}]")]
    if named:
        flags = torch.stack([finite_flag(t) for _, t in named])
        if flags.is_cuda:
            # Wait here, not inside the copy to host: `.tolist()` alone is a copy to pageable memory queued behind
            # the batch's host-to-device copies, and while it waits the training thread's launches stall
            # (bench/NOTES.md, "What stalled bf16's store-fed step": +53 ms a step beside a reader, +4 ms for the
            # copies alone).
            torch.cuda.current_stream(flags.device).synchronize()
        ok = flags.tolist()
        bad = [name for (name, _), good in zip(named, ok) if not good]
        if bad:
            raise ValueError(f"{', '.join(bad)} of samples {batch['ids']} {'has' if len(bad) == 1 else 'have'} "
                             "NaN/Inf values")
    return batch


def batch_to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Every tensor of a collated batch (lists of tensors too, compressed teacher entries too) on `device`,
    asynchronously from pinned memory."""
    def movable(t) -> bool:
        return torch.is_tensor(t) or is_encoded(t)

    def move(t):
        return t.to(device, non_blocking=True)
    return {k: ([move(t) for t in v] if isinstance(v, list) and v and movable(v[0])
                else move(v) if movable(v) else v) for k, v in batch.items()}


def _tensors(batch: dict[str, Any]) -> Iterator[torch.Tensor]:
    for value in batch.values():
        for t in value if isinstance(value, list) else [value]:
            if torch.is_tensor(t):
                yield t
            elif is_encoded(t):
                yield from t.tensors()


def store_batches(store: TeacherKVStore, id_batches: Sequence[Sequence[str]], n_teachers: int, pad_id: int = 0,
                  device: str | torch.device = "cpu", prefetch: int = 2) -> Iterator[dict[str, Any]]:
    """The collated micro-batches of `id_batches`, in order, on `device`, with `prefetch` of them prepared ahead by
    a background thread (0: read on the calling thread)."""
    if prefetch < 0:
        raise ValueError(f"prefetch must be >= 0, got {prefetch}")
    device = torch.device(device)
    cuda = device.type == "cuda"
    side = torch.cuda.Stream(device) if cuda else None

    def load(ids: Sequence[str]) -> tuple[dict[str, Any], torch.cuda.Event | None]:
        batch = collate([dict(store.get(sample_id)) for sample_id in ids], n_teachers, pad_id, pin_memory=cuda)
        if not cuda:
            return check_finite_teachers(batch), None
        with torch.cuda.stream(side):
            moved = check_finite_teachers(batch_to(batch, device))   # the check waits for this stream only
            ready = torch.cuda.Event()
            ready.record(side)
        return moved, ready

    def hand_over(loaded: tuple[dict[str, Any], torch.cuda.Event | None]) -> dict[str, Any]:
        batch, ready = loaded
        if ready is not None:
            current = torch.cuda.current_stream(device)
            current.wait_event(ready)
            for t in _tensors(batch):
                if t.device.type == "cuda":
                    t.record_stream(current)   # made on the side stream, used and freed on this one
        return batch

    if prefetch == 0:
        for ids in id_batches:
            yield hand_over(load(ids))
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvfuse-store") as pool:
        pending: deque[Future] = deque()
        try:
            for ids in id_batches:
                pending.append(pool.submit(load, ids))
                if len(pending) > prefetch:
                    yield hand_over(pending.popleft().result())
            while pending:
                yield hand_over(pending.popleft().result())
        finally:
            for job in pending:
                job.cancel()
