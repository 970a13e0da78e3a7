// sdpa public C++ interface: the problem description shared by the driver and the kernels.
//
// Only plain data crosses this boundary: raw pointers and element strides (never Eigen types,
// never Python objects), so each kernel can be compiled once per ISA into its own shared object
// and reached through the plain function table `KernelTable`.
#pragma once

#include <cstddef>
#include <cstdint>

namespace sdpa {

// Bumped whenever Problem, Plan or KernelTable change layout; the driver refuses a kernel
// module built against another version.
constexpr int kAbiVersion = 4;

// Leading (batch) dims after broadcasting. The last batch dim is always the GQA group dim G:
// query heads that share one key/value head (G = 1 without GQA; K/V have stride 0 along it).
constexpr int kMaxBatchDims = 32;

enum class DType : int { f16 = 0, bf16 = 1, f32 = 2, f64 = 3 };

// Strided view, strides in elements (may be zero for broadcast dims, or negative).
struct View {
  const void* data = nullptr;
  int64_t batch_stride[kMaxBatchDims] = {};
  int64_t row_stride = 0;  // along L (query-side tensors) or S (key-side tensors)
  int64_t col_stride = 0;  // along E, Ev or S (mask)
};

enum class MaskKind : int { none = 0, boolean = 1, additive = 2 };
enum class Alignment : int { top_left = 0, bottom_right = 1 };

// Sentinel for an unbounded window side.
constexpr int64_t kUnbounded = INT64_MAX / 4;

// One attention call. Shapes: q (batch, G, L, E), k (batch, 1, S, E), v (batch, 1, S, Ev),
// out (batch, G, L, Ev), where `batch` are the first nbatch-1 dims of batch_shape and
// G = batch_shape[nbatch-1].
struct Problem {
  DType dtype = DType::f32;  // storage type of q, k, v and out
  int nbatch = 1;
  int64_t batch_shape[kMaxBatchDims] = {1};
  int64_t L = 0, S = 0, E = 0, Ev = 0;
  View q, k, v, out;

  double scale = 1.0;  // multiplies q.k
  double softcap = 0;  // 0: none; else s = softcap * tanh(s / softcap)

  MaskKind mask_kind = MaskKind::none;
  View mask;  // (batch, G, L, S): uint8 for boolean, compute type (f32/f64) for additive

  bool causal = false;
  Alignment alignment = Alignment::top_left;
  int64_t window_left = kUnbounded, window_right = kUnbounded;

  View alibi;      // (batch, G) float64 slopes; data == nullptr when absent
  View kv_length;  // (batch, G) int64; data == nullptr when absent

  View lse;  // (batch, G, L) in the compute type (f32 or f64); data == nullptr when absent

  // (batch, G, L, S) in the storage type: when present, the kernel also writes the attention
  // probabilities (a second pass over the keys once each row's max and sum are known).
  View weights;
};

// How the driver split the work; computed from the shape only, never from the thread count,
// so results are bitwise independent of how many threads run.
struct Plan {
  int64_t n_outer = 0;      // product of batch dims except G
  int64_t rows = 0;         // G * L: query rows handled per outer index
  int64_t row_tile = 0;     // query rows per work item
  int64_t n_row_tiles = 0;  // ceil(rows / row_tile)
  int64_t key_block = 0;    // keys per block inside an item
  int64_t n_splits = 1;     // key chunks per row tile (split-K for decode-like shapes)
  int64_t split_len = 0;    // keys per split (a multiple of the key block)
  int64_t n_items = 0;      // n_outer * n_row_tiles * n_splits
  // Causal-like shapes: later row tiles see more keys. Items are handed out in index order, so
  // the kernel maps item order to tiles last-to-first (largest first), which keeps the final
  // items small and the threads evenly loaded. Changes which thread computes what, never what.
  bool heavy_tiles_last = false;
  // Partial results when n_splits > 1, laid out [outer][tile][split][row] with per-row record
  // (m, l, acc[Ev]) in the compute type; allocated by the driver.
  void* partials = nullptr;
};

// Entry points of one compiled kernel variant.
struct KernelTable {
  int abi_version;
  const char* isa;           // "baseline", "avx2", "avx512", "generic"
  const char* compile_info;  // compiler, flags and Eigen version
  // Bytes of per-worker scratch that run_items needs for this problem.
  size_t (*scratch_bytes)(const Problem&, const Plan&);
  // Computes work items [begin, end) (each item: one row tile of one outer index, one key split).
  void (*run_items)(const Problem&, const Plan&, int64_t begin, int64_t end, void* scratch);
  // Merges split partials for row tiles [begin, end) of the flattened (outer, tile) space.
  void (*merge_tiles)(const Problem&, const Plan&, int64_t begin, int64_t end, void* scratch);
};

}  // namespace sdpa

// Each kernel variant is its own Python extension module (sdpa._kernel_<isa>) whose attribute
// `table` is a PyCapsule named kKernelCapsuleName holding a `const KernelTable*`.
namespace sdpa {
constexpr const char* kKernelCapsuleName = "sdpa.KernelTable";
// Defined once per variant, in cpp/src/kernels/attention.cpp.
const KernelTable* kernel_table();
}  // namespace sdpa
