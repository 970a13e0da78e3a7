// The panel micro-kernels from bfloat16 operands with VDPBF16PS (the avx512_bf16 variant only):
// each instruction does 32 multiply-adds of bf16 pairs into 16 float lanes, twice an fp32 FMA's
// work. Layout as in panel.hpp (query rows across the lanes of MP packets), but every quantity
// that is multiplied comes in pairs along the sum's index, one 32-bit word per lane and pair:
//   Q^T pairs  (ceil(E/2) x ld):  word (e2, row) = q[row][2 e2] | q[row][2 e2 + 1] << 16
//   K          read in place: the pair (k[2 e2], k[2 e2 + 1]) is one 32-bit broadcast
//   P^T pairs  (ceil(nc/2) x ld): word (c2, row) = bf16(p[2 c2][row]) | bf16(p[2 c2 + 1][row]) <<
//   16 V pairs    (ceil(nk/2) x Ev): word (c2, d) = v[2 c2][d] | v[2 c2 + 1][d] << 16, packed once
//              per key block for all the tile's panels
// As in FlashAttention: both products take bf16 operands and accumulate in float, P is rounded
// to bf16 for P.V, and the online softmax (max, exp, the sum l) stays in float on the unrounded
// P. Q is not pre-multiplied by the scale (a bf16 rounding of q * scale would cost accuracy): the
// scores are scaled in float when a chunk joins them. Included by attention.cpp only.
#pragma once

#if defined(__AVX512BF16__) && defined(EIGEN_VECTORIZE_AVX512)
#define SDPA_BF16_PANELS 1

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "panel.hpp"

namespace sdpa {
namespace panel_bf16 {

namespace ei = Eigen::internal;
using simd::kW;
using simd::Packet;
static_assert(kW == 16, "bf16 panels are AVX-512 only");

// dst[0, ceil(n/2)) = the words of a bf16 row of n elements (the last one half 0 for odd n).
inline void row_to_pairs(const uint16_t* row, int64_t n, uint32_t* dst) {
  const int64_t full = n / 2;
  std::memcpy(dst, row, static_cast<size_t>(full) * sizeof(uint32_t));
  if (n % 2) dst[full] = row[n - 1];
}

inline __m512 dot2(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

// Scores of NR keys against one panel, scaled, written to p and folded into the running max:
//   p[n][.] (NR x MP*kW) = scale * Q_panel (rows x E) k_n,  k_n = k + n * ldk (E bf16 each)
// qp: the panel's Q^T pairs (ceil(E/2) x MP*kW words). As in panel::score_tile, each chunk of
// 64 features (32 pairs) is summed as two interleaved halves and joins the score once.
template <int MP, int NR>
inline void score_tile(const uint32_t* qp, int64_t E, const uint16_t* k, int64_t ldk, float* p,
                       Packet* vmax, Packet scale) {
  constexpr int ld = MP * kW;
  constexpr int64_t kChunk = panel::kDotChunk / 2;  // pairs per chunk
  const int64_t E2 = E / 2;                         // whole pairs (an odd E has one more, padded)
  Packet acc[NR][MP], acc2[NR][MP];
  auto word = [&](int n, int64_t e2) {  // the pair e2 of key n, one 32-bit broadcast
    uint32_t w;
    std::memcpy(&w, k + n * ldk + 2 * e2, sizeof w);
    return _mm512_set1_epi32(static_cast<int>(w));
  };
  // acc[n][.] += the pair e2 of Q^T times w(n)
  auto step = [&](Packet(&into)[NR][MP], int64_t e2, auto&& w) {
    SDPA_UNROLL
    for (int n = 0; n < NR; ++n) {
      const __m512i b = w(n);
      SDPA_UNROLL
      for (int i = 0; i < MP; ++i)
        into[n][i] = dot2(into[n][i], _mm512_load_si512(qp + e2 * ld + i * kW), b);
    }
  };
  for (int64_t e0 = 0; e0 < E2 || e0 == 0; e0 += kChunk) {
    SDPA_UNROLL
    for (int n = 0; n < NR; ++n) SDPA_UNROLL
    for (int i = 0; i < MP; ++i) acc[n][i] = acc2[n][i] = _mm512_setzero_ps();
    const int64_t len = std::min(E2 - e0, kChunk), half = len / 2, h0 = e0 + len - half;
    for (int64_t e = 0; e < half; ++e) {  // pairs e0 + e and h0 + e, one to each set
      __m512i a[MP], a2[MP];
      SDPA_UNROLL
      for (int i = 0; i < MP; ++i) {
        a[i] = _mm512_load_si512(qp + (e0 + e) * ld + i * kW);
        a2[i] = _mm512_load_si512(qp + (h0 + e) * ld + i * kW);
      }
      SDPA_UNROLL
      for (int n = 0; n < NR; ++n) {
        const __m512i b = word(n, e0 + e);
        SDPA_UNROLL
        for (int i = 0; i < MP; ++i) acc[n][i] = dot2(acc[n][i], a[i], b);
        const __m512i b2 = word(n, h0 + e);
        SDPA_UNROLL
        for (int i = 0; i < MP; ++i) acc2[n][i] = dot2(acc2[n][i], a2[i], b2);
      }
    }
    if (len % 2) step(acc, e0 + half, [&](int n) { return word(n, e0 + half); });
    if (E % 2 && e0 + kChunk >= E2)  // an odd E's last feature, paired with 0
      step(acc2, E2, [&](int n) { return _mm512_set1_epi32(k[n * ldk + E - 1]); });
    SDPA_UNROLL
    for (int n = 0; n < NR; ++n) SDPA_UNROLL
    for (int i = 0; i < MP; ++i) {
      float* pn = p + n * ld + i * kW;
      const Packet s = ei::padd(acc[n][i], acc2[n][i]);
      acc[n][i] = e0 > 0 ? ei::pmadd(s, scale, ei::pload<Packet>(pn)) : ei::pmul(s, scale);
      ei::pstore(pn, acc[n][i]);
    }
  }
  SDPA_UNROLL
  for (int n = 0; n < NR; ++n) SDPA_UNROLL
  for (int i = 0; i < MP; ++i) vmax[i] = ei::pmax(vmax[i], acc[n][i]);
}

// P^T (nc x MP*kW floats) into P^T pairs (ceil(nc/2) x MP*kW words) in place, rounded to bf16
// (VCVTNE2PS2BF16, nearest even); a missing last key counts as 0. (Pair row c2 overwrites float
// row c2 <= 2 c2, which has been read by then.)
template <int MP>
inline void pairs_of_p(float* p, int64_t nc) {
  constexpr int ld = MP * kW;
  // word j of the result = element j (key 2 c2) | element 16 + j (key 2 c2 + 1) << 16
  const __m512i interleave =
      _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                       21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  auto* words = reinterpret_cast<uint32_t*>(p);
  for (int64_t c2 = 0; 2 * c2 < nc; ++c2) {
    const bool both = 2 * c2 + 1 < nc;
    __m512i w[MP];
    SDPA_UNROLL
    for (int i = 0; i < MP; ++i) {
      const Packet a = ei::pload<Packet>(p + 2 * c2 * ld + i * kW);
      const Packet b = both ? ei::pload<Packet>(p + (2 * c2 + 1) * ld + i * kW) : ei::pzero(a);
      w[i] = _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(b, a));
    }
    SDPA_UNROLL
    for (int i = 0; i < MP; ++i) _mm512_store_si512(words + c2 * ld + i * kW, w[i]);
  }
}

// V pairs (ceil(nk/2) x Ev words) of nk bf16 rows of Ev (ldv apart).
inline void pairs_of_v(const uint16_t* v, int64_t ldv, int64_t nk, int64_t Ev, uint32_t* vp) {
  for (int64_t c2 = 0; 2 * c2 < nk; ++c2) {
    const uint16_t* a = v + 2 * c2 * ldv;
    const bool both = 2 * c2 + 1 < nk;
    const uint16_t* b = both ? a + ldv : nullptr;
    uint32_t* dst = vp + c2 * Ev;
    int64_t d = 0;
    for (; d + kW <= Ev; d += kW) {
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(a + d)));
      const __m512i hi = both ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(b + d)))
                              : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + d, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
    for (; d < Ev; ++d) dst[d] = a[d] | (both ? static_cast<uint32_t>(b[d]) << 16 : 0u);
  }
}

// Whether nk bf16 rows of n (ld apart) hold no NaN or Inf (exponent bits all ones).
inline bool all_finite(const uint16_t* x, int64_t ld, int64_t nk, int64_t n) {
  uint16_t bad = 0;
  for (int64_t r = 0; r < nk; ++r)
    for (int64_t c = 0; c < n; ++c)
      bad |= static_cast<uint16_t>((x[r * ld + c] & 0x7F80) == 0x7F80);
  return bad == 0;
}

// NR columns of the panel's accumulator over n2 key pairs:
//   a[n][.] (NR x MP*kW) = scale[.] * a[n][.] + sum_c p[c][.] v_c[n]
// pp: P^T pairs (n2 x MP*kW words); vp: V pairs from the first column (rows ldv words apart).
template <int MP, int NR>
inline void pv_tile(const uint32_t* pp, int64_t n2, const uint32_t* vp, int64_t ldv, float* a,
                    const Packet* scale) {
  constexpr int ld = MP * kW;
  Packet acc[NR][MP];  // the chunk's sum from 0, joining a once (as panel::pv_tile)
  SDPA_UNROLL
  for (int n = 0; n < NR; ++n) SDPA_UNROLL
  for (int i = 0; i < MP; ++i) acc[n][i] = _mm512_setzero_ps();
  for (int64_t c2 = 0; c2 < n2; ++c2) {
    __m512i x[MP];
    SDPA_UNROLL
    for (int i = 0; i < MP; ++i) x[i] = _mm512_load_si512(pp + c2 * ld + i * kW);
    const uint32_t* vc = vp + c2 * ldv;
    SDPA_UNROLL
    for (int n = 0; n < NR; ++n) {
      const __m512i b = _mm512_set1_epi32(static_cast<int>(vc[n]));
      SDPA_UNROLL
      for (int i = 0; i < MP; ++i) acc[n][i] = dot2(acc[n][i], x[i], b);
    }
  }
  panel::join<MP, NR>(acc, a, scale);
}

// ---- Decode (the few-row path) from a bf16 query over bf16 K ----

// Features a step of decode_scores: 16 pairs, one zmm of a K row.
constexpr int64_t kDecodeStep = 32;

// s[i * lds] = scale * q_i . k for i < R: q rows of E bf16 (E apart, 64-byte aligned, E a
// multiple of kDecodeStep), k a row of E bf16. Products exact, summed in float.
template <int R>
inline void decode_dot(const uint16_t* q, int64_t E, const uint16_t* k, float scale, float* s,
                       int64_t lds) {
  __m512 acc[R];
  SDPA_UNROLL
  for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t e = 0; e < E; e += kDecodeStep) {
    const __m512i y = _mm512_loadu_si512(k + e);
    SDPA_UNROLL
    for (int i = 0; i < R; ++i) acc[i] = dot2(acc[i], _mm512_load_si512(q + i * E + e), y);
  }
  float t[R];
  if constexpr (R == 4) {
    few_rows::predux4(acc, t);
  } else {
    SDPA_UNROLL
    for (int i = 0; i < R; ++i) t[i] = _mm512_reduce_add_ps(acc[i]);
  }
  SDPA_UNROLL
  for (int i = 0; i < R; ++i) s[i * lds] = t[i] * scale;
}

// S (nr x nc, rows lds apart) = scale * Q K^T for nc K rows (ldk apart, read in place), one key
// at a time against up to 4 rows, as few_rows::scores but with half its instructions: a K row
// is loaded as it is stored (no conversion) and each VDPBF16PS does two features. V's rows are
// fetched into L2 as there.
inline void decode_scores(const uint16_t* q, int64_t nr, int64_t E, const uint16_t* k, int64_t ldk,
                          int64_t nc, float scale, float* s, int64_t lds, few_rows::Fetch v) {
  for (int64_t c = 0; c < nc; ++c) {
    if (v.row) simd::prefetch<2>(v.row + c * v.ld, v.bytes);
    const uint16_t* kc = k + c * ldk;
    few_rows::in_fours(nr, [=](int64_t r, auto R) {
      decode_dot<R()>(q + r * E, E, kc, scale, s + r * lds + c, lds);
    });
  }
}

// words[c2] for c2 < ceil(n / 2) rounded up to 16: the n floats of p rounded to bf16 (to
// nearest even) in pairs of consecutive keys, 0 past n.
inline void to_pairs(const float* p, int64_t n, uint32_t* words) {
  for (int64_t c = 0; c < n; c += 32) {
    const int64_t m = std::min<int64_t>(32, n - c);
    const auto lo = static_cast<__mmask16>(m >= 16 ? 0xFFFF : (1u << m) - 1);
    const auto hi = static_cast<__mmask16>(m >= 32 ? 0xFFFF : m > 16 ? (1u << (m - 16)) - 1 : 0);
    const __m512 a = _mm512_maskz_loadu_ps(lo, p + c), b = _mm512_maskz_loadu_ps(hi, p + c + 16);
    _mm512_storeu_si512(words + c / 2, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a)));
  }
}

// a[i * lda + x] += sum_c bf16(p_i[c]) v[c][x] for i < R, x < 32 * SEG, c < n: decode's P.V from
// bf16 V (rows ldv apart) with VDPBF16PS. w: the P rows as to_pairs words, ldw apart. Unpacking
// two V rows interleaves them into the key pairs VDPBF16PS takes, the columns permuted within
// each 128-bit lane (unpacklo: columns 0-3 of each group of 8, unpackhi: 4-7); the chunk's sum
// starts from 0 and is put back in column order as it joins `a`.
template <int R, int SEG>
inline void decode_pv(const uint32_t* w, int64_t ldw, const uint16_t* v, int64_t ldv, int64_t n,
                      float* a, int64_t lda) {
  __m512 acc[R][2 * SEG];
  SDPA_UNROLL
  for (int i = 0; i < R; ++i) SDPA_UNROLL
  for (int s = 0; s < 2 * SEG; ++s) acc[i][s] = _mm512_setzero_ps();
  auto step = [&](int64_t c2, const uint16_t* r0, const uint16_t* r1) {
    __m512i x[2 * SEG];
    SDPA_UNROLL
    for (int s = 0; s < SEG; ++s) {
      const __m512i y0 = _mm512_loadu_si512(r0 + 32 * s);
      const __m512i y1 = r1 ? _mm512_loadu_si512(r1 + 32 * s) : _mm512_setzero_si512();
      x[2 * s] = _mm512_unpacklo_epi16(y0, y1);
      x[2 * s + 1] = _mm512_unpackhi_epi16(y0, y1);
    }
    SDPA_UNROLL
    for (int i = 0; i < R; ++i) {
      const __m512i pw = _mm512_set1_epi32(static_cast<int>(w[i * ldw + c2]));
      SDPA_UNROLL
      for (int s = 0; s < 2 * SEG; ++s) acc[i][s] = dot2(acc[i][s], x[s], pw);
    }
  };
  int64_t c = 0;
  for (; c + 2 <= n; c += 2) step(c / 2, v + c * ldv, v + (c + 1) * ldv);
  if (c < n) step(c / 2, v + c * ldv, nullptr);  // (an odd last key, paired with 0)
  // lane x of the 16 columns [16 h, 16 h + 16) of a segment: word 4 g + j of unpacklo (j < 4)
  // or of unpackhi (j >= 4, index + 16), g = x / 8 + 2 h the 128-bit lane, j = x % 8
  const __m512i idx0 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i idx1 =
      _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  SDPA_UNROLL
  for (int i = 0; i < R; ++i) SDPA_UNROLL
  for (int s = 0; s < SEG; ++s) {
    float* as = a + i * lda + 32 * s;
    const __m512 lo = acc[i][2 * s], hi = acc[i][2 * s + 1];
    _mm512_storeu_ps(as, _mm512_add_ps(_mm512_loadu_ps(as), _mm512_permutex2var_ps(lo, idx0, hi)));
    _mm512_storeu_ps(as + 16,
                     _mm512_add_ps(_mm512_loadu_ps(as + 16), _mm512_permutex2var_ps(lo, idx1, hi)));
  }
}

// R rows of A (lda apart) += their P words times n V rows, 64 columns a pass (16 accumulators)
// and a last 32 (Ev a multiple of 32).
template <int R>
inline void decode_pv_rows(const uint32_t* w, int64_t ldw, const uint16_t* v, int64_t ldv,
                           int64_t n, int64_t Ev, float* a, int64_t lda) {
  int64_t x = 0;
  for (; x + 64 <= Ev; x += 64) decode_pv<R, 2>(w, ldw, v + x, ldv, n, a + x, lda);
  if (x < Ev) decode_pv<R, 1>(w, ldw, v + x, ldv, n, a + x, lda);
}

}  // namespace panel_bf16
}  // namespace sdpa
#endif
