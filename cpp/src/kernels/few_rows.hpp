// Micro-kernels for tiles of a few query rows (decode, GQA groups: at most 8 rows), in float.
// Lanes run along the embedding. Both loops walk K and V strictly row after row, each row read
// from memory once: a decode step streams them from DRAM, and interleaving rows or splitting
// them into column passes streamed worse (benchmarks/NOTES.md, sections 14 and 17). Included by
// attention.cpp only, so that it is compiled once per ISA.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "convert.hpp"
#include "simd.hpp"

namespace sdpa {
namespace few_rows {

namespace ei = Eigen::internal;
using simd::kW;
using simd::Packet;

// Packets of a value row held in registers by the P.V loop: 2 rows x kRowPackets accumulators
// plus the operands must fit the register file (32 zmm: 16 + 1 + 2; 16 ymm: 8 + 1 + 2).
constexpr int kRowPackets = kW >= 16 ? 8 : 4;

// Rows of a key-side operand as the loops read them, in its storage type S (float, Eigen::half,
// Eigen::bfloat16, or int8_t for q8), converted to float in registers: x rows ld apart; for q8
// the scales d as floats (the caller converts a block's float16 scales once), one per `block`
// elements of a row (block a multiple of kW), rows ldd apart. Decode streams K and V from
// memory, so reading half or a quarter of float's bytes is what makes it faster.
template <typename S>
struct Rows {
  static constexpr bool kQ8 = std::is_same_v<S, int8_t>;
  const S* x;
  int64_t ld;
  const float* d = nullptr;
  int64_t ldd = 0, block = 0;

  Rows at(int64_t c) const { return {x + c * ld, ld, kQ8 ? d + c * ldd : nullptr, ldd, block}; }
  // kW elements of row 0 from column e, as floats (not yet scaled, for q8).
  Packet load(int64_t e) const {
    if constexpr (std::is_same_v<S, float>) {
      return ei::ploadu<Packet>(x + e);
    } else if constexpr (kQ8) {
      return simd::load_i8(x + e);
    } else {
#ifdef SDPA_HALF_PACKETS
      return PacketOf<S>::to_float(ei::ploadu<typename PacketOf<S>::type>(x + e));
#else
      alignas(64) float f[kW];
      for (int i = 0; i < kW; ++i) f[i] = static_cast<float>(x[e + i]);
      return ei::pload<Packet>(f);
#endif
    }
  }
  float scale(int64_t e) const {
    if constexpr (kQ8) return d[e / block];
    return 1.0f;
  }
  float value(int64_t e) const { return static_cast<float>(x[e]) * scale(e); }
};

// out[i] = the sum of the lanes of a[i], i < 4: one transposing tree instead of 4 reductions.
inline void predux4(const Packet* a, float* out) {
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

// s[i * lds] = q_i . k for i < R: q rows E apart, k one row of E elements. Each K packet loaded
// serves all R rows. Packets alternate between two sets of accumulators (but for q8), so that a
// row's chain of dependent multiply-adds is half the row long (E = 128: 4 FMA latencies, not 8):
// the chain, not the FMA rate, bounded a float32 key in cache (NOTES section 30).
template <int R, typename S>
inline void dot_block(const float* q, int64_t E, const Rows<S>& k, float* s, int64_t lds) {
  Packet acc[2][R];
  SDPA_UNROLL
  for (int i = 0; i < R; ++i) acc[0][i] = acc[1][i] = ei::pzero(acc[0][i]);
  const int64_t Ew = E - E % kW;
  // q8: one scale per block of the row; the other types take the row in one piece.
  const int64_t step = Rows<S>::kQ8 ? k.block : std::max<int64_t>(Ew, 1);
  auto madd = [&](Packet(&into)[R], int64_t e, const Packet& sc) {
    Packet y = k.load(e);
    if constexpr (Rows<S>::kQ8) y = ei::pmul(y, sc);
    SDPA_UNROLL
    for (int i = 0; i < R; ++i) into[i] = ei::pmadd(ei::ploadu<Packet>(q + i * E + e), y, into[i]);
  };
  for (int64_t b0 = 0, b = 0; b0 < Ew; b0 += step, ++b) {
    const int64_t b1 = std::min(b0 + step, Ew);
    const Packet sc = ei::pset1<Packet>(Rows<S>::kQ8 ? k.d[b] : 1.0f);
    int64_t e = b0;
    if constexpr (!Rows<S>::kQ8) {  // (q8 measured 4% slower with two sets)
      for (; e + 2 * kW <= b1; e += 2 * kW) {
        madd(acc[0], e, sc);
        madd(acc[1], e + kW, sc);
      }
    }
    for (; e < b1; e += kW) madd(acc[0], e, sc);
  }
  SDPA_UNROLL
  for (int i = 0; i < R; ++i) acc[0][i] = ei::padd(acc[0][i], acc[1][i]);
  float t[R];
  if constexpr (R == 4) {
    predux4(acc[0], t);
  } else {
    SDPA_UNROLL
    for (int i = 0; i < R; ++i) t[i] = ei::predux(acc[0][i]);
  }
  SDPA_UNROLL
  for (int i = 0; i < R; ++i) {
    for (int64_t e = Ew; e < E; ++e) t[i] += q[i * E + e] * k.value(e);
    s[i * lds] = t[i];
  }
}

// s[i * lds] = q_i . k0 and s[i * lds + 1] = q_i . k1 for 4 rows: two keys a step, each Q packet
// loaded once for both, and one reduction tree for the 8 sums (NOTES section 30). E a multiple
// of kW (q8: of the block).
template <typename S>
inline void dot_block_pair(const float* q, int64_t E, const Rows<S>& k0, const Rows<S>& k1,
                           float* s, int64_t lds) {
  constexpr int R = 4;
  Packet acc[2][R], alt[2][R];  // (alt: odd packets)
  SDPA_UNROLL
  for (int i = 0; i < R; ++i) acc[0][i] = acc[1][i] = alt[0][i] = alt[1][i] = ei::pzero(acc[0][i]);
  const int64_t step = Rows<S>::kQ8 ? k0.block : E;
  auto madd = [&](Packet(&a)[2][R], int64_t e, const Packet& sc0, const Packet& sc1) {
    Packet y0 = k0.load(e), y1 = k1.load(e);
    if constexpr (Rows<S>::kQ8) {
      y0 = ei::pmul(y0, sc0);
      y1 = ei::pmul(y1, sc1);
    }
    SDPA_UNROLL
    for (int i = 0; i < R; ++i) {
      const Packet x = simd::in_register(ei::ploadu<Packet>(q + i * E + e));
      a[0][i] = ei::pmadd(x, y0, a[0][i]);
      a[1][i] = ei::pmadd(x, y1, a[1][i]);
    }
  };
  for (int64_t b0 = 0, b = 0; b0 < E; b0 += step, ++b) {
    const Packet sc0 = ei::pset1<Packet>(Rows<S>::kQ8 ? k0.d[b] : 1.0f);
    const Packet sc1 = ei::pset1<Packet>(Rows<S>::kQ8 ? k1.d[b] : 1.0f);
    int64_t e = b0;
    for (; e + 2 * kW <= b0 + step; e += 2 * kW) {
      madd(acc, e, sc0, sc1);
      madd(alt, e + kW, sc0, sc1);
    }
    if (e < b0 + step) madd(acc, e, sc0, sc1);
  }
  SDPA_UNROLL
  for (int i = 0; i < R; ++i) {
    acc[0][i] = ei::padd(acc[0][i], alt[0][i]);
    acc[1][i] = ei::padd(acc[1][i], alt[1][i]);
  }
  float t[2][R];
  predux4(acc[0], t[0]);
  predux4(acc[1], t[1]);
  SDPA_UNROLL
  for (int i = 0; i < R; ++i) {
    s[i * lds] = t[0][i];
    s[i * lds + 1] = t[1][i];
  }
}

// f(r, std::integral_constant<int, R>{}) for the rows [r, r + R) of nr rows taken 4 at a time
// (the last group what is left): the loops over a few rows take R as a template argument.
template <typename F>
inline void in_fours(int64_t nr, F&& f) {
  for (int64_t r = 0; r < nr; r += 4) {
    switch (std::min<int64_t>(4, nr - r)) {
      case 1:
        f(r, std::integral_constant<int, 1>{});
        break;
      case 2:
        f(r, std::integral_constant<int, 2>{});
        break;
      case 3:
        f(r, std::integral_constant<int, 3>{});
        break;
      default:
        f(r, std::integral_constant<int, 4>{});
        break;
    }
  }
}

// s[r * lds] = q_r . k for the nr rows, up to 4 at a time.
template <typename S>
inline void dot_rows(const float* q, int64_t nr, int64_t E, const Rows<S>& k, float* s,
                     int64_t lds) {
  in_fours(nr, [=](int64_t r, auto R) { dot_block<R()>(q + r * E, E, k, s + r * lds, lds); });
}

// Rows of V to fetch into L2 while the block's scores are computed, one as each key is scored,
// for the P.V loop that follows (row c at row + c * ld, `bytes` long; none when row is null).
// Converting V from half precision or q8 otherwise waited on each row's misses: compute and
// memory took turns.
struct Fetch {
  const char* row = nullptr;
  int64_t ld = 0, bytes = 0;
};

// How many keys ahead of the pair scored the two-key loop fetches K rows into L1. With the
// hardware prefetcher alone, that loop waited on K: from memory, decode over a float16, q8 or
// bfloat16 cache (float32 query) ran 5-26% faster with it (NOTES section 33).
constexpr int64_t kKeyPrefetch = 16;

// The pairs of keys [0, 2 * (nc / 2)) of `scores` below, against nr rows taken 4 at a time.
// kOneGroup (nr is 4, GQA-4 decode) keeps that case as it was measured before nr = 8 joined:
// small changes to this loop's code moved GQA-4 decode by 3-7% (NOTES section 34).
template <bool kOneGroup, typename S>
inline int64_t score_pairs(const float* q, int64_t nr, int64_t E, const Rows<S>& k, int64_t nc,
                           float* s, int64_t lds, const Fetch& v) {
  const int64_t kbytes = E * static_cast<int64_t>(sizeof(S));
  int64_t c = 0;
  for (; c + 2 <= nc; c += 2) {
    if (c + kKeyPrefetch + 2 <= nc) {
      simd::prefetch<3>(k.at(c + kKeyPrefetch).x, kbytes);
      simd::prefetch<3>(k.at(c + kKeyPrefetch + 1).x, kbytes);
    }
    if (v.row) {
      simd::prefetch<2>(v.row + c * v.ld, v.bytes);
      simd::prefetch<2>(v.row + (c + 1) * v.ld, v.bytes);
    }
    if constexpr (kOneGroup) {
      dot_block_pair(q, E, k.at(c), k.at(c + 1), s + c, lds);
    } else {
      for (int64_t r = 0; r < nr; r += 4)
        dot_block_pair(q + r * E, E, k.at(c), k.at(c + 1), s + r * lds + c, lds);
    }
  }
  return c;
}

#if defined(EIGEN_VECTORIZE_AVX512)
// q8 keys 16 at a time, lanes along the keys (NOTES section 35). Along the embedding, each key's
// dot product needs a reduction across lanes at its end and a scale multiply on every packet;
// across keys, a lane is a key, so there is no reduction and a block's scale multiplies a
// block's sum once. The price is a transpose of the 16 rows, done on dwords (4 elements each):
// per 32 elements, 8 loads with inserts and 24 shuffles give 8 vectors, each one 4-element
// quad of all 16 keys, in key order. A shuffle then moves element i of every dword to its top
// byte with zeros below: the int32 is k * 2^24, exactly a float after conversion, which is why
// the query rows come scaled by 2^-24 (exact but where q is below 2^-102, whose scores are too
// small to move a softmax). One conversion and no sign extension per 16 values.
namespace keys16 {

constexpr int64_t kKeys = 16;
constexpr float kScale = 1.0f / 16777216.0f;  // 2^-24: q8 values come out as k * 2^24

// The quads (4 elements, a dword) [h, h + 32) of the 16 rows of k (rows ld apart), as 8 vectors
// t[w]: quad w of the 16 keys, in key order.
inline void transpose_quads(const int8_t* x, int64_t ld, int64_t h, __m512i (&t)[8]) {
  auto half = [&](int64_t row) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + row * ld + h));
  };
  __m512i g[2][4];
  SDPA_UNROLL
  for (int grp = 0; grp < 2; ++grp) {
    __m512i z[4];  // rows 8 grp + j (lanes 0-1: quads 0-3, 4-7) and 8 grp + 4 + j (lanes 2-3)
    SDPA_UNROLL
    for (int j = 0; j < 4; ++j)
      z[j] =
          _mm512_inserti64x4(_mm512_castsi256_si512(half(8 * grp + j)), half(8 * grp + 4 + j), 1);
    // 4 x 4 dword transposes within each 128-bit lane: lane L of g[grp][w] is quad w of the
    // four rows that lane L of z holds.
    const __m512i t0 = _mm512_unpacklo_epi32(z[0], z[1]), t1 = _mm512_unpackhi_epi32(z[0], z[1]);
    const __m512i t2 = _mm512_unpacklo_epi32(z[2], z[3]), t3 = _mm512_unpackhi_epi32(z[2], z[3]);
    g[grp][0] = _mm512_unpacklo_epi64(t0, t2);
    g[grp][1] = _mm512_unpackhi_epi64(t0, t2);
    g[grp][2] = _mm512_unpacklo_epi64(t1, t3);
    g[grp][3] = _mm512_unpackhi_epi64(t1, t3);
  }
  SDPA_UNROLL
  for (int w = 0; w < 4; ++w) {  // lanes 0 and 2 (quad w), 1 and 3 (quad 4 + w) of both groups
    t[w] = _mm512_shuffle_i32x4(g[0][w], g[1][w], 0x88);
    t[4 + w] = _mm512_shuffle_i32x4(g[0][w], g[1][w], 0xDD);
  }
}

// Element I of each dword of t at the dword's top byte, zeros below: k * 2^24, as floats.
template <int I>
inline __m512 element(const __m512i& t) {
  if constexpr (I == 3) {
    return _mm512_cvtepi32_ps(_mm512_and_si512(t, _mm512_set1_epi32(int32_t(0xFF000000u))));
  } else {
    // (vpshufb indexes bytes within each 128-bit lane; an index of 0x80 writes a zero)
    const __m512i ctl =
        _mm512_set4_epi32(int32_t(0x0C808080u + (I << 24)), int32_t(0x08808080u + (I << 24)),
                          int32_t(0x04808080u + (I << 24)), int32_t(0x00808080u + (I << 24)));
    return _mm512_cvtepi32_ps(_mm512_shuffle_epi8(t, ctl));
  }
}

// s[i * lds + c] = q_i . k_c for i < R, c < 16: q rows E apart, scaled by 2^-24; E a multiple of
// 32 and the scale block of 16. 8 / R sets of R accumulators keep 8 chains of multiply-adds in
// flight (two FMA pipes of 4 cycles' latency).
template <int R>
inline void dot16(const float* q, int64_t E, const Rows<int8_t>& k, const __m512i& scale_index,
                  float* s, int64_t lds) {
  constexpr int NS = 8 / R;
  __m512 sum[R], acc[NS][R];
  SDPA_UNROLL
  for (int i = 0; i < R; ++i) {
    sum[i] = _mm512_setzero_ps();
    SDPA_UNROLL
    for (int n = 0; n < NS; ++n) acc[n][i] = _mm512_setzero_ps();
  }
  auto madd = [&](int set, const __m512& col, int64_t e) {
    SDPA_UNROLL
    for (int i = 0; i < R; ++i)
      acc[set][i] = _mm512_fmadd_ps(_mm512_set1_ps(q[i * E + e]), col, acc[set][i]);
  };
  int64_t b = 0, next = k.block;  // the block being summed, and where it ends
  for (int64_t h = 0; h < E; h += 32) {
    __m512i t[8];
    transpose_quads(k.x, k.ld, h, t);
    SDPA_UNROLL
    for (int w = 0; w < 8; ++w) {
      const int64_t e = h + 4 * w;
      madd(0, element<0>(t[w]), e);
      madd(NS - 1, element<1>(t[w]), e + 1);
      madd(0, element<2>(t[w]), e + 2);
      madd(NS - 1, element<3>(t[w]), e + 3);
      if ((w == 3 || w == 7) && e + 4 == next) {  // the block's sums times the keys' scales
        const __m512 d = _mm512_i32gather_ps(scale_index, k.d + b, 4);
        SDPA_UNROLL
        for (int i = 0; i < R; ++i) {
          __m512 a = acc[0][i];
          if constexpr (NS == 2) a = _mm512_add_ps(a, acc[1][i]);
          sum[i] = _mm512_fmadd_ps(a, d, sum[i]);
          SDPA_UNROLL
          for (int n = 0; n < NS; ++n) acc[n][i] = _mm512_setzero_ps();
        }
        ++b;
        next += k.block;
      }
    }
  }
  SDPA_UNROLL
  for (int i = 0; i < R; ++i) _mm512_storeu_ps(s + i * lds, sum[i]);
}

constexpr int64_t kMaxQ = 8 * 256;  // (rows x E of the query, at most)

#if defined(__AVX512VNNI__) && defined(__GNUC__)  // (GCC and Clang: the inline assembly)
// With VNNI (NOTES section 37), VPDPBUSD multiplies the 16 keys' bytes by a query's bytes and sums
// them in int32 lanes, four products an instruction per lane, with no conversion of K to float.
// The query takes three bytes: each row is scaled to integers x (|x| <= kQMax) and written in
// base 256 with digits in [-128, 127], x = d0 + 256 d1 + 65536 d2, which gives it 23 bits, as
// exact as a float for the row's largest elements. VPDPBUSD takes an unsigned byte on one side
// and the broadcast operand on the other, so the keys go as k + 128 (a XOR of the sign bit) and
// the query's digits as the broadcast bytes; the sums of k + 128 over a block exceed those of k
// by 128 times the sum of the block's digits, which the accumulators start from, negated. Per
// block (at most kMaxBlock elements, so that d0 + 256 d1 stays in int32) the three sums give
// one float (two roundings), times the 16 keys' scales.
namespace vnni {

constexpr int32_t kQMax = 0x7F7F7F;  // the largest x three digits in [-128, 127] can write
constexpr int64_t kMaxBlock = 256;

// The query rows as VPDPBUSD reads them, in groups of 4 rows: digits[(g * E / 4 + w) * 12 + 3 i
// + p] holds digit p of elements [4 w, 4 w + 4) of row 4 g + i (a dword of 4 bytes), so that
// one pointer walks a group's digits; start[(g * nb + b) * 12 + 3 i + p] is -128 times the sum
// of those digits over block b (nb blocks a row); scale[4 g + i] turns the row's integer scores
// back into q . k.
struct Query {
  alignas(64) int32_t digits[3 * kMaxQ / 4];
  alignas(64) int32_t start[3 * kMaxQ / 16];
  float scale[8];
  int64_t nb;
};

// Fills `out` from nr rows of q (a multiple of 4, E apart; E a multiple of 16, nr * E <= kMaxQ,
// block a multiple of 16): false where a row holds a value that is not finite, or whose largest
// magnitude is so small that its scale would be subnormal (the float loop takes those).
inline bool prepare(const float* q, int64_t nr, int64_t E, int64_t block, Query& out) {
  const int64_t nb = out.nb = E / block;
  const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  for (int64_t r = 0; r < nr; ++r) {
    const float* qr = q + r * E;
    __m512 m = _mm512_setzero_ps();
    __mmask16 finite = 0xFFFF;
    for (int64_t e = 0; e < E; e += 16) {
      const __m512 x = _mm512_and_ps(_mm512_loadu_ps(qr + e), abs_mask);
      finite &= _mm512_cmp_ps_mask(x, _mm512_set1_ps(3.0e38f), _CMP_LE_OQ);  // (NaN: false)
      m = _mm512_max_ps(m, x);
    }
    const float mx = _mm512_reduce_max_ps(m);
    if (finite != 0xFFFF || (mx != 0.0f && mx < 1e-25f)) return false;
    const float inv = mx == 0.0f ? 0.0f : static_cast<float>(kQMax) / mx;
    out.scale[r] = mx / static_cast<float>(kQMax);
    const int64_t g = r / 4, i = r % 4;
    int32_t* dg = out.digits + g * (E / 4) * 12 + 3 * i;
    __m512i sums[3] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
    for (int64_t e = 0; e < E; e += 16) {
      __m512i x = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(qr + e), _mm512_set1_ps(inv)));
      x = _mm512_max_epi32(_mm512_min_epi32(x, _mm512_set1_epi32(kQMax)),
                           _mm512_set1_epi32(-kQMax));
      __m512i d[3];  // digit = the low byte, sign-extended; the rest, divided by 256, goes on
      for (int p = 0; p < 3; ++p) {
        d[p] = _mm512_srai_epi32(_mm512_slli_epi32(x, 24), 24);
        x = _mm512_srai_epi32(_mm512_sub_epi32(x, d[p]), 8);
        sums[p] = _mm512_add_epi32(sums[p], d[p]);
        alignas(16) int32_t quads[4];  // the 16 digits as bytes: 4 dwords
        _mm_store_si128(reinterpret_cast<__m128i*>(quads), _mm512_cvtepi32_epi8(d[p]));
        for (int w = 0; w < 4; ++w) dg[(e / 4 + w) * 12 + p] = quads[w];
      }
      if ((e + 16) % block == 0) {
        int32_t* st = out.start + (g * nb + (e + 16) / block - 1) * 12 + 3 * i;
        for (int p = 0; p < 3; ++p) {
          st[p] = -128 * _mm512_reduce_add_epi32(sums[p]);
          sums[p] = _mm512_setzero_si512();
        }
      }
    }
  }
  return true;
}

// acc += the sums of 4 products of u's unsigned bytes by the 4 signed bytes at p, in each lane
// (VPDPBUSD with p broadcast from memory: GCC 12 does not fold the broadcast of the intrinsic).
inline void dpbusd(__m512i& acc, const __m512i& u, const int32_t* p) {
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(u), "m"(*p));
}

// s[i * lds + c] = q_i . k_c for i < 4, c < 16: the rows of group g of the query's digits.
inline void dot16(const Query& qd, int64_t g, int64_t E, const Rows<int8_t>& k,
                  const __m512i& scale_index, float* s, int64_t lds) {
  constexpr int R = 4;
  const int64_t nb = qd.nb;
  const int32_t* dg = qd.digits + g * (E / 4) * 12;
  const int32_t* st = qd.start + g * nb * 12;
  __m512 sum[R];
  __m512i acc[R][3];
  auto begin_block = [&](const int32_t* from) {
    SDPA_UNROLL
    for (int x = 0; x < 3 * R; ++x) acc[x / 3][x % 3] = _mm512_set1_epi32(from[x]);
  };
  SDPA_UNROLL
  for (int i = 0; i < R; ++i) sum[i] = _mm512_setzero_ps();
  begin_block(st);
  const __m512i sign = _mm512_set1_epi8(-128);
  int64_t b = 0, next = k.block;
  for (int64_t h = 0; h < E; h += 32, dg += 8 * 12) {
    __m512i t[8];
    transpose_quads(k.x, k.ld, h, t);
    SDPA_UNROLL
    for (int w = 0; w < 8; ++w) {
      const __m512i ku = _mm512_xor_si512(t[w], sign);
      SDPA_UNROLL
      for (int x = 0; x < 3 * R; ++x) dpbusd(acc[x / 3][x % 3], ku, dg + w * 12 + x);
      if ((w == 3 || w == 7) && h + 4 * w + 4 == next) {  // the block's sums times the scales
        const __m512 d = _mm512_i32gather_ps(scale_index, k.d + b, 4);
        SDPA_UNROLL
        for (int i = 0; i < R; ++i) {
          const __m512i lo = _mm512_add_epi32(acc[i][0], _mm512_slli_epi32(acc[i][1], 8));
          const __m512 y = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][2]), _mm512_set1_ps(65536.0f),
                                           _mm512_cvtepi32_ps(lo));
          sum[i] = _mm512_fmadd_ps(y, d, sum[i]);
        }
        ++b;
        next += k.block;
        if (b < nb) begin_block(st + b * 12);
      }
    }
  }
  SDPA_UNROLL
  for (int i = 0; i < R; ++i)
    _mm512_storeu_ps(s + i * lds, _mm512_mul_ps(sum[i], _mm512_set1_ps(qd.scale[4 * g + i])));
}

}  // namespace vnni
#endif

// The scores of keys [0, 16 * (nc / 16)) against nr rows (a multiple of 4) of q (unscaled, rows
// E apart, nr * E <= kMaxQ): returns how many keys it scored, 0 where E is not a multiple of 32
// (or the scale block of 16).
inline int64_t scores(const float* q, int64_t nr, int64_t E, const Rows<int8_t>& k, int64_t nc,
                      float* s, int64_t lds, const Fetch& v) {
  if (E % 32 != 0 || nr > 8 || nr * E > kMaxQ || k.block % 16 != 0) return 0;
  const __m512i scale_index =
      _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                         _mm512_set1_epi32(static_cast<int32_t>(k.ldd)));
  // f(c) scores keys [c, c + 16) for all rows
  auto each16 = [&](auto&& f) {
    int64_t c = 0;
    for (; c + kKeys <= nc; c += kKeys) {
      if (c + 2 * kKeys <= nc)  // (the next 16 rows; 2 or 3 groups ahead measured the same)
        for (int64_t j = 0; j < kKeys; ++j) simd::prefetch<3>(k.at(c + kKeys + j).x, E);
      if (v.row)
        for (int64_t j = 0; j < kKeys; ++j) simd::prefetch<2>(v.row + (c + j) * v.ld, v.bytes);
      f(c);
    }
    return c;
  };
#if defined(__AVX512VNNI__) && defined(__GNUC__)  // (GCC and Clang: the inline assembly)
  if (k.block <= vnni::kMaxBlock) {
    vnni::Query qd;
    if (vnni::prepare(q, nr, E, k.block, qd))
      return each16([&](int64_t c) {
        for (int64_t g = 0; g < nr / 4; ++g)
          vnni::dot16(qd, g, E, k.at(c), scale_index, s + 4 * g * lds + c, lds);
      });
  }
#endif
  alignas(64) float qs[kMaxQ];
  for (int64_t x = 0; x < nr * E; ++x) qs[x] = q[x] * kScale;
  return each16([&](int64_t c) {
    if (nr == 8) {
      dot16<8>(qs, E, k.at(c), scale_index, s + c, lds);
    } else {
      for (int64_t r = 0; r < nr; r += 4)
        dot16<4>(qs + r * E, E, k.at(c), scale_index, s + r * lds + c, lds);
    }
  });
}

}  // namespace keys16
#endif

// S (nr x nc, rows lds apart) = Q (nr x E, rows E apart) K^T for the nc rows of K: two keys at
// a time against each 4 rows where K is converted and nr is a multiple of 4 (each converted K
// packet then serves 4 rows, each Q packet two keys), else one key at a time against up to 4
// rows. (Two keys at a time over float32 K ran 18% slower from memory: section 17.)
template <typename S>
inline void scores(const float* q, int64_t nr, int64_t E, const Rows<S>& k, int64_t nc, float* s,
                   int64_t lds, Fetch v = {}) {
  int64_t c = 0;
  if constexpr (!std::is_same_v<S, float>) {
    if (E % (Rows<S>::kQ8 ? k.block : kW) == 0) {
#if defined(EIGEN_VECTORIZE_AVX512)
      if constexpr (Rows<S>::kQ8) {
        if (nr % 4 == 0) c = keys16::scores(q, nr, E, k, nc, s, lds, v);
        if (c > 0) {  // (the last nc % 16 keys: two at a time, then one)
          const Fetch vc = v.row ? Fetch{v.row + c * v.ld, v.ld, v.bytes} : v;
          c += score_pairs<false>(q, nr, E, k.at(c), nc - c, s + c, lds, vc);
        }
      }
#endif
      if (c == 0 && nr == 4) {  // (the other types' code as measured before the q8 loop)
        c = score_pairs<true>(q, nr, E, k, nc, s, lds, v);
      } else if (c == 0 && nr % 4 == 0) {
        c = score_pairs<false>(q, nr, E, k, nc, s, lds, v);
      }
    }
  }
  for (; c < nc; ++c) {
    if (v.row) simd::prefetch<2>(v.row + c * v.ld, v.bytes);
    dot_rows(q, nr, E, k.at(c), s + c, lds);
  }
}

// a[i * lda + x] += sum_c p[i * ldp + c] v_c[x] for i < R, x in [x0, x0 + D * kW), c < nc: V
// read in its storage type S (float, or converted in registers), each packet once for the R
// rows. The chunk's sum starts from 0 and joins A once (adding each key's term to A, the running
// sum of the whole key range, lost its bits: constant values of 3 over 2^31 keys averaged 2.0).
template <int R, int D, typename S>
inline void axpy_stored(const float* p, int64_t ldp, const Rows<S>& v, int64_t x0, int64_t nc,
                        float* a, int64_t lda) {
  Packet acc[R][D];
  SDPA_UNROLL
  for (int i = 0; i < R; ++i) SDPA_UNROLL
  for (int j = 0; j < D; ++j) acc[i][j] = ei::pzero(acc[i][j]);
  int64_t blk[D];  // q8: the scale block of each packet
  SDPA_UNROLL
  for (int j = 0; j < D; ++j) blk[j] = Rows<S>::kQ8 ? (x0 + j * kW) / v.block : 0;
  for (int64_t c = 0; c < nc; ++c) {
    const Rows<S> vc = v.at(c);
    Packet b[R];
    SDPA_UNROLL
    for (int i = 0; i < R; ++i) b[i] = ei::pset1<Packet>(p[i * ldp + c]);
    SDPA_UNROLL
    for (int j = 0; j < D; ++j) {
      Packet y = vc.load(x0 + j * kW);
      if constexpr (Rows<S>::kQ8) y = ei::pmul(y, ei::pset1<Packet>(vc.d[blk[j]]));
      SDPA_UNROLL
      for (int i = 0; i < R; ++i) acc[i][j] = ei::pmadd(b[i], y, acc[i][j]);
    }
  }
  SDPA_UNROLL
  for (int i = 0; i < R; ++i) SDPA_UNROLL
  for (int j = 0; j < D; ++j) {
    float* aij = a + i * lda + x0 + j * kW;
    ei::pstoreu(aij, ei::padd(ei::ploadu<Packet>(aij), acc[i][j]));
  }
}

// The columns [x0, Ev) that no packet covers, one at a time: as axpy_stored, in scalars.
template <int R, typename S>
inline void axpy_tail(const float* p, int64_t ldp, const Rows<S>& v, int64_t x0, int64_t Ev,
                      int64_t nc, float* a, int64_t lda) {
  for (int64_t x = x0; x < Ev; ++x)
    for (int i = 0; i < R; ++i) {
      float sum = 0;
      for (int64_t c = 0; c < nc; ++c) sum += p[i * ldp + c] * v.at(c).value(x);
      a[i * lda + x] += sum;
    }
}

// R rows of A (lda apart) += their P rows (ldp apart) times nc rows of V (Ev wide, ldv apart):
// whole rows of V at a time where they fit the registers.
template <int R>
inline void axpy_rows(const float* p, int64_t ldp, const float* v, int64_t ldv, int64_t nc,
                      int64_t Ev, float* a, int64_t lda) {
  const Rows<float> vr{v, ldv};
  int64_t x = 0;
  for (; x + kRowPackets * kW <= Ev; x += kRowPackets * kW)
    axpy_stored<R, kRowPackets>(p, ldp, vr, x, nc, a, lda);
  if constexpr (kRowPackets > 4) {
    for (; x + 4 * kW <= Ev; x += 4 * kW) axpy_stored<R, 4>(p, ldp, vr, x, nc, a, lda);
  }
  for (; x + kW <= Ev; x += kW) axpy_stored<R, 1>(p, ldp, vr, x, nc, a, lda);
  axpy_tail<R>(p, ldp, vr, x, Ev, nc, a, lda);
}

// A (nr x Ev, rows lda apart) += P (nr x nc, rows ldp apart) V (nc x Ev, rows ldv apart), two
// rows at a time. The caller hands V over in chunks of the plan's few_rows_pv_keys keys, so
// that a chunk stays in L1 for every pair of rows (and a chunk converted from half precision or
// q8 is converted once for all of them). (Four rows at a time from such a chunk, 4 x 4 packets
// of accumulators, measured no faster: section 22.)
inline void accumulate(const float* p, int64_t ldp, int64_t nr, const float* v, int64_t ldv,
                       int64_t nc, int64_t Ev, float* a, int64_t lda) {
  int64_t r = 0;
  for (; r + 2 <= nr; r += 2) axpy_rows<2>(p + r * ldp, ldp, v, ldv, nc, Ev, a + r * lda, lda);
  if (r < nr) axpy_rows<1>(p + r * ldp, ldp, v, ldv, nc, Ev, a + r * lda, lda);
}

// A (nr x Ev, rows lda apart) += P (nr x nc, rows ldp apart) V (nc rows of Ev in storage type
// S), 4 rows x 4 packets at a time: each V packet is converted once for 4 rows, with no float
// copy of V stored and read back (NOTES section 30).
template <typename S>
inline void accumulate_stored(const float* p, int64_t ldp, int64_t nr, const Rows<S>& v, int64_t nc,
                              int64_t Ev, float* a, int64_t lda) {
  in_fours(nr, [&](int64_t r, auto R) {
    const float* pr = p + r * ldp;
    float* ar = a + r * lda;
    int64_t x = 0;
    for (; x + 4 * kW <= Ev; x += 4 * kW) axpy_stored<R(), 4>(pr, ldp, v, x, nc, ar, lda);
    for (; x + kW <= Ev; x += kW) axpy_stored<R(), 1>(pr, ldp, v, x, nc, ar, lda);
    axpy_tail<R()>(pr, ldp, v, x, Ev, nc, ar, lda);
  });
}

}  // namespace few_rows
}  // namespace sdpa
