// Flash-style attention kernel, compiled once per ISA (see CMakeLists.txt: SDPA_ISA_NAME and the
// -m flags). Pure C++ and Eigen: no Python, no threads, no allocation of its own; the driver hands
// it a range of work items and a scratch buffer.
//
// Algorithm: blocked attention with an online softmax (softmax.hpp). For one tile of query rows
// and each block of keys:
//   S_blk = Q_tile (nr x E) * K_blk^T (E x nk)          scores, Q pre-scaled by `scale`
//   S_blk = softcap * tanh(S_blk / softcap)             optional
//   S_blk += float mask, ALiBi; removed keys -> -inf
//   online softmax step: m, l, P_blk = exp(S_blk - m), acc = alpha * acc + P_blk * V_blk
// and finally out = acc / l (0 where l == 0: a row with no key left), lse = m + log(l).
// The L x S score matrix never exists: memory is O(row_tile * (E + Ev + key_block)) per worker.
//
// Three inner paths compute a tile (choose_path picks one by what each honours):
//   panels    query rows across SIMD lanes, register-blocked products (panel.hpp)
//   few_rows  <= plan.few_rows_max rows streaming K and V once (few_rows.hpp)
//   general   Eigen block products, every score modifier and the attention weights

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "convert.hpp"
#include "few_rows.hpp"
#include "panel.hpp"
#include "panel_bf16.hpp"
#include "sdpa/kernel.hpp"
#include "softmax.hpp"
#include "tile.hpp"

#ifndef SDPA_ISA_NAME
#error "SDPA_ISA_NAME must name the ISA variant this file is compiled for"
#endif
#ifndef SDPA_COMPILE_INFO
#define SDPA_COMPILE_INFO "unknown"
#endif

namespace sdpa {
namespace {

// ---- Path selection, by capability ----
// What a call asks of the kernel: one bit for each operand present (in Operand order), and one for
// each scalar option in use. A path is taken only if it honours every bit, so an operand added to
// kernel.hpp is served by the general path until another path declares it.
using Features = uint32_t;
static_assert(kOperandCount <= 24, "operand bits must not reach the option bits");
constexpr Features bit(Operand o) { return Features{1} << static_cast<int>(o); }
constexpr Features kSoftcap = Features{1} << 24;
constexpr Features kCausal = Features{1} << 25;
constexpr Features kWindow = Features{1} << 26;
constexpr Features kBottomRight = Features{1} << 27;

Features features_of(const Problem& p) {
  Features f = 0;
  for (int k = 0; k < kOperandCount; ++k)
    if (p.operand[k].data) f |= Features{1} << k;
  if (p.opt.softcap > 0) f |= kSoftcap;
  if (p.opt.causal) f |= kCausal;
  if (p.opt.window_left != kUnbounded || p.opt.window_right != kUnbounded) f |= kWindow;
  if (p.opt.alignment == Alignment::bottom_right) f |= kBottomRight;
  return f;
}

// The panel path computes plain scores and removes keys by per-row ranges only (causal, window,
// kv_lengths): no per-score modifier (masks, ALiBi, softcap) and no weights pass. Sinks are folded
// in when a row is written (write_row), which every path shares.
constexpr Features kPanelsHonour =
    bit(Operand::query) | bit(Operand::key) | bit(Operand::value) | bit(Operand::out) |
    bit(Operand::lse) | bit(Operand::kv_lengths) | bit(Operand::q_lengths) | bit(Operand::sinks) |
    bit(Operand::q_starts) | bit(Operand::kv_starts) | bit(Operand::q_offset) |
    bit(Operand::kv_offset) | bit(Operand::key_scales) | bit(Operand::value_scales) | kCausal |
    kWindow | kBottomRight;
// Every path reads key and value in their own storage type (kv_dtype), q8 scales included: the
// panels and the general path convert each key block once into the worker's block buffer
// (key_side_block), the few-row loops convert in registers as they stream the rows.
// The few-row and general paths apply every modifier to their score block.
constexpr Features kBlocksHonour = ~Features{0};

// The inner path for a tile of `rows` query rows computed in type T.
template <typename T>
Path choose_path(const Problem& p, const Plan& plan, int64_t rows) {
  constexpr bool fp32 = std::is_same_v<T, float>;  // the micro-kernels compute in float
  const Features need = features_of(p);
  if (fp32 && rows > plan.few_rows_max && (need & ~kPanelsHonour) == 0) return Path::panels;
  if (fp32 && rows <= plan.few_rows_max && (need & ~kBlocksHonour) == 0) return Path::few_rows;
  return Path::general;
}

// Where work item `item` lies: (outer index, row tile, key split).
struct Item {
  int64_t outer, tile, split;
  int64_t t0, nr;  // its query rows [t0, t0 + nr) of the (G x L) row space
};

Item locate(const Plan& plan, int64_t item) {
  Item it;
  it.split = item % plan.n_splits;
  it.tile = (item / plan.n_splits) % plan.n_row_tiles;
  if (plan.heavy_tiles_last) it.tile = plan.n_row_tiles - 1 - it.tile;  // big items first
  it.outer = item / plan.n_splits / plan.n_row_tiles;
  it.t0 = it.tile * plan.row_tile;
  it.nr = std::min(plan.row_tile, plan.rows - it.t0);
  return it;
}

template <DType D>
struct Kernel {
  using Store = typename Types<D>::Store;
  using T = typename Types<D>::Acc;
  static constexpr T kNegInf = -std::numeric_limits<T>::infinity();

  static void run_item(const Problem& p, const Plan& plan, int64_t item, Scratch<T>& ws) {
    if (plan.stop()) return;
    const Item it = locate(plan, item);
    const OuterOffsets o = outer_offsets(p, it.outer);
    describe_rows(p, o, it.t0, it.nr, ws.rows);

    // Keys this item visits: the span the rows attend, within this split's chunk.
    auto [jlo, jhi] = attended_keys(ws.rows, it.nr, 0, p.S);
    if (plan.n_splits > 1) {
      jlo = std::max(jlo, it.split * plan.split_len);
      jhi = std::min(jhi, (it.split + 1) * plan.split_len);
    }
    // Row r's accumulator (Ev values) to the output, or to its partial record under split-K.
    auto finish = [&](int64_t r, const T* acc_row) {
      if (ws.rows[r].absent) return;  // (not in memory: a packed call's padding row)
      if (plan.n_splits == 1) return write_row(p, ws.rows[r], acc_row, ws.m[r], ws.l[r]);
      const int64_t tile_index = it.outer * plan.n_row_tiles + it.tile;
      T* rec = static_cast<T*>(plan.partials) +
               PartialRecord::offset(plan, p.Ev, tile_index, it.split, r);
      PartialRecord::m(rec) = ws.m[r];
      PartialRecord::l(rec) = ws.l[r];
      std::copy(acc_row, acc_row + p.Ev, PartialRecord::acc(rec));
    };

    const Path path = choose_path<T>(p, plan, it.nr);
    if (path == Path::panels) {
      run_panels(p, plan, o, it.nr, jlo, jhi, ws);
      panels_to_rows(p, it.nr, ws, finish);
    } else {
      run_blocks(p, plan, o, it.nr, jlo, jhi, ws, path);
      for (int64_t r = 0; r < it.nr; ++r) finish(r, ws.acc + r * p.Ev);
    }
  }

  // ---- The few-row and general paths: block products over a row-major tile ----

  // Rows [0, nr) of the tile over keys [jlo, jhi), block by block. Leaves the running max and
  // sum in ws.m, ws.l and the accumulator (nr x Ev, row-major) in ws.acc; writes the weights.
  static void run_blocks(const Problem& p, const Plan& plan, const OuterOffsets& o, int64_t nr,
                         int64_t jlo, int64_t jhi, Scratch<T>& ws, Path path) {
    // Q_tile (nr x E) = scale * q rows, in T.
    const auto* q = static_cast<const Store*>(p.view(Operand::query).data);
    const int64_t qcs = p.view(Operand::query).col_stride;
    for (int64_t r = 0; r < nr; ++r) {
      T* dst = ws.Qs + r * p.E;
      if (ws.rows[r].absent)  // (a packed call's padding row: the next sequence's memory)
        std::fill(dst, dst + p.E, T(0));
      else
        convert_row<T>(dst, 1, q + ws.rows[r].q_off, qcs, p.E, T(p.opt.scale));
    }
    const ConstMatMap<T> Qtile(ws.Qs, nr, p.E, Eigen::OuterStride<>(p.E));
    MatMap<T> acc(ws.acc, nr, p.Ev, Eigen::OuterStride<>(p.Ev));
    acc.setZero();
    std::fill(ws.m, ws.m + nr, kNegInf);
    std::fill(ws.l, ws.l + nr, T(0));
    for (int64_t j0 = jlo; j0 < jhi && !plan.stop(); j0 += ws.kb) {
      const int64_t nk = std::min(ws.kb, jhi - j0);
      process_block(p, plan, o, nr, j0, nk, ws, Qtile, acc, path);
    }
    if (p.has(Operand::weights)) write_weights(p, plan, o, nr, ws, Qtile);
  }

  static void process_block(const Problem& p, const Plan& plan, const OuterOffsets& o, int64_t nr,
                            int64_t j0, int64_t nk, Scratch<T>& ws, const ConstMatMap<T>& Qtile,
                            MatMap<T>& acc, Path path) {
    const Scored scored = score_block(p, plan, o, nr, j0, nk, ws, Qtile, path);
    if (!scored.any) return;
    MatMap<T> Sb(ws.Sb, nr, nk, Eigen::OuterStride<>(ws.kb));

    // Online softmax step, row by row (rows of Sb are contiguous).
    bool live = false;  // whether any row has a key so far (else P.V adds nothing)
    for (int64_t r = 0; r < nr; ++r) {
      const softmax::Step<T> st = softmax::begin(ws.m[r], Sb.row(r).maxCoeff());
      const T sum = exp_row(ws.Sb + r * ws.kb, nk, st.m_use);
      softmax::end(st, sum, ws.m[r], ws.l[r]);
      if (st.alpha != T(1)) acc.row(r) *= st.alpha;
      live = live || st.m_new != kNegInf;
    }
    if (!live) return;

    // acc (nr x Ev) += P_blk (nr x nk) * V_blk (nk x Ev)
#ifdef SDPA_BF16_PANELS
    if constexpr (D == DType::bf16) {
      if (path == Path::few_rows && scored.full && nr <= kDecodeRows && bf16_decode_pv(p))
        return bf16_decode_pv(p, plan, o, nr, j0, nk, ws);
    }
#endif
    if constexpr (std::is_same_v<T, float>) {
      // V not in float (half precision, q8), a chunk of keys at a time (a partial block with
      // non-finite values is confined below instead): read in its storage and converted in
      // registers, 4 rows at a time, where its rows are contiguous (direct); otherwise converted
      // into the first rows of the block buffer, where it stays in L1 for all the tile's rows.
      if (path == Path::few_rows && scored.full && !mappable<T>(p, Operand::value)) {
        const bool in_place = direct(p, Operand::value);
        for (int64_t c0 = 0; c0 < nk; c0 += plan.few_rows_pv_keys) {
          const int64_t n = std::min(plan.few_rows_pv_keys, nk - c0);
          if (in_place) {
            with_rows(p, Operand::value, o, j0 + c0, n, ws.Vc, [&](const auto& v) {
              few_rows::accumulate_stored(ws.Sb + c0, ws.kb, nr, v, n, p.Ev, ws.acc, p.Ev);
            });
            continue;
          }
          const ConstMatMap<T> Vc =
              key_side_block<T>(p, Operand::value, o[Operand::value], o[Operand::value_scales],
                                j0 + c0, n, p.Ev, ws.Vc);
          few_rows::accumulate(ws.Sb + c0, ws.kb, nr, Vc.data(), Vc.outerStride(), n, p.Ev, ws.acc,
                               p.Ev);
        }
        return;
      }
    }
    const ConstMatMap<T> Vb = key_side_block<T>(p, Operand::value, o[Operand::value],
                                                o[Operand::value_scales], j0, nk, p.Ev, ws.Vc);
    // A NaN or Inf in V reaches exactly the rows that attend its key: where some row does not
    // attend some key of the block, the product would spread it to that row as 0 * NaN.
    if (!scored.full && !all_finite(Vb.data(), Vb.outerStride(), nk, p.Ev))
      return confined_pv(p, nr, j0, nk, ws, Vb, acc);
    if constexpr (std::is_same_v<T, float>) {
      if (path == Path::few_rows) {
        for (int64_t c0 = 0; c0 < nk; c0 += plan.few_rows_pv_keys)
          few_rows::accumulate(ws.Sb + c0, ws.kb, nr, Vb.data() + c0 * Vb.outerStride(),
                               Vb.outerStride(), std::min(plan.few_rows_pv_keys, nk - c0), p.Ev,
                               ws.acc, p.Ev);
        return;
      }
    }
    if (nr <= plan.few_rows_max) {  // (float64: rows of a few-row tile, without packing)
      for (int64_t c = 0; c < nk; ++c)
        for (int64_t r = 0; r < nr; ++r) acc.row(r) += Sb(r, c) * Vb.row(c);
    } else {
      acc.noalias() += Sb * Vb;
    }
  }

  // Whether the few-row loops read key-side operand `which` in place in its storage type
  // (float16, bfloat16, q8 with scale blocks of whole packets) rather than a converted block.
  static bool direct(const Problem& p, Operand which) {
    if (p.view(which).col_stride != 1) return false;
    switch (p.kv_dtype) {
      case DType::f16:
      case DType::bf16:
        return true;
      case DType::q8:
        return p.kv_block % simd::kW == 0 && p.view(scales_of(which)).col_stride == 1;
      default:  // (float32 is mapped: read in place already)
        return false;
    }
  }

  // The length of a row of key-side operand `which`: E for the key, Ev for the value.
  static int64_t row_length(const Problem& p, Operand which) {
    return which == Operand::value ? p.Ev : p.E;
  }

  // The rows of key-side operand `which` from key j0 as bytes to prefetch: the values read in
  // place (not q8's scales, a line of which serves many rows); none where they are converted.
  static few_rows::Fetch fetch_rows(const Problem& p, Operand which, const OuterOffsets& o,
                                    int64_t j0) {
    if (!direct(p, which)) return {};
    const View& v = p.view(which);
    const int64_t size = p.kv_dtype == DType::q8 ? 1 : 2;  // (direct: half precision or q8)
    return {static_cast<const char*>(v.data) + (o[which] + j0 * v.row_stride) * size,
            v.row_stride * size, row_length(p, which) * size};
  }

  // f(few_rows::Rows<S>) over the n rows of key-side operand `which` from key j0, in storage S.
  // q8's float16 scales of those rows are converted into `scales` (n x ceil(D / block) floats),
  // packets at a time: the loops then broadcast a scale from memory, where converting it there
  // took a scalar load, conversion and broadcast for each packet of K and V (NOTES section 33).
  template <typename F>
  static void with_rows(const Problem& p, Operand which, const OuterOffsets& o, int64_t j0,
                        int64_t n, float* scales, F&& f) {
    const View& v = p.view(which);
    const int64_t off = o[which] + j0 * v.row_stride;
    switch (p.kv_dtype) {
      case DType::f16:
        return f(few_rows::Rows<Eigen::half>{static_cast<const Eigen::half*>(v.data) + off,
                                             v.row_stride});
      case DType::bf16:
        return f(few_rows::Rows<Eigen::bfloat16>{static_cast<const Eigen::bfloat16*>(v.data) + off,
                                                 v.row_stride});
      case DType::q8: {
        const Operand so = scales_of(which);
        const View& sv = p.view(so);
        const auto* d = static_cast<const Eigen::half*>(sv.data) + o[so] + j0 * sv.row_stride;
        const int64_t nb = p.kv_blocks(row_length(p, which));
        if (sv.row_stride == nb) {  // (the scales of the n rows side by side: one run)
          convert_row<float>(scales, 1, d, 1, n * nb, 1.0f);
        } else {
          for (int64_t j = 0; j < n; ++j)
            convert_row<float>(scales + j * nb, 1, d + j * sv.row_stride, 1, nb, 1.0f);
        }
        return f(few_rows::Rows<int8_t>{static_cast<const int8_t*>(v.data) + off, v.row_stride,
                                        scales, nb, p.kv_block});
      }
      default:
        return;
    }
  }

  // acc (nr x Ev) += P_blk (nr x nk) * V_blk (nk x Ev) over the keys each row attends only.
  static void confined_pv(const Problem& p, int64_t nr, int64_t j0, int64_t nk,
                          const Scratch<T>& ws, const ConstMatMap<T>& Vb, MatMap<T>& acc) {
    for (int64_t r = 0; r < nr; ++r)
      for (int64_t c = 0; c < nk; ++c)
        if (attends(p, ws.rows[r], j0 + c)) acc.row(r) += ws.Sb[r * ws.kb + c] * Vb.row(c);
  }

  // Whether the row attends key j: inside its key range and not removed by a mask (a bool mask's
  // false, a float mask's -inf).
  static bool attends(const Problem& p, const RowInfo& ri, int64_t j) {
    if (j < ri.lo || j >= ri.hi) return false;
    if (p.has(Operand::bool_mask)) {
      const View& mv = p.view(Operand::bool_mask);
      return static_cast<const uint8_t*>(mv.data)[ri.mask_off + j * mv.col_stride] != 0;
    }
    if (p.has(Operand::float_mask)) {
      const View& mv = p.view(Operand::float_mask);
      return static_cast<const T*>(mv.data)[ri.mask_off + j * mv.col_stride] != kNegInf;
    }
    return true;
  }

  // P = exp(s - m) over one score row in place (m >= every s, or 0 for a row of -inf scores),
  // returning the row sum; removed keys (-inf) give exactly 0.
  static T exp_row(T* s, int64_t n, T m) {
#ifdef SDPA_FAST_EXP
    if constexpr (std::is_same_v<T, float>) {
      namespace ei = Eigen::internal;
      using simd::kW;
      using simd::Packet;
      const Packet vm = ei::pset1<Packet>(m);
      Packet total = ei::pset1<Packet>(0.0f);
      int64_t c = 0;
      for (; c + kW <= n; c += kW) {
        const Packet e = simd::exp_nonpositive_packet(ei::psub(ei::ploadu<Packet>(s + c), vm));
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

  // What score_block did: whether any row may attend a key of the block (else Sb is untouched),
  // and whether every row attends every key of it.
  struct Scored {
    bool any, full;
  };

  // Scores of keys [j0, j0 + nk) for the tile's rows into ws.Sb, every score modifier applied
  // and removed keys at -inf.
  static Scored score_block(const Problem& p, const Plan& plan, const OuterOffsets& o, int64_t nr,
                            int64_t j0, int64_t nk, Scratch<T>& ws, const ConstMatMap<T>& Qtile,
                            Path path) {
    const KeySpan span = attended_keys(ws.rows, nr, j0, j0 + nk);
    if (span.lo >= span.hi) return {false, false};

    // S_blk (nr x nk) = Q_tile (nr x E) * K_blk^T (E x nk)
    MatMap<T> Sb(ws.Sb, nr, nk, Eigen::OuterStride<>(ws.kb));
    auto key_block = [&] {
      return key_side_block<T>(p, Operand::key, o[Operand::key], o[Operand::key_scales], j0, nk,
                               p.E, ws.Kc);
    };
    bool done = false;
#ifdef SDPA_BF16_PANELS
    if constexpr (D == DType::bf16) {
      if (path == Path::few_rows && nr <= kDecodeRows && bf16_decode(p)) {
        bf16_decode_scores(p, o, nr, j0, nk, ws);
        done = true;
      }
    }
#endif
    if constexpr (std::is_same_v<T, float>) {
      if (path == Path::few_rows && !done) {  // one pass over the keys; each K row serves all rows
        if (direct(p, Operand::key)) {        // K read in its storage, converted in registers
          const few_rows::Fetch v = fetch_rows(p, Operand::value, o, j0);
          with_rows(p, Operand::key, o, j0, nk, ws.Kc, [&](const auto& k) {
            few_rows::scores(Qtile.data(), nr, p.E, k, nk, ws.Sb, ws.kb, v);
          });
        } else {  // (float32: streamed from memory, row after row; K read in place)
          const ConstMatMap<T> Kb = key_block();
          few_rows::scores(Qtile.data(), nr, p.E,
                           few_rows::Rows<float>{Kb.data(), Kb.outerStride()}, nk, ws.Sb, ws.kb);
        }
        done = true;
      }
    }
    if (!done) {
      const ConstMatMap<T> Kb = key_block();
      if (nr <= plan.few_rows_max) {  // (float64: dot products, without packing)
        for (int64_t c = 0; c < nk; ++c)
          for (int64_t r = 0; r < nr; ++r) Sb(r, c) = Qtile.row(r).dot(Kb.row(c));
      } else {
        Sb.noalias() = Qtile * Kb.transpose();
      }
    }
    const bool in_range = all_attend(ws.rows, nr, j0, j0 + nk);
    apply_modifiers(p, nr, j0, nk, ws, in_range);
    return {true, in_range && !p.has(Operand::bool_mask) && !p.has(Operand::float_mask)};
  }

  // The score modifiers, in the documented order: softcap, + float mask, + ALiBi; then every
  // boolean restriction (key ranges, bool mask) sets removed keys to -inf.
  static void apply_modifiers(const Problem& p, int64_t nr, int64_t j0, int64_t nk, Scratch<T>& ws,
                              bool all_in_range) {
    const RowInfo* rows = ws.rows;
    MatMap<T> Sb(ws.Sb, nr, nk, Eigen::OuterStride<>(ws.kb));
    if (p.opt.softcap > 0) softcap_rows(static_cast<T>(p.opt.softcap), nr, nk, ws);
    if (p.has(Operand::float_mask)) {
      mask_rows<T>(p, Operand::float_mask, nr, j0, ws, [&](T* srow, const T* mrow, int64_t cs) {
        // (-inf removes the key, even where its score is NaN: mask + NaN would be NaN)
        for (int64_t c = 0; c < nk; ++c) {
          const T mc = mrow[c * cs];
          srow[c] = mc == kNegInf ? kNegInf : srow[c] + mc;
        }
      });
    }
    if (p.has(Operand::alibi_slopes)) {
      for (int64_t r = 0; r < nr; ++r) {
        const T slope = static_cast<T>(rows[r].slope);
        if (slope == T(0)) continue;
        T* srow = ws.Sb + r * ws.kb;
        const int64_t d = rows[r].diag - j0, near = rows[r].near;  // |j - diag| = |c - d|
        for (int64_t c = 0; c < nk; ++c) srow[c] -= slope * static_cast<T>(std::abs(c - d) - near);
      }
    }
    if (!all_in_range) {
      for (int64_t r = 0; r < nr; ++r) {
        T* srow = ws.Sb + r * ws.kb;
        const int64_t lo = std::clamp<int64_t>(rows[r].lo - j0, 0, nk);
        const int64_t hi = std::clamp<int64_t>(rows[r].hi - j0, lo, nk);
        std::fill(srow, srow + lo, kNegInf);
        std::fill(srow + hi, srow + nk, kNegInf);
      }
    }
    if (p.has(Operand::bool_mask)) {
      mask_rows<uint8_t>(p, Operand::bool_mask, nr, j0, ws,
                         [&](T* srow, const uint8_t* mrow, int64_t cs) {
                           for (int64_t c = 0; c < nk; ++c)
                             srow[c] = mrow[c * cs] ? srow[c] : kNegInf;
                         });
    }
  }

  // s = c * tanh(s / c) over the tile's score rows (in float, with simd::tanh_packet: Eigen's
  // tanh is up to 4.6 ulp off, and the cap multiplies that error).
  static void softcap_rows(T c, int64_t nr, int64_t nk, Scratch<T>& ws) {
    if constexpr (std::is_same_v<T, float>) {
      namespace ei = Eigen::internal;
      using simd::Packet;
      const Packet vc = ei::pset1<Packet>(c);
      for (int64_t r = 0; r < nr; ++r) {
        T* srow = ws.Sb + r * ws.kb;
        int64_t j = 0;
        for (; j + simd::kW <= nk; j += simd::kW) {
          const Packet x = ei::pdiv(ei::ploadu<Packet>(srow + j), vc);
          ei::pstoreu(srow + j, ei::pmul(simd::tanh_packet(x), vc));
        }
        for (; j < nk; ++j) srow[j] = c * std::tanh(srow[j] / c);
      }
    } else {
      MatMap<T> Sb(ws.Sb, nr, nk, Eigen::OuterStride<>(ws.kb));
      Sb = (Sb.array() / c).tanh() * c;
    }
  }

  // Calls f(score row, mask row from key j0, the mask's column stride) for each row of the tile;
  // the mask is operand `which`, of element type M.
  template <typename M, typename F>
  static void mask_rows(const Problem& p, Operand which, int64_t nr, int64_t j0, Scratch<T>& ws,
                        F&& f) {
    const View& mv = p.view(which);
    const auto* mask = static_cast<const M*>(mv.data);
    for (int64_t r = 0; r < nr; ++r)
      f(ws.Sb + r * ws.kb, mask + ws.rows[r].mask_off + j0 * mv.col_stride, mv.col_stride);
  }

  // Second pass for attention_weights: with each row's final max m and sum l known, recompute
  // the scores block by block and write P = exp(s - m) / l over all S keys (0 where removed).
  static void write_weights(const Problem& p, const Plan& plan, const OuterOffsets& o, int64_t nr,
                            Scratch<T>& ws, const ConstMatMap<T>& Qtile) {
    const View& wv = p.view(Operand::weights);
    auto* w = static_cast<Store*>(const_cast<void*>(wv.data));
    const Path path = choose_path<T>(p, plan, nr);
    for (int64_t j0 = 0; j0 < p.S; j0 += ws.kb) {
      const int64_t nk = std::min(ws.kb, p.S - j0);
      const bool scored = score_block(p, plan, o, nr, j0, nk, ws, Qtile, path).any;
      for (int64_t r = 0; r < nr; ++r) {
        T* srow = ws.Sb + r * ws.kb;
        const T m = ws.m[r], l = ws.l[r];
        T inv_l = T(0);
        if (!scored || l == T(0)) {  // (a NaN l falls through: NaN weights, as in the reference)
          std::fill(srow, srow + nk, T(0));
        } else {
          exp_row(srow, nk, m);  // the same exp as the first pass, so rows sum to l / l
          // (a +inf max: exp gives NaN at its +inf keys and 0 elsewhere, as the reference does;
          // a sink takes its share, so the row then sums to less than 1)
          inv_l = m == -kNegInf ? T(1) : static_cast<T>(finish(ws.rows[r], m, l).factor);
        }
        convert_row<T>(w + ws.rows[r].w_off + j0 * wv.col_stride, wv.col_stride, srow, 1, nk,
                       inv_l);
      }
    }
  }

  // A finished row: the factor that turns its acc into the output, and its lse.
  struct Finished {
    double factor, lse;
  };

  // The softmax's final rule (softmax.hpp) for a row with running max m and sum l, in double: the
  // row's scores carry the ALiBi shift of RowInfo::near, taken back out of the lse here, and its
  // attention sink (if any) joins the denominator: out = acc / (l + e^(sink - m)) and lse =
  // log(e^lse_keys + e^sink). (In float, a shift of hundreds would cost the lse its digits when a
  // sink outweighs the keys.)
  static Finished finish(const RowInfo& ri, T m, T l) {
    const double lse_keys =
        static_cast<double>(softmax::lse(m, l)) - ri.slope * static_cast<double>(ri.near);
    Finished f{static_cast<double>(softmax::out_factor(l)), lse_keys};
    if (ri.padding) return {0.0, -std::numeric_limits<double>::infinity()};
    if (ri.sink != -std::numeric_limits<double>::infinity() &&
        lse_keys != std::numeric_limits<double>::infinity()) {  // (a +inf score: lse +inf)
      const double top = std::max(lse_keys, ri.sink);           // (a NaN lse_keys makes f.lse NaN)
      f.lse = top + std::log(std::exp(lse_keys - top) + std::exp(ri.sink - top));
      f.factor *= std::exp(lse_keys - f.lse);  // the keys' share (0 for a row with no key)
    }
    return f;
  }

  // Writes out = factor * acc and the lse (finish).
  static void write_row(const Problem& p, const RowInfo& ri, const T* acc_row, T m, T l) {
    const Finished f = finish(ri, m, l);
    const View& ov = p.view(Operand::out);
    auto* out = static_cast<Store*>(const_cast<void*>(ov.data));
    convert_row<T>(out + ri.out_off, ov.col_stride, acc_row, 1, p.Ev, static_cast<T>(f.factor));
    if (p.has(Operand::lse)) {
      auto* lse = static_cast<T*>(const_cast<void*>(p.view(Operand::lse).data));
      lse[ri.lse_off] = static_cast<T>(f.lse);
    }
  }

  // ---- The panel path (panel.hpp) ----

  // Rows [0, nr) of the tile over keys [jlo, jhi), in the panels of PanelSplit. Leaves the
  // running max and sum in ws.m, ws.l and acc^T in ws.acc (panel layout).
  static void run_panels(const Problem& p, const Plan& plan, const OuterOffsets& o, int64_t nr,
                         int64_t jlo, int64_t jhi, Scratch<T>& ws) {
#ifdef SDPA_BF16_PANELS
    if constexpr (D == DType::bf16) {
      if (bf16_panels(p)) return run_panels_bf16(p, plan, o, nr, jlo, jhi, ws);
    }
#endif
    if constexpr (std::is_same_v<T, float>) {
      const RowInfo* rows = ws.rows;
      const panel::PanelSplit panels(nr);
      load_panels(p, panels, ws);
      for (int64_t j0 = jlo; j0 < jhi && !plan.stop(); j0 += ws.kb) {
        const int64_t nk = std::min(ws.kb, jhi - j0);
        const ConstMatMap<T> Kb = key_side_block<T>(p, Operand::key, o[Operand::key],
                                                    o[Operand::key_scales], j0, nk, p.E, ws.Kc);
        const ConstMatMap<T> Vb = key_side_block<T>(p, Operand::value, o[Operand::value],
                                                    o[Operand::value_scales], j0, nk, p.Ev, ws.Vc);
        // V's values, checked once a block when some row does not attend some of its keys.
        const bool v_finite =
            all_attend(rows, nr, j0, j0 + nk) || all_finite(Vb.data(), Vb.outerStride(), nk, p.Ev);
        for (int64_t pi = 0; pi < panels.n_panels; ++pi) {
          const int64_t r0 = panels.first_row(pi), pr = panels.rows(pi);
          // Keys [c0, c1) of the block that some row of the panel attends.
          const KeySpan span = attended_keys(rows + r0, pr, j0, j0 + nk);
          const int64_t c0 = span.lo - j0, c1 = span.hi - j0;
          // In steps of plan.panel_step_keys keys, so that the panel's P^T stays in L1.
          for (int64_t s0 = c0; s0 < c1; s0 += plan.panel_step_keys) {
            const int64_t s1 = std::min(c1, s0 + plan.panel_step_keys);
            const bool full = all_attend(rows + r0, pr, j0 + s0, j0 + s1);
            PanelBlock blk = panel_of(p, plan, ws, r0, pr, j0 + s0, s1 - s0, full, v_finite);
            blk.k = Kb.data() + s0 * Kb.outerStride();
            blk.ldk = Kb.outerStride();
            blk.v = Vb.data() + s0 * Vb.outerStride();
            blk.ldv = Vb.outerStride();
            panel::with_packets(panels.packets(pi), [&](auto mp) { panel_block<mp()>(blk); });
          }
        }
      }
    }
  }

  // Per panel: Q^T (E x ld) = scale * q rows (padding lanes 0), acc^T (Ev x ld) = 0, m = -inf,
  // l = 0.
  static void load_panels(const Problem& p, const panel::PanelSplit& panels, Scratch<T>& ws) {
    const auto* q = static_cast<const Store*>(p.view(Operand::query).data);
    const int64_t qcs = p.view(Operand::query).col_stride;
    for (int64_t pi = 0; pi < panels.n_panels; ++pi) {
      const int64_t r0 = panels.first_row(pi), pr = panels.rows(pi), ld = panels.ld(pi);
      T* qt = ws.Qs + r0 * p.E;
      for (int64_t i0 = 0; i0 < ld; i0 += simd::kW) {
        // Tr (kW x E) = the next kW rows (0 past the tile's last), then into lanes i0...
        for (int64_t i = 0; i < simd::kW; ++i) {
          T* dst = ws.Tr + i * p.E;
          if (i0 + i < pr && !ws.rows[r0 + i0 + i].absent)
            convert_row<T>(dst, 1, q + ws.rows[r0 + i0 + i].q_off, qcs, p.E, T(p.opt.scale));
          else  // (past the tile, or a packed call's padding row)
            std::fill(dst, dst + p.E, T(0));
        }
        panel::transpose_to_lanes(ws.Tr, p.E, p.E, qt + i0, ld);
      }
      std::fill(ws.acc + r0 * p.Ev, ws.acc + r0 * p.Ev + ld * p.Ev, T(0));
      std::fill(ws.m + r0, ws.m + r0 + ld, kNegInf);
      std::fill(ws.l + r0, ws.l + r0 + ld, T(0));
    }
  }

  // acc^T of each panel back into rows, kW lanes at a time through Tr (kW x Ev); finish(r, row)
  // receives each row's accumulator.
  template <typename Finish>
  static void panels_to_rows(const Problem& p, int64_t nr, Scratch<T>& ws, Finish&& finish) {
    if constexpr (std::is_same_v<T, float>) {
      const panel::PanelSplit panels(nr);
      for (int64_t pi = 0; pi < panels.n_panels; ++pi) {
        const int64_t r0 = panels.first_row(pi), pr = panels.rows(pi), ld = panels.ld(pi);
        for (int64_t i0 = 0; i0 < pr; i0 += simd::kW) {
          panel::transpose_from_lanes(ws.acc + r0 * p.Ev + i0, ld, p.Ev, ws.Tr, p.Ev);
          for (int64_t i = 0; i < simd::kW && i0 + i < pr; ++i)
            finish(r0 + i0 + i, ws.Tr + i * p.Ev);
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
    int64_t pv_keys;      // keys per chunk of P.V
    bool v_finite;        // whether the block's V rows hold no NaN or Inf (checked when partial)
    const RowInfo* rows;  // the panel's rows when some keys are removed for some rows, else null
    int64_t n_rows, j_first;
    const T* qt;  // Q^T (E x ld)
    T* pt;        // P^T (nc x ld)
    T* acc;       // acc^T (Ev x ld)
    T* m;         // running max (ld)
    T* l;         // running sum (ld)
    // The bf16 panels' operands (panel_bf16.hpp): K and V rows in bf16 (k, v unused), V pairs
    // ((nc + 1) / 2 x Ev words), the scale the scores take (Q is not scaled).
    const uint16_t* kh = nullptr;
    const uint16_t* vh = nullptr;
    const uint32_t* vp = nullptr;
    T scale = T(1);
  };

  // The panel of rows [r0, r0 + pr) of the tile against nc keys from key j (its K and V
  // operands left for the caller); full: every row attends all of them.
  static PanelBlock panel_of(const Problem& p, const Plan& plan, const Scratch<T>& ws, int64_t r0,
                             int64_t pr, int64_t j, int64_t nc, bool full, bool v_finite) {
    PanelBlock blk{};
    blk.E = p.E;
    blk.Ev = p.Ev;
    blk.nc = nc;
    blk.pv_keys = plan.panel_pv_keys;
    blk.v_finite = v_finite;
    blk.rows = full ? nullptr : ws.rows + r0;
    blk.n_rows = pr;
    blk.j_first = j;
    blk.qt = ws.Qs + r0 * p.E;
    blk.pt = ws.Sb + r0 * ws.kb;
    blk.acc = ws.acc + r0 * p.Ev;
    blk.m = ws.m + r0;
    blk.l = ws.l + r0;
    return blk;
  }

  template <int MP>
  static void panel_block(const PanelBlock& b) {
    using panel::kNR;
    using simd::Packet;
    constexpr int64_t ld = MP * simd::kW;
    // P^T (nc x ld) = K_blk (nc x E) Q_panel^T (E x ld), and its per-row max.
    Packet vmax[MP];
    for (auto& x : vmax) x = Eigen::internal::pset1<Packet>(kNegInf);
    int64_t c = 0;
    constexpr int kSNR = panel::kScoreNR;
    for (; c + kSNR <= b.nc; c += kSNR)
      panel::score_tile<MP, kSNR>(b.qt, b.E, b.k + c * b.ldk, b.ldk, b.pt + c * ld, vmax);
    for (; c < b.nc; ++c)
      panel::score_tile<MP, 1>(b.qt, b.E, b.k + c * b.ldk, b.ldk, b.pt + c * ld, vmax);
    if (b.rows) remove_keys<MP>(b, vmax);
    Packet alpha[MP];
    panel::softmax_step<MP>(b.pt, b.nc, vmax, b.m, b.l, alpha);
    // As in process_block: NaN or Inf in V must not reach a lane that does not attend its key.
    if (b.rows && !b.v_finite) return confined_panel_pv<MP>(b, alpha);

    // acc^T (Ev x ld) = alpha * acc^T + V_blk^T (Ev x nc) P^T (nc x ld), keys in chunks of
    // pv_keys so that the chunk of P^T (pv_keys x ld) stays in L1 across the columns.
    for (int64_t c0 = 0; c0 < b.nc; c0 += b.pv_keys) {
      const int64_t n = std::min(b.pv_keys, b.nc - c0);
      const Packet* scale = c0 == 0 ? alpha : nullptr;
      const T* pt = b.pt + c0 * ld;
      const T* v = b.v + c0 * b.ldv;
      int64_t d = 0;
      for (; d + kNR <= b.Ev; d += kNR)
        panel::pv_tile<MP, kNR>(pt, n, v + d, b.ldv, b.acc + d * ld, scale);
      for (; d < b.Ev; ++d) panel::pv_tile<MP, 1>(pt, n, v + d, b.ldv, b.acc + d * ld, scale);
    }
  }

  // Removed keys -> -inf in P^T, row by row (a lane of the panel each), then the max again.
  template <int MP>
  static void remove_keys(const PanelBlock& b, simd::Packet* vmax) {
    constexpr int64_t ld = MP * simd::kW;
    for (int64_t i = 0; i < b.n_rows; ++i) {
      const int64_t lo = std::clamp<int64_t>(b.rows[i].lo - b.j_first, 0, b.nc);
      const int64_t hi = std::clamp<int64_t>(b.rows[i].hi - b.j_first, lo, b.nc);
      for (int64_t cc = 0; cc < lo; ++cc) b.pt[cc * ld + i] = kNegInf;
      for (int64_t cc = hi; cc < b.nc; ++cc) b.pt[cc * ld + i] = kNegInf;
    }
    for (int i = 0; i < MP; ++i) vmax[i] = Eigen::internal::pset1<simd::Packet>(kNegInf);
    panel::column_max<MP>(b.pt, b.nc, vmax);
  }

  // acc^T (Ev x ld) = alpha * acc^T + P^T V over the keys each lane attends only.
  template <int MP>
  static void confined_panel_pv(const PanelBlock& b, const simd::Packet* alpha) {
    namespace ei = Eigen::internal;
    constexpr int64_t ld = MP * simd::kW;
    for (int64_t d = 0; d < b.Ev; ++d)
      for (int i = 0; i < MP; ++i) {
        T* a = b.acc + d * ld + i * simd::kW;
        ei::pstore(a, ei::pmul(ei::pload<simd::Packet>(a), alpha[i]));
      }
    for (int64_t i = 0; i < b.n_rows; ++i) {
      const int64_t lo = std::clamp<int64_t>(b.rows[i].lo - b.j_first, 0, b.nc);
      const int64_t hi = std::clamp<int64_t>(b.rows[i].hi - b.j_first, lo, b.nc);
      for (int64_t c = lo; c < hi; ++c)
        for (int64_t d = 0; d < b.Ev; ++d)
          b.acc[d * ld + i] += b.pt[c * ld + i] * value_at(b, c, d);
    }
  }

  static T value_at(const PanelBlock& b, int64_t c, int64_t d) {
    if (!b.vh) return b.v[c * b.ldv + d];
    const uint32_t bits = static_cast<uint32_t>(b.vh[c * b.ldv + d]) << 16;  // bf16 to float
    float x;
    std::memcpy(&x, &bits, sizeof x);
    return x;
  }

#ifdef SDPA_BF16_PANELS
  // ---- The bf16 panels (panel_bf16.hpp): VDPBF16PS from bfloat16 operands ----

  // Whether a call takes them: a bfloat16 query over bfloat16 key and value with contiguous rows.
  static bool bf16_panels(const Problem& p) {
    return p.kv_dtype == DType::bf16 && p.view(Operand::key).col_stride == 1 &&
           p.view(Operand::value).col_stride == 1;
  }

  // Whether a few-row tile takes panel_bf16::decode_scores: bf16 K with contiguous rows, whole
  // steps of 32 features, and E small enough for the query rows' copy on the stack.
  static bool bf16_decode(const Problem& p) {
    return p.kv_dtype == DType::bf16 && p.view(Operand::key).col_stride == 1 &&
           p.E % panel_bf16::kDecodeStep == 0 && p.E <= kDecodeMaxE;
  }
  static constexpr int64_t kDecodeMaxE = 512, kDecodeRows = 8;  // (the query rows' stack copy)

  // Scores of keys [j0, j0 + nk) for the tile's rows into ws.Sb, from the bf16 query rows as
  // they are stored (Qtile holds them scaled, which bf16 cannot carry exactly).
  static void bf16_decode_scores(const Problem& p, const OuterOffsets& o, int64_t nr, int64_t j0,
                                 int64_t nk, Scratch<T>& ws) {
    alignas(64) uint16_t qb[kDecodeRows * kDecodeMaxE];
    const auto* q = static_cast<const uint16_t*>(p.view(Operand::query).data);
    const int64_t qcs = p.view(Operand::query).col_stride;
    for (int64_t r = 0; r < nr; ++r) {
      uint16_t* dst = qb + r * p.E;
      const uint16_t* src = q + ws.rows[r].q_off;
      for (int64_t e = 0; e < p.E; ++e) dst[e] = ws.rows[r].absent ? uint16_t{0} : src[e * qcs];
    }
    const View& kv = p.view(Operand::key);
    const auto* k = static_cast<const uint16_t*>(kv.data) + o[Operand::key] + j0 * kv.row_stride;
    panel_bf16::decode_scores(qb, nr, p.E, k, kv.row_stride, nk, static_cast<T>(p.opt.scale), ws.Sb,
                              ws.kb, fetch_rows(p, Operand::value, o, j0));
  }

  // Whether a few-row tile's P.V takes panel_bf16::decode_pv: bf16 V with contiguous rows, Ev in
  // whole steps of 32 columns. (Only where every row attends every key of the block: P's zeros
  // would not confine a NaN of V, as confined_pv does.)
  static bool bf16_decode_pv(const Problem& p) {
    return p.kv_dtype == DType::bf16 && p.view(Operand::value).col_stride == 1 && p.Ev % 32 == 0;
  }

  // acc (nr x Ev) += bf16(P_blk) V_blk from V's rows in place, a chunk of the plan's
  // few_rows_pv_keys keys at a time (in L1 for every group of 4 rows); P rounded to bf16 as in
  // the bf16 panels (FlashAttention's rule), its sum l taken before (by the softmax step).
  static void bf16_decode_pv(const Problem& p, const Plan& plan, const OuterOffsets& o, int64_t nr,
                             int64_t j0, int64_t nk, Scratch<T>& ws) {
    constexpr int64_t kMaxKeys = 64;  // (the P words' stack buffer: kMaxKeys / 2 a row)
    alignas(64) uint32_t w[kDecodeRows * kMaxKeys / 2];
    const int64_t chunk = std::min(plan.few_rows_pv_keys, kMaxKeys), ldw = kMaxKeys / 2;
    const View& vv = p.view(Operand::value);
    const auto* v = static_cast<const uint16_t*>(vv.data) + o[Operand::value];
    for (int64_t c0 = 0; c0 < nk; c0 += chunk) {
      const int64_t n = std::min(chunk, nk - c0);
      for (int64_t r = 0; r < nr; ++r) panel_bf16::to_pairs(ws.Sb + r * ws.kb + c0, n, w + r * ldw);
      const uint16_t* vc = v + (j0 + c0) * vv.row_stride;
      few_rows::in_fours(nr, [&](int64_t r, auto R) {
        panel_bf16::decode_pv_rows<R()>(w + r * ldw, ldw, vc, vv.row_stride, n, p.Ev,
                                        ws.acc + r * p.Ev, p.Ev);
      });
    }
  }

  // As run_panels, from bf16 operands. Each key block's V is packed into pairs once (in Vc) for
  // all panels; a panel's steps start at even keys of the block, so that they line up with those
  // pairs (a key that no row of the panel attends, taken in to round a step, is removed as -inf).
  static void run_panels_bf16(const Problem& p, const Plan& plan, const OuterOffsets& o, int64_t nr,
                              int64_t jlo, int64_t jhi, Scratch<T>& ws) {
    const RowInfo* rows = ws.rows;
    const panel::PanelSplit panels(nr);
    load_panels_bf16(p, panels, ws);
    const View &kv = p.view(Operand::key), &vv = p.view(Operand::value);
    const auto* k = static_cast<const uint16_t*>(kv.data) + o[Operand::key];
    const auto* v = static_cast<const uint16_t*>(vv.data) + o[Operand::value];
    auto* vp = reinterpret_cast<uint32_t*>(ws.Vc);
    for (int64_t j0 = jlo; j0 < jhi && !plan.stop(); j0 += ws.kb) {
      const int64_t nk = std::min(ws.kb, jhi - j0);
      const uint16_t* kb = k + j0 * kv.row_stride;
      const uint16_t* vb = v + j0 * vv.row_stride;
      panel_bf16::pairs_of_v(vb, vv.row_stride, nk, p.Ev, vp);
      const bool v_finite =
          all_attend(rows, nr, j0, j0 + nk) || panel_bf16::all_finite(vb, vv.row_stride, nk, p.Ev);
      for (int64_t pi = 0; pi < panels.n_panels; ++pi) {
        const int64_t r0 = panels.first_row(pi), pr = panels.rows(pi);
        const KeySpan span = attended_keys(rows + r0, pr, j0, j0 + nk);
        if (span.lo >= span.hi) continue;
        const int64_t c0 = (span.lo - j0) & ~int64_t{1};
        const int64_t c1 = std::min(nk, (span.hi - j0 + 1) & ~int64_t{1});
        for (int64_t s0 = c0; s0 < c1; s0 += plan.panel_step_keys) {  // (an even step)
          const int64_t s1 = std::min(c1, s0 + plan.panel_step_keys);
          const bool full = all_attend(rows + r0, pr, j0 + s0, j0 + s1);
          PanelBlock blk = panel_of(p, plan, ws, r0, pr, j0 + s0, s1 - s0, full, v_finite);
          blk.kh = kb + s0 * kv.row_stride;
          blk.ldk = kv.row_stride;
          blk.vh = vb + s0 * vv.row_stride;
          blk.ldv = vv.row_stride;
          blk.vp = vp + s0 / 2 * p.Ev;
          blk.scale = static_cast<T>(p.opt.scale);
          panel::with_packets(panels.packets(pi), [&](auto mp) { panel_block_bf16<mp()>(blk); });
        }
      }
    }
  }

  // Per panel: Q^T pairs ((E + 1) / 2 x ld words, unscaled; padding lanes 0), acc^T = 0,
  // m = -inf, l = 0.
  static void load_panels_bf16(const Problem& p, const panel::PanelSplit& panels, Scratch<T>& ws) {
    const auto* q = static_cast<const uint16_t*>(p.view(Operand::query).data);
    const int64_t qcs = p.view(Operand::query).col_stride, E2 = (p.E + 1) / 2;
    auto* tr = reinterpret_cast<uint32_t*>(ws.Tr);  // (kW x E2 words)
    uint16_t row[2];
    for (int64_t pi = 0; pi < panels.n_panels; ++pi) {
      const int64_t r0 = panels.first_row(pi), pr = panels.rows(pi), ld = panels.ld(pi);
      auto* qp = reinterpret_cast<uint32_t*>(ws.Qs + r0 * p.E);
      for (int64_t i0 = 0; i0 < ld; i0 += simd::kW) {
        for (int64_t i = 0; i < simd::kW; ++i) {
          uint32_t* dst = tr + i * E2;
          const RowInfo& ri = ws.rows[r0 + std::min(i0 + i, pr - 1)];
          if (i0 + i >= pr || ri.absent) {  // (past the tile, or a packed call's padding row)
            std::fill(dst, dst + E2, 0u);
            continue;
          }
          const uint16_t* src = q + ri.q_off;
          for (int64_t e = 0; e < E2; ++e) {  // (any column stride)
            row[0] = src[2 * e * qcs];
            row[1] = 2 * e + 1 < p.E ? src[(2 * e + 1) * qcs] : uint16_t{0};
            std::memcpy(dst + e, row, sizeof row);
          }
        }
        panel::transpose_to_lanes(reinterpret_cast<const float*>(tr), E2, E2,
                                  reinterpret_cast<float*>(qp + i0), ld);
      }
      std::fill(ws.acc + r0 * p.Ev, ws.acc + r0 * p.Ev + ld * p.Ev, T(0));
      std::fill(ws.m + r0, ws.m + r0 + ld, kNegInf);
      std::fill(ws.l + r0, ws.l + r0 + ld, T(0));
    }
  }

  template <int MP>
  static void panel_block_bf16(const PanelBlock& b) {
    using panel::kNR;
    using simd::Packet;
    constexpr int64_t ld = MP * simd::kW;
    const auto* qp = reinterpret_cast<const uint32_t*>(b.qt);
    const Packet scale = Eigen::internal::pset1<Packet>(b.scale);
    // P^T (nc x ld) = scale * K_blk (nc x E) Q_panel^T (E x ld), and its per-row max.
    Packet vmax[MP];
    for (auto& x : vmax) x = Eigen::internal::pset1<Packet>(kNegInf);
    int64_t c = 0;
    constexpr int kSNR = panel::kScoreNR;
    for (; c + kSNR <= b.nc; c += kSNR)
      panel_bf16::score_tile<MP, kSNR>(qp, b.E, b.kh + c * b.ldk, b.ldk, b.pt + c * ld, vmax,
                                       scale);
    for (; c < b.nc; ++c)
      panel_bf16::score_tile<MP, 1>(qp, b.E, b.kh + c * b.ldk, b.ldk, b.pt + c * ld, vmax, scale);
    if (b.rows) remove_keys<MP>(b, vmax);
    Packet alpha[MP];
    panel::softmax_step<MP, true>(b.pt, b.nc, vmax, b.m, b.l, alpha);
    if (b.rows && !b.v_finite) return confined_panel_pv<MP>(b, alpha);

    // acc^T (Ev x ld) = alpha * acc^T + V_blk^T P^T, P rounded to bf16 pairs, keys in chunks of
    // pv_keys (even) as in panel_block.
    panel_bf16::pairs_of_p<MP>(b.pt, b.nc);
    const auto* pp = reinterpret_cast<const uint32_t*>(b.pt);
    for (int64_t c0 = 0; c0 < b.nc; c0 += b.pv_keys) {
      const int64_t n2 = (std::min(b.pv_keys, b.nc - c0) + 1) / 2;
      const Packet* sc = c0 == 0 ? alpha : nullptr;
      const uint32_t* pc = pp + c0 / 2 * ld;
      const uint32_t* vc = b.vp + c0 / 2 * b.Ev;
      int64_t d = 0;
      for (; d + kNR <= b.Ev; d += kNR)
        panel_bf16::pv_tile<MP, kNR>(pc, n2, vc + d, b.Ev, b.acc + d * ld, sc);
      for (; d < b.Ev; ++d) panel_bf16::pv_tile<MP, 1>(pc, n2, vc + d, b.Ev, b.acc + d * ld, sc);
    }
  }
#endif

  // ---- Entry points ----

  // What the scratch must hold for this call (Scratch::Needs).
  static typename Scratch<T>::Needs needs(const Problem& p, const Plan& plan) {
    return {!mappable<T>(p, Operand::key), !mappable<T>(p, Operand::value),
            choose_path<T>(p, plan, plan.row_tile) == Path::panels};
  }

  static size_t scratch_bytes(const Problem& p, const Plan& plan) {
    return Scratch<T>(p, plan, needs(p, plan), nullptr).bytes;
  }

  static void run_items(const Problem& p, const Plan& plan, int64_t begin, int64_t end,
                        void* scratch) {
    Scratch<T> ws(p, plan, needs(p, plan), scratch);
    for (int64_t item = begin; item < end; ++item) run_item(p, plan, item, ws);
  }

  // Merges the splits of row tiles [begin, end): each split's partial record is folded in as one
  // step of the online softmax, always in split order 0, 1, ...
  static void merge_tiles(const Problem& p, const Plan& plan, int64_t begin, int64_t end,
                          void* scratch) {
    Scratch<T> ws(p, plan, needs(p, plan), scratch);
    for (int64_t ot = begin; ot < end; ++ot) {
      const OuterOffsets o = outer_offsets(p, ot / plan.n_row_tiles);
      const int64_t t0 = (ot % plan.n_row_tiles) * plan.row_tile;
      const int64_t nr = std::min(plan.row_tile, plan.rows - t0);
      describe_rows(p, o, t0, nr, ws.rows);
      for (int64_t r = 0; r < nr; ++r) {
        Eigen::Map<RowVec<T>> acc(ws.acc, p.Ev);
        acc.setZero();
        T m = kNegInf, l = T(0);
        for (int64_t s = 0; s < plan.n_splits; ++s) {
          T* rec = static_cast<T*>(plan.partials) + PartialRecord::offset(plan, p.Ev, ot, s, r);
          const softmax::Step<T> st = softmax::begin(m, PartialRecord::m(rec));
          const T w = softmax::partial_weight(st, PartialRecord::m(rec));
          if (st.alpha != T(1)) acc *= st.alpha;
          if (w != T(0)) acc += w * Eigen::Map<const RowVec<T>>(PartialRecord::acc(rec), p.Ev);
          softmax::end(st, w * PartialRecord::l(rec), m, l);
        }
        if (!ws.rows[r].absent) write_row(p, ws.rows[r], ws.acc, m, l);
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
    return Kernel<D>::scratch_bytes(p, plan);
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
template <DType D>
struct PathOf {
  static Path call(const Problem& p, const Plan& plan, int64_t rows) {
    return choose_path<typename Types<D>::Acc>(p, plan, rows);
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
Path path_of(const Problem& p, const Plan& plan, int64_t rows) {
  return by_dtype<PathOf>(p.dtype, p, plan, rows);
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
                            merge_tiles,
                            path_of};

}  // namespace

const KernelTable* kernel_table() { return &kTable; }

}  // namespace sdpa
