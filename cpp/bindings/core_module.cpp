// pybind11 binding of the driver, module sdpa._core. It converts NumPy arrays into the kernel
// interface's views (byte strides to element strides), reads the Python options record into
// sdpa::Options, releases the GIL around the driver and maps C++ errors to Python ones. It holds
// no maths and no defaults: the Python layer (python/sdpa/api.py) has already checked, broadcast
// and cast every operand to its final shape and dtype, and the driver resolves the default scale.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "arrays.hpp"
#include "sdpa/sdpa.hpp"

namespace py = pybind11;

namespace {

using sdpa::Axis;
using sdpa::Elem;
using sdpa::Operand;
using sdpa::OperandSpec;
using sdpa_binding::dtype_of;
using sdpa_binding::is_native;
using sdpa_binding::kv_dtype_of;
using sdpa_binding::make_view;
using sdpa_binding::may_overlap;
using sdpa_binding::nested_layout;

constexpr int kAligned = py::detail::npy_api::NPY_ARRAY_ALIGNED_;

[[noreturn]] void fail(const std::string& name, const std::string& what) {
  throw std::invalid_argument(name + ": " + what);
}

int64_t extent(const sdpa::Problem& p, Axis axis) {
  switch (axis) {
    case Axis::L:
      return p.L;
    case Axis::S:
      return p.S;
    case Axis::E:
      return p.E;
    case Axis::Ev:
      return p.Ev;
    case Axis::Ek:
      return p.kv_blocks(p.E);
    case Axis::Evk:
      return p.kv_blocks(p.Ev);
    default:
      return 0;
  }
}

int core_dims(const OperandSpec& spec) {
  return (spec.rows != Axis::none ? 1 : 0) + (spec.cols != Axis::none ? 1 : 0);
}

// Whether `a` holds the element type `elem` of problem p, whose storage dtype is `storage`.
bool has_elem(const py::array& a, Elem elem, const sdpa::Problem& p, const py::dtype& storage) {
  const py::dtype dt = a.dtype();
  switch (elem) {
    case Elem::storage:
      return dt.equal(storage);
    case Elem::kv_storage:
      return kv_dtype_of(dt) == p.kv_dtype;
    case Elem::compute:
      return dt.kind() == 'f' && static_cast<size_t>(dt.itemsize()) == sdpa::compute_size(p.dtype);
    case Elem::u8:
      return (dt.kind() == 'b' || dt.kind() == 'u') && dt.itemsize() == 1;
    case Elem::f64:
      return dt.kind() == 'f' && dt.itemsize() == 8;
    case Elem::i64:
      return dt.kind() == 'i' && dt.itemsize() == 8;
    case Elem::f16:
      return dt.kind() == 'f' && dt.itemsize() == 2 && dtype_of(dt) == sdpa::DType::f16;
  }
  return false;
}

// Checks one operand against its spec and the problem's shape.
void check_operand(const py::array& a, const OperandSpec& spec, const sdpa::Problem& p,
                   const py::dtype& storage) {
  const int nb = p.nbatch, core = core_dims(spec);
  if (a.ndim() != nb + core) fail(spec.name, "unexpected number of dims");
  for (int d = 0; d < nb; ++d) {
    const bool group_dim = spec.key_side && d == nb - 1;
    if (a.shape(d) != (group_dim ? 1 : p.batch_shape[d])) fail(spec.name, "unexpected batch shape");
  }
  if ((core >= 1 && a.shape(nb) != extent(p, spec.rows)) ||
      (core >= 2 && a.shape(nb + 1) != extent(p, spec.cols)))
    fail(spec.name, "core dims differ from the problem's");
  if (!has_elem(a, spec.elem, p, storage) || !is_native(a.dtype()))
    fail(spec.name, "unexpected dtype");
  if (!(a.flags() & kAligned)) fail(spec.name, "not aligned");
  if (spec.written && !a.writeable()) fail(spec.name, "not writeable");
}

py::array operand_array(const py::dict& operands, const char* name) {
  if (!operands.contains(name)) fail(name, "missing");
  py::object obj = operands[name];
  if (!py::isinstance<py::array>(obj)) fail(name, "not an ndarray");
  return py::reinterpret_borrow<py::array>(obj);
}

// The kernel-side options from the Python record (an sdpa.Options: is_causal, scale, softcap,
// alignment, window; scale None stays NaN, the driver's default).
sdpa::Options options_from(py::handle record) {
  sdpa::Options opt;
  const py::object scale = record.attr("scale"), softcap = record.attr("softcap");
  if (!scale.is_none()) opt.scale = scale.cast<double>();
  if (!softcap.is_none()) opt.softcap = softcap.cast<double>();
  opt.causal = record.attr("is_causal").cast<bool>();
  const auto alignment = record.attr("alignment").cast<std::string>();
  if (alignment == sdpa::kAlignmentNames[1])
    opt.alignment = sdpa::Alignment::bottom_right;
  else if (alignment != sdpa::kAlignmentNames[0])
    fail("alignment", "unknown value " + alignment);
  const py::object window = record.attr("window");
  if (!window.is_none()) {
    const auto sides = window.cast<std::pair<py::object, py::object>>();
    if (!sides.first.is_none()) opt.window_left = sides.first.cast<int64_t>();
    if (!sides.second.is_none()) opt.window_right = sides.second.cast<int64_t>();
    if (opt.window_left < 0 || opt.window_right < 0) fail("window", "negative side");
  }
  return opt;
}

// The problem of a call: `operands` maps the names of kOperandSpecs to arrays already laid out
// (batch..., G, core...), absent or None for optional ones; `record` is the options record;
// kv_block > 0 says that key and value are q8 (int8) with a scale per kv_block elements.
sdpa::Problem problem_from(const py::dict& operands, py::handle record, int64_t kv_block) {
  sdpa::Problem p;
  const py::array q = operand_array(operands, "query");
  const auto dtype = dtype_of(q.dtype());
  if (!dtype) fail("query", "unsupported dtype");
  p.dtype = *dtype;
  const auto kv_dtype = kv_dtype_of(operand_array(operands, "key").dtype());
  if (!kv_dtype) fail("key", "unsupported dtype");
  p.kv_dtype = *kv_dtype;
  if ((p.kv_dtype == sdpa::DType::q8) != (kv_block > 0)) fail("kv_block", "int8 key/value only");
  p.kv_block = kv_block;
  const int nbatch = static_cast<int>(q.ndim()) - 2;
  if (nbatch < 1 || nbatch > sdpa::kMaxBatchDims)
    fail("query", "number of batch dims out of range");
  p.nbatch = nbatch;
  for (int d = 0; d < nbatch; ++d) p.batch_shape[d] = q.shape(d);
  p.L = q.shape(nbatch);
  p.E = q.shape(nbatch + 1);
  const py::array k = operand_array(operands, "key"), v = operand_array(operands, "value");
  if (k.ndim() != q.ndim() || v.ndim() != q.ndim()) fail("key/value", "unexpected number of dims");
  p.S = k.shape(nbatch);
  p.Ev = v.shape(nbatch + 1);

  size_t seen = 0;
  for (int i = 0; i < sdpa::kOperandCount; ++i) {
    const OperandSpec& spec = sdpa::kOperandSpecs[i];
    const bool required = i <= static_cast<int>(Operand::out);
    if (!operands.contains(spec.name)) {
      if (required) fail(spec.name, "missing");
      continue;
    }
    ++seen;
    if (operands[spec.name].is_none() && !required) continue;
    const py::array a = operand_array(operands, spec.name);
    check_operand(a, spec, p, q.dtype());
    p.operand[i] = make_view(a, spec.name, nbatch, core_dims(spec));
  }
  if (seen != operands.size()) fail("operands", "an unknown name among them");
  if (p.has(Operand::bool_mask) && p.has(Operand::float_mask)) fail("masks", "at most one");
  const bool q8 = p.kv_dtype == sdpa::DType::q8;
  if (q8 != p.has(Operand::key_scales) || q8 != p.has(Operand::value_scales))
    fail("key_scales/value_scales", "given exactly when key and value are int8");
  p.opt = options_from(record);
  return p;
}

constexpr double kHoldGilWork = 1 << 12;

// Runs the driver without the GIL. The calling thread takes the GIL back briefly about every
// 20 ms to let Python run its signal handlers: one that raises (Ctrl-C's KeyboardInterrupt) stops
// the call, and its exception is raised here.
void run_interruptibly(sdpa::Problem& p) {
  // A call of a few thousand multiply-adds ends in about a microsecond: it keeps the GIL, whose
  // release and return would cost a tenth of that, and nothing can interrupt it anyway.
  double work =
      static_cast<double>(p.L) * static_cast<double>(p.S) * static_cast<double>(p.E + p.Ev);
  for (int d = 0; d < p.nbatch; ++d) work *= static_cast<double>(p.batch_shape[d]);
  if (work < kHoldGilWork) {
    sdpa::run(p, nullptr);
    return;
  }
  sdpa::Interrupt interrupt;
  interrupt.pending = [](void*) {
    py::gil_scoped_acquire gil;
    return PyErr_CheckSignals() != 0;
  };
  bool completed;
  {
    py::gil_scoped_release release;
    completed = sdpa::run(p, &interrupt);
  }
  if (!completed) throw py::error_already_set();
}

// attention(operands, record): the general route, for calls the Python layer has prepared.
void attention(const py::dict& operands, py::handle record, int64_t kv_block) {
  sdpa::Problem p = problem_from(operands, record, kv_block);
  run_interruptibly(p);
}

// The inner path (a name from kPathNames) that the first row tile of a call would take.
std::string inner_path(const py::dict& operands, py::handle record, int64_t kv_block) {
  return sdpa::kPathNames[static_cast<int>(
      sdpa::path_of(problem_from(operands, record, kv_block)))];
}

// The direct route for the most common call: q, k, v plain aligned native ndarrays of one dtype
// (or k and v both float16 or both bfloat16 under a query of another dtype: mixed storage, the
// result in the query's dtype, as the Python layer's dtype policy has it) with identical batch
// shapes (but for grouped query heads), and among the options only
// is_causal and enable_gqa (bools), scale (None or a finite float) and out (absent, or exactly
// right and not overlapping the inputs); others only at their plain defaults. It returns
// None to decline anything else, leaving every check, broadcast and error message to the Python
// layer; it exists because that layer's generality costs tens of microseconds per call, which
// dominates small problems (benchmarks/NOTES.md, section 1).
// The options that leave a call plain when given at these values (the Python layer's record
// declares them: every option the direct route does not honour, with its default).
py::dict& plain_defaults() {
  static py::dict* d = new py::dict();  // (kept for the interpreter's life)
  return *d;
}

void set_plain_defaults(const py::dict& defaults) { plain_defaults() = defaults; }

// Whether an option the route does not honour is given at its plain default.
bool at_plain_default(PyObject* key, PyObject* value) {
  PyObject* d = PyDict_GetItem(plain_defaults().ptr(), key);
  if (!d) return false;
  if (value == d) return true;
  return Py_TYPE(value) == Py_TYPE(d) && PyObject_RichCompareBool(value, d, Py_EQ) == 1;
}

class Direct {
 public:
  // Reads the options this route honours; false when `options` holds any other away from its
  // plain default.
  bool read_options(const py::dict& options) {
    static PyObject* const kCausal = PyUnicode_InternFromString("is_causal");
    static PyObject* const kScale = PyUnicode_InternFromString("scale");
    static PyObject* const kOut = PyUnicode_InternFromString("out");
    static PyObject* const kGqa = PyUnicode_InternFromString("enable_gqa");
    size_t understood = 0;
    if (PyObject* c = PyDict_GetItem(options.ptr(), kCausal)) {
      if (c != Py_True && c != Py_False) return false;
      causal_ = c == Py_True;
      ++understood;
    }
    if (PyObject* s = PyDict_GetItem(options.ptr(), kScale)) {
      if (s != Py_None) {
        if (!PyFloat_CheckExact(s) || !std::isfinite(PyFloat_AS_DOUBLE(s))) return false;
        scale_ = PyFloat_AS_DOUBLE(s);
      }
      ++understood;
    }
    if (PyObject* o = PyDict_GetItem(options.ptr(), kOut)) {
      if (o != Py_None) out_ = py::reinterpret_borrow<py::object>(o);
      ++understood;
    }
    if (PyObject* g = PyDict_GetItem(options.ptr(), kGqa)) {
      if (g != Py_True && g != Py_False) return false;
      gqa_ = g == Py_True;
      ++understood;
    }
    if (understood == options.size()) return true;
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(options.ptr(), &pos, &key, &value))
      if (key != kCausal && key != kScale && key != kOut && key != kGqa &&
          !at_plain_default(key, value))
        return false;  // (a key not interned falls to the Python layer: right, if slower)
    return true;
  }

  // The problem of plain arrays q, k, v (see above), k and v maybe both QuantizedKV; false to
  // decline.
  bool read_operands(py::handle q_obj, py::handle k_obj, py::handle v_obj) {
    if (!plain(q_obj)) return false;
    if (quantized(k_obj) && quantized(v_obj)) {
      if (!read_quantized(k_obj, k_, ks_) || !read_quantized(v_obj, v_, vs_)) return false;
    } else if (plain(k_obj) && plain(v_obj)) {
      k_ = py::reinterpret_borrow<py::object>(k_obj);
      v_ = py::reinterpret_borrow<py::object>(v_obj);
    } else {
      return false;
    }
    q_ = py::reinterpret_borrow<py::object>(q_obj);
    const py::array q = array(q_), k = array(k_), v = array(v_);
    const py::dtype dt = q.dtype();
    const auto dtype = dtype_of(dt);
    const py::ssize_t nd = q.ndim();
    if (!dtype || !is_native(dt) || nd < 2 || nd > sdpa::kMaxBatchDims + 1) return false;
    if (k.ndim() != nd || v.ndim() != nd) return false;
    const py::dtype kdt = k.dtype();
    if (!(v.dtype().is(kdt) || v.dtype().equal(kdt))) return false;
    std::optional<sdpa::DType> kv_dtype = dtype;
    if (kv_block_ > 0) {  // (int8 values, checked with their scales)
      kv_dtype = sdpa::DType::q8;
    } else if (!(kdt.is(dt) || kdt.equal(dt))) {  // mixed storage, or for the Python layer
      kv_dtype = dtype_of(kdt);
      if (!kv_dtype || (*kv_dtype != sdpa::DType::f16 && *kv_dtype != sdpa::DType::bf16) ||
          !is_native(kdt))
        return false;
    }
    for (const py::array* a : {&q, &k, &v})
      if (!(a->flags() & kAligned)) return false;
    nb_ = static_cast<int>(nd) - 2;
    if (gqa_) {  // query heads (dim -3) in groups of `groups_` per key/value head
      if (nb_ < 1) return false;
      const py::ssize_t hq = q.shape(nb_ - 1), hkv = k.shape(nb_ - 1);
      if (hkv < 1 || hq % hkv != 0 || v.shape(nb_ - 1) != hkv) return false;
      groups_ = static_cast<int64_t>(hq / hkv);
    }
    for (int d = 0; d < nb_; ++d) {
      if (gqa_ && d == nb_ - 1) continue;  // (the heads, checked above)
      if (k.shape(d) != q.shape(d) || v.shape(d) != q.shape(d)) return false;
    }
    if (k.shape(nb_ + 1) != q.shape(nb_ + 1) || v.shape(nb_) != k.shape(nb_)) return false;
    // (a scale above 1 may make the float query overflow, which needs float64 computation:
    // the Python layer checks it)
    if (*dtype != sdpa::DType::f64 && std::abs(scale_) > 1) return false;
    p_.dtype = *dtype;
    p_.kv_dtype = *kv_dtype;
    p_.kv_block = kv_block_;
    p_.nbatch = nb_ + 1;  // plus the group dim G
    for (int d = 0; d < nb_; ++d) p_.batch_shape[d] = k.shape(d);
    p_.batch_shape[nb_] = groups_;
    p_.L = q.shape(nb_);
    p_.E = q.shape(nb_ + 1);
    p_.S = k.shape(nb_);
    p_.Ev = v.shape(nb_ + 1);
    return true;
  }

  // The result: a new array, or `out` if it is exactly right; false to decline.
  bool make_out() {
    const py::array q = array(q_);
    std::vector<py::ssize_t> shape(q.shape(), q.shape() + q.ndim());
    shape[nb_ + 1] = p_.Ev;
    if (!out_) {
      out_ = py::array(q.dtype(), shape);
      return true;
    }
    if (!plain(out_)) return false;
    const py::array out = array(out_);
    if (!out.dtype().equal(q.dtype()) || !is_native(out.dtype()) ||
        out.ndim() != static_cast<py::ssize_t>(shape.size()) || !out.writeable() ||
        !(out.flags() & kAligned))
      return false;
    for (size_t d = 0; d < shape.size(); ++d)
      if (out.shape(d) != shape[d]) return false;
    if (!nested_layout(out)) return false;  // (a self-overlapping out: the Python layer's error)
    for (const py::object* a : {&q_, &k_, &v_})
      if (may_overlap(out, array(*a))) return false;
    return true;
  }

  // Computes the call into the result, which it returns.
  py::object run() {
    p_.view(Operand::query) = grouped(make_view(array(q_), "query", nb_, 2));
    p_.view(Operand::key) = make_view(array(k_), "key", nb_, 2);
    p_.view(Operand::value) = make_view(array(v_), "value", nb_, 2);
    if (kv_block_ > 0) {
      p_.view(Operand::key_scales) = make_view(array(ks_), "key_scales", nb_, 2);
      p_.view(Operand::value_scales) = make_view(array(vs_), "value_scales", nb_, 2);
    }
    p_.view(Operand::out) = grouped(make_view(array(out_), "out", nb_, 2));
    if (!std::isnan(scale_)) p_.opt.scale = scale_;
    p_.opt.causal = causal_;
    run_interruptibly(p_);
    return std::move(out_);
  }

 private:
  static py::array array(const py::object& h) { return py::reinterpret_borrow<py::array>(h); }

  // A query-side view whose heads (the last batch dim) split into (key/value heads, groups):
  // head h = kv * groups + g sits at h's stride times that.
  sdpa::View grouped(sdpa::View v) const {
    if (nb_ >= 1) {
      const int64_t head = v.batch_stride[nb_ - 1];
      v.batch_stride[nb_ - 1] = head * groups_;
      v.batch_stride[nb_] = head;
    }
    return v;
  }
  static bool quantized(py::handle h) {
    static PyObject* const quantized_type =
        py::object(py::module_::import("sdpa._quant").attr("QuantizedKV")).release().ptr();
    return Py_TYPE(h.ptr()) == reinterpret_cast<PyTypeObject*>(quantized_type);
  }
  static int64_t block_of(py::handle h) {
    const py::object b = h.attr("block");
    return PyLong_CheckExact(b.ptr()) ? PyLong_AsLongLong(b.ptr()) : -1;
  }
  // A QuantizedKV's int8 values and float16 scales, as the kernel reads them: plain, native and
  // aligned arrays, the scales of shape values.shape[:-1] + (ceil(D / block),), and the block
  // the same for key and value (kv_block_, set by the first); false to decline (the Python
  // layer converts the scales or raises).
  bool read_quantized(py::handle x, py::object& values, py::object& scales) {
    const int64_t block = block_of(x);
    if (block < 1 || (kv_block_ > 0 && block != kv_block_)) return false;
    kv_block_ = block;
    values = x.attr("values");
    scales = x.attr("scales");
    if (!plain(values) || !plain(scales)) return false;
    const py::array a = array(values), d = array(scales);
    if (kv_dtype_of(a.dtype()) != sdpa::DType::q8 || dtype_of(d.dtype()) != sdpa::DType::f16 ||
        !is_native(d.dtype()) || !(d.flags() & kAligned) || d.ndim() != a.ndim() || a.ndim() < 1)
      return false;
    const py::ssize_t last = a.ndim() - 1;
    for (py::ssize_t i = 0; i < last; ++i)
      if (d.shape(i) != a.shape(i)) return false;
    return d.shape(last) == (a.shape(last) + block - 1) / block;
  }
  static bool plain(py::handle h) {
    static PyObject* const ndarray_type =
        py::object(py::module_::import("numpy").attr("ndarray")).release().ptr();
    return Py_TYPE(h.ptr()) == reinterpret_cast<PyTypeObject*>(ndarray_type);
  }

  sdpa::Problem p_;
  py::object q_, k_, v_, out_;  // (py::object: a default py::array would allocate one)
  py::object ks_, vs_;          // a QuantizedKV key's and value's scales
  int64_t kv_block_ = 0;        // their block; 0: float key and value
  int nb_ = 0;
  bool causal_ = false, gqa_ = false;
  int64_t groups_ = 1;
  double scale_ = std::nan("");
};

py::object attention_direct(py::handle q, py::handle k, py::handle v, const py::dict& options) {
  Direct call;
  if (!call.read_options(options) || !call.read_operands(q, k, v) || !call.make_out())
    return py::none();
  return call.run();
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
  d["avx512vnni"] = f.avx512vnni;
  return d;
}

}  // namespace

// C entry points for threadpoolctl's custom controller (found through the loaded library).
#if defined(_MSC_VER)
#define SDPA_EXPORT __declspec(dllexport)
#else
#define SDPA_EXPORT __attribute__((visibility("default")))
#endif
extern "C" SDPA_EXPORT int sdpa_get_num_threads() { return sdpa::get_num_threads(); }
extern "C" SDPA_EXPORT void sdpa_set_num_threads(int n) { sdpa::set_num_threads(n); }

PYBIND11_MODULE(_core, m) {
  m.doc() = "sdpa driver and binding (baseline instructions; kernels live in _kernel_<isa>)";
  m.def("attention", &attention, py::arg("operands"), py::arg("options"), py::arg("kv_block") = 0);
  m.def("attention_direct", &attention_direct);
  m.def("set_plain_defaults", &set_plain_defaults, py::arg("defaults"));
  m.def("inner_path", &inner_path, py::arg("operands"), py::arg("options"),
        py::arg("kv_block") = 0);
  m.def("set_kernel", &set_kernel);
  m.def("kernel_info", &kernel_info);
  m.def("cpu_features", &cpu_features);
  m.def("set_num_threads", &sdpa::set_num_threads);
  m.def("get_num_threads", &sdpa::get_num_threads);
  m.def("_set_tiles", &sdpa::set_tiles,
        "test and benchmark override of (row tile, key block); 0 = the planner's");
  m.attr("max_batch_dims") = sdpa::kMaxBatchDims;
  py::tuple dtypes(sdpa::kDTypeCount);
  for (int d = 0; d < sdpa::kDTypeCount; ++d) dtypes[d] = sdpa::kDTypeNames[d];
  m.attr("dtypes") = dtypes;
  py::tuple kv_dtypes(sdpa::kKvDTypeCount);
  for (int d = 0; d < sdpa::kKvDTypeCount; ++d) kv_dtypes[d] = sdpa::kDTypeNames[d];
  m.attr("kv_dtypes") = kv_dtypes;
  py::list operands;
  for (const auto& spec : sdpa::kOperandSpecs) operands.append(spec.name);
  m.attr("operands") = operands;
  m.attr("binding_info") = "compiler " __VERSION__;
}
