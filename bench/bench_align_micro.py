"""CPU microbenchmarks (pytest-benchmark) of the alignment builder on 4k-token spans; each also checks its result.
Run them with `python -m pytest bench/bench_align_micro.py` (kept out of the unit suite: timing is not a test;
tests/test_iou_alignment.py holds the builder's correctness). The full comparison on real tokenizers is
`python -m bench.bench_align`.
"""
import numpy as np
import pytest

from kvfuse import _C
from kvfuse.align.tokens import reference_iou_alignment


def spans_4k(seed: int) -> np.ndarray:
    """~4k word-like spans over one text: gaps, byte-piece duplicates and zero-width special tokens."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 9, size=4096)
    starts = np.cumsum(lengths + rng.integers(0, 2, size=4096)) - lengths
    spans = np.stack([starts, starts + lengths], 1)
    dup = rng.random(4096) < 0.05
    spans[1:][dup[1:]] = spans[:-1][dup[1:]]
    special = rng.random(4096) < 0.01
    spans[special] = 0
    return spans.astype(np.int64)


@pytest.fixture(scope="module")
def spans():
    s, t = spans_4k(0), spans_4k(1)
    return s, t, reference_iou_alignment(s, t, threshold=0.1, fallback="nearest")


@pytest.mark.benchmark(group="iou_alignment 4k")
def test_bench_cxx_builder(benchmark, spans):
    s, t, want = spans
    got = benchmark(_C.iou_alignment, s, t, threshold=0.1, fallback="nearest")
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


@pytest.mark.benchmark(group="iou_alignment 4k")
def test_bench_cxx_batch_of_8(benchmark, spans):
    s, t, want = spans
    got = benchmark(_C.iou_alignment_batch, [s] * 8, [t] * 8, 0.1, True, "nearest", 0)
    for sample in got:
        for g, w in zip(sample, want):
            np.testing.assert_array_equal(g, w)


@pytest.mark.benchmark(group="iou_alignment 4k")
def test_bench_python_reference(benchmark, spans):
    s, t, want = spans
    got = benchmark.pedantic(reference_iou_alignment, args=(s, t), kwargs=dict(threshold=0.1, fallback="nearest"),
                             rounds=3, iterations=1)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
