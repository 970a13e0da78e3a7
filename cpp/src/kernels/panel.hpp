// Register-blocked micro-kernels of the fused float path (Kernel::run_item_panels in
// attention.cpp; benchmarks/NOTES.md, section 13). Included by attention.cpp only, so that it is
// compiled once per ISA with that variant's flags.
//
// Panel layout: a panel holds up to kPanelRows query rows laid across the lanes of MP packets
// (MP <= kMaxPackets). An (X x rows) quantity of the panel is stored x-major: element (x, row) at
// x * MP * kW + row. Q^T (E x rows), the scores/probabilities P^T (keys x rows) and the
// accumulator acc^T (Ev x rows) all use it, so
//  - every per-row step of the online softmax (max, exp, sum, rescale) is a vertical packet
//    operation, with no horizontal reduction;
//  - neither product packs anything: K and V are read in place, row by row, and broadcast.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "simd.hpp"
#include "softmax.hpp"

namespace sdpa {
namespace panel {

namespace ei = Eigen::internal;
using simd::kW;
using simd::Packet;

constexpr int kMaxPackets = 3;                // packets of query rows per panel
constexpr int kPanelRows = kMaxPackets * kW;  // 48 (AVX-512), 24 (AVX2), 12 (SSE)
// Keys (scores) or value columns (P.V) per register block: MP x kNR accumulators must fit in the
// register file with room for the operands (32 zmm: 24 + 3 + 1; 16 ymm/xmm: 12 + 3 + 1).
constexpr int kNR = kW >= 16 ? 8 : 4;
// Rows of every per-worker panel buffer are rounded up to this (a multiple of kPanelRows on every
// ISA), so that panels start 64-byte aligned.
constexpr int64_t kRowQuantum = 48;
static_assert(kRowQuantum % kPanelRows == 0, "panels must tile the row quantum");

// How a tile of nr query rows splits into consecutive panels: its ceil(nr / kW) packets shared
// out as evenly as possible, at most kMaxPackets to a panel. Even shares matter: a 1-packet
// panel needs a broadcast per multiply-add and runs at about half the rate of a 3-packet one,
// so 64 rows run as 32 + 32 rather than 48 + 16 (benchmarks/NOTES.md, section 13).
struct PanelSplit {
  int64_t nr, n_panels, base, extra;
  explicit PanelSplit(int64_t rows) : nr(rows) {
    const int64_t packets = (rows + kW - 1) / kW;
    n_panels = (packets + kMaxPackets - 1) / kMaxPackets;
    base = n_panels ? packets / n_panels : 0;
    extra = n_panels ? packets % n_panels : 0;
  }
  int64_t packets(int64_t i) const { return base + (i < extra ? 1 : 0); }
  int64_t first_row(int64_t i) const { return (i * base + std::min(i, extra)) * kW; }
  int64_t ld(int64_t i) const { return packets(i) * kW; }  // lanes, padding included
  int64_t rows(int64_t i) const { return std::min(ld(i), nr - first_row(i)); }
};

// b (n x kW, rows ldb apart) = a^T for a (kW x n, rows lda apart): kW rows into the lanes of a
// panel (Q into Q^T).
inline void transpose_to_lanes(const float* a, int64_t lda, int64_t n, float* b, int64_t ldb) {
  int64_t x = 0;
  for (; x + kW <= n; x += kW) {
    ei::PacketBlock<Packet, kW> blk;
    SDPA_UNROLL
    for (int i = 0; i < kW; ++i) blk.packet[i] = ei::ploadu<Packet>(a + i * lda + x);
    ei::ptranspose(blk);
    SDPA_UNROLL
    for (int j = 0; j < kW; ++j) ei::pstoreu(b + (x + j) * ldb, blk.packet[j]);
  }
  for (; x < n; ++x) SDPA_UNROLL
  for (int i = 0; i < kW; ++i) b[x * ldb + i] = a[i * lda + x];
}

// b (kW x n, rows ldb apart) = a^T for a (n x kW, rows lda apart): kW lanes of a panel back into
// rows (acc^T into acc).
inline void transpose_from_lanes(const float* a, int64_t lda, int64_t n, float* b, int64_t ldb) {
  int64_t x = 0;
  for (; x + kW <= n; x += kW) {
    ei::PacketBlock<Packet, kW> blk;
    SDPA_UNROLL
    for (int j = 0; j < kW; ++j) blk.packet[j] = ei::ploadu<Packet>(a + (x + j) * lda);
    ei::ptranspose(blk);
    SDPA_UNROLL
    for (int i = 0; i < kW; ++i) ei::pstoreu(b + i * ldb + x, blk.packet[i]);
  }
  for (; x < n; ++x) SDPA_UNROLL
  for (int i = 0; i < kW; ++i) b[i * ldb + x] = a[x * lda + i];
}

// Accuracy of the scores: a float sum of E products loses bits in proportion to the length of its
// chain of additions. Each score is summed as two interleaved halves of each chunk of kDotChunk
// features (two sets of accumulators, added at the end), so no chain is longer than 32 products,
// and chunks join the score once each; against a float64 reference this took E = 512 from 2.4x
// PyTorch's error to below it, at no cost in register traffic for E <= kDotChunk.
constexpr int64_t kDotChunk = 64;
// Keys per register block of the score loop: two sets of MP x kScoreNR accumulators must fit in
// the register file with the operands (32 zmm: 24 + 6 + 1; 16 ymm/xmm: 12 + 2 + 1, one packet).
constexpr int kScoreNR = kW >= 16 ? 4 : 2;

// Scores of NR keys against one panel, written to p and folded into the running max:
//   p[n][.] (NR x MP*kW) = Q_panel (rows x E) k_n, k_n = k + n * ldk (E floats each)
//   vmax[.] = max(vmax[.], p[n][.])
// qt: the panel's Q^T (E x MP*kW).
template <int MP, int NR>
inline void score_tile(const float* qt, int64_t E, const float* k, int64_t ldk, float* p,
                       Packet* vmax) {
  constexpr int ld = MP * kW;
  Packet acc[NR][MP], acc2[NR][MP];
  for (int64_t e0 = 0; e0 < E || e0 == 0; e0 += kDotChunk) {
    SDPA_UNROLL
    for (int n = 0; n < NR; ++n) SDPA_UNROLL
    for (int i = 0; i < MP; ++i) acc[n][i] = acc2[n][i] = ei::pzero(acc[n][i]);
    const int64_t len = std::min(E - e0, kDotChunk), half = len / 2, h0 = e0 + len - half;
    for (int64_t e = 0; e < half; ++e) {  // features e0 + e and h0 + e, one to each set
      Packet a[MP], a2[MP];
      SDPA_UNROLL
      for (int i = 0; i < MP; ++i) {
        a[i] = ei::pload<Packet>(qt + (e0 + e) * ld + i * kW);
        a2[i] = ei::pload<Packet>(qt + (h0 + e) * ld + i * kW);
      }
      SDPA_UNROLL
      for (int n = 0; n < NR; ++n) {
        const Packet b = ei::pset1<Packet>(k[n * ldk + e0 + e]);
        SDPA_UNROLL
        for (int i = 0; i < MP; ++i) acc[n][i] = ei::pmadd(a[i], b, acc[n][i]);
        const Packet b2 = ei::pset1<Packet>(k[n * ldk + h0 + e]);
        SDPA_UNROLL
        for (int i = 0; i < MP; ++i) acc2[n][i] = ei::pmadd(a2[i], b2, acc2[n][i]);
      }
    }
    if (len % 2) {  // the odd feature, into the first set
      const int64_t e = e0 + half;
      SDPA_UNROLL
      for (int n = 0; n < NR; ++n) {
        const Packet b = ei::pset1<Packet>(k[n * ldk + e]);
        SDPA_UNROLL
        for (int i = 0; i < MP; ++i)
          acc[n][i] = ei::pmadd(ei::pload<Packet>(qt + e * ld + i * kW), b, acc[n][i]);
      }
    }
    SDPA_UNROLL
    for (int n = 0; n < NR; ++n) SDPA_UNROLL
    for (int i = 0; i < MP; ++i) {
      acc[n][i] = ei::padd(acc[n][i], acc2[n][i]);
      if (e0 > 0) acc[n][i] = ei::padd(acc[n][i], ei::pload<Packet>(p + n * ld + i * kW));
      ei::pstore(p + n * ld + i * kW, acc[n][i]);
    }
  }
  SDPA_UNROLL
  for (int n = 0; n < NR; ++n) SDPA_UNROLL
  for (int i = 0; i < MP; ++i) vmax[i] = ei::pmax(vmax[i], acc[n][i]);
}

// The running max of the panel's scores p[c][.] for c < nc (after removed keys were set to -inf).
template <int MP>
inline void column_max(const float* p, int64_t nc, Packet* vmax) {
  constexpr int ld = MP * kW;
  for (int64_t c = 0; c < nc; ++c) SDPA_UNROLL
  for (int i = 0; i < MP; ++i) vmax[i] = ei::pmax(vmax[i], ei::pload<Packet>(p + c * ld + i * kW));
}

// Online softmax step (softmax.hpp) of one panel over nc keys whose scores are in p (P^T,
// nc x MP*kW), vmax being their per-row max: p becomes exp(p - m_use), m and l (MP*kW floats
// each) move on, and alpha receives the factor that rescales the panel's accumulator. Coarse:
// the scores' exp to 3e-6 (simd::exp_nonpositive_coarse), for P that is rounded to bf16.
template <int MP, bool Coarse = false>
inline void softmax_step(float* p, int64_t nc, const Packet* vmax, float* m, float* l,
                         Packet* alpha) {
  constexpr int ld = MP * kW;
  softmax::Step<Packet> st[MP];
  Packet sum[MP];
  SDPA_UNROLL
  for (int i = 0; i < MP; ++i) {
    st[i] = softmax::begin(ei::pload<Packet>(m + i * kW), vmax[i]);
    alpha[i] = st[i].alpha;
    sum[i] = ei::pzero(sum[i]);
  }
  for (int64_t c = 0; c < nc; ++c) SDPA_UNROLL
  for (int i = 0; i < MP; ++i) {
    float* x = p + c * ld + i * kW;
    const Packet d = ei::psub(ei::pload<Packet>(x), st[i].m_use);
    const Packet e = Coarse ? simd::exp_nonpositive_coarse(d) : softmax::exp_nonpositive(d);
    ei::pstore(x, e);
    sum[i] = ei::padd(sum[i], e);
  }
  SDPA_UNROLL
  for (int i = 0; i < MP; ++i) {
    Packet mi = ei::pload<Packet>(m + i * kW), li = ei::pload<Packet>(l + i * kW);
    softmax::end(st[i], sum[i], mi, li);
    ei::pstore(m + i * kW, mi);
    ei::pstore(l + i * kW, li);
  }
}

// f(std::integral_constant<int, MP>{}) for a panel of `packets` packets: MP = 1, 2 or kMaxPackets.
template <typename F>
inline void with_packets(int64_t packets, F&& f) {
  switch (packets) {
    case 1:
      return f(std::integral_constant<int, 1>{});
    case 2:
      return f(std::integral_constant<int, 2>{});
    default:
      return f(std::integral_constant<int, kMaxPackets>{});
  }
}

// a[n][.] (NR x MP*kW) = scale[.] * a[n][.] + acc[n][.] (a + acc without a scale): a chunk's
// sum, started from 0, joins the running accumulator once.
template <int MP, int NR>
inline void join(const Packet (&acc)[NR][MP], float* a, const Packet* scale) {
  constexpr int ld = MP * kW;
  SDPA_UNROLL
  for (int n = 0; n < NR; ++n) SDPA_UNROLL
  for (int i = 0; i < MP; ++i) {
    float* an = a + n * ld + i * kW;
    const Packet old = ei::pload<Packet>(an);
    ei::pstore(an, scale ? ei::pmadd(old, scale[i], acc[n][i]) : ei::padd(old, acc[n][i]));
  }
}

// NR columns of the panel's accumulator, over nc keys:
//   a[n][.] (NR x MP*kW) = scale[.] * a[n][.] + sum_c p[c][.] v_c[n],  v_c = v + c * ldv
// p: P^T (nc x MP*kW); scale: MP packets, or null for none.
template <int MP, int NR>
inline void pv_tile(const float* p, int64_t nc, const float* v, int64_t ldv, float* a,
                    const Packet* scale) {
  constexpr int ld = MP * kW;
  // The chunk's sum starts from 0 and joins the running accumulator once at the end: adding each
  // key's small term to the large running sum would lose more of its bits.
  Packet acc[NR][MP];
  SDPA_UNROLL
  for (int n = 0; n < NR; ++n) SDPA_UNROLL
  for (int i = 0; i < MP; ++i) acc[n][i] = ei::pzero(acc[n][i]);
  for (int64_t c = 0; c < nc; ++c) {
    Packet x[MP];
    SDPA_UNROLL
    for (int i = 0; i < MP; ++i) x[i] = ei::pload<Packet>(p + c * ld + i * kW);
    const float* vc = v + c * ldv;
    SDPA_UNROLL
    for (int n = 0; n < NR; ++n) {
      const Packet b = ei::pset1<Packet>(vc[n]);
      SDPA_UNROLL
      for (int i = 0; i < MP; ++i) acc[n][i] = ei::pmadd(x[i], b, acc[n][i]);
    }
  }
  join<MP, NR>(acc, a, scale);
}

}  // namespace panel
}  // namespace sdpa
