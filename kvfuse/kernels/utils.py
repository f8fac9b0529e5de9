"""What every Triton op here shares: interpreter detection, the tensor-core operand dtype, autotune configs, small
device constants."""
from __future__ import annotations

import functools
import os
from collections.abc import Iterable

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (kernels run on the CPU through Triton's interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_dtype(dtypes: Iterable[torch.dtype]):
    """(tl operand dtype, torch dtype of fp buffers the kernel writes for the dot, 'ieee' fp32 products?).

    One shared half dtype runs on half tensor cores with fp32 accumulation; anything else runs in fp32 with
    'ieee' products (tf32 would miss the fp32 tolerances). Under TRITON_INTERPRET=1 tl.dot on bf16 operands
    returns garbage (triton 3.9), so bf16 is upcast there and 'ieee' is meaningless (numpy products)."""
    kinds = set(dtypes)
    if len(kinds) == 1 and kinds <= {torch.bfloat16, torch.float16}:
        dt = kinds.pop()
        if dt == torch.bfloat16 and interpreting():
            return tl.float32, torch.float32, False
        return (tl.bfloat16 if dt == torch.bfloat16 else tl.float16), dt, False
    return tl.float32, torch.float32, not interpreting()


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for host code: triton.cdiv is a constexpr_function since triton 3.5, and its argument unwrapping costs
    microseconds per call — tens of calls per step of the fused loss, host time small batches cannot hide."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ≥ n (n ≥ 1), for host code, for the reason `cdiv` gives."""
    return 1 << (n - 1).bit_length()


def autotune_configs(options, pre_hook=None) -> list[triton.Config]:
    """[(meta dict, num_warps, num_stages)] -> triton.Configs sharing one pre-hook."""
    return [triton.Config(dict(meta), num_warps=w, num_stages=s, pre_hook=pre_hook) for meta, w, s in options]


def define_op(fn, fake):
    """Register `fn` (type-annotated) as the CPU and CUDA kernel of the operator kvfuse::<fn.__name__>, with `fake`
    computing its outputs' shapes for torch.compile (FakeTensor/meta); returns torch.ops.kvfuse.<name>.

    This is torch.library's plain define/impl: the dispatcher calls `fn` directly. torch.library.custom_op would
    wrap every call in Python layers (an autograd kernel, output aliasing checks, pytree handling) that cost more
    host time per step than the fused loss's kernels take on the GPU at small batches (bench/NOTES.md); so the
    ops here carry no autograd formula and each op's gradient lives in a torch.autograd.Function around it."""
    name = f"kvfuse::{fn.__name__}"
    torch.library.define(name, torch.library.infer_schema(fn, mutates_args=()))
    torch.library.impl(name, ("cpu", "cuda"), fn)
    torch.library.register_fake(name, fake)
    return getattr(torch.ops.kvfuse, fn.__name__)


@functools.lru_cache(maxsize=64)
def _cached_constant(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def host_constant(values, dtype: torch.dtype, device) -> torch.Tensor:
    """A small tensor of Python values (nested tuples for more than one dim) on `device`, without a host sync per
    call: a copy from host memory waits for the stream, which would stall every step, so eager calls reuse one
    cached copy (never written to); under torch.compile the values are graph constants."""
    if torch.compiler.is_compiling():
        return torch.tensor(tuple(values), dtype=dtype, device=device)
    return _cached_constant(tuple(values), dtype, torch.device(device))
