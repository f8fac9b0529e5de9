"""kvfuse.backend.resolve_backend: the one meaning of backend="auto" for the KV loss and the attention KL."""
from types import SimpleNamespace

import pytest
import torch

from kvfuse.backend import resolve_backend


def _tensor(cuda: bool, dtype: torch.dtype):
    # only the device flag and dtype matter, so no GPU is needed to check the CUDA branch
    return SimpleNamespace(is_cuda=cuda, dtype=dtype)


@pytest.mark.parametrize("tensors, want", [
    ([_tensor(True, torch.bfloat16), _tensor(True, torch.float32)], "triton"),
    ([_tensor(True, torch.float16)], "triton"),
    ([_tensor(True, torch.float64)], "torch"),                           # Triton takes no float64
    ([_tensor(True, torch.float32), _tensor(False, torch.float32)], "torch"),
    ([torch.zeros(2)], "torch"),                                          # the CPU
])
def test_auto_picks_triton_only_for_cuda_tensors_of_a_triton_dtype(tensors, want):
    assert resolve_backend("auto", *tensors) == want


def test_explicit_backends_are_kept_and_others_refused():
    assert resolve_backend("torch", _tensor(True, torch.bfloat16)) == "torch"
    assert resolve_backend("triton", torch.zeros(2)) == "triton"
    with pytest.raises(ValueError, match=r"backend must be one of \('torch', 'triton', 'auto'\), got None"):
        resolve_backend(None, torch.zeros(2))
