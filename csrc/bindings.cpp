// pybind11 module kvfuse._C: numpy adapters around the pure C++ alignment builder.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "iou_alignment.h"

namespace py = pybind11;

namespace {

// Checks dtype and shape up front so that bad input is a ValueError naming the argument rather
// than a silent cast (float offsets would be truncated) or an out-of-bounds read. The returned
// array is C-contiguous and must outlive every SpanView taken from it.
py::array_t<int64_t> as_span_array(const py::handle& obj, const std::string& name) {
  py::array arr;
  try {
    arr = py::array::ensure(obj);
  } catch (const py::error_already_set&) {
    arr = py::array();
  }
  if (!arr) {
    throw py::value_error(name + " must be an int64 array of shape [T, 2], got " +
                          std::string(py::str(py::type::of(obj))));
  }
  // equal(), not identity: numpy's 'q' (long long) and 'l' (long) are distinct dtype objects that are both
  // native int64; a byte-swapped '>i8' is not equivalent and is rejected.
  if (!arr.dtype().equal(py::dtype::of<int64_t>())) {
    throw py::value_error(name + " must have dtype int64, got " + std::string(py::str(arr.dtype())));
  }
  if (arr.ndim() != 2 || arr.shape(1) != 2) {
    std::string shape = "(";
    for (py::ssize_t i = 0; i < arr.ndim(); ++i) shape += (i ? ", " : "") + std::to_string(arr.shape(i));
    shape += arr.ndim() == 1 ? ",)" : ")";
    throw py::value_error(name + " must have shape [T, 2], got " + shape);
  }
  return py::array_t<int64_t, py::array::c_style>::ensure(arr);
}

kvfuse::SpanView view_of(const py::array_t<int64_t>& arr) {
  return kvfuse::SpanView{arr.data(), static_cast<int64_t>(arr.shape(0))};
}

// Hands a vector's buffer to numpy without copying: the capsule owns the moved-from vector.
template <typename T>
py::array_t<T> to_numpy(std::vector<T>&& v) {
  auto* owned = new std::vector<T>(std::move(v));
  py::capsule free_when_done(owned, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>(static_cast<py::ssize_t>(owned->size()), owned->data(), free_when_done);
}

py::tuple to_tuple(kvfuse::CsrAlignment&& a) {
  return py::make_tuple(to_numpy(std::move(a.indptr)), to_numpy(std::move(a.indices)),
                        to_numpy(std::move(a.values)));
}

py::tuple iou_alignment_py(const py::object& student_spans, const py::object& teacher_spans,
                           double threshold, bool normalize, const std::string& fallback) {
  const kvfuse::Fallback fb = kvfuse::parse_fallback(fallback);
  const auto s = as_span_array(student_spans, "student_spans");
  const auto t = as_span_array(teacher_spans, "teacher_spans");
  kvfuse::CsrAlignment out;
  {
    py::gil_scoped_release release;
    out = kvfuse::iou_alignment(view_of(s), view_of(t), threshold, normalize, fb);
  }
  return to_tuple(std::move(out));
}

void validate_spans_py(const py::object& spans, const std::string& name) {
  const auto arr = as_span_array(spans, name);
  py::gil_scoped_release release;
  kvfuse::validate_spans(view_of(arr), name);
}

py::list iou_alignment_batch_py(const py::sequence& student_spans, const py::sequence& teacher_spans,
                                double threshold, bool normalize, const std::string& fallback,
                                int num_threads) {
  const kvfuse::Fallback fb = kvfuse::parse_fallback(fallback);
  const size_t n = py::len(student_spans);
  if (py::len(teacher_spans) != n) {
    throw py::value_error("student_spans and teacher_spans must hold the same number of samples, got " +
                          std::to_string(n) + " and " + std::to_string(py::len(teacher_spans)));
  }
  if (num_threads < 0) {
    throw py::value_error("num_threads must be >= 0 (0 = one per hardware thread), got " +
                          std::to_string(num_threads));
  }
  std::vector<py::array_t<int64_t>> s_arrays, t_arrays;  // keep the buffers alive while threads read
  std::vector<kvfuse::SpanView> s_views, t_views;
  s_arrays.reserve(n);
  t_arrays.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const std::string idx = "[" + std::to_string(i) + "]";
    s_arrays.push_back(as_span_array(student_spans[i], "student_spans" + idx));
    t_arrays.push_back(as_span_array(teacher_spans[i], "teacher_spans" + idx));
    s_views.push_back(view_of(s_arrays.back()));
    t_views.push_back(view_of(t_arrays.back()));
  }

  std::vector<kvfuse::CsrAlignment> results(n);
  std::vector<std::exception_ptr> errors(n);
  {
    py::gil_scoped_release release;
    size_t workers = num_threads > 0 ? static_cast<size_t>(num_threads)
                                     : std::max(1u, std::thread::hardware_concurrency());
    workers = std::min(workers, std::max<size_t>(n, 1));
    // Samples differ a lot in length, so threads pull the next sample from a shared counter
    // instead of taking fixed chunks.
    std::atomic<size_t> next{0};
    auto work = [&]() {
      for (size_t i = next++; i < n; i = next++) {
        try {
          results[i] = kvfuse::iou_alignment(s_views[i], t_views[i], threshold, normalize, fb);
        } catch (...) {
          errors[i] = std::current_exception();
        }
      }
    };
    std::vector<std::thread> pool;
    for (size_t w = 1; w < workers; ++w) pool.emplace_back(work);
    work();
    for (auto& th : pool) th.join();
  }
  for (size_t i = 0; i < n; ++i) {
    if (!errors[i]) continue;
    try {
      std::rethrow_exception(errors[i]);
    } catch (const std::invalid_argument& e) {
      throw py::value_error("sample " + std::to_string(i) + ": " + e.what());
    }
  }
  py::list out;
  for (auto& r : results) out.append(to_tuple(std::move(r)));
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "kvfuse C++ extension: sparse IoU alignment between two tokenizations (CSR, numpy).";
  m.def("iou_alignment", &iou_alignment_py, py::arg("student_spans"), py::arg("teacher_spans"),
        py::arg("threshold") = 0.0, py::arg("normalize") = true, py::arg("fallback") = "none",
        R"doc(Sparse IoU alignment A[s, t] = |span_s ∩ span_t| / |span_s ∪ span_t| as CSR.

student_spans, teacher_spans: int64 arrays [T_s, 2] / [T_t, 2] of half-open char ranges
[start, end). Non-empty spans must have non-decreasing starts and ends on each side (equal spans
are allowed); zero-width spans may stand anywhere and match nothing.
threshold: raw IoU values below it are dropped (0 keeps every overlap); must lie in [0, 1].
normalize: non-empty rows are divided by their sum.
fallback: "none" leaves rows without a kept entry empty; "nearest" gives them weight 1 on the
non-empty teacher token with the nearest span midpoint (ties -> lowest index; zero-width teacher
spans are never chosen; zero-width student spans use their start as midpoint).

Returns (indptr int64 [T_s + 1], indices int64 [nnz], values float32 [nnz]).
Raises ValueError naming the side and index for bad spans, dtype or shape.)doc");
  m.def("validate_spans", &validate_spans_py, py::arg("spans"), py::arg("name") = "spans",
        R"doc(Check spans against iou_alignment's rules without building anything.

Raises ValueError naming `name` and the offending index (negative or too large offset, end < start,
non-monotone non-empty span) or the wrong dtype / shape; returns None otherwise.)doc");
  m.def("iou_alignment_batch", &iou_alignment_batch_py, py::arg("student_spans"),
        py::arg("teacher_spans"), py::arg("threshold") = 0.0, py::arg("normalize") = true,
        py::arg("fallback") = "none", py::arg("num_threads") = 0,
        R"doc(iou_alignment over many samples, spread over std::threads with the GIL released.

student_spans, teacher_spans: sequences of equal length of [T, 2] int64 arrays.
num_threads: 0 uses one thread per hardware thread (never more than there are samples).
Returns a list of (indptr, indices, values) tuples, one per sample, equal to iou_alignment's.
A bad sample raises ValueError prefixed with "sample i: " (the lowest failing index).)doc");
}
