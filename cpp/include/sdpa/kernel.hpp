// sdpa kernel interface: the description of one attention call that the driver hands to a kernel
// variant, and the table of a variant's entry points.
//
// Only plain data crosses this boundary: raw pointers and element strides (never Eigen types,
// never Python objects), so each kernel can be compiled once per ISA into its own shared object
// and reached through the plain function table `KernelTable`.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>

namespace sdpa {

// Bumped whenever Problem, Plan or KernelTable change layout; the driver refuses a kernel
// module built against another version.
constexpr int kAbiVersion = 11;

// Leading (batch) dims after broadcasting. The last batch dim is always the GQA group dim G:
// query heads that share one key/value head (G = 1 without GQA; K/V have stride 0 along it).
// 32 is NumPy 1.x's NPY_MAXDIMS: any array it can make has at most 30 batch dims, plus G. NumPy 2
// allows 64 dims; the Python layer refuses more than kMaxBatchDims - 1 batch dims, clearly.
constexpr int kMaxBatchDims = 32;

// Storage types, named as NumPy names them (q8 by its values' dtype). A call has two: `dtype`, of
// the query side (query, out, weights), and `kv_dtype`, of key and value, each operand read in
// its own type and converted in registers. The first kDTypeCount may hold either side; q8 holds
// key and value only: int8 values and one float16 scale per block of Problem::kv_block
// consecutive elements of a row (key_scales, value_scales), llama.cpp's q8_0.
enum class DType : int { f16 = 0, bf16 = 1, f32 = 2, f64 = 3, q8 = 4 };
constexpr const char* kDTypeNames[] = {"float16", "bfloat16", "float32", "float64", "int8"};
constexpr int kDTypeCount = 4;    // the types of either side
constexpr int kKvDTypeCount = 5;  // the types of the key side
inline size_t storage_size(DType d) {
  return d == DType::f64 ? 8 : d == DType::f32 ? 4 : d == DType::q8 ? 1 : 2;
}
// The type each is computed (accumulated) in: float64 for float64, float32 for the others.
inline size_t compute_size(DType d) { return d == DType::f64 ? 8 : 4; }

// Strided view, strides in elements (may be zero for broadcast dims, or negative).
struct View {
  const void* data = nullptr;  // nullptr: the operand is absent
  int64_t batch_stride[kMaxBatchDims] = {};
  int64_t row_stride = 0;  // along the first core dim (L or S)
  int64_t col_stride = 0;  // along the second core dim (E, Ev or S)
};

// Every array a call may have. Each is laid out (batch..., G, core...) with the call's batch
// shape; key-side operands have G = 1 (stride 0), shared by the G query heads of a group.
enum class Operand : int {
  query,         // (L, E)
  key,           // (S, E), key side
  value,         // (S, Ev), key side
  out,           // (L, Ev), written
  bool_mask,     // (L, S) uint8: 0 removes the key
  float_mask,    // (L, S) in the compute type: added to the scores
  lse,           // (L) in the compute type, written: log-sum-exp of each row's scores
  weights,       // (L, S), written: the attention probabilities (a second pass over the keys)
  alibi_slopes,  // per head: float64 slope of the ALiBi bias
  kv_lengths,    // per head: int64 count of keys that exist
  sinks,         // per head: float64 logit added to the softmax denominator, with no value
  q_lengths,     // per head: int64 count of query rows that exist (the others are padding)
  q_starts,      // per head: int64 row where the sequence starts in the packed query-side arrays
  kv_starts,     // per head: int64 row where the sequence starts in the packed key-side arrays
  q_offset,      // per head: int64 position of query row 0 (a chunk of a longer sequence)
  kv_offset,     // per head: int64 position of key row 0
  key_scales,    // (S, ceil(E / kv_block)) float16, key side: the scales of a q8 key
  value_scales,  // (S, ceil(Ev / kv_block)) float16, key side: the scales of a q8 value
  kCount
};
constexpr int kOperandCount = static_cast<int>(Operand::kCount);

// What the binding checks each operand against: its name (the key the Python layer uses), core
// dims, element type and side.
// Ek and Evk count the q8 scale blocks of a key and of a value row.
enum class Axis : int8_t { none, L, S, E, Ev, Ek, Evk };
// storage: the query side's dtype; kv_storage: the key side's kv_dtype; f16: float16 scales.
enum class Elem : int8_t { storage, kv_storage, compute, u8, f64, i64, f16 };
struct OperandSpec {
  const char* name;
  Axis rows, cols;  // core dims; Axis::none for fewer than two
  Elem elem;
  bool key_side;  // group dim of size 1
  bool written;   // an output of the kernel
};
constexpr OperandSpec kOperandSpecs[kOperandCount] = {
    {"query", Axis::L, Axis::E, Elem::storage, false, false},
    {"key", Axis::S, Axis::E, Elem::kv_storage, true, false},
    {"value", Axis::S, Axis::Ev, Elem::kv_storage, true, false},
    {"out", Axis::L, Axis::Ev, Elem::storage, false, true},
    {"bool_mask", Axis::L, Axis::S, Elem::u8, false, false},
    {"float_mask", Axis::L, Axis::S, Elem::compute, false, false},
    {"lse", Axis::L, Axis::none, Elem::compute, false, true},
    {"weights", Axis::L, Axis::S, Elem::storage, false, true},
    {"alibi_slopes", Axis::none, Axis::none, Elem::f64, false, false},
    {"kv_lengths", Axis::none, Axis::none, Elem::i64, false, false},
    {"sinks", Axis::none, Axis::none, Elem::f64, false, false},
    {"q_lengths", Axis::none, Axis::none, Elem::i64, false, false},
    {"q_starts", Axis::none, Axis::none, Elem::i64, false, false},
    {"kv_starts", Axis::none, Axis::none, Elem::i64, false, false},
    {"q_offset", Axis::none, Axis::none, Elem::i64, false, false},
    {"kv_offset", Axis::none, Axis::none, Elem::i64, false, false},
    {"key_scales", Axis::S, Axis::Ek, Elem::f16, true, false},
    {"value_scales", Axis::S, Axis::Evk, Elem::f16, true, false},
};
// A call with q_starts is packed (varlen): each outer index is a sequence whose rows start at its
// q_starts / kv_starts row of the query-side (query, out, lse) and key-side (key, value) arrays,
// so the rows past its q_lengths / kv_lengths belong to the next sequence: they are never read
// or written (a padded call writes 0 and -inf to its padding rows).

// Where the diagonal of the L x S score matrix sits: query i's diagonal key is i (top_left) or
// i + len_k - len_q (bottom_right), len_k and len_q being the row's kv_lengths and q_lengths
// (S and L when absent): FlashAttention's rule for ragged batches. q_offset - kv_offset is added
// to either (the positions of a chunk's first query and key in the full sequences).
enum class Alignment : int { top_left = 0, bottom_right = 1 };
constexpr const char* kAlignmentNames[] = {"top_left", "bottom_right"};

// An unbounded window side. A quarter of INT64_MAX, so that diag +- side + 1 never overflows.
constexpr int64_t kUnbounded = INT64_MAX / 4;

// The scalar options of a call (the kernel-side image of Python's sdpa.Options record).
struct Options {
  // Multiplies q.k. NaN stands for the default, which the driver resolves (sdpa::default_scale).
  double scale = std::numeric_limits<double>::quiet_NaN();
  double softcap = 0;  // 0: none; else s = softcap * tanh(s / softcap)
  bool causal = false;
  Alignment alignment = Alignment::top_left;
  int64_t window_left = kUnbounded, window_right = kUnbounded;
};

// One attention call. `batch` are the first nbatch - 1 dims of batch_shape and
// G = batch_shape[nbatch - 1].
struct Problem {
  DType dtype = DType::f32;     // query, out, weights
  DType kv_dtype = DType::f32;  // key, value
  int64_t kv_block = 0;         // q8: elements per scale (0 otherwise)
  int nbatch = 1;
  int64_t batch_shape[kMaxBatchDims] = {1};
  int64_t L = 0, S = 0, E = 0, Ev = 0;
  View operand[kOperandCount];
  Options opt;

  const View& view(Operand o) const { return operand[static_cast<int>(o)]; }
  View& view(Operand o) { return operand[static_cast<int>(o)]; }
  bool has(Operand o) const { return view(o).data != nullptr; }
  // Scale blocks of a q8 row of n elements.
  int64_t kv_blocks(int64_t n) const { return kv_block > 0 ? (n + kv_block - 1) / kv_block : 0; }
};

// How the driver split the work, and the cache-level sizes of the kernel's inner paths: all are
// chosen in one place, the planner (make_plan in cpp/src/driver.cpp), from the shape only, never
// from the thread count, so results are bitwise independent of how many threads run. (Register
// blocks, which depend on the ISA's register file, are compile-time constants of the kernels.)
struct Plan {
  int64_t n_outer = 0;      // product of batch dims except G
  int64_t rows = 0;         // G * L: query rows handled per outer index
  int64_t row_tile = 0;     // query rows per work item
  int64_t n_row_tiles = 0;  // ceil(rows / row_tile)
  int64_t key_block = 0;    // keys per block inside an item
  int64_t n_splits = 1;     // key chunks per row tile (split-K for decode-like shapes)
  int64_t split_len = 0;    // keys per split (a multiple of the key block, but for q8 decode)
  int64_t n_items = 0;      // n_outer * n_row_tiles * n_splits
  // Causal-like shapes: later row tiles see more keys. Items are handed out in index order, so
  // the kernel maps item order to tiles last-to-first (largest first), which keeps the final
  // items small and the threads evenly loaded. Changes which thread computes what, never what.
  bool heavy_tiles_last = false;
  int64_t few_rows_max = 0;      // tiles of at most this many rows stream K and V (decode)
  int64_t few_rows_pv_keys = 0;  // keys per chunk of the few-row P.V
  int64_t panel_step_keys = 0;   // keys per online-softmax step of the panel path
  int64_t panel_pv_keys = 0;     // keys per chunk of the panel path's P.V
  // Split-K partial results (n_splits > 1), allocated by the driver: see PartialRecord.
  void* partials = nullptr;
  // Asked by the kernel between key blocks (null: never): true means the call is being stopped
  // (an interrupt), and the kernel abandons its work item. The driver answers it.
  bool (*stopping)(void* ctx) = nullptr;
  void* stopping_ctx = nullptr;
  bool stop() const { return stopping && stopping(stopping_ctx); }
};

// The split-K partial result of one query row over one key split: (m, l, acc[0 .. Ev)) in the
// compute type, m the running max and l the running sum of the online softmax. Records are laid
// out [outer x row tile][split][row of the tile].
struct PartialRecord {
  static int64_t size(int64_t Ev) { return Ev + 2; }
  static int64_t count(const Plan& plan, int64_t Ev) {
    return plan.n_items * plan.row_tile * size(Ev);
  }
  // Element offset of the record of row r of tile `tile_index` (outer * n_row_tiles + tile).
  static int64_t offset(const Plan& plan, int64_t Ev, int64_t tile_index, int64_t split,
                        int64_t r) {
    return ((tile_index * plan.n_splits + split) * plan.row_tile + r) * size(Ev);
  }
  template <typename T>
  static T& m(T* record) {
    return record[0];
  }
  template <typename T>
  static T& l(T* record) {
    return record[1];
  }
  template <typename T>
  static T* acc(T* record) {
    return record + 2;
  }
};

// The kernel's inner paths (see choose_path in attention.cpp), reported by KernelTable::path_of.
enum class Path : int { general = 0, few_rows = 1, panels = 2 };
constexpr const char* kPathNames[] = {"general", "few_rows", "panels"};

// Entry points of one compiled kernel variant.
struct KernelTable {
  int abi_version;
  const char* isa;           // "baseline", "avx2", "avx512", "avx512_bf16", "generic"
  const char* compile_info;  // compiler, flags and Eigen version
  // Bytes of per-worker scratch that run_items needs for this problem.
  size_t (*scratch_bytes)(const Problem&, const Plan&);
  // Computes work items [begin, end) (each item: one row tile of one outer index, one key split).
  void (*run_items)(const Problem&, const Plan&, int64_t begin, int64_t end, void* scratch);
  // Merges split partials for row tiles [begin, end) of the flattened (outer, tile) space.
  void (*merge_tiles)(const Problem&, const Plan&, int64_t begin, int64_t end, void* scratch);
  // The inner path a tile of `rows` query rows takes (for tests and diagnostics).
  Path (*path_of)(const Problem&, const Plan&, int64_t rows);
};

// Each kernel variant is its own Python extension module (sdpa._kernel_<isa>, whose glue is
// cpp/bindings/kernel_module.cpp) with an attribute `table`: a PyCapsule named
// kKernelCapsuleName holding a `const KernelTable*`.
constexpr const char* kKernelCapsuleName = "sdpa.KernelTable";
// Defined once per variant, in cpp/src/kernels/attention.cpp.
const KernelTable* kernel_table();

}  // namespace sdpa
