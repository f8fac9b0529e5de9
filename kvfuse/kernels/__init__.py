"""Triton kernels and their operators; imported lazily by kvfuse.loss and kvfuse.attention (Triton loads only when a
Triton backend is asked for)."""
