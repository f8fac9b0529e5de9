// Sparse IoU alignment between two tokenizations of the same characters.
//
// A[s, t] = |span_s ∩ span_t| / |span_s ∪ span_t| over half-open char ranges [start, end),
// stored as CSR. Pure C++ (no Python, no torch) so it can run with the GIL released and be
// reused from other hosts; bindings.cpp adapts it to numpy.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace kvfuse {

// What to do with a row that keeps no entry (no overlap, or every overlap below the threshold).
enum class Fallback {
  None,     // leave the row empty: the caller masks that token out
  Nearest,  // weight 1 on the non-empty teacher token whose span midpoint is nearest
};

// Parses "none" / "nearest"; anything else throws std::invalid_argument naming the value.
Fallback parse_fallback(const std::string& name);

// A borrowed row-major [n, 2] int64 array of (start, end) pairs.
struct SpanView {
  const int64_t* data = nullptr;
  int64_t n = 0;
  int64_t start(int64_t i) const { return data[2 * i]; }
  int64_t end(int64_t i) const { return data[2 * i + 1]; }
};

struct CsrAlignment {
  std::vector<int64_t> indptr;   // [T_s + 1]
  std::vector<int64_t> indices;  // [nnz], ascending teacher index within a row
  std::vector<float> values;     // [nnz]
};

// Offsets above this bound are rejected so that start + end (used for midpoints) cannot overflow.
constexpr int64_t kMaxOffset = int64_t(1) << 61;

// Throws std::invalid_argument naming `side` and the offending index when a span has a negative
// or too large offset, end < start, or a non-empty span whose start or end is smaller than that
// of the previous non-empty span. Zero-width spans are exempt from the order check.
void validate_spans(const SpanView& spans, const std::string& side);

// Validates both sides, then builds the alignment with a two-pointer sweep.
//
// threshold: raw IoU values below it are dropped (threshold 0 keeps every real overlap, which
//            always has IoU > 0); must lie in [0, 1].
// normalize: divide each non-empty row by its sum so it sums to 1.
// fallback:  see Fallback. Ties in midpoint distance go to the lowest teacher index; zero-width
//            teacher spans are never chosen; with no non-empty teacher span the row stays empty.
//            Zero-width student spans (special tokens) count as empty rows too, with midpoint
//            equal to their start.
CsrAlignment iou_alignment(const SpanView& student, const SpanView& teacher, double threshold,
                           bool normalize, Fallback fallback);

}  // namespace kvfuse
