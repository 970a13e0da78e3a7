// The binding's helpers: NumPy arrays (byte strides, dtypes) into the kernel interface's views
// (element strides, DType). Used by core_module.cpp only.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "sdpa/kernel.hpp"

namespace sdpa_binding {

namespace py = pybind11;

// NumPy's type number of float16 (NPY_HALF in numpy/ndarraytypes.h; pybind11 does not name it).
constexpr int kNpyHalf = 23;

// The storage DType of a NumPy dtype, if the kernel has one. Built-in types by type number (the
// direct route's hot path); bfloat16, a user dtype registered by ml_dtypes, by name.
inline std::optional<sdpa::DType> dtype_of(const py::dtype& dt) {
  switch (dt.num()) {
    case kNpyHalf:
      return sdpa::DType::f16;
    case py::detail::npy_api::NPY_FLOAT_:
      return sdpa::DType::f32;
    case py::detail::npy_api::NPY_DOUBLE_:
      return sdpa::DType::f64;
    default:
      break;
  }
  const std::string name = py::str(dt.attr("name"));
  for (int d = 0; d < sdpa::kDTypeCount; ++d)
    if (name == sdpa::kDTypeNames[d]) return static_cast<sdpa::DType>(d);
  return std::nullopt;
}

// The key-side DType of a NumPy dtype: a storage DType, or q8 for int8 (values of q8 blocks).
inline std::optional<sdpa::DType> kv_dtype_of(const py::dtype& dt) {
  if (dt.kind() == 'i' && dt.itemsize() == 1) return sdpa::DType::q8;
  return dtype_of(dt);
}

// Whether a dtype is in the machine's byte order ('=' native, '|' not applicable).
inline bool is_native(const py::dtype& dt) {
  const char bo = dt.byteorder();
#if defined(__BYTE_ORDER__)
  const char native = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ ? '<' : '>';
#else
  const char native = '<';  // MSVC has no __BYTE_ORDER__; all its targets are little-endian
#endif
  return bo == '=' || bo == '|' || bo == native;
}

// Whether the memory spans of two arrays may intersect (a cheap bounds test, like NumPy's
// may_share_memory).
inline bool may_overlap(const py::array& a, const py::array& b) {
  auto span = [](const py::array& x) {
    auto lo = reinterpret_cast<intptr_t>(x.data()), hi = lo;
    for (py::ssize_t d = 0; d < x.ndim(); ++d) {
      if (x.shape(d) == 0) return std::pair<intptr_t, intptr_t>(0, 0);
      const intptr_t ext = (x.shape(d) - 1) * x.strides(d);
      (ext < 0 ? lo : hi) += ext;
    }
    return std::pair<intptr_t, intptr_t>(lo, hi + x.itemsize());
  };
  const auto sa = span(a), sb = span(b);
  return sa.first < sb.second && sb.first < sa.second;
}

// Whether each dim of `a` (by increasing stride) steps over all the dims inside it, which proves
// that no two elements overlap (the usual layouts; the Python layer judges any other).
inline bool nested_layout(const py::array& a) {
  if (a.size() <= 1) return true;
  std::vector<std::pair<py::ssize_t, py::ssize_t>> dims;  // (|stride|, size) of dims of size > 1
  for (py::ssize_t d = 0; d < a.ndim(); ++d)
    if (a.shape(d) > 1) dims.emplace_back(std::abs(a.strides(d)), a.shape(d));
  std::sort(dims.begin(), dims.end());
  py::ssize_t extent = a.itemsize();
  for (const auto& [stride, n] : dims) {
    if (stride < extent) return false;
    extent += stride * (n - 1);
  }
  return true;
}

// The view of `a`, shaped (batch..., core...) with `core` trailing dims (0, 1 or 2). A dim of size
// 1 keeps its stride if NumPy's is a whole number of items (a packed call's starts step along it
// even when a sequence has one row), else gets 0: only its index 0 is ever read.
inline sdpa::View make_view(const py::array& a, const char* name, int nbatch, int core) {
  if (a.ndim() != nbatch + core)
    throw std::invalid_argument(std::string(name) + ": unexpected number of dims");
  const auto itemsize = static_cast<py::ssize_t>(a.itemsize());
  sdpa::View v;
  v.data = a.data();
  auto elem = [&](py::ssize_t d) -> int64_t {
    const py::ssize_t s = a.strides(d);
    if (a.shape(d) == 1) return s % itemsize == 0 ? static_cast<int64_t>(s / itemsize) : 0;
    if (s % itemsize != 0)
      throw std::invalid_argument(std::string(name) + ": stride not a multiple of the item size");
    return static_cast<int64_t>(s / itemsize);
  };
  for (int d = 0; d < nbatch; ++d) v.batch_stride[d] = elem(d);
  if (core >= 1) v.row_stride = elem(nbatch);
  if (core >= 2) v.col_stride = elem(nbatch + 1);
  return v;
}

}  // namespace sdpa_binding
