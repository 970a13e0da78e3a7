// pybind11 binding: converts NumPy arrays (byte strides) into sdpa::Problem views (element
// strides), releases the GIL around the driver and maps C++ errors to Python ones. It holds no
// maths and no defaults: the Python layer (python/sdpa/api.py) has already checked, broadcast and
// cast every operand to its final shape and dtype.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "../src/cpu.hpp"
#include "../src/driver.hpp"
#include "../src/threadpool.hpp"
#include "sdpa/sdpa.hpp"

namespace py = pybind11;

namespace {

using sdpa::View;

// Whether a dtype is in the machine's byte order ('=' native, '|' not applicable).
bool is_native(const py::dtype& dt) {
  const char bo = dt.byteorder();
  const char native = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ ? '<' : '>';
  return bo == '=' || bo == '|' || bo == native;
}

// Whether the memory spans of two arrays may intersect (a cheap bounds test, like NumPy's
// may_share_memory).
bool may_overlap(const py::array& a, const py::array& b) {
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

// Fills `view` from `a`, whose shape is (batch..., core...) with `core` trailing dims (0, 1 or 2).
View make_view(const py::array& a, const char* name, int nbatch, int core, size_t itemsize) {
  if (a.ndim() != nbatch + core)
    throw std::invalid_argument(std::string(name) + ": unexpected number of dims");
  if (static_cast<size_t>(a.itemsize()) != itemsize)
    throw std::invalid_argument(std::string(name) + ": unexpected item size");
  View v;
  v.data = a.data();
  auto elem = [&](py::ssize_t d) {
    const py::ssize_t s = a.strides(d);
    if (s % static_cast<py::ssize_t>(itemsize) != 0)
      throw std::invalid_argument(std::string(name) + ": stride not a multiple of the item size");
    return static_cast<int64_t>(s / static_cast<py::ssize_t>(itemsize));
  };
  for (int d = 0; d < nbatch; ++d) v.batch_stride[d] = a.shape(d) == 1 ? 0 : elem(d);
  if (core >= 1) v.row_stride = a.shape(nbatch) == 1 ? 0 : elem(nbatch);
  if (core >= 2) v.col_stride = a.shape(nbatch + 1) == 1 ? 0 : elem(nbatch + 1);
  return v;
}

void check_batch(const py::array& a, const char* name, const sdpa::Problem& p) {
  for (int d = 0; d < p.nbatch; ++d)
    if (a.shape(d) != p.batch_shape[d])
      throw std::invalid_argument(std::string(name) + ": batch shape differs from query's");
}

// attention(q, k, v, out, mask, lse, alibi, kv_length, weights, dtype, mask_kind, scale, softcap,
//           causal, bottom_right, window_left, window_right)
// q (B..., G, L, E), k (B..., G, S, E), v (B..., G, S, Ev), out (B..., G, L, Ev), mask
// (B..., G, L, S) or None, lse (B..., G, L) or None, alibi and kv_length (B..., G) or None,
// weights (B..., G, L, S) or None.
void attention(const py::array& q, const py::array& k, const py::array& v, py::array& out,
               const py::object& mask, const py::object& lse, const py::object& alibi,
               const py::object& kv_length, const py::object& weights, int dtype, int mask_kind,
               double scale, double softcap, bool causal, bool bottom_right, int64_t window_left,
               int64_t window_right) {
  sdpa::Problem p;
  if (dtype < 0 || dtype > 3) throw std::invalid_argument("unknown dtype code");
  p.dtype = static_cast<sdpa::DType>(dtype);
  const size_t isz = p.dtype == sdpa::DType::f64 ? 8 : (p.dtype == sdpa::DType::f32 ? 4 : 2);
  const size_t acc_sz = p.dtype == sdpa::DType::f64 ? 8 : 4;
  const int nbatch = static_cast<int>(q.ndim()) - 2;
  if (nbatch < 1 || nbatch > sdpa::kMaxBatchDims)
    throw std::invalid_argument("query: number of batch dims out of range");
  p.nbatch = nbatch;
  for (int d = 0; d < nbatch; ++d) p.batch_shape[d] = q.shape(d);
  p.L = q.shape(nbatch);
  p.E = q.shape(nbatch + 1);
  p.S = k.shape(nbatch);
  p.Ev = v.shape(nbatch + 1);
  p.q = make_view(q, "query", nbatch, 2, isz);
  p.k = make_view(k, "key", nbatch, 2, isz);
  p.v = make_view(v, "value", nbatch, 2, isz);
  if (!out.writeable()) throw std::invalid_argument("out: not writeable");
  p.out = make_view(out, "out", nbatch, 2, isz);
  check_batch(out, "out", p);
  if (k.shape(nbatch + 1) != p.E || v.shape(nbatch) != p.S || out.shape(nbatch) != p.L ||
      out.shape(nbatch + 1) != p.Ev)
    throw std::invalid_argument("query/key/value/out: inconsistent core dims");
  for (int d = 0; d < nbatch - 1; ++d)
    if ((k.shape(d) != p.batch_shape[d] && k.shape(d) != 1) ||
        (v.shape(d) != p.batch_shape[d] && v.shape(d) != 1))
      throw std::invalid_argument("key/value: batch shape does not broadcast");
  if (k.shape(nbatch - 1) != 1 || v.shape(nbatch - 1) != 1)
    throw std::invalid_argument("key/value: group dim must be 1");

  p.mask_kind = static_cast<sdpa::MaskKind>(mask_kind);
  if (p.mask_kind != sdpa::MaskKind::none) {
    const auto m = py::array(mask);
    p.mask =
        make_view(m, "attn_mask", nbatch, 2, p.mask_kind == sdpa::MaskKind::boolean ? 1 : acc_sz);
    check_batch(m, "attn_mask", p);
    if (m.shape(nbatch) != p.L || m.shape(nbatch + 1) != p.S)
      throw std::invalid_argument("attn_mask: core dims differ from (L, S)");
  }
  if (!lse.is_none()) {
    auto a = py::array(lse);
    if (!a.writeable()) throw std::invalid_argument("lse: not writeable");
    p.lse = make_view(a, "lse", nbatch, 1, acc_sz);
    check_batch(a, "lse", p);
  }
  if (!alibi.is_none()) {
    const auto a = py::array(alibi);
    p.alibi = make_view(a, "alibi_slopes", nbatch, 0, 8);
    check_batch(a, "alibi_slopes", p);
  }
  if (!kv_length.is_none()) {
    const auto a = py::array(kv_length);
    p.kv_length = make_view(a, "kv_lengths", nbatch, 0, 8);
    check_batch(a, "kv_lengths", p);
  }
  if (!weights.is_none()) {
    auto a = py::array(weights);
    if (!a.writeable()) throw std::invalid_argument("weights: not writeable");
    p.weights = make_view(a, "weights", nbatch, 2, isz);
    check_batch(a, "weights", p);
    if (a.shape(nbatch) != p.L || a.shape(nbatch + 1) != p.S)
      throw std::invalid_argument("weights: core dims differ from (L, S)");
  }
  p.scale = scale;
  p.softcap = softcap;
  p.causal = causal;
  p.alignment = bottom_right ? sdpa::Alignment::bottom_right : sdpa::Alignment::top_left;
  p.window_left = window_left < 0 ? sdpa::kUnbounded : window_left;
  p.window_right = window_right < 0 ? sdpa::kUnbounded : window_right;

  py::gil_scoped_release release;
  sdpa::run(p);
}

// The direct route for the most common call: q, k, v plain aligned native ndarrays of one dtype
// (float16/32/64) with identical batch shapes, no mask or variant, `out` absent or exactly right
// and not overlapping the inputs. It returns None to decline anything else, leaving every check,
// broadcast and error message to the Python layer; it exists because that layer's generality costs
// tens of microseconds per call, which dominates small problems (see benchmarks/NOTES.md).
py::object attention_fast(py::handle q_obj, py::handle k_obj, py::handle v_obj, py::handle out_obj,
                          bool causal, py::handle scale_obj) {
  static const py::handle ndarray_type =
      py::object(py::module_::import("numpy").attr("ndarray")).release();
  auto plain = [&](py::handle h) { return py::type::handle_of(h).is(ndarray_type); };
  if (!plain(q_obj) || !plain(k_obj) || !plain(v_obj)) return py::none();
  const auto q = py::reinterpret_borrow<py::array>(q_obj);
  const auto k = py::reinterpret_borrow<py::array>(k_obj);
  const auto v = py::reinterpret_borrow<py::array>(v_obj);
  const py::dtype dt = q.dtype();
  int code;
  switch (dt.num()) {
    case py::detail::npy_api::NPY_FLOAT_:
      code = 2;
      break;
    case py::detail::npy_api::NPY_DOUBLE_:
      code = 3;
      break;
    case 23 /* NPY_HALF */:
      code = 0;
      break;
    default:
      return py::none();
  }
  const py::ssize_t nd = q.ndim();
  if (nd < 2 || nd > sdpa::kMaxBatchDims + 1 || k.ndim() != nd || v.ndim() != nd) return py::none();
  if (!k.dtype().is(dt) && !k.dtype().equal(dt)) return py::none();
  if (!v.dtype().is(dt) && !v.dtype().equal(dt)) return py::none();
  if (!is_native(dt)) return py::none();
  const int aligned = py::detail::npy_api::NPY_ARRAY_ALIGNED_;
  if (!(q.flags() & aligned) || !(k.flags() & aligned) || !(v.flags() & aligned)) return py::none();
  const int nb = static_cast<int>(nd) - 2;
  for (int d = 0; d < nb; ++d)
    if (k.shape(d) != q.shape(d) || v.shape(d) != q.shape(d)) return py::none();
  const py::ssize_t L = q.shape(nb), E = q.shape(nb + 1), S = k.shape(nb), Ev = v.shape(nb + 1);
  if (k.shape(nb + 1) != E || v.shape(nb) != S) return py::none();

  double scale;
  if (scale_obj.is_none()) {
    scale = E > 0 ? 1.0 / std::sqrt(static_cast<double>(E)) : 1.0;
  } else {
    if (!PyFloat_CheckExact(scale_obj.ptr())) return py::none();
    scale = PyFloat_AS_DOUBLE(scale_obj.ptr());
    if (!std::isfinite(scale)) return py::none();
  }

  std::vector<py::ssize_t> out_shape(q.shape(), q.shape() + nd);
  out_shape[nb + 1] = Ev;
  py::array out;
  if (out_obj.is_none()) {
    out = py::array(dt, out_shape);
  } else {
    if (!plain(out_obj)) return py::none();
    out = py::reinterpret_borrow<py::array>(out_obj);
    if (!out.dtype().equal(dt) || !is_native(out.dtype()) || out.ndim() != nd || !out.writeable() ||
        !(out.flags() & aligned))
      return py::none();
    for (py::ssize_t d = 0; d < nd; ++d)
      if (out.shape(d) != out_shape[d] || (out.strides(d) == 0 && out.shape(d) > 1))
        return py::none();  // (a self-overlapping out is the Python layer's error to raise)
    for (const py::array* a : {&q, &k, &v})
      if (may_overlap(out, *a)) return py::none();
  }

  sdpa::Problem p;
  p.dtype = static_cast<sdpa::DType>(code);
  p.nbatch = nb + 1;  // plus the group dim G = 1
  for (int d = 0; d < nb; ++d) p.batch_shape[d] = q.shape(d);
  p.batch_shape[nb] = 1;
  p.L = L;
  p.S = S;
  p.E = E;
  p.Ev = Ev;
  const size_t isz = static_cast<size_t>(dt.itemsize());
  p.q = make_view(q, "query", nb, 2, isz);
  p.k = make_view(k, "key", nb, 2, isz);
  p.v = make_view(v, "value", nb, 2, isz);
  p.out = make_view(out, "out", nb, 2, isz);
  p.scale = scale;
  p.causal = causal;
  {
    py::gil_scoped_release release;
    sdpa::run(p);
  }
  return std::move(out);
}

void set_kernel(const py::capsule& cap) {
  if (std::string(cap.name() ? cap.name() : "") != sdpa::kKernelCapsuleName)
    throw std::invalid_argument("not an sdpa kernel capsule");
  sdpa::set_kernel(static_cast<const sdpa::KernelTable*>(cap.get_pointer()));
}

py::object kernel_info() {
  const sdpa::KernelTable* kt = sdpa::active_kernel();
  if (!kt) return py::none();
  py::dict d;
  d["isa"] = kt->isa;
  d["compile_info"] = kt->compile_info;
  return d;
}

py::dict cpu_features() {
  const sdpa::CpuFeatures f = sdpa::cpu_features();
  py::dict d;
  d["sse4.2"] = f.sse42;
  d["avx2"] = f.avx2;
  d["fma"] = f.fma;
  d["f16c"] = f.f16c;
  d["avx512f"] = f.avx512f;
  d["avx512bw"] = f.avx512bw;
  d["avx512dq"] = f.avx512dq;
  d["avx512vl"] = f.avx512vl;
  d["avx512bf16"] = f.avx512bf16;
  return d;
}

}  // namespace

// C entry points for threadpoolctl's custom controller (found through the loaded library).
extern "C" __attribute__((visibility("default"))) int sdpa_get_num_threads() {
  return sdpa::get_num_threads();
}
extern "C" __attribute__((visibility("default"))) void sdpa_set_num_threads(int n) {
  sdpa::set_num_threads(n);
}

PYBIND11_MODULE(_core, m) {
  m.doc() = "sdpa driver and binding (baseline instructions; kernels live in _kernel_<isa>)";
  m.def("attention", &attention);
  m.def("attention_fast", &attention_fast);
  m.def("set_kernel", &set_kernel);
  m.def("kernel_info", &kernel_info);
  m.def("cpu_features", &cpu_features);
  m.def("set_num_threads", &sdpa::set_num_threads);
  m.def("_set_tiles", &sdpa::set_tiles,
        "benchmark-only override of (row tile, key block); 0 = default");
  m.def("get_num_threads", &sdpa::get_num_threads);
  m.attr("max_batch_dims") = sdpa::kMaxBatchDims;
  m.attr("binding_info") = "compiler " __VERSION__;
}
