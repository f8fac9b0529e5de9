"""Which implementation of a loss term runs: the readable PyTorch reference or the Triton kernel."""
from __future__ import annotations

import torch

BACKENDS = ("torch", "triton", "auto")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """"torch" or "triton" as given; "auto" is "triton" when every tensor is a CUDA tensor of a Triton dtype
    (fp16/bf16/fp32) and "torch" otherwise (the CPU, float64)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    return "triton" if all(t.is_cuda and t.dtype in TRITON_DTYPES for t in tensors) else "torch"
