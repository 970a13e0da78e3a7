// The driver: resolves a call's defaults, plans its work (every tile and block size is chosen
// here), owns the scratch and runs the active kernel on the pool.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

#include "sdpa/sdpa.hpp"
#include "threadpool.hpp"

namespace sdpa {
namespace {

std::atomic<const KernelTable*> g_kernel{nullptr};

// ---- The planner's sizes (benchmarks/NOTES.md has the measurements behind each) ---------------
// Row tiles and key blocks (section 4): a tile of query rows shares each K/V block, so bigger
// tiles amortise reading it; up to kWholeTile rows are taken as one tile (e.g. ViT's 197), else
// kRowTile rows, falling back to kSmallTile when that would leave fewer than kMinItems work items
// to spread over threads. kKeyBlock keys per block; the general path's score block
// (128 x 512 x 4 B = 256 KB) stays within L2 (1 MB on Zen 4); whole tiles above kRowTile rows
// take half as many keys to keep that bound.
constexpr int64_t kWholeTile = 256;
constexpr int64_t kRowTile = 128;
constexpr int64_t kSmallTile = 64;
constexpr int64_t kKeyBlock = 512;
constexpr int64_t kMinItems = 16;
// Split-K engages when a call has fewer (outer x row-tile) items than this, so that decode-like
// shapes (few query rows, many keys) still spread over the threads.
constexpr int64_t kTargetItems = 64;
// Up to this many rows a tile streams K and V once instead of multiplying blocks: a GEMM would
// spend more time packing them than multiplying (sections 3, 6 and 17).
constexpr int64_t kFewRowsMax = 8;
// Keys per chunk of the few-row P.V: the chunk of V (32 x Ev floats, 16 KB at Ev = 128) stays in
// L1 for the second pair of rows (section 17).
constexpr int64_t kFewRowsPvKeys = 32;
// Keys per block of a few-row tile over a q8 cache (at most; no more than its split): the loop
// scoring a block fetches its V rows into L2 for the P.V that follows, and q8's (2048 x 136 B =
// 272 KB) take what a float16 cache's 1024-key block does, while each block's fixed costs (the
// query's digits, the softmax step, the scale conversions) are spread over more keys (section
// 37).
constexpr int64_t kFewRowsQ8Block = 2048;
// Keys per online-softmax step of the panel path: P^T (128 x 48 floats, 24 KB) stays in L1 from
// the scores through the exp to P.V (section 15).
constexpr int64_t kPanelStepKeys = 128;
// Keys per chunk of the panel path's P.V: the chunk of P^T (64 x 48 floats, 12 KB) stays in L1
// while every column block of V is multiplied with it (section 13).
constexpr int64_t kPanelPvKeys = 64;
// Calls with less work than this (in multiply-adds) run on the caller: waking threads costs more
// (section 8).
constexpr double kInlineWork = 1 << 16;

// How often the calling thread asks an Interrupt whether to stop: often enough that Ctrl-C stops
// a long call within about 0.1 s, rarely enough that asking (taking the GIL) costs nothing.
constexpr auto kInterruptPoll = std::chrono::milliseconds(20);

// Test and benchmark overrides of the row tile and key block (0: the planner's); see set_tiles.
std::atomic<int64_t> g_row_tile{0}, g_key_block{0};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Per-thread scratch, grown on demand and kept for the thread's life. Thread-local rather than
// indexed by worker id, so that concurrent calls from several Python threads never share it; and
// one buffer per depth of nested calls on the thread: a Python signal handler (run while the
// calling thread polls for Ctrl-C) may itself call sdpa, inline, while the outer call's items
// still use their scratch.
thread_local int t_depth = 0;  // calls of run() active on this thread

struct Buffer {
  std::unique_ptr<char[]> data;
  size_t cap = 0;
};

void* thread_scratch(size_t bytes) {
  thread_local std::vector<Buffer> buffers;
  const size_t level = static_cast<size_t>(std::max(t_depth - 1, 0));
  if (buffers.size() <= level) buffers.resize(level + 1);
  Buffer& b = buffers[level];
  if (bytes > b.cap) {
    b.data.reset(new char[bytes]);
    b.cap = bytes;
  }
  return b.data.get();
}

// Counts this thread's active calls for thread_scratch.
struct Depth {
  Depth() { ++t_depth; }
  ~Depth() { --t_depth; }
  Depth(const Depth&) = delete;
  Depth& operator=(const Depth&) = delete;
};

// Split-K: how many key chunks each row tile's keys are cut into (a shape-only rule).
void plan_splits(const Problem& p, Plan& plan) {
  const int64_t tiles = plan.n_outer * plan.n_row_tiles;
  plan.n_splits = 1;
  plan.split_len = p.S;
  const int64_t min_split = 2 * plan.key_block;  // merging must cost little next to computing
  if (tiles > 0 && tiles < kTargetItems && p.S >= 2 * min_split && !p.has(Operand::weights)) {
    const int64_t want = std::min(ceil_div(kTargetItems, tiles), p.S / min_split);
    plan.split_len = ceil_div(ceil_div(p.S, want), plan.key_block) * plan.key_block;
    plan.n_splits = ceil_div(p.S, plan.split_len);
  }
  plan.n_items = tiles * plan.n_splits;
}

// Answers Plan::stop for one call: every thread sees the flag; the calling thread also asks the
// caller's Interrupt, at most once per kInterruptPoll.
class Stopper {
 public:
  explicit Stopper(const Interrupt* interrupt)
      : interrupt_(interrupt && interrupt->pending ? interrupt : nullptr) {
    if (interrupt_) {
      caller_ = std::this_thread::get_id();
      next_ = std::chrono::steady_clock::now() + kInterruptPoll;
    }
  }

  bool armed() const { return interrupt_ != nullptr; }

  static bool poll(void* ctx) { return static_cast<Stopper*>(ctx)->poll(); }

  bool poll() {
    if (stopped_.load(std::memory_order_relaxed)) return true;
    if (std::this_thread::get_id() != caller_) return false;
    const auto now = std::chrono::steady_clock::now();
    if (now < next_) return false;
    next_ = now + kInterruptPoll;
    if (interrupt_->pending(interrupt_->ctx)) stopped_.store(true, std::memory_order_relaxed);
    return stopped_.load(std::memory_order_relaxed);
  }

  bool stopped() const { return stopped_.load(); }

 private:
  const Interrupt* interrupt_;
  std::thread::id caller_;
  std::chrono::steady_clock::time_point next_;
  std::atomic<bool> stopped_{false};
};

void resolve(Problem& p) {
  if (std::isnan(p.opt.scale)) p.opt.scale = default_scale(p.E);
}

}  // namespace

void set_tiles(int64_t row_tile, int64_t key_block) {
  g_row_tile.store(row_tile);
  g_key_block.store(key_block);
}

void set_kernel(const KernelTable* table) {
  if (!table || table->abi_version != kAbiVersion)
    throw std::invalid_argument("kernel module was built for another sdpa ABI version");
  g_kernel.store(table);
}

const KernelTable* active_kernel() { return g_kernel.load(); }

double default_scale(int64_t E) { return E > 0 ? 1.0 / std::sqrt(static_cast<double>(E)) : 1.0; }

Plan make_plan(const Problem& p) {
  Plan plan;
  plan.n_outer = 1;
  for (int d = 0; d + 1 < p.nbatch; ++d) plan.n_outer *= p.batch_shape[d];
  plan.rows = p.batch_shape[p.nbatch - 1] * p.L;
  plan.row_tile = plan.rows <= kWholeTile ? std::max<int64_t>(plan.rows, 1) : kRowTile;
  if (plan.n_outer * ceil_div(plan.rows, plan.row_tile) < kMinItems)
    plan.row_tile = std::min(plan.row_tile, kSmallTile);
  plan.key_block = plan.row_tile > kRowTile ? kKeyBlock / 2 : kKeyBlock;
  if (g_row_tile.load() > 0) plan.row_tile = g_row_tile.load();
  if (g_key_block.load() > 0) plan.key_block = g_key_block.load();
  // Never more than the call has: the per-worker scratch is sized by these.
  plan.row_tile = std::min(plan.row_tile, std::max<int64_t>(plan.rows, 1));
  plan.key_block = std::min(plan.key_block, std::max<int64_t>(p.S, 1));
  plan.n_row_tiles = ceil_div(plan.rows, plan.row_tile);
  plan_splits(p, plan);
  // Few-row tiles over a q8 cache take longer blocks within their splits, which stay those of
  // kKeyBlock: the number of work items, and so the parallelism, does not change.
  if (p.kv_dtype == DType::q8 && p.kv_block % 16 == 0 && plan.row_tile <= kFewRowsMax &&
      g_key_block.load() <= 0)
    plan.key_block = std::min(kFewRowsQ8Block, plan.split_len);
  // With a causal rule or a right-bounded window, a row's key range grows with its index.
  plan.heavy_tiles_last = p.opt.causal || p.opt.window_right != kUnbounded;
  plan.few_rows_max = kFewRowsMax;
  plan.few_rows_pv_keys = kFewRowsPvKeys;
  plan.panel_step_keys = kPanelStepKeys;
  plan.panel_pv_keys = kPanelPvKeys;
  return plan;
}

Path path_of(const Problem& in) {
  const KernelTable* kt = active_kernel();
  if (!kt) throw std::invalid_argument("no sdpa kernel selected");
  Problem p = in;
  resolve(p);
  const Plan plan = make_plan(p);
  return kt->path_of(p, plan, std::min(plan.row_tile, plan.rows));
}

bool run(Problem& p, const Interrupt* interrupt) {
  const KernelTable* kt = active_kernel();
  if (!kt) throw std::invalid_argument("no sdpa kernel selected");
  if (p.nbatch < 1 || p.nbatch > kMaxBatchDims)
    throw std::invalid_argument("number of batch dims out of range");
  if (p.L < 0 || p.S < 0 || p.E < 0 || p.Ev < 0) throw std::invalid_argument("negative size");
  resolve(p);
  const Depth depth;
  // Nothing to write: an empty output and no lse or weights (whatever L and S are).
  if (p.Ev == 0 && !p.has(Operand::lse) && !p.has(Operand::weights)) return true;

  Plan plan = make_plan(p);
  if (plan.n_items == 0) return true;
  const double work = static_cast<double>(plan.n_outer) * static_cast<double>(plan.rows) *
                      static_cast<double>(p.S) * static_cast<double>(p.E + p.Ev);
  Stopper stopper(work < kInlineWork ? nullptr : interrupt);  // (a small call ends at once)
  if (stopper.armed()) {
    plan.stopping = Stopper::poll;
    plan.stopping_ctx = &stopper;
  }

  std::vector<char> partials;
  if (plan.n_splits > 1) {
    partials.resize(static_cast<size_t>(PartialRecord::count(plan, p.Ev)) * compute_size(p.dtype));
    plan.partials = partials.data();
  }

  const size_t scratch = kt->scratch_bytes(p, plan);
  std::shared_ptr<ThreadPool> pool = global_pool();
  const int threads = work < kInlineWork ? 1 : pool->size();

  pool->parallel_for(plan.n_items, threads, [&](int64_t item) {
    kt->run_items(p, plan, item, item + 1, thread_scratch(scratch));
  });
  if (plan.n_splits > 1 && !stopper.stopped()) {
    pool->parallel_for(plan.n_outer * plan.n_row_tiles, threads, [&](int64_t tile) {
      kt->merge_tiles(p, plan, tile, tile + 1, thread_scratch(scratch));
    });
  }
  return !stopper.stopped();
}

}  // namespace sdpa
