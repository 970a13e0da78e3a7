// Flash-style attention kernel, compiled once per ISA (see CMakeLists.txt: SDPA_ISA_NAME and the
// -m flags). Pure C++ and Eigen: no Python, no threads, no allocation of its own; the driver hands
// it a range of work items and a scratch buffer.
//
// Algorithm: blocked attention with an online softmax (Milakov & Gimelshein 2018; Rabe & Staats
// 2021; Dao et al. 2022). For one tile of query rows and each block of keys:
//   S_blk = Q_tile (nr x E) * K_blk^T (E x nk)          scores, Q pre-scaled by `scale`
//   S_blk = softcap * tanh(S_blk / softcap)             optional
//   S_blk += additive mask, ALiBi; removed keys -> -inf
//   m_new = max(m, rowmax(S_blk))                       running max per row
//   alpha = exp(m - m_new)                              rescale factor of the old state
//   P_blk = exp(S_blk - m_new)
//   l     = alpha * l + rowsum(P_blk)                   running sum
//   acc   = alpha * acc + P_blk (nr x nk) * V_blk (nk x Ev)
// and finally out = acc / l (0 where l == 0: a row with no key left), lse = m + log(l).
// The L x S score matrix never exists: memory is O(row_tile * (E + Ev + key_block)) per worker.

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "few_rows.hpp"
#include "panel.hpp"
#include "sdpa/sdpa.hpp"

#ifndef SDPA_ISA_NAME
#error "SDPA_ISA_NAME must name the ISA variant this file is compiled for"
#endif
#ifndef SDPA_COMPILE_INFO
#define SDPA_COMPILE_INFO "unknown"
#endif

namespace sdpa {
namespace {

template <typename T>
using RowMat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <typename T>
using RowVec = Eigen::Matrix<T, 1, Eigen::Dynamic>;
template <typename T>
using MatMap = Eigen::Map<RowMat<T>, Eigen::Unaligned, Eigen::OuterStride<>>;
template <typename T>
using ConstMatMap = Eigen::Map<const RowMat<T>, Eigen::Unaligned, Eigen::OuterStride<>>;

// Storage type of each DType and the type it is computed in.
template <DType D>
struct Types;
template <>
struct Types<DType::f16> {
  using Store = Eigen::half;
  using Acc = float;
};
template <>
struct Types<DType::bf16> {
  using Store = Eigen::bfloat16;
  using Acc = float;
};
template <>
struct Types<DType::f32> {
  using Store = float;
  using Acc = float;
};
template <>
struct Types<DType::f64> {
  using Store = double;
  using Acc = double;
};

constexpr size_t kAlign = 64;

// Up to this many query rows in a tile (decode, GQA groups), the block products run as one
// streaming pass over K and V: a GEMM would spend more time packing them than multiplying.
constexpr int64_t kGemvRows = 8;
// Keys per chunk of the panel path's P.V: a chunk of P^T (64 x 48 floats, 12 KB) stays in L1
// while every column block of V is multiplied with it.
constexpr int64_t kPanelKeys = 64;
// Keys per online-softmax step of the panel path: P^T (128 x 48 floats, 24 KB) stays in L1 from
// the scores through the exp to P.V; the step's rescale of acc^T costs little next to it.
constexpr int64_t kPanelKeyBlock = 128;
inline size_t round_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }
inline int64_t round_up_rows(int64_t n) {
  return (n + panel::kRowQuantum - 1) / panel::kRowQuantum * panel::kRowQuantum;
}

// What each query row of the tile needs, gathered once per tile.
struct RowInfo {
  int64_t q_off, out_off, mask_off, lse_off, w_off;  // element offsets of the row's start
  int64_t lo, hi;  // keys [lo, hi) survive causal/window/kv_length
  int64_t diag;    // the row's diagonal key (alignment)
  double slope;    // ALiBi slope (0 when absent)
  // Distance from the diagonal to the nearest surviving key. The kernel adds slope * near to the
  // row's ALiBi scores (softmax is shift-invariant; the lse takes it back out), so that the
  // scores that carry the weight stay near 0 in magnitude and keep their float precision even
  // when every surviving key lies far from the diagonal.
  int64_t near;
};

// Per-worker scratch, carved from the driver's buffer (each region 64-byte aligned):
// (Bq = plan.row_tile query rows rounded up to panel::kRowQuantum, Bk = plan.key_block keys):
//   Qs    [Bq x E]    query tile, converted and multiplied by scale
//   Sb    [Bq x Bk]   scores, then probabilities (leading dimension kb = Bk)
//   acc   [Bq x Ev]   unnormalised output
// (row-major in the general path; the panel path keeps Qs, Sb and acc as consecutive panels of
// up to kPanelRows rows, each in the transposed panel layout of panel.hpp)
//   Kc    [Bk x E]    key block converted to T (only when K is not mappable)
//   Vc    [Bk x Ev]   value block converted to T (only when V is not mappable)
//   m, l  [Bq] each   running max and running sum
//   rows  [Bq]        RowInfo
//   Tr    [W x max(E, Ev)]  the panel path's rows on their way into or out of a panel (W lanes)
template <typename T>
struct Scratch {
  T *Qs, *Sb, *acc, *Kc, *Vc, *m, *l, *Tr;
  RowInfo* rows;
  int64_t kb;  // keys per block, the leading dimension of Sb

  // Visits each region's size in bytes, in layout order.
  template <typename F>
  static void layout(const Problem& p, const Plan& plan, F&& f) {
    const size_t bq = static_cast<size_t>(round_up_rows(plan.row_tile));
    const size_t bk = static_cast<size_t>(plan.key_block);
    const size_t E = static_cast<size_t>(p.E), Ev = static_cast<size_t>(p.Ev);
    for (size_t n : {bq * E, bq * bk, bq * Ev, bk * E, bk * Ev, bq, bq}) f(sizeof(T) * n);
    f(sizeof(RowInfo) * bq);
    f(sizeof(T) * panel::kW * std::max(E, Ev));
  }

  static size_t bytes(const Problem& p, const Plan& plan) {
    size_t total = kAlign;
    layout(p, plan, [&](size_t n) { total += round_up(n); });
    return total;
  }

  Scratch(const Problem& p, const Plan& plan, void* buffer) : kb(plan.key_block) {
    auto base = reinterpret_cast<uintptr_t>(buffer);
    char* c = reinterpret_cast<char*>((base + kAlign - 1) / kAlign * kAlign);
    char* region[9];
    int i = 0;
    layout(p, plan, [&](size_t n) {
      region[i++] = c;
      c += round_up(n);
    });
    Qs = reinterpret_cast<T*>(region[0]);
    Sb = reinterpret_cast<T*>(region[1]);
    acc = reinterpret_cast<T*>(region[2]);
    Kc = reinterpret_cast<T*>(region[3]);
    Vc = reinterpret_cast<T*>(region[4]);
    m = reinterpret_cast<T*>(region[5]);
    l = reinterpret_cast<T*>(region[6]);
    rows = reinterpret_cast<RowInfo*>(region[7]);
    Tr = reinterpret_cast<T*>(region[8]);
  }
};

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

// Element offsets of one outer (batch) index into every operand.
struct OuterOffsets {
  int64_t q = 0, k = 0, v = 0, out = 0, mask = 0, alibi = 0, kv_length = 0, lse = 0, weights = 0;
};

OuterOffsets outer_offsets(const Problem& p, int64_t outer) {
  OuterOffsets o;
  for (int d = p.nbatch - 2; d >= 0; --d) {
    const int64_t n = p.batch_shape[d];
    const int64_t i = outer % n;
    outer /= n;
    o.q += i * p.q.batch_stride[d];
    o.k += i * p.k.batch_stride[d];
    o.v += i * p.v.batch_stride[d];
    o.out += i * p.out.batch_stride[d];
    o.mask += i * p.mask.batch_stride[d];
    o.alibi += i * p.alibi.batch_stride[d];
    o.kv_length += i * p.kv_length.batch_stride[d];
    o.lse += i * p.lse.batch_stride[d];
    o.weights += i * p.weights.batch_stride[d];
  }
  return o;
}

// Fills rows[0, nr) for query rows [t0, t0 + nr) of the (G x L) row space.
void describe_rows(const Problem& p, const OuterOffsets& o, int64_t t0, int64_t nr, RowInfo* rows) {
  const int gd = p.nbatch - 1;
  const int64_t shift = p.alignment == Alignment::bottom_right ? p.S - p.L : 0;
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t t = t0 + r, g = t / p.L, i = t % p.L;
    RowInfo& ri = rows[r];
    ri.q_off = o.q + g * p.q.batch_stride[gd] + i * p.q.row_stride;
    ri.out_off = o.out + g * p.out.batch_stride[gd] + i * p.out.row_stride;
    ri.mask_off = o.mask + g * p.mask.batch_stride[gd] + i * p.mask.row_stride;
    ri.lse_off = o.lse + g * p.lse.batch_stride[gd] + i * p.lse.row_stride;
    ri.w_off = o.weights + g * p.weights.batch_stride[gd] + i * p.weights.row_stride;
    ri.diag = i + shift;
    int64_t lo = 0, hi = p.S;
    if (p.causal) hi = std::min(hi, ri.diag + 1);
    if (p.window_left != kUnbounded) lo = std::max(lo, ri.diag - p.window_left);
    if (p.window_right != kUnbounded) hi = std::min(hi, ri.diag + p.window_right + 1);
    if (p.kv_length.data) {
      const auto* len = static_cast<const int64_t*>(p.kv_length.data);
      hi = std::min(hi, len[o.kv_length + g * p.kv_length.batch_stride[gd]]);
    }
    ri.lo = std::max<int64_t>(lo, 0);
    ri.hi = std::max(std::min(hi, p.S), ri.lo);
    ri.slope = 0;
    ri.near = ri.diag < ri.lo ? ri.lo - ri.diag : ri.diag >= ri.hi ? ri.diag - (ri.hi - 1) : 0;
    if (p.alibi.data) {
      const auto* s = static_cast<const double*>(p.alibi.data);
      ri.slope = s[o.alibi + g * p.alibi.batch_stride[gd]];
    }
  }
}

// Eigen 3.4 does not vectorise .cast<>() inside expressions, so the half-precision rows are
// converted packet by packet here (with F16C on AVX2, and with VCVTNEPS2BF16 where the
// avx512_bf16 variant enables EIGEN_VECTORIZE_AVX512BF16); other cases use Eigen's cast.
#if defined(EIGEN_VECTORIZE_AVX512)
using PacketF = Eigen::internal::Packet16f;
using PacketH = Eigen::internal::Packet16h;
using PacketBF = Eigen::internal::Packet16bf;
#define SDPA_HALF_PACKETS 1
#elif defined(EIGEN_VECTORIZE_AVX)
using PacketF = Eigen::internal::Packet8f;
using PacketH = Eigen::internal::Packet8h;
using PacketBF = Eigen::internal::Packet8bf;
#define SDPA_HALF_PACKETS 1
#endif

#ifdef SDPA_HALF_PACKETS
// The packet holding as many elements of each storage type as PacketF holds floats, and the
// conversions between it and PacketF.
template <typename S>
struct PacketOf;
template <>
struct PacketOf<float> {
  using type = PacketF;
  static PacketF to_float(PacketF p) { return p; }
  static PacketF from_float(PacketF p) { return p; }
};
template <typename S, typename P>
struct HalfPacketOf {
  using type = P;
  static PacketF to_float(P p) { return Eigen::internal::pcast<P, PacketF>(p); }
  static P from_float(PacketF p) { return Eigen::internal::pcast<PacketF, P>(p); }
};
template <>
struct PacketOf<Eigen::half> : HalfPacketOf<Eigen::half, PacketH> {};
template <>
struct PacketOf<Eigen::bfloat16> : HalfPacketOf<Eigen::bfloat16, PacketBF> {};

template <typename T, typename Src, typename Dst>
constexpr bool kHalfPackets =
    std::is_same_v<T, float> && !std::is_same_v<Src, Dst> &&
    (std::is_same_v<Src, float> || std::is_same_v<Dst, float>)&&(
        std::is_same_v<Src, Eigen::half> || std::is_same_v<Src, Eigen::bfloat16> ||
        std::is_same_v<Dst, Eigen::half> || std::is_same_v<Dst, Eigen::bfloat16>);
#else
template <typename T, typename Src, typename Dst>
constexpr bool kHalfPackets = false;
#endif

// dst[c * ds] = Dst(T(src[c * ss]) * mul) for c < n, T being the compute type: loads rows of
// q, k, v into T and stores rows of out and weights from T.
template <typename T, typename Src, typename Dst>
inline void convert_row(Dst* dst, int64_t ds, const Src* src, int64_t ss, int64_t n, T mul) {
  if (ds != 1 || ss != 1) {
    for (int64_t c = 0; c < n; ++c)
      dst[c * ds] = static_cast<Dst>(static_cast<T>(src[c * ss]) * mul);
    return;
  }
  int64_t c = 0;
#ifdef SDPA_HALF_PACKETS
  if constexpr (kHalfPackets<T, Src, Dst>) {
    namespace ei = Eigen::internal;
    using In = PacketOf<Src>;
    using Out = PacketOf<Dst>;
    constexpr int64_t W = ei::packet_traits<float>::size;  // the width of PacketF
    const PacketF m = ei::pset1<PacketF>(mul);
    for (; c + W <= n; c += W) {
      const PacketF x = In::to_float(ei::ploadu<typename In::type>(src + c));
      ei::pstoreu(dst + c, Out::from_float(ei::pmul(x, m)));
    }
  }
#endif
  Eigen::Map<RowVec<Dst>>(dst + c, n - c) =
      (Eigen::Map<const RowVec<Src>>(src + c, n - c).template cast<T>() * mul).template cast<Dst>();
}

// A block of rows [j0, j0 + nk) of a (S x D) key-side operand as a matrix in type T: a direct
// map when the storage already is T with unit column stride, else converted into `buffer`.
template <typename T, typename Store>
ConstMatMap<T> key_side_block(const View& view, int64_t base, int64_t j0, int64_t nk, int64_t D,
                              T* buffer) {
  const auto* src = static_cast<const Store*>(view.data) + base + j0 * view.row_stride;
  if constexpr (std::is_same_v<T, Store>) {
    if (view.col_stride == 1 && view.row_stride > 0)
      return ConstMatMap<T>(src, nk, D, Eigen::OuterStride<>(view.row_stride));
  }
  for (int64_t j = 0; j < nk; ++j)
    convert_row<T>(buffer + j * D, 1, src + j * view.row_stride, view.col_stride, D, T(1));
  return ConstMatMap<T>(buffer, nk, D, Eigen::OuterStride<>(D));
}

// max(a, b) that keeps a NaN from either side (std::max drops a NaN second operand).
template <typename T>
inline T nan_max(T a, T b) {
  return std::isnan(a) || std::isnan(b) ? std::numeric_limits<T>::quiet_NaN() : std::max(a, b);
}

template <DType D>
struct Kernel {
  using Store = typename Types<D>::Store;
  using T = typename Types<D>::Acc;
  static constexpr T kNegInf = -std::numeric_limits<T>::infinity();

  static void run_item(const Problem& p, const Plan& plan, int64_t item, Scratch<T>& ws) {
    const int64_t split = item % plan.n_splits;
    int64_t tile = (item / plan.n_splits) % plan.n_row_tiles;
    if (plan.heavy_tiles_last) tile = plan.n_row_tiles - 1 - tile;  // hand out big items first
    const int64_t outer = item / plan.n_splits / plan.n_row_tiles;
    const OuterOffsets o = outer_offsets(p, outer);
    const int64_t t0 = tile * plan.row_tile;
    const int64_t nr = std::min(plan.row_tile, plan.rows - t0);
    RowInfo* rows = ws.rows;
    describe_rows(p, o, t0, nr, rows);

    // Keys this item visits: the span the rows attend, within this split's chunk.
    auto [jlo, jhi] = attended_keys(rows, nr, 0, p.S);
    if (plan.n_splits > 1) {
      jlo = std::max(jlo, split * plan.split_len);
      jhi = std::min(jhi, (split + 1) * plan.split_len);
    }

    const bool panels = use_panels(p, nr);
    if (panels) {
      run_panels(p, o, nr, jlo, jhi, ws);
    } else {
      // Q_tile (nr x E) = scale * q rows, in T.
      const auto* q = static_cast<const Store*>(p.q.data);
      for (int64_t r = 0; r < nr; ++r)
        convert_row<T>(ws.Qs + r * p.E, 1, q + rows[r].q_off, p.q.col_stride, p.E, T(p.scale));
      ConstMatMap<T> Qt(ws.Qs, nr, p.E, Eigen::OuterStride<>(p.E));
      MatMap<T> acc(ws.acc, nr, p.Ev, Eigen::OuterStride<>(p.Ev));
      acc.setZero();
      std::fill(ws.m, ws.m + nr, kNegInf);
      std::fill(ws.l, ws.l + nr, T(0));
      for (int64_t j0 = jlo; j0 < jhi; j0 += ws.kb) {
        const int64_t nk = std::min(ws.kb, jhi - j0);
        process_block(p, o, nr, j0, nk, ws, Qt, acc);
      }
      if (p.weights.data) write_weights(p, o, nr, ws, Qt);
    }

    // Row r's accumulator (Ev values) to the output, or to its partial record under split-K.
    auto finish = [&](int64_t r, const T* acc_row) {
      if (plan.n_splits == 1) {
        write_row(p, rows[r], acc_row, ws.m[r], ws.l[r]);
        return;
      }
      const int64_t rec = p.Ev + 2;  // (m, l, acc[Ev])
      T* dst =
          static_cast<T*>(plan.partials) +
          (((outer * plan.n_row_tiles + tile) * plan.n_splits + split) * plan.row_tile + r) * rec;
      dst[0] = ws.m[r];
      dst[1] = ws.l[r];
      std::copy(acc_row, acc_row + p.Ev, dst + 2);
    };
    if (!panels) {
      for (int64_t r = 0; r < nr; ++r) finish(r, ws.acc + r * p.Ev);
      return;
    }
    if constexpr (std::is_same_v<T, float>) {
      // acc^T of each panel back into rows, kW lanes at a time: Tr (kW x Ev).
      const panel::PanelSplit split_rows(nr);
      for (int64_t pi = 0; pi < split_rows.n_panels; ++pi) {
        const int64_t r0 = split_rows.first_row(pi), pr = split_rows.rows(pi);
        const int64_t ld = split_rows.ld(pi);
        for (int64_t i0 = 0; i0 < pr; i0 += panel::kW) {
          panel::transpose_from_lanes(ws.acc + r0 * p.Ev + i0, ld, p.Ev, ws.Tr, p.Ev);
          for (int64_t i = 0; i < panel::kW && i0 + i < pr; ++i)
            finish(r0 + i0 + i, ws.Tr + i * p.Ev);
        }
      }
    }
  }

  // The panel path (panel.hpp) serves float compute without per-score modifiers (masks, ALiBi,
  // softcap; causal, windows and kv_lengths are key ranges, which it handles) and without
  // attention_weights, for tiles of more than kGemvRows rows.
  static bool use_panels(const Problem& p, int64_t nr) {
    return std::is_same_v<T, float> && nr > kGemvRows && p.mask_kind == MaskKind::none &&
           !p.alibi.data && !(p.softcap > 0) && !p.weights.data;
  }

  // Rows [0, nr) of the tile over keys [jlo, jhi), in the panels of PanelSplit. Leaves the
  // running max and sum in ws.m, ws.l and acc^T in ws.acc (panel layout).
  static void run_panels(const Problem& p, const OuterOffsets& o, int64_t nr, int64_t jlo,
                         int64_t jhi, Scratch<T>& ws) {
    if constexpr (std::is_same_v<T, float>) {
      const RowInfo* rows = ws.rows;
      const panel::PanelSplit panels(nr);
      // Per panel: Q^T (E x ld) = scale * q rows (padding lanes 0), acc^T (Ev x ld) = 0, m = -inf,
      // l = 0.
      const auto* q = static_cast<const Store*>(p.q.data);
      for (int64_t pi = 0; pi < panels.n_panels; ++pi) {
        const int64_t r0 = panels.first_row(pi), pr = panels.rows(pi), ld = panels.ld(pi);
        T* qt = ws.Qs + r0 * p.E;
        for (int64_t i0 = 0; i0 < ld; i0 += panel::kW) {
          // Tr (kW x E) = the next kW rows (0 past the tile's last), then into lanes i0...
          for (int64_t i = 0; i < panel::kW; ++i) {
            T* dst = ws.Tr + i * p.E;
            if (i0 + i < pr)
              convert_row<T>(dst, 1, q + rows[r0 + i0 + i].q_off, p.q.col_stride, p.E, T(p.scale));
            else
              std::fill(dst, dst + p.E, T(0));
          }
          panel::transpose_to_lanes(ws.Tr, p.E, p.E, qt + i0, ld);
        }
        std::fill(ws.acc + r0 * p.Ev, ws.acc + r0 * p.Ev + ld * p.Ev, T(0));
        std::fill(ws.m + r0, ws.m + r0 + ld, kNegInf);
        std::fill(ws.l + r0, ws.l + r0 + ld, T(0));
      }

      for (int64_t j0 = jlo; j0 < jhi; j0 += ws.kb) {
        const int64_t nk = std::min(ws.kb, jhi - j0);
        const ConstMatMap<T> Kb = key_side_block<T, Store>(p.k, o.k, j0, nk, p.E, ws.Kc);
        const ConstMatMap<T> Vb = key_side_block<T, Store>(p.v, o.v, j0, nk, p.Ev, ws.Vc);
        for (int64_t pi = 0; pi < panels.n_panels; ++pi) {
          const int64_t r0 = panels.first_row(pi), pr = panels.rows(pi), ld = panels.ld(pi);
          // Keys [c0, c1) of the block that some row of the panel attends.
          const KeySpan span = attended_keys(rows + r0, pr, j0, j0 + nk);
          const int64_t c0 = span.lo - j0, c1 = span.hi - j0;
          // In sub-blocks of kPanelKeyBlock keys, so that the panel's P^T stays in L1.
          for (int64_t s0 = c0; s0 < c1; s0 += kPanelKeyBlock) {
            const int64_t s1 = std::min(c1, s0 + kPanelKeyBlock);
            const bool full = all_attend(rows + r0, pr, j0 + s0, j0 + s1);
            const PanelBlock blk{p.E,
                                 p.Ev,
                                 Kb.data() + s0 * Kb.outerStride(),
                                 Kb.outerStride(),
                                 Vb.data() + s0 * Vb.outerStride(),
                                 Vb.outerStride(),
                                 s1 - s0,
                                 full ? nullptr : rows + r0,
                                 pr,
                                 j0 + s0,
                                 ws.Qs + r0 * p.E,
                                 ws.Sb + r0 * ws.kb,
                                 ws.acc + r0 * p.Ev,
                                 ws.m + r0,
                                 ws.l + r0};
            switch (ld / panel::kW) {
              case 1:
                panel_block<1>(blk);
                break;
              case 2:
                panel_block<2>(blk);
                break;
              default:
                panel_block<3>(blk);
                break;
            }
          }
        }
      }
    }
  }

  // One panel against nc keys of a block (keys j_first .. j_first + nc - 1 of the sequence).
  struct PanelBlock {
    int64_t E, Ev;
    const T* k;  // K rows (nc x E), ldk apart
    int64_t ldk;
    const T* v;  // V rows (nc x Ev), ldv apart
    int64_t ldv;
    int64_t nc;
    const RowInfo* rows;  // the panel's rows when some keys are removed for some rows, else null
    int64_t n_rows, j_first;
    const T* qt;  // Q^T (E x ld)
    T* pt;        // P^T (nc x ld)
    T* acc;       // acc^T (Ev x ld)
    T* m;         // running max (ld)
    T* l;         // running sum (ld)
  };

  template <int MP>
  static void panel_block(const PanelBlock& b) {
    using panel::kNR;
    using panel::Packet;
    constexpr int64_t ld = MP * panel::kW;
    // P^T (nc x ld) = K_blk (nc x E) Q_panel^T (E x ld), and its per-row max.
    Packet vmax[MP];
    for (auto& x : vmax) x = Eigen::internal::pset1<Packet>(kNegInf);
    int64_t c = 0;
    for (; c + kNR <= b.nc; c += kNR)
      panel::score_tile<MP, kNR>(b.qt, b.E, b.k + c * b.ldk, b.ldk, b.pt + c * ld, vmax);
    for (; c < b.nc; ++c)
      panel::score_tile<MP, 1>(b.qt, b.E, b.k + c * b.ldk, b.ldk, b.pt + c * ld, vmax);
    if (b.rows) {
      // Removed keys -> -inf, row by row (a lane of the panel each), then the max again.
      for (int64_t i = 0; i < b.n_rows; ++i) {
        const int64_t lo = std::clamp<int64_t>(b.rows[i].lo - b.j_first, 0, b.nc);
        const int64_t hi = std::clamp<int64_t>(b.rows[i].hi - b.j_first, lo, b.nc);
        for (int64_t cc = 0; cc < lo; ++cc) b.pt[cc * ld + i] = kNegInf;
        for (int64_t cc = hi; cc < b.nc; ++cc) b.pt[cc * ld + i] = kNegInf;
      }
      for (auto& x : vmax) x = Eigen::internal::pset1<Packet>(kNegInf);
      panel::column_max<MP>(b.pt, b.nc, vmax);
    }
    Packet alpha[MP];
    panel::softmax_step<MP>(b.pt, b.nc, vmax, b.m, b.l, alpha);

    // acc^T (Ev x ld) = alpha * acc^T + V_blk^T (Ev x nc) P^T (nc x ld), keys in chunks of
    // kPanelKeys so that the chunk of P^T (kPanelKeys x ld) stays in L1 across the columns.
    for (int64_t c0 = 0; c0 < b.nc; c0 += kPanelKeys) {
      const int64_t n = std::min(kPanelKeys, b.nc - c0);
      const Packet* scale = c0 == 0 ? alpha : nullptr;
      const T* pt = b.pt + c0 * ld;
      const T* v = b.v + c0 * b.ldv;
      int64_t d = 0;
      for (; d + kNR <= b.Ev; d += kNR)
        panel::pv_tile<MP, kNR>(pt, n, v + d, b.ldv, b.acc + d * ld, scale);
      for (; d < b.Ev; ++d) panel::pv_tile<MP, 1>(pt, n, v + d, b.ldv, b.acc + d * ld, scale);
    }
  }
  // P = exp(s - m) over one score row in place (m is the row max, so s - m <= 0), returning
  // the row sum; removed keys (-inf) give exactly 0.
  static T exp_row(T* s, int64_t n, T m) {
#ifdef SDPA_FAST_EXP
    if constexpr (std::is_same_v<T, float>) {
      namespace ei = Eigen::internal;
      using P = ei::packet_traits<float>::type;
      constexpr int64_t W = ei::packet_traits<float>::size;
      const P vm = ei::pset1<P>(m);
      P total = ei::pset1<P>(0.0f);
      int64_t c = 0;
      for (; c + W <= n; c += W) {
        const P e = panel::exp_nonpositive(ei::psub(ei::ploadu<P>(s + c), vm));
        ei::pstoreu(s + c, e);
        total = ei::padd(total, e);
      }
      float sum = ei::predux(total);
      for (; c < n; ++c) {
        s[c] = std::exp(s[c] - m);  // std::exp(-inf) is 0
        sum += s[c];
      }
      return sum;
    }
#endif
    // Eigen's vectorised exp clamps its input (to about -88 in float) and so returns a tiny
    // positive `floor` for -inf; subtracting that floor and clipping at 0 stays vectorised
    // (Eigen 3.4's select is not) and changes no other value measurably: m is the row max, so
    // the values that matter are near 1 >> floor.
    static const T floor = Eigen::Array<T, 64, 1>::Constant(kNegInf).exp().maxCoeff();
    auto a = Eigen::Map<RowVec<T>>(s, n).array();
    a = ((a - m).exp() - floor).max(T(0));
    return a.sum();
  }

  // Scores of keys [j0, j0 + nk) for the tile's rows into ws.Sb, every score modifier applied
  // and removed keys at -inf. Returns false (Sb untouched) when no row may attend any of them.
  static bool score_block(const Problem& p, const OuterOffsets& o, int64_t nr, int64_t j0,
                          int64_t nk, Scratch<T>& ws, const ConstMatMap<T>& Qt) {
    const RowInfo* rows = ws.rows;
    const KeySpan span = attended_keys(rows, nr, j0, j0 + nk);
    if (span.lo >= span.hi) return false;
    const bool full = all_attend(rows, nr, j0, j0 + nk);

    // S_blk (nr x nk) = Q_tile (nr x E) * K_blk^T (E x nk)
    const ConstMatMap<T> Kb = key_side_block<T, Store>(p.k, o.k, j0, nk, p.E, ws.Kc);
    MatMap<T> Sb(ws.Sb, nr, nk, Eigen::OuterStride<>(ws.kb));
    if (nr <= kGemvRows) {
      // Few rows (decode): one pass over the keys, no packing; each K row, once loaded, serves
      // every query row of the tile.
      if constexpr (std::is_same_v<T, float>) {
        few_rows::scores(Qt.data(), nr, p.E, Kb.data(), Kb.outerStride(), nk, ws.Sb, ws.kb);
      } else {
        for (int64_t c = 0; c < nk; ++c)
          for (int64_t r = 0; r < nr; ++r) Sb(r, c) = Qt.row(r).dot(Kb.row(c));
      }
    } else {
      Sb.noalias() = Qt * Kb.transpose();
    }

    if (p.softcap > 0) {
      const T c = static_cast<T>(p.softcap), inv_c = T(1) / c;
      Sb = (Sb.array() * inv_c).tanh() * c;
    }
    if (p.mask_kind == MaskKind::additive) {
      const auto* mk = static_cast<const T*>(p.mask.data);
      const int64_t cs = p.mask.col_stride;
      for (int64_t r = 0; r < nr; ++r) {
        const T* mrow = mk + rows[r].mask_off + j0 * cs;
        T* srow = ws.Sb + r * ws.kb;
        if (cs == 1) {
          Eigen::Map<RowVec<T>>(srow, nk) += Eigen::Map<const RowVec<T>>(mrow, nk);
        } else {
          for (int64_t c = 0; c < nk; ++c) srow[c] += mrow[c * cs];
        }
      }
    }
    if (p.alibi.data) {
      for (int64_t r = 0; r < nr; ++r) {
        const T slope = static_cast<T>(rows[r].slope);
        if (slope == T(0)) continue;
        T* srow = ws.Sb + r * ws.kb;
        const int64_t d = rows[r].diag - j0, near = rows[r].near;  // |j - diag| = |c - d|
        for (int64_t c = 0; c < nk; ++c) srow[c] -= slope * static_cast<T>(std::abs(c - d) - near);
      }
    }
    if (!full) {
      for (int64_t r = 0; r < nr; ++r) {
        T* srow = ws.Sb + r * ws.kb;
        const int64_t lo = std::clamp<int64_t>(rows[r].lo - j0, 0, nk);
        const int64_t hi = std::clamp<int64_t>(rows[r].hi - j0, lo, nk);
        std::fill(srow, srow + lo, kNegInf);
        std::fill(srow + hi, srow + nk, kNegInf);
      }
    }
    if (p.mask_kind == MaskKind::boolean) {
      const auto* mk = static_cast<const uint8_t*>(p.mask.data);
      const int64_t cs = p.mask.col_stride;
      for (int64_t r = 0; r < nr; ++r) {
        const uint8_t* mrow = mk + rows[r].mask_off + j0 * cs;
        T* srow = ws.Sb + r * ws.kb;
        for (int64_t c = 0; c < nk; ++c) srow[c] = mrow[c * cs] ? srow[c] : kNegInf;
      }
    }

    return true;
  }

  static void process_block(const Problem& p, const OuterOffsets& o, int64_t nr, int64_t j0,
                            int64_t nk, Scratch<T>& ws, const ConstMatMap<T>& Qt, MatMap<T>& acc) {
    if (!score_block(p, o, nr, j0, nk, ws, Qt)) return;
    MatMap<T> Sb(ws.Sb, nr, nk, Eigen::OuterStride<>(ws.kb));

    // Online softmax update, row by row (rows of Sb are contiguous).
    bool live = false;
    for (int64_t r = 0; r < nr; ++r) {
      auto srow = Sb.row(r).array();
      T m_new = nan_max(ws.m[r], srow.maxCoeff());
      if (m_new == kNegInf) {
        // Nothing to attend to in this row so far, unless the max skipped a NaN score (the fast
        // max may): NaN must reach the output as NaN, as in the reference. Elsewhere a NaN
        // score turns exp and the row sum into NaN by itself.
        if (!srow.hasNaN()) {
          srow.setZero();
          continue;
        }
        m_new = std::numeric_limits<T>::quiet_NaN();
      }
      live = true;
      const T alpha = std::exp(ws.m[r] - m_new);  // 0 when m was -inf
      ws.l[r] = ws.l[r] * alpha + exp_row(ws.Sb + r * ws.kb, nk, m_new);
      ws.m[r] = m_new;
      if (alpha != T(1)) acc.row(r) *= alpha;
    }
    if (!live) return;

    // acc (nr x Ev) += P_blk (nr x nk) * V_blk (nk x Ev)
    const ConstMatMap<T> Vb = key_side_block<T, Store>(p.v, o.v, j0, nk, p.Ev, ws.Vc);
    if (nr <= kGemvRows) {
      if constexpr (std::is_same_v<T, float>) {
        few_rows::accumulate(ws.Sb, ws.kb, nr, Vb.data(), Vb.outerStride(), nk, p.Ev, ws.acc, p.Ev);
      } else {
        for (int64_t c = 0; c < nk; ++c)
          for (int64_t r = 0; r < nr; ++r) acc.row(r) += Sb(r, c) * Vb.row(c);
      }
    } else {
      acc.noalias() += Sb * Vb;
    }
  }

  // Second pass for attention_weights: with each row's final max m and sum l known, recompute
  // the scores block by block and write P = exp(s - m) / l over all S keys (0 where removed).
  static void write_weights(const Problem& p, const OuterOffsets& o, int64_t nr, Scratch<T>& ws,
                            const ConstMatMap<T>& Qt) {
    auto* w = static_cast<Store*>(const_cast<void*>(p.weights.data));
    const int64_t cs = p.weights.col_stride;
    for (int64_t j0 = 0; j0 < p.S; j0 += ws.kb) {
      const int64_t nk = std::min(ws.kb, p.S - j0);
      const bool scored = score_block(p, o, nr, j0, nk, ws, Qt);
      for (int64_t r = 0; r < nr; ++r) {
        T* srow = ws.Sb + r * ws.kb;
        const T l = ws.l[r];
        T inv_l = T(0);
        if (!scored || l == T(0)) {  // (a NaN l falls through: NaN weights, as in the reference)
          std::fill(srow, srow + nk, T(0));
        } else {
          exp_row(srow, nk, ws.m[r]);  // the same exp as the first pass, so rows sum to l / l
          inv_l = T(1) / l;
        }
        convert_row<T>(w + ws.rows[r].w_off + j0 * cs, cs, srow, 1, nk, inv_l);
      }
    }
  }

  // Writes out = acc / l (0 for a row with no key) and lse = m + log(l) (-inf for such a row).
  static void write_row(const Problem& p, const RowInfo& ri, const T* acc_row, T m, T l) {
    // l == 0: the row had no key left (output 0, lse -inf). A NaN l (NaN in the inputs) stays NaN.
    const T inv = l == T(0) ? T(0) : T(1) / l;
    auto* out = static_cast<Store*>(const_cast<void*>(p.out.data));
    convert_row<T>(out + ri.out_off, p.out.col_stride, acc_row, 1, p.Ev, inv);
    if (p.lse.data) {
      auto* lse = static_cast<T*>(const_cast<void*>(p.lse.data));
      // (less the ALiBi shift of the row's scores, see RowInfo::near)
      lse[ri.lse_off] = l == T(0) ? kNegInf : m + std::log(l) - static_cast<T>(ri.slope) * ri.near;
    }
  }

  static void run_items(const Problem& p, const Plan& plan, int64_t begin, int64_t end,
                        void* scratch) {
    Scratch<T> ws(p, plan, scratch);
    for (int64_t item = begin; item < end; ++item) run_item(p, plan, item, ws);
  }

  // Merges the splits of row tiles [begin, end) by log-sum-exp, always in split order 0, 1, ...
  static void merge_tiles(const Problem& p, const Plan& plan, int64_t begin, int64_t end,
                          void* scratch) {
    Scratch<T> ws(p, plan, scratch);
    const int64_t rec = p.Ev + 2;
    for (int64_t ot = begin; ot < end; ++ot) {
      const int64_t outer = ot / plan.n_row_tiles, tile = ot % plan.n_row_tiles;
      const OuterOffsets o = outer_offsets(p, outer);
      const int64_t t0 = tile * plan.row_tile;
      const int64_t nr = std::min(plan.row_tile, plan.rows - t0);
      describe_rows(p, o, t0, nr, ws.rows);
      const T* base =
          static_cast<const T*>(plan.partials) + ot * plan.n_splits * plan.row_tile * rec;
      for (int64_t r = 0; r < nr; ++r) {
        T m = kNegInf;
        for (int64_t s = 0; s < plan.n_splits; ++s)
          m = nan_max(m, base[(s * plan.row_tile + r) * rec]);
        Eigen::Map<RowVec<T>> acc(ws.acc, p.Ev);
        acc.setZero();
        T l = 0;
        if (m != kNegInf) {
          for (int64_t s = 0; s < plan.n_splits; ++s) {
            const T* part = base + (s * plan.row_tile + r) * rec;
            if (part[1] == T(0)) continue;
            const T w = std::exp(part[0] - m);
            l += w * part[1];
            acc += w * Eigen::Map<const RowVec<T>>(part + 2, p.Ev);
          }
        }
        write_row(p, ws.rows[r], ws.acc, m, l);
      }
    }
  }
};

template <template <DType> class F, typename... Args>
auto by_dtype(DType d, Args&&... args) {
  switch (d) {
    case DType::f16:
      return F<DType::f16>::call(std::forward<Args>(args)...);
    case DType::bf16:
      return F<DType::bf16>::call(std::forward<Args>(args)...);
    case DType::f32:
      return F<DType::f32>::call(std::forward<Args>(args)...);
    case DType::f64:
    default:
      return F<DType::f64>::call(std::forward<Args>(args)...);
  }
}

template <DType D>
struct ScratchBytes {
  static size_t call(const Problem& p, const Plan& plan) {
    return Scratch<typename Types<D>::Acc>::bytes(p, plan);
  }
};
template <DType D>
struct RunItems {
  static void call(const Problem& p, const Plan& plan, int64_t b, int64_t e, void* s) {
    Kernel<D>::run_items(p, plan, b, e, s);
  }
};
template <DType D>
struct MergeTiles {
  static void call(const Problem& p, const Plan& plan, int64_t b, int64_t e, void* s) {
    Kernel<D>::merge_tiles(p, plan, b, e, s);
  }
};

size_t scratch_bytes(const Problem& p, const Plan& plan) {
  return by_dtype<ScratchBytes>(p.dtype, p, plan);
}
void run_items(const Problem& p, const Plan& plan, int64_t b, int64_t e, void* s) {
  by_dtype<RunItems>(p.dtype, p, plan, b, e, s);
}
void merge_tiles(const Problem& p, const Plan& plan, int64_t b, int64_t e, void* s) {
  by_dtype<MergeTiles>(p.dtype, p, plan, b, e, s);
}

#define SDPA_STR2(x) #x
#define SDPA_STR(x) SDPA_STR2(x)
const KernelTable kTable = {kAbiVersion,
                            SDPA_ISA_NAME,
                            "compiler " __VERSION__ "; flags " SDPA_COMPILE_INFO
                            "; Eigen " SDPA_STR(EIGEN_WORLD_VERSION) "." SDPA_STR(
                                EIGEN_MAJOR_VERSION) "." SDPA_STR(EIGEN_MINOR_VERSION),
                            scratch_bytes,
                            run_items,
                            merge_tiles};

}  // namespace

const KernelTable* kernel_table() { return &kTable; }

}  // namespace sdpa
