"""Training batches read from an offline teacher-KV store ahead of the step that needs them.

A 1.5B student step consumes ~170 KB of stored KV per token; read, decoded and collated on the training thread that
cost more than the step itself (bench/NOTES.md, "store read"). Here each DataLoader item is one whole micro-batch
(read + collate + NaN check), so `workers` processes prepare the next batches — into pinned memory on a GPU
machine — while the current one trains, and the order stays exactly the one the caller asked for (resume-safe).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from kvfuse.teacher.builder import collate
from kvfuse.teacher.store import TeacherKVStore


def check_finite_teachers(batch: dict[str, Any]) -> dict[str, Any]:
    """Refuse a batch whose teacher KV holds NaN/Inf, naming the samples (a corrupt teacher poisons every step)."""
    for kind in ("teacher_k", "teacher_v"):
        for i, t in enumerate(batch[kind]):
            if not torch.isfinite(t).all():
                raise ValueError(f"{kind}[{i}] of samples {batch['ids']} has NaN/Inf values")
    return batch


class StoreBatches(Dataset):
    """Item j = the collated micro-batch of the sample ids in `id_batches[j]`."""

    def __init__(self, store: TeacherKVStore, id_batches: Sequence[Sequence[str]], n_teachers: int, pad_id: int):
        self.store, self.n_teachers, self.pad_id = store, n_teachers, pad_id
        self.id_batches = [list(b) for b in id_batches]

    def __len__(self) -> int:
        return len(self.id_batches)

    def __getitem__(self, j: int) -> dict[str, Any]:
        samples = [dict(self.store.get(sample_id)) for sample_id in self.id_batches[j]]
        return check_finite_teachers(collate(samples, self.n_teachers, pad_id=self.pad_id))


def store_loader(store: TeacherKVStore, id_batches: Sequence[Sequence[str]], n_teachers: int, pad_id: int = 0,
                 workers: int = 2, pin_memory: bool = False, prefetch: int = 2) -> DataLoader:
    """Iterate the collated micro-batches of `id_batches` in order; `workers=0` reads on the calling thread."""
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    return DataLoader(StoreBatches(store, id_batches, n_teachers, pad_id), batch_size=None, shuffle=False,
                      num_workers=workers, pin_memory=pin_memory, prefetch_factor=prefetch if workers else None)
