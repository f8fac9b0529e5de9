"""Import a Triton op module: `kvfuse.kernels.<name>` once installed, the source tree's `kernels/<name>` in a bare
checkout (e.g. `PYTHONPATH=.` on the GPU machine, where the package is not installed)."""
from __future__ import annotations

import importlib
from types import ModuleType


def kernel_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(f"kvfuse.kernels.{name}")
    except ModuleNotFoundError as err:
        if err.name not in ("kvfuse.kernels", f"kvfuse.kernels.{name}"):
            raise
        return importlib.import_module(f"kernels.{name}")
