// Micro-kernels for tiles of a few query rows (decode, GQA groups: at most 8 rows), in float.
// Lanes run along the embedding. Both loops walk K and V strictly row after row, each row read
// from memory once: a decode step streams them from DRAM, and interleaving rows or splitting
// them into column passes streamed worse (benchmarks/NOTES.md, sections 14 and 17). Included by
// attention.cpp only, so that it is compiled once per ISA.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

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
// key at a time against up to 4 rows: K streamed from memory in order. (Two keys at a time,
// reading two K rows side by side, ran 18% slower from memory: section 17.)
inline void scores(const float* q, int64_t nr, int64_t E, const float* k, int64_t ldk, int64_t nc,
                   float* s, int64_t lds) {
  for (int64_t c = 0; c < nc; ++c) dot_rows(q, nr, E, k + c * ldk, s + c, lds);
}

// out[n] = the sum of the lanes of a[n], n < 4 (a transposing tree: cheaper than 4 reductions).
inline void predux4(const Packet (&a)[4], float* out) {
#if defined(EIGEN_VECTORIZE_AVX512)
  __m256 h[4];
  for (int n = 0; n < 4; ++n)
    h[n] = _mm256_add_ps(_mm512_castps512_ps256(a[n]),
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a[n]), 1)));
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
#elif defined(EIGEN_VECTORIZE_AVX)
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
#else
  for (int n = 0; n < 4; ++n) out[n] = ei::predux(a[n]);
#endif
}

// s[i * lds + n] = q_i . k_n for i < R and 4 keys k_n (rows ldk apart): 4 x R accumulators, so
// that each load serves 4 or R multiply-adds. For K already in L1 (a converted chunk).
template <int R>
inline void dot_block_4keys(const float* q, int64_t E, const float* k, int64_t ldk, float* s,
                            int64_t lds) {
  Packet acc[R][4];
  SDPA_UNROLL
  for (int i = 0; i < R; ++i) SDPA_UNROLL
  for (int n = 0; n < 4; ++n) acc[i][n] = ei::pzero(acc[i][n]);
  const int64_t Ew = E - E % kW;
  for (int64_t e = 0; e < Ew; e += kW) {
    Packet y[4];
    SDPA_UNROLL
    for (int n = 0; n < 4; ++n) y[n] = ei::ploadu<Packet>(k + n * ldk + e);
    SDPA_UNROLL
    for (int i = 0; i < R; ++i) {
      const Packet x = ei::ploadu<Packet>(q + i * E + e);
      SDPA_UNROLL
      for (int n = 0; n < 4; ++n) acc[i][n] = ei::pmadd(x, y[n], acc[i][n]);
    }
  }
  SDPA_UNROLL
  for (int i = 0; i < R; ++i) {
    float t[4];
    predux4(acc[i], t);
    for (int n = 0; n < 4; ++n) {
      for (int64_t e = Ew; e < E; ++e) t[n] += q[i * E + e] * k[n * ldk + e];
      s[i * lds + n] = t[n];
    }
  }
}

// As scores, for K in L1 (a chunk converted from half precision or q8): 4 keys at a time.
inline void scores_cached(const float* q, int64_t nr, int64_t E, const float* k, int64_t ldk,
                          int64_t nc, float* s, int64_t lds) {
  int64_t c = 0;
  for (; c + 4 <= nc; c += 4)
    for (int64_t r = 0; r < nr; r += 4) {
      const float* qr = q + r * E;
      float* sr = s + r * lds + c;
      switch (std::min<int64_t>(4, nr - r)) {
        case 1:
          dot_block_4keys<1>(qr, E, k + c * ldk, ldk, sr, lds);
          break;
        case 2:
          dot_block_4keys<2>(qr, E, k + c * ldk, ldk, sr, lds);
          break;
        case 3:
          dot_block_4keys<3>(qr, E, k + c * ldk, ldk, sr, lds);
          break;
        default:
          dot_block_4keys<4>(qr, E, k + c * ldk, ldk, sr, lds);
          break;
      }
    }
  for (; c < nc; ++c) dot_rows(q, nr, E, k + c * ldk, s + c, lds);
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

// A (nr x Ev, rows lda apart) += P (nr x nc, rows ldp apart) V (nc x Ev, rows ldv apart), two
// rows at a time. The caller hands V over in chunks of the plan's few_rows_pv_keys keys, so
// that a chunk stays in L1 for every pair of rows (and a chunk converted from half precision or
// q8 is converted once for all of them).
inline void accumulate(const float* p, int64_t ldp, int64_t nr, const float* v, int64_t ldv,
                       int64_t nc, int64_t Ev, float* a, int64_t lda) {
  int64_t r = 0;
  for (; r + 2 <= nr; r += 2) axpy_rows<2>(p + r * ldp, ldp, v, ldv, nc, Ev, a + r * lda, lda);
  if (r < nr) axpy_rows<1>(p + r * ldp, ldp, v, ldv, nc, Ev, a + r * lda, lda);
}

// Packets of a value row per P.V register block with 4 query rows: 4 x kRowPackets4 accumulators
// plus the operands fit the register file (32 zmm: 16 + 4 + 1; 16 ymm: 8 + 4 + 1).
constexpr int kRowPackets4 = kW >= 16 ? 4 : 2;

// As accumulate, for V in L1 (a converted chunk): up to 4 rows at a time, so that each V packet
// loaded serves 4 multiply-adds (the rows of V are taken in column passes, from L1).
inline void accumulate_cached(const float* p, int64_t ldp, int64_t nr, const float* v, int64_t ldv,
                              int64_t nc, int64_t Ev, float* a, int64_t lda) {
  for (int64_t r = 0; r < nr; r += 4) {
    const float* pr = p + r * ldp;
    float* ar = a + r * lda;
    auto rows = [&](auto R) {
      constexpr int kR = decltype(R)::value;
      int64_t x = 0;
      for (; x + kRowPackets4 * kW <= Ev; x += kRowPackets4 * kW)
        axpy_block<kR, kRowPackets4>(pr, ldp, v + x, ldv, nc, ar + x, lda);
      for (; x + kW <= Ev; x += kW) axpy_block<kR, 1>(pr, ldp, v + x, ldv, nc, ar + x, lda);
      for (; x < Ev; ++x)
        for (int i = 0; i < kR; ++i) {
          float sum = 0;
          for (int64_t c = 0; c < nc; ++c) sum += pr[i * ldp + c] * v[c * ldv + x];
          ar[i * lda + x] += sum;
        }
    };
    switch (std::min<int64_t>(4, nr - r)) {
      case 1:
        rows(std::integral_constant<int, 1>{});
        break;
      case 2:
        rows(std::integral_constant<int, 2>{});
        break;
      case 3:
        rows(std::integral_constant<int, 3>{});
        break;
      default:
        rows(std::integral_constant<int, 4>{});
        break;
    }
  }
}

}  // namespace few_rows
}  // namespace sdpa
