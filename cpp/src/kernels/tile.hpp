// A work item's bookkeeping: where its query rows and their operands lie, which keys each row
// attends, and the per-worker scratch it computes in. Included by the kernel sources only
// (compiled once per ISA).
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>

#include "panel.hpp"
#include "sdpa/kernel.hpp"

namespace sdpa {

// Element offsets of one outer (batch) index into every operand.
struct OuterOffsets {
  int64_t at[kOperandCount] = {};
  int64_t operator[](Operand o) const { return at[static_cast<int>(o)]; }
};

// The value of a per-head operand (alibi_slopes, kv_lengths, ...) for group member g.
template <typename X>
inline X per_head(const Problem& p, const OuterOffsets& o, Operand which, int64_t g) {
  const View& v = p.view(which);
  return static_cast<const X*>(v.data)[o[which] + g * v.batch_stride[p.nbatch - 1]];
}

inline OuterOffsets outer_offsets(const Problem& p, int64_t outer) {
  OuterOffsets o;
  for (int d = p.nbatch - 2; d >= 0; --d) {
    const int64_t n = p.batch_shape[d];
    const int64_t i = outer % n;
    outer /= n;
    for (int k = 0; k < kOperandCount; ++k) o.at[k] += i * p.operand[k].batch_stride[d];
  }
  // A packed sequence's rows start further down its arrays (the same row for the whole group).
  auto start = [&](Operand starts, std::initializer_list<Operand> arrays) {
    if (!p.has(starts)) return;
    const int64_t row = per_head<int64_t>(p, o, starts, 0);
    for (Operand a : arrays) o.at[static_cast<int>(a)] += row * p.view(a).row_stride;
  };
  start(Operand::q_starts, {Operand::query, Operand::out, Operand::lse});
  start(Operand::kv_starts,
        {Operand::key, Operand::value, Operand::key_scales, Operand::value_scales});
  return o;
}

// What each query row of the tile needs, gathered once per tile.
struct RowInfo {
  int64_t q_off, out_off, mask_off, lse_off, w_off;  // element offsets of the row's start
  int64_t lo, hi;  // keys [lo, hi) survive causal/window/kv_lengths
  int64_t diag;    // the row's diagonal key (alignment)
  bool padding;    // a row at or beyond its q_lengths: output 0 and lse -inf, whatever else
  bool absent;     // a padding row of a packed call: not in memory, never read or written
  double slope;    // ALiBi slope (0 when absent)
  double sink;     // attention-sink logit (-inf when absent: exp(-inf) adds nothing)
  // Distance from the diagonal to the nearest surviving key. The kernel adds slope * near to the
  // row's ALiBi scores (softmax is shift-invariant; the lse takes it back out), so that the
  // scores that carry the weight stay near 0 in magnitude and keep their float precision even
  // when every surviving key lies far from the diagonal.
  int64_t near;
};

// Element offset of query row i of group member g into a query-side operand.
inline int64_t row_offset(const Problem& p, const OuterOffsets& o, Operand which, int64_t g,
                          int64_t i) {
  const View& v = p.view(which);
  return o[which] + g * v.batch_stride[p.nbatch - 1] + i * v.row_stride;
}

// Fills rows[0, nr) for query rows [t0, t0 + nr) of the (G x L) row space.
inline void describe_rows(const Problem& p, const OuterOffsets& o, int64_t t0, int64_t nr,
                          RowInfo* rows) {
  const Operand mask = p.has(Operand::bool_mask) ? Operand::bool_mask : Operand::float_mask;
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t t = t0 + r, g = t / p.L, i = t % p.L;
    RowInfo& ri = rows[r];
    ri.q_off = row_offset(p, o, Operand::query, g, i);
    ri.out_off = row_offset(p, o, Operand::out, g, i);
    ri.mask_off = row_offset(p, o, mask, g, i);
    ri.lse_off = row_offset(p, o, Operand::lse, g, i);
    ri.w_off = row_offset(p, o, Operand::weights, g, i);
    const int64_t len_k =
        p.has(Operand::kv_lengths) ? per_head<int64_t>(p, o, Operand::kv_lengths, g) : p.S;
    const int64_t len_q =
        p.has(Operand::q_lengths) ? per_head<int64_t>(p, o, Operand::q_lengths, g) : p.L;
    ri.padding = i >= len_q;
    ri.absent = ri.padding && p.has(Operand::q_starts);
    ri.diag = i + (p.opt.alignment == Alignment::bottom_right ? len_k - len_q : 0);
    if (p.has(Operand::q_offset)) ri.diag += per_head<int64_t>(p, o, Operand::q_offset, g);
    if (p.has(Operand::kv_offset)) ri.diag -= per_head<int64_t>(p, o, Operand::kv_offset, g);
    int64_t lo = 0, hi = std::min(p.S, len_k);
    if (p.opt.causal) hi = std::min(hi, ri.diag + 1);
    if (p.opt.window_left != kUnbounded) lo = std::max(lo, ri.diag - p.opt.window_left);
    if (p.opt.window_right != kUnbounded) hi = std::min(hi, ri.diag + p.opt.window_right + 1);
    if (ri.padding) hi = lo;  // a padding row attends nothing
    ri.lo = std::max<int64_t>(lo, 0);
    ri.hi = std::max(std::min(hi, p.S), ri.lo);
    ri.near = ri.diag < ri.lo ? ri.lo - ri.diag : ri.diag >= ri.hi ? ri.diag - (ri.hi - 1) : 0;
    ri.slope =
        p.has(Operand::alibi_slopes) ? per_head<double>(p, o, Operand::alibi_slopes, g) : 0.0;
    ri.sink = p.has(Operand::sinks) ? per_head<double>(p, o, Operand::sinks, g)
                                    : -std::numeric_limits<double>::infinity();
  }
}

// The span [lo, hi) of keys within [a, b) that at least one of the n rows attends (the hull of
// their ranges there; lo >= hi when none does).
struct KeySpan {
  int64_t lo, hi;
};
inline KeySpan attended_keys(const RowInfo* rows, int64_t n, int64_t a, int64_t b) {
  KeySpan span{b, a};
  for (int64_t r = 0; r < n; ++r) {
    const int64_t lo = std::max(rows[r].lo, a), hi = std::min(rows[r].hi, b);
    if (lo >= hi) continue;
    span.lo = std::min(span.lo, lo);
    span.hi = std::max(span.hi, hi);
  }
  return span;
}

// Whether every one of the n rows attends every key of [a, b).
inline bool all_attend(const RowInfo* rows, int64_t n, int64_t a, int64_t b) {
  for (int64_t r = 0; r < n; ++r)
    if (rows[r].lo > a || rows[r].hi < b) return false;
  return true;
}

// Carves 64-byte aligned regions out of a buffer one after the other; without a buffer it only
// counts the bytes they take.
class Arena {
 public:
  static constexpr size_t kAlign = 64;  // a cache line, and an AVX-512 register: aligned loads
  explicit Arena(void* buffer)
      : next_(buffer ? (reinterpret_cast<uintptr_t>(buffer) + kAlign - 1) / kAlign * kAlign : 0) {}
  template <typename X>
  X* take(size_t n) {
    X* at = next_ ? reinterpret_cast<X*>(next_ + used_) : nullptr;
    used_ += (n * sizeof(X) + kAlign - 1) / kAlign * kAlign;
    return at;
  }
  size_t bytes() const { return used_ + kAlign; }  // (the buffer's start may need aligning)

 private:
  uintptr_t next_;
  size_t used_ = 0;
};

// Per-worker scratch (Bq = plan.row_tile query rows, rounded up to panel::kRowQuantum when the
// panels may run; Bk = plan.key_block keys; both at most what the call has):
//   Qs    [Bq x E]    query tile, converted and multiplied by scale
//   Sb    [Bq x Bk]   scores, then probabilities (leading dimension kb = Bk)
//   acc   [Bq x Ev]   unnormalised output
// (row-major in the general path; the panel path keeps Qs, Sb and acc as consecutive panels of
// up to kPanelRows rows, each in the transposed panel layout of panel.hpp)
//   Kc    [Bk x E]    key block converted to T (only when K is not mappable; where the few-row
//                     loops read q8 K in place, its float scales)
//   Vc    [Bk x Ev]   value block converted to T (only when V is not mappable; likewise)
//   m, l  [Bq] each   running max and running sum
//   rows  [Bq]        RowInfo
//   Tr    [W x max(E, Ev)]  the panel path's rows on their way into or out of a panel (W lanes;
//                     only when the panels may run)
template <typename T>
struct Scratch {
  // What the call needs beyond the tile's own buffers.
  struct Needs {
    bool key_buffer, value_buffer, panels;
  };

  T *Qs, *Sb, *acc, *Kc, *Vc, *m, *l, *Tr;
  RowInfo* rows;
  int64_t kb;    // keys per block, the leading dimension of Sb
  size_t bytes;  // the size of the whole, alignment included

  Scratch(const Problem& p, const Plan& plan, const Needs& needs, void* buffer)
      : kb(plan.key_block) {
    const size_t bq = static_cast<size_t>(needs.panels ? (plan.row_tile + panel::kRowQuantum - 1) /
                                                             panel::kRowQuantum * panel::kRowQuantum
                                                       : plan.row_tile);
    const size_t bk = static_cast<size_t>(plan.key_block);
    const size_t E = static_cast<size_t>(p.E), Ev = static_cast<size_t>(p.Ev);
    Arena arena(buffer);
    Qs = arena.take<T>(bq * E);
    Sb = arena.take<T>(bq * bk);
    acc = arena.take<T>(bq * Ev);
    Kc = arena.take<T>(needs.key_buffer ? bk * E : 0);
    Vc = arena.take<T>(needs.value_buffer ? bk * Ev : 0);
    m = arena.take<T>(bq);
    l = arena.take<T>(bq);
    rows = arena.take<RowInfo>(bq);
    Tr = arena.take<T>(needs.panels ? simd::kW * std::max(E, Ev) : 0);
    bytes = arena.bytes();
  }
};

}  // namespace sdpa
