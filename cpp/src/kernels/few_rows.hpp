// Micro-kernels for tiles of a few query rows (decode, GQA groups: at most 8 rows), in float.
// Lanes run along the embedding. Both loops walk K and V strictly row after row, each row read
// from memory once: a decode step streams them from DRAM, and interleaving rows or splitting
// them into column passes streamed worse (benchmarks/NOTES.md, sections 14 and 17). Included by
// attention.cpp only, so that it is compiled once per ISA.
#pragma once

#include <algorithm>
#include <cstdint>

#include "simd.hpp"

namespace sdpa {
namespace few_rows {

namespace ei = Eigen::internal;
using simd::kW;
using simd::Packet;

// Packets of a value row held in registers by the P.V loop: 2 rows x kRowPackets accumulators
// plus the operands must fit the register file (32 zmm: 16 + 1 + 2; 16 ymm: 8 + 1 + 2).
constexpr int kRowPackets = kW >= 16 ? 8 : 4;

// s[i * lds] = q_i . k for i < R: q rows E apart, k one row of E floats. Each K packet loaded
// serves all R rows.
template <int R>
inline void dot_block(const float* q, int64_t E, const float* k, float* s, int64_t lds) {
  Packet acc[R];
  SDPA_UNROLL
  for (int i = 0; i < R; ++i) acc[i] = ei::pzero(acc[i]);
  const int64_t Ew = E - E % kW;
  for (int64_t e = 0; e < Ew; e += kW) {
    const Packet y = ei::ploadu<Packet>(k + e);
    SDPA_UNROLL
    for (int i = 0; i < R; ++i) acc[i] = ei::pmadd(ei::ploadu<Packet>(q + i * E + e), y, acc[i]);
  }
  SDPA_UNROLL
  for (int i = 0; i < R; ++i) {
    float t = ei::predux(acc[i]);
    for (int64_t e = Ew; e < E; ++e) t += q[i * E + e] * k[e];
    s[i * lds] = t;
  }
}

// s[r * lds] = q_r . k for the nr rows, up to 4 at a time.
inline void dot_rows(const float* q, int64_t nr, int64_t E, const float* k, float* s, int64_t lds) {
  for (int64_t r = 0; r < nr; r += 4) {
    const float* qr = q + r * E;
    float* sr = s + r * lds;
    switch (std::min<int64_t>(4, nr - r)) {
      case 1:
        dot_block<1>(qr, E, k, sr, lds);
        break;
      case 2:
        dot_block<2>(qr, E, k, sr, lds);
        break;
      case 3:
        dot_block<3>(qr, E, k, sr, lds);
        break;
      default:
        dot_block<4>(qr, E, k, sr, lds);
        break;
    }
  }
}

// S (nr x nc, rows lds apart) = Q (nr x E, rows E apart) K^T for K (nc x E) rows ldk apart, one
// key at a time against up to 4 rows. (Two keys at a time, reading two K rows side by side, ran
// 18% slower from memory: section 17.)
inline void scores(const float* q, int64_t nr, int64_t E, const float* k, int64_t ldk, int64_t nc,
                   float* s, int64_t lds) {
  for (int64_t c = 0; c < nc; ++c) dot_rows(q, nr, E, k + c * ldk, s + c, lds);
}

// a[i * lda + x] += sum_c p[i * ldp + c] * v[c * ldv + x] for i < R, x < D * kW, c < nc.
template <int R, int D>
inline void axpy_block(const float* p, int64_t ldp, const float* v, int64_t ldv, int64_t nc,
                       float* a, int64_t lda) {
  // The chunk's sum starts from 0 and joins A once (adding each key's term to A, the running sum
  // of the whole key range, lost its bits: constant values of 3 over 2^31 keys averaged 2.0).
  Packet acc[R][D];
  SDPA_UNROLL
  for (int i = 0; i < R; ++i) SDPA_UNROLL
  for (int j = 0; j < D; ++j) acc[i][j] = ei::pzero(acc[i][j]);
  for (int64_t c = 0; c < nc; ++c) {
    Packet b[R];
    SDPA_UNROLL
    for (int i = 0; i < R; ++i) b[i] = ei::pset1<Packet>(p[i * ldp + c]);
    SDPA_UNROLL
    for (int j = 0; j < D; ++j) {
      const Packet y = ei::ploadu<Packet>(v + c * ldv + j * kW);
      SDPA_UNROLL
      for (int i = 0; i < R; ++i) acc[i][j] = ei::pmadd(b[i], y, acc[i][j]);
    }
  }
  SDPA_UNROLL
  for (int i = 0; i < R; ++i) SDPA_UNROLL
  for (int j = 0; j < D; ++j) {
    float* aij = a + i * lda + j * kW;
    ei::pstoreu(aij, ei::padd(ei::ploadu<Packet>(aij), acc[i][j]));
  }
}

// R rows of A (lda apart) += their P rows (ldp apart) times nc rows of V (Ev wide, ldv apart):
// whole rows of V at a time where they fit the registers.
template <int R>
inline void axpy_rows(const float* p, int64_t ldp, const float* v, int64_t ldv, int64_t nc,
                      int64_t Ev, float* a, int64_t lda) {
  int64_t x = 0;
  for (; x + kRowPackets * kW <= Ev; x += kRowPackets * kW)
    axpy_block<R, kRowPackets>(p, ldp, v + x, ldv, nc, a + x, lda);
  if constexpr (kRowPackets > 4) {
    for (; x + 4 * kW <= Ev; x += 4 * kW) axpy_block<R, 4>(p, ldp, v + x, ldv, nc, a + x, lda);
  }
  for (; x + kW <= Ev; x += kW) axpy_block<R, 1>(p, ldp, v + x, ldv, nc, a + x, lda);
  for (; x < Ev; ++x)
    for (int i = 0; i < R; ++i) {
      float sum = 0;
      for (int64_t c = 0; c < nc; ++c) sum += p[i * ldp + c] * v[c * ldv + x];
      a[i * lda + x] += sum;
    }
}

// A (nr x Ev, rows lda apart) += P (nr x nc, rows ldp apart) V (nc x Ev, rows ldv apart), in
// chunks of `chunk` keys (the plan's few_rows_pv_keys, so that a chunk of V stays in L1 for every
// pair of rows), two rows at a time.
inline void accumulate(const float* p, int64_t ldp, int64_t nr, const float* v, int64_t ldv,
                       int64_t nc, int64_t Ev, float* a, int64_t lda, int64_t chunk) {
  for (int64_t c0 = 0; c0 < nc; c0 += chunk) {
    const int64_t n = std::min(chunk, nc - c0);
    int64_t r = 0;
    for (; r + 2 <= nr; r += 2)
      axpy_rows<2>(p + r * ldp + c0, ldp, v + c0 * ldv, ldv, n, Ev, a + r * lda, lda);
    if (r < nr) axpy_rows<1>(p + r * ldp + c0, ldp, v + c0 * ldv, ldv, n, Ev, a + r * lda, lda);
  }
}

}  // namespace few_rows
}  // namespace sdpa
