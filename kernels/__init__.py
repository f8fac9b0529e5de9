"""Triton kernels and their autograd Functions (installed as kvfuse.kernels)."""
