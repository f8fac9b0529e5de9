"""Cross-tokenizer alignment: char spans of tokens → sparse IoU alignment matrix A [T_s, T_t].

A[s, t] = |span_s ∩ span_t| / |span_s ∪ span_t| over half-open char ranges [start, end) of the same
text, thresholded and row-normalised (docs/DESIGN.md §3 step 3). The fast builder is the C++ extension
`kvfuse._C`; this module gets the spans from a tokenizer, wraps the builder's CSR arrays as a torch
sparse CSR tensor, and keeps two readable references used by the tests and the benchmark:

  reference_iou_alignment   the same linear two-pointer sweep in plain Python (identical output)
  dense_iou                 the quadratic brute force: IoU of every (student, teacher) pair

Span rules (shared by all three): offsets are non-negative and end >= start; non-empty spans have
non-decreasing starts and ends on each side (byte pieces of one character share a span); zero-width
spans (special tokens) may stand anywhere and match nothing. Rows left without an entry stay empty with
fallback="none"; fallback="nearest" gives them weight 1 on the non-empty teacher token whose span
midpoint is nearest (ties → lowest teacher index; zero-width teacher spans are never chosen; a
zero-width student span uses its start as midpoint; with no non-empty teacher span the row stays empty).
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch

from kvfuse import _C

FALLBACKS = ("none", "nearest")

_MAX_OFFSET = 1 << 61  # same bound as the C++ builder: start + end must not overflow int64


def token_spans(tokenizer, text: str, trim_whitespace: bool = False,
                add_special_tokens: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise `text` and return `(input_ids int64 [T], spans int64 [T, 2])` of char offsets.

    Offsets come from a fast tokenizer's `return_offsets_mapping`: special tokens are `(0, 0)` and
    byte-level pieces of one character share that character's span. With `trim_whitespace=True`
    each span loses its leading and trailing whitespace (e.g. the space a word token carries), so
    " cat" and "cat" line up with IoU 1; a span of only whitespace becomes the zero-width
    `(start, start)` — it then matches nothing, and nearest-midpoint fallback stays local to it.
    Trimming keeps non-empty spans monotone: a later span's first non-space character cannot
    precede an earlier span's, because it would lie inside the earlier span.
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    name = f"{type(tokenizer).__name__}({getattr(tokenizer, 'name_or_path', '') or '?'})"
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"tokenizer {name} is not a fast tokenizer: char offsets "
                         "(return_offsets_mapping) need a tokenizers-backed (fast) tokenizer")
    try:
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=add_special_tokens)
    except NotImplementedError as err:
        raise ValueError(f"tokenizer {name} cannot return char offsets: {err}") from err
    offsets = enc.get("offset_mapping")
    if offsets is None:
        raise ValueError(f"tokenizer {name} returned no offset_mapping")
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    if len(spans) != len(ids):
        raise ValueError(f"tokenizer {name} returned {len(spans)} offsets for {len(ids)} tokens")
    if trim_whitespace:
        spans = _trim_whitespace(text, spans)
    # Catch a tokenizer whose offsets break the span rules here, where the error can name it, rather
    # than later in the builder, where it could only name "student_spans" or "teacher_spans".
    _C.validate_spans(spans, f"offsets of tokenizer {name}")
    return ids, spans


def _trim_whitespace(text: str, spans: np.ndarray) -> np.ndarray:
    out = spans.copy()
    for i, (a, b) in enumerate(spans.tolist()):
        piece = text[a:b]
        stripped = piece.lstrip()
        if not stripped:
            out[i] = (a, a)
            continue
        start = a + len(piece) - len(stripped)
        out[i] = (start, start + len(stripped.rstrip()))
    return out


def alignment_matrix(student_spans, teacher_spans, threshold: float = 0.0, normalize: bool = True,
                     fallback: str = "none") -> torch.Tensor:
    """Alignment matrix A as a float32 `torch.sparse_csr_tensor` of shape [T_s, T_t].

    Spans: int64 [T, 2] numpy arrays or CPU tensors. Arguments as in the module docstring; bad
    spans raise ValueError naming the side and index. The tensor shares memory with the builder's
    output arrays.
    """
    s, t = _to_numpy(student_spans), _to_numpy(teacher_spans)
    csr = _C.iou_alignment(s, t, threshold=threshold, normalize=normalize, fallback=fallback)
    return _to_sparse(csr, len(s), len(t))


def alignment_matrices(student_spans: Sequence, teacher_spans: Sequence, threshold: float = 0.0,
                       normalize: bool = True, fallback: str = "none",
                       num_threads: int = 0) -> list[torch.Tensor]:
    """`alignment_matrix` over many samples at once, built on `num_threads` C++ threads (0 = all)."""
    ss = [_to_numpy(x) for x in student_spans]
    ts = [_to_numpy(x) for x in teacher_spans]
    csrs = _C.iou_alignment_batch(ss, ts, threshold=threshold, normalize=normalize,
                                  fallback=fallback, num_threads=num_threads)
    return [_to_sparse(c, len(s), len(t)) for c, s, t in zip(csrs, ss, ts)]


def _to_numpy(spans):
    # The C++ side checks dtype and shape; only tensors need unwrapping (no copy for CPU tensors).
    if isinstance(spans, torch.Tensor):
        return spans.detach().cpu().numpy()
    return spans


def _to_sparse(csr, n_rows: int, n_cols: int) -> torch.Tensor:
    indptr, indices, values = csr
    # The builder guarantees the CSR invariants (sorted columns in range, indptr of length T_s + 1),
    # so torch's O(nnz) re-check is skipped; its "beta" notice would repeat on every sample, and torch 2.11 also
    # warns that an explicit check_invariants=False disables the checks.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        return torch.sparse_csr_tensor(torch.from_numpy(indptr), torch.from_numpy(indices),
                                       torch.from_numpy(values), size=(n_rows, n_cols),
                                       dtype=torch.float32, check_invariants=False)


# ----------------------------------------------------------------------------------------------
# Readable references (tests, benchmark). Same rules and the same float arithmetic as the C++
# builder — IoU in double, row sums left to right, one rounding to float32 — so outputs are equal.
# ----------------------------------------------------------------------------------------------

def check_spans(spans, side: str) -> list[tuple[int, int]]:
    """Validate spans under the rules above; return them as a list of (start, end) ints."""
    if isinstance(spans, torch.Tensor):
        spans = spans.detach().cpu().numpy()
    arr = np.asarray(spans)
    if arr.dtype != np.int64:
        raise ValueError(f"{side} must have dtype int64, got {arr.dtype}")
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{side} must have shape [T, 2], got {tuple(arr.shape)}")
    pairs = [(int(a), int(b)) for a, b in arr.tolist()]
    prev = None
    for i, (a, b) in enumerate(pairs):
        if a < 0 or b < 0:
            raise ValueError(f"{side}[{i}] = ({a}, {b}) has a negative offset")
        if a > _MAX_OFFSET or b > _MAX_OFFSET:
            raise ValueError(f"{side}[{i}] = ({a}, {b}) has an offset above 2**61")
        if b < a:
            raise ValueError(f"{side}[{i}] = ({a}, {b}) has end < start")
        if a == b:
            continue
        if prev is not None and (a < pairs[prev][0] or b < pairs[prev][1]):
            raise ValueError(f"{side}[{i}] = ({a}, {b}) is not monotone after {side}[{prev}] = "
                             f"{pairs[prev]}: starts and ends of non-empty spans must be non-decreasing")
        prev = i
    return pairs


def _check_options(threshold: float, fallback: str) -> None:
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be 'none' or 'nearest', got {fallback!r}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")


def _nearest_teacher(mid2: int, teacher: list[tuple[int, int]]) -> int | None:
    """Lowest-index non-empty teacher span with the nearest doubled midpoint (linear scan)."""
    best, best_dist = None, None
    for t, (c, d) in enumerate(teacher):
        if c == d:
            continue
        dist = abs(c + d - mid2)
        if best is None or dist < best_dist:
            best, best_dist = t, dist
    return best


def _row_sum(values: list[float]) -> float:
    # A plain left-to-right sum, as in C++; builtin sum() compensates rounding on Python >= 3.12.
    total = 0.0
    for v in values:
        total += v
    return total


def _finish_row(ious: list[float], normalize: bool) -> list[float]:
    if normalize and ious:
        total = _row_sum(ious)
        return [v / total for v in ious]
    return ious


def reference_iou_alignment(student_spans, teacher_spans, threshold: float = 0.0,
                            normalize: bool = True, fallback: str = "none"):
    """Pure-Python two-pointer sweep; returns `(indptr, indices, values)` exactly as `_C.iou_alignment`."""
    _check_options(threshold, fallback)
    student = check_spans(student_spans, "student_spans")
    teacher = check_spans(teacher_spans, "teacher_spans")
    # Non-empty teacher spans have sorted starts and sorted ends. For student span [a, b), the
    # overlapping ones are those with end > a (a suffix, from `lo`) and start < b (a prefix, up to
    # `hi`); both bounds only grow from one non-empty student span to the next.
    nonempty = [t for t, (c, d) in enumerate(teacher) if d > c]
    indptr, indices, values = [0], [], []
    lo = hi = 0
    for a, b in student:
        row_idx, row_iou = [], []
        if b > a:
            while lo < len(nonempty) and teacher[nonempty[lo]][1] <= a:
                lo += 1
            hi = max(hi, lo)
            while hi < len(nonempty) and teacher[nonempty[hi]][0] < b:
                hi += 1
            for t in nonempty[lo:hi]:
                c, d = teacher[t]
                iou = (min(b, d) - max(a, c)) / (max(b, d) - min(a, c))
                if iou >= threshold:
                    row_idx.append(t)
                    row_iou.append(iou)
        row_val = _finish_row(row_iou, normalize)
        if not row_idx and fallback == "nearest":
            t = _nearest_teacher(a + b, teacher)
            if t is not None:
                row_idx, row_val = [t], [1.0]
        indices += row_idx
        values += row_val
        indptr.append(len(indices))
    return (np.asarray(indptr, dtype=np.int64), np.asarray(indices, dtype=np.int64),
            np.asarray(values, dtype=np.float64).astype(np.float32))


def dense_iou(student_spans, teacher_spans, threshold: float = 0.0, normalize: bool = True,
              fallback: str = "none") -> np.ndarray:
    """Quadratic brute force: a Python double loop over every (student, teacher) pair → dense float32 [T_s, T_t]."""
    _check_options(threshold, fallback)
    student = check_spans(student_spans, "student_spans")
    teacher = check_spans(teacher_spans, "teacher_spans")
    out = np.zeros((len(student), len(teacher)), dtype=np.float32)
    for s, (a, b) in enumerate(student):
        row = [0.0] * len(teacher)
        for t, (c, d) in enumerate(teacher):
            inter = min(b, d) - max(a, c)
            if a < b and c < d and inter > 0:
                iou = inter / (max(b, d) - min(a, c))
                if iou >= threshold:
                    row[t] = iou
        kept = [v for v in row if v > 0.0]
        if kept:
            # Summing the kept values in index order matches the sweep's left-to-right row sum.
            total = _row_sum(kept) if normalize else 1.0
            out[s] = [v / total for v in row]
        elif fallback == "nearest":
            t = _nearest_teacher(a + b, teacher)
            if t is not None:
                out[s, t] = 1.0
    return out
