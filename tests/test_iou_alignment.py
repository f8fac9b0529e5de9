"""kvfuse._C.iou_alignment (C++) against the Python sweep and the quadratic brute force, on random spans."""
import threading

import numpy as np
import pytest
import torch

from kvfuse import _C
from kvfuse.align.tokens import (alignment_matrices, alignment_matrix, dense_iou,
                                 reference_iou_alignment)


def random_spans(rng: np.random.Generator, n: int, text_len: int = 60) -> np.ndarray:
    """Monotone non-empty spans with gaps, overlaps and duplicates, plus zero-width spans anywhere."""
    out, start, end = [], 0, 0
    for _ in range(n):
        kind = rng.random()
        if kind < 0.15:  # zero-width (a special token), anywhere in or past the text
            z = int(rng.integers(0, text_len + 5))
            out.append((z, z))
        elif kind < 0.3 and end > start:  # byte piece of the same character: duplicate span
            out.append((start, end))
        else:
            start = start + int(rng.integers(0, 4))  # may start inside the previous span (overlap)
            end = max(end, start + 1) + int(rng.integers(0, 4))  # may leave a gap before the next
            out.append((start, end))
    return np.asarray(out, dtype=np.int64).reshape(-1, 2)


def csr_to_dense(csr, n_rows, n_cols) -> np.ndarray:
    indptr, indices, values = csr
    out = np.zeros((n_rows, n_cols), dtype=np.float32)
    for r in range(n_rows):
        out[r, indices[indptr[r]:indptr[r + 1]]] = values[indptr[r]:indptr[r + 1]]
    return out


def assert_csr_equal(got, want):
    for g, w, dtype in zip(got, want, (np.int64, np.int64, np.float32)):
        assert g.dtype == dtype
        np.testing.assert_array_equal(g, w)


def test_random_spans_match_reference_and_brute_force():
    rng = np.random.default_rng(1234)
    for case in range(400):
        s = random_spans(rng, int(rng.integers(0, 30)))
        t = random_spans(rng, int(rng.integers(0, 30)))
        threshold = float(rng.choice([0.0, 0.0, 0.25, 0.5, 1.0, rng.random()]))
        normalize = bool(rng.integers(0, 2))
        fallback = "nearest" if rng.integers(0, 2) else "none"
        kw = dict(threshold=threshold, normalize=normalize, fallback=fallback)
        got = _C.iou_alignment(s, t, **kw)
        assert_csr_equal(got, reference_iou_alignment(s, t, **kw))
        dense = dense_iou(s, t, **kw)
        np.testing.assert_array_equal(csr_to_dense(got, len(s), len(t)), dense, err_msg=f"case {case}")
        # Column indices within a row are strictly increasing (a valid CSR for torch).
        for r in range(len(s)):
            assert np.all(np.diff(got[1][got[0][r]:got[0][r + 1]]) > 0)


def test_brute_force_against_float64_formula():
    rng = np.random.default_rng(7)
    s, t = random_spans(rng, 25), random_spans(rng, 31)
    raw = dense_iou(s, t, normalize=False)
    for i, (a, b) in enumerate(s.tolist()):
        for j, (c, d) in enumerate(t.tolist()):
            inter = max(0, min(b, d) - max(a, c))
            want = inter / (max(b, d) - min(a, c)) if inter else 0.0
            assert raw[i, j] == np.float32(want)
    norm = dense_iou(s, t, normalize=True)
    sums = norm.astype(np.float64).sum(1)
    nonempty = raw.sum(1) > 0
    np.testing.assert_allclose(sums[nonempty], 1.0, rtol=1e-6)
    np.testing.assert_array_equal(sums[~nonempty], 0.0)


def test_hand_computed_overlaps_and_duplicates():
    # Student token 1 covers three byte pieces of one character (duplicate teacher spans), and the
    # duplicate student spans 2, 3 must both see teacher token 4 again: the window must not move past it.
    s = np.array([[0, 2], [2, 3], [3, 7], [3, 7]], dtype=np.int64)
    t = np.array([[0, 1], [1, 2], [2, 3], [2, 3], [2, 5], [5, 7]], dtype=np.int64)
    indptr, indices, values = _C.iou_alignment(s, t, normalize=False)
    np.testing.assert_array_equal(indptr, [0, 2, 5, 7, 9])
    np.testing.assert_array_equal(indices, [0, 1, 2, 3, 4, 4, 5, 4, 5])
    np.testing.assert_allclose(values, [0.5, 0.5, 1, 1, 1 / 3, 2 / 5, 2 / 4, 2 / 5, 2 / 4], rtol=1e-7)
    _, _, norm = _C.iou_alignment(s, t)
    np.testing.assert_allclose(norm[2:5], np.array([1, 1, 1 / 3]) / (7 / 3), rtol=1e-6)


def test_identity_and_shift():
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 6, size=17)
    ends = np.cumsum(lengths)
    spans = np.stack([ends - lengths, ends], 1).astype(np.int64)
    a = alignment_matrix(spans, spans).to_dense()
    assert torch.equal(a, torch.eye(17))
    # A student with two extra (zero-width) special tokens in front is a shifted identity.
    student = np.concatenate([np.zeros((2, 2), dtype=np.int64), spans])
    a = alignment_matrix(student, spans).to_dense()
    assert torch.equal(a[2:], torch.eye(17)) and a[:2].abs().sum() == 0


def test_threshold_drops_raw_iou_before_normalising():
    s = np.array([[0, 10]], dtype=np.int64)
    t = np.array([[0, 1], [1, 6], [6, 10]], dtype=np.int64)  # IoU 0.1, 0.5, 0.4
    indptr, indices, values = _C.iou_alignment(s, t, threshold=0.4)
    np.testing.assert_array_equal(indices, [1, 2])
    np.testing.assert_allclose(values, [5 / 9, 4 / 9], rtol=1e-6)
    # threshold 1 keeps only exact matches; none here, so the row is empty...
    assert _C.iou_alignment(s, t, threshold=1.0)[0].tolist() == [0, 0]
    # ...unless the nearest fallback fills it: midpoints 0.5, 3.5, 8 vs 5 → teacher 1.
    _, indices, values = _C.iou_alignment(s, t, threshold=1.0, fallback="nearest")
    assert indices.tolist() == [1] and values.tolist() == [1.0]


def test_nearest_fallback_tie_breaking_and_zero_width_teachers():
    # Student [4, 6) (midpoint 5) overlaps nothing. Teacher 0 ((2, 4) → 3) and teacher 3 ((6, 8) → 7)
    # are equally near, so the lower index wins; the zero-width teacher 1 at 5 is nearer but never chosen.
    s = np.array([[4, 6]], dtype=np.int64)
    t = np.array([[2, 4], [5, 5], [0, 0], [6, 8], [6, 8]], dtype=np.int64)
    _, indices, values = _C.iou_alignment(s, t, fallback="nearest")
    assert indices.tolist() == [0] and values.tolist() == [1.0]
    # Equal spans (same midpoint) → the lowest index of the run.
    t = np.array([[0, 1], [7, 9], [7, 9], [7, 9]], dtype=np.int64)
    s = np.array([[7, 7], [12, 14], [20, 30]], dtype=np.int64)
    indptr, indices, values = _C.iou_alignment(s, t, fallback="nearest")
    assert indptr.tolist() == [0, 1, 2, 3] and indices.tolist() == [1, 1, 1]
    # Zero-width student spans (special tokens) at 0 go to the first non-empty teacher token.
    _, indices, _ = _C.iou_alignment(np.zeros((2, 2), np.int64), t, fallback="nearest")
    assert indices.tolist() == [0, 0]
    # No non-empty teacher token at all: rows stay empty even with the fallback.
    indptr, _, _ = _C.iou_alignment(s, np.array([[3, 3], [0, 0]], np.int64), fallback="nearest")
    assert indptr.tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("n_s,n_t", [(0, 0), (0, 5), (5, 0), (1, 1), (1, 7), (7, 1)])
def test_empty_and_single_token_sides(n_s, n_t):
    rng = np.random.default_rng(n_s * 10 + n_t)
    s, t = random_spans(rng, n_s), random_spans(rng, n_t)
    for fallback in ("none", "nearest"):
        got = _C.iou_alignment(s, t, fallback=fallback)
        assert got[0].shape == (n_s + 1,)
        assert_csr_equal(got, reference_iou_alignment(s, t, fallback=fallback))
        a = alignment_matrix(s, t, fallback=fallback)
        assert a.layout == torch.sparse_csr and a.shape == (n_s, n_t) and a.dtype == torch.float32
        np.testing.assert_array_equal(a.to_dense().numpy(), dense_iou(s, t, fallback=fallback))


def test_any_native_int64_dtype_is_accepted():
    # np.longlong is int64 on this platform but a different dtype object than np.int64.
    s = np.array([[0, 2], [2, 5]], dtype=np.longlong)
    t = np.array([[0, 3], [3, 5]], dtype=np.int64)
    for got, want in zip(_C.iou_alignment(s, t), reference_iou_alignment(s, t)):
        np.testing.assert_array_equal(got, want)


def test_alignment_matrix_accepts_tensors_and_non_contiguous_arrays():
    rng = np.random.default_rng(11)
    s, t = random_spans(rng, 23), random_spans(rng, 19)
    want = dense_iou(s, t, threshold=0.2)
    got = alignment_matrix(torch.from_numpy(s), torch.from_numpy(t), threshold=0.2)
    np.testing.assert_array_equal(got.to_dense().numpy(), want)
    s_strided = np.asfortranarray(s)  # column-major copy: same values, other strides
    np.testing.assert_array_equal(alignment_matrix(s_strided, t, threshold=0.2).to_dense().numpy(), want)


def test_batch_equals_unbatched():
    rng = np.random.default_rng(5)
    ss = [random_spans(rng, int(rng.integers(0, 40))) for _ in range(37)]
    ts = [random_spans(rng, int(rng.integers(0, 40))) for _ in range(37)]
    for num_threads in (0, 1, 3, 64):
        for fallback in ("none", "nearest"):
            batch = _C.iou_alignment_batch(ss, ts, 0.1, True, fallback, num_threads=num_threads)
            assert len(batch) == len(ss)
            for got, s, t in zip(batch, ss, ts):
                assert_csr_equal(got, _C.iou_alignment(s, t, threshold=0.1, fallback=fallback))
    assert _C.iou_alignment_batch([], []) == []
    mats = alignment_matrices(ss[:4], ts[:4], num_threads=2)
    for m, s, t in zip(mats, ss, ts):
        np.testing.assert_array_equal(m.to_dense().numpy(), dense_iou(s, t))


def test_concurrent_python_threads_agree():
    # The GIL is released inside; concurrent callers must not interfere with each other's buffers.
    rng = np.random.default_rng(9)
    pairs = [(random_spans(rng, 300, 1500), random_spans(rng, 300, 1500)) for _ in range(4)]
    want = [reference_iou_alignment(s, t) for s, t in pairs]
    results = [None] * len(pairs)

    def work(i):
        for _ in range(20):
            results[i] = _C.iou_alignment(*pairs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(pairs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for got, w in zip(results, want):
        assert_csr_equal(got, w)


GOOD = np.array([[0, 2], [2, 4]], dtype=np.int64)

BAD_SPANS = [
    (np.array([[0, 2], [1, 1], [-1, 3]], dtype=np.int64), r"\[2\] = \(-1, 3\) has a negative offset"),
    (np.array([[0, -2]], dtype=np.int64), r"\[0\] = \(0, -2\) has a negative offset"),
    (np.array([[0, 2], [5, 3]], dtype=np.int64), r"\[1\] = \(5, 3\) has end < start"),
    (np.array([[0, 2], [3, 6], [0, 0], [2, 7]], dtype=np.int64), r"\[3\] = \(2, 7\) is not monotone after .*\[1\]"),
    (np.array([[0, 5], [1, 4]], dtype=np.int64), r"\[1\] = \(1, 4\) is not monotone after .*\[0\]"),
    (np.array([[0, 1 << 62]], dtype=np.int64), r"\[0\] .* above 2\*\*61"),
    (np.array([[0, 2]], dtype=np.int32), r"dtype int64, got int32"),
    (np.array([[0.0, 2.0]]), r"dtype int64, got float64"),
    (np.array([[0, 2]], dtype=">i8"), r"dtype int64, got >i8"),
    (np.array([0, 2], dtype=np.int64), r"shape \[T, 2\], got \(2,\)"),
    (np.zeros((2, 3), dtype=np.int64), r"shape \[T, 2\], got \(2, 3\)"),
    (np.zeros((1, 2, 2), dtype=np.int64), r"shape \[T, 2\], got \(1, 2, 2\)"),
    ("spans", r"dtype int64"),
]


@pytest.mark.parametrize("bad,pattern", BAD_SPANS)
@pytest.mark.parametrize("side", ["student_spans", "teacher_spans"])
def test_bad_spans_raise_value_error_naming_side_and_index(bad, pattern, side):
    args = (bad, GOOD) if side == "student_spans" else (GOOD, bad)
    with pytest.raises(ValueError, match=side + ".*" + pattern):
        _C.iou_alignment(*args)
    with pytest.raises(ValueError, match=side + ".*" + pattern):
        _C.validate_spans(bad, side)
    assert _C.validate_spans(GOOD, side) is None
    with pytest.raises(ValueError, match=side):
        reference_iou_alignment(*args)
    with pytest.raises(ValueError, match=side):
        dense_iou(*args)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(fallback="closest"), "fallback must be 'none' or 'nearest', got 'closest'"),
    (dict(threshold=-0.1), r"threshold must lie in \[0, 1\]"),
    (dict(threshold=1.5), r"threshold must lie in \[0, 1\]"),
    (dict(threshold=float("nan")), r"threshold must lie in \[0, 1\]"),
])
def test_bad_options(kwargs, pattern):
    for fn in (_C.iou_alignment, reference_iou_alignment, dense_iou):
        with pytest.raises(ValueError, match=pattern):
            fn(GOOD, GOOD, **kwargs)


def test_batch_bad_input_names_the_sample():
    bad = np.array([[0, 2], [1, 1], [4, 3]], dtype=np.int64)
    with pytest.raises(ValueError, match=r"sample 2: teacher_spans\[2\] = \(4, 3\) has end < start"):
        _C.iou_alignment_batch([GOOD] * 4, [GOOD, GOOD, bad, bad], num_threads=2)
    with pytest.raises(ValueError, match=r"student_spans\[1\] must have dtype int64"):
        _C.iou_alignment_batch([GOOD, GOOD.astype(np.float32)], [GOOD, GOOD])
    with pytest.raises(ValueError, match="same number of samples, got 2 and 1"):
        _C.iou_alignment_batch([GOOD, GOOD], [GOOD])
    with pytest.raises(ValueError, match="num_threads must be >= 0"):
        _C.iou_alignment_batch([GOOD], [GOOD], num_threads=-1)
    with pytest.raises(ValueError, match="fallback must be"):
        _C.iou_alignment_batch([GOOD], [GOOD], fallback="")
