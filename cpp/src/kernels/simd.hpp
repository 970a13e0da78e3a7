// The SIMD vocabulary the kernel's micro-kernels share: Eigen's float packet of the ISA this
// variant is compiled for, and its width. Included by the kernel sources only, so that it is
// compiled once per ISA with that variant's flags.
#pragma once

#include <Eigen/Core>
#include <cstdint>

namespace sdpa {
namespace simd {

namespace ei = Eigen::internal;

// The register blocks of the micro-kernels are arrays indexed by compile-time loop counters; GCC
// keeps them in registers only when those loops are fully unrolled, which it does not always
// choose itself.
#define SDPA_UNROLL _Pragma("GCC unroll 32")

using Packet = ei::packet_traits<float>::type;
constexpr int kW = ei::packet_traits<float>::size;  // floats per packet: 16, 8 or 4

// Asks for the `bytes` from p to be fetched ahead of use: into L1 (Level 3) or L2 (Level 2).
// Prefetches never fault, so an address past an array's end is harmless.
template <int Level>
inline void prefetch(const void* p, int64_t bytes) {
#if defined(__GNUC__) || defined(__clang__)
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b, 0, Level);
#else
  (void)p;
  (void)bytes;
#endif
}

// x, which the compiler must now hold in a register: a packet loaded once and used by several
// multiply-adds is otherwise folded into each of them as a memory operand, a load apiece (in the
// two-key score loop that made the loads, not the multiply-adds, its bound: NOTES section 33).
inline Packet in_register(Packet x) {
#if defined(__GNUC__) || defined(__clang__)
  __asm__("" : "+v"(x));
#endif
  return x;
}

// kW int8 values as floats (the values of a q8 row), sign-extended and converted in registers.
inline Packet load_i8(const int8_t* p) {
#if defined(EIGEN_VECTORIZE_AVX512)
  return _mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(EIGEN_VECTORIZE_AVX2)
  return _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
  alignas(64) float f[kW];
  for (int i = 0; i < kW; ++i) f[i] = static_cast<float>(p[i]);
  return ei::pload<Packet>(f);
#endif
}

#if defined(EIGEN_VECTORIZE_AVX512) || defined(EIGEN_VECTORIZE_AVX2)
#define SDPA_FAST_EXP 1
// exp(x) for x <= 0, as the online softmax needs it (x = s - m, m the row max): Eigen's Cephes
// polynomial on the reduced argument, with cheaper range handling than the general pexp. Below
// -86 (and for -inf, a removed key) the result is exactly 0 (under 1e-37 of the row max, so
// nothing is lost), which keeps 2^n a normal number that an integer add to the exponent field
// can apply. NaN stays NaN (pmax keeps its first operand's NaN; cvtt turns NaN into INT_MIN,
// whose shift adds 0 to the exponent).
inline Packet exp_nonpositive_packet(const Packet& x) {
  using PI = ei::unpacket_traits<Packet>::integer_packet;
  const Packet lo = ei::pset1<Packet>(-86.0f);
  const Packet xc = ei::pmax(x, lo);
  // x = n ln2 + r, |r| <= ln2 / 2, ln2 split in two parts for the reduction.
  const Packet n =
      ei::pfloor(ei::pmadd(xc, ei::pset1<Packet>(1.44269504088896341f), ei::pset1<Packet>(0.5f)));
  Packet r = ei::pmadd(n, ei::pset1<Packet>(-0.693359375f), xc);
  r = ei::pmadd(n, ei::pset1<Packet>(2.12194440e-4f), r);
  const Packet r2 = ei::pmul(r, r);
  Packet y = ei::pmadd(ei::pset1<Packet>(1.9875691500e-4f), r, ei::pset1<Packet>(1.3981999507e-3f));
  Packet y1 =
      ei::pmadd(ei::pset1<Packet>(4.1665795894e-2f), r, ei::pset1<Packet>(1.6666665459e-1f));
  y = ei::pmadd(y, r, ei::pset1<Packet>(8.3334519073e-3f));
  y1 = ei::pmadd(y1, r, ei::pset1<Packet>(5.0000001201e-1f));
  y = ei::pmadd(y, ei::pmul(r2, r), y1);
  y = ei::pmadd(y, r2, ei::padd(r, ei::pset1<Packet>(1.0f)));  // exp(r)
  const PI e = ei::plogical_shift_left<23>(ei::pcast<Packet, PI>(n));
  y = ei::preinterpret<Packet>(ei::padd(ei::preinterpret<PI>(y), e));  // exp(r) * 2^n
  return ei::pandnot(y, ei::pcmp_lt(x, lo));
}
#else
// Without AVX2: Eigen's general exp, sent to exactly 0 below -86 (Eigen clamps its argument and
// would return a tiny positive number for -inf, a removed key).
inline Packet exp_nonpositive_packet(const Packet& x) {
  return ei::pandnot(ei::pexp(x), ei::pcmp_lt(x, ei::pset1<Packet>(-86.0f)));
}
#endif

#if defined(EIGEN_VECTORIZE_AVX512)
// exp(x) for x <= 0 to 3e-6 relative, not float's 1 ulp: for the bf16 panels, whose P is rounded
// to bfloat16 (2^-9) before P.V. exp(x) = 2^f 2^n, t = x log2(e) = n + f with |f| <= 1/2; 2^f is
// 1 + f (c1 + c2 f + c3 f^2 + c4 f^3) (a near-minimax fit, exactly 1 at f = 0) and 2^n is applied
// by VSCALEFPS, which underflows to exactly 0 (x = -inf is clamped to -150: 2^-216 gives 0).
// Half the operations of exp_nonpositive_packet (NOTES section 31). NaN stays NaN (MAXPS returns
// its second operand, x, when either is NaN).
inline Packet exp_nonpositive_coarse(const Packet& x) {
  const __m512 xc = _mm512_max_ps(_mm512_set1_ps(-150.0f), x);
  const __m512 t = _mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.009582748636603355f), f,
                             _mm512_set1_ps(0.055906444787979126f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24024100601673126f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931241750717163f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}
#else
// (Without AVX-512, which the bf16 panels need anyway: the accurate exp.)
inline Packet exp_nonpositive_coarse(const Packet& x) { return exp_nonpositive_packet(x); }
#endif

// tanh(x) to about 2 ulp (Eigen's float tanh is up to 4.6 ulp off, which softcap magnifies by the
// cap): an odd polynomial below |x| = 0.625 (a minimax fit of tanh's series, as in the Cephes
// library) and (1 - e) / (1 + e), e = exp(-2|x|), above, where e <= 0.29 keeps it well
// conditioned. NaN stays NaN; +-inf give +-1.
inline Packet tanh_packet(const Packet& x) {
  const Packet one = ei::pset1<Packet>(1.0f);
  const Packet ax = ei::pabs(x);
  const Packet e = exp_nonpositive_packet(ei::pmul(ax, ei::pset1<Packet>(-2.0f)));
  Packet big = ei::pdiv(ei::psub(one, e), ei::padd(one, e));
  big = ei::por(big, ei::pand(x, ei::pset1<Packet>(-0.0f)));  // tanh's sign is x's
  const Packet z = ei::pmul(x, x);
  Packet poly = ei::pset1<Packet>(-5.70498872745e-3f);
  poly = ei::pmadd(poly, z, ei::pset1<Packet>(2.06390887954e-2f));
  poly = ei::pmadd(poly, z, ei::pset1<Packet>(-5.37397155531e-2f));
  poly = ei::pmadd(poly, z, ei::pset1<Packet>(1.33314422036e-1f));
  poly = ei::pmadd(poly, z, ei::pset1<Packet>(-3.33332819422e-1f));
  const Packet small = ei::pmadd(ei::pmul(x, z), poly, x);
  return ei::pselect(ei::pcmp_lt(ax, ei::pset1<Packet>(0.625f)), small, big);
}

}  // namespace simd
}  // namespace sdpa
