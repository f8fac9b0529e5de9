#include "iou_alignment.h"

#include <algorithm>
#include <cmath>
#include <sstream>
#include <stdexcept>

namespace kvfuse {

Fallback parse_fallback(const std::string& name) {
  if (name == "none") return Fallback::None;
  if (name == "nearest") return Fallback::Nearest;
  throw std::invalid_argument("fallback must be 'none' or 'nearest', got '" + name + "'");
}

void validate_spans(const SpanView& spans, const std::string& side) {
  int64_t prev = -1;  // index of the previous non-empty span
  for (int64_t i = 0; i < spans.n; ++i) {
    const int64_t a = spans.start(i), b = spans.end(i);
    if (a < 0 || b < 0) {
      std::ostringstream msg;
      msg << side << "[" << i << "] = (" << a << ", " << b << ") has a negative offset";
      throw std::invalid_argument(msg.str());
    }
    if (a > kMaxOffset || b > kMaxOffset) {
      std::ostringstream msg;
      msg << side << "[" << i << "] = (" << a << ", " << b << ") has an offset above 2**61";
      throw std::invalid_argument(msg.str());
    }
    if (b < a) {
      std::ostringstream msg;
      msg << side << "[" << i << "] = (" << a << ", " << b << ") has end < start";
      throw std::invalid_argument(msg.str());
    }
    if (a == b) continue;  // zero-width spans (special tokens) may stand anywhere
    if (prev >= 0 && (a < spans.start(prev) || b < spans.end(prev))) {
      std::ostringstream msg;
      msg << side << "[" << i << "] = (" << a << ", " << b << ") is not monotone after "
          << side << "[" << prev << "] = (" << spans.start(prev) << ", " << spans.end(prev)
          << "): starts and ends of non-empty spans must be non-decreasing";
      throw std::invalid_argument(msg.str());
    }
    prev = i;
  }
}

namespace {

// Nearest-midpoint lookup over the non-empty teacher spans. Doubled midpoints (start + end) keep
// the arithmetic in integers; they are non-decreasing because starts and ends both are, so a
// binary search finds the nearest one.
class NearestTeacher {
 public:
  // Built only when the fallback is on, so fallback="none" pays nothing for it.
  NearestTeacher(const SpanView& teacher, const std::vector<int64_t>& nonempty, bool enabled)
      : idx_(nonempty) {
    if (!enabled) return;
    mid2_.reserve(nonempty.size());
    for (int64_t t : nonempty) mid2_.push_back(teacher.start(t) + teacher.end(t));
  }

  bool empty() const { return mid2_.empty(); }

  // Lowest teacher index among those at minimal |mid2 - q|.
  int64_t operator()(int64_t q) const {
    auto hi = std::lower_bound(mid2_.begin(), mid2_.end(), q);
    if (hi == mid2_.begin()) return idx_.front();
    // The run of equal midpoints just below q starts where lower_bound of that value lands.
    auto lo = std::lower_bound(mid2_.begin(), hi, *(hi - 1));
    if (hi == mid2_.end() || q - *lo <= *hi - q) return idx_[lo - mid2_.begin()];
    return idx_[hi - mid2_.begin()];
  }

 private:
  const std::vector<int64_t>& idx_;
  std::vector<int64_t> mid2_;
};

}  // namespace

CsrAlignment iou_alignment(const SpanView& student, const SpanView& teacher, double threshold,
                           bool normalize, Fallback fallback) {
  if (!(threshold >= 0.0 && threshold <= 1.0)) {
    std::ostringstream msg;
    msg << "threshold must lie in [0, 1], got " << threshold;
    throw std::invalid_argument(msg.str());
  }
  validate_spans(student, "student_spans");
  validate_spans(teacher, "teacher_spans");

  // Zero-width teacher spans match nothing; dropping them up front makes the non-empty ones a
  // sequence whose starts and ends are both sorted, which is what the sweep relies on.
  std::vector<int64_t> tn;
  tn.reserve(teacher.n);
  for (int64_t t = 0; t < teacher.n; ++t)
    if (teacher.end(t) > teacher.start(t)) tn.push_back(t);
  const int64_t nt = static_cast<int64_t>(tn.size());
  const NearestTeacher nearest(teacher, tn, fallback == Fallback::Nearest);

  CsrAlignment out;
  out.indptr.reserve(student.n + 1);
  out.indices.reserve(student.n + nt);
  out.values.reserve(student.n + nt);
  out.indptr.push_back(0);

  // Overlap of student span [a, b) with teacher span [c, d) means c < b and d > a. Since teacher
  // ends are sorted, {d > a} is a suffix starting at `lo`; since starts are sorted, {c < b} is a
  // prefix ending at `hi`. Later non-empty student spans have a' >= a and b' >= b, so both
  // pointers only move forward and no match is skipped even when spans repeat or overlap.
  int64_t lo = 0, hi = 0;
  std::vector<double> row;  // raw IoU of the kept entries of the current row
  for (int64_t s = 0; s < student.n; ++s) {
    const int64_t a = student.start(s), b = student.end(s);
    const size_t row_begin = out.indices.size();
    if (b > a) {
      while (lo < nt && teacher.end(tn[lo]) <= a) ++lo;
      if (hi < lo) hi = lo;
      while (hi < nt && teacher.start(tn[hi]) < b) ++hi;
      row.clear();
      for (int64_t k = lo; k < hi; ++k) {
        const int64_t c = teacher.start(tn[k]), d = teacher.end(tn[k]);
        const double inter = static_cast<double>(std::min(b, d) - std::max(a, c));
        const double uni = static_cast<double>(std::max(b, d) - std::min(a, c));
        const double iou = inter / uni;
        if (iou < threshold) continue;
        out.indices.push_back(tn[k]);
        row.push_back(iou);
      }
      if (normalize && !row.empty()) {
        double total = 0.0;
        for (double v : row) total += v;  // left to right, as the Python reference does
        for (double v : row) out.values.push_back(static_cast<float>(v / total));
      } else {
        for (double v : row) out.values.push_back(static_cast<float>(v));
      }
    }
    if (out.indices.size() == row_begin && fallback == Fallback::Nearest && !nearest.empty()) {
      out.indices.push_back(nearest(a + b));
      out.values.push_back(1.0f);
    }
    out.indptr.push_back(static_cast<int64_t>(out.indices.size()));
  }
  return out;
}

}  // namespace kvfuse
