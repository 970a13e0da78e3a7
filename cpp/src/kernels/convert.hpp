// Conversions between the storage types (float16, bfloat16, float32, float64) and the compute
// type, and Eigen views of key-side blocks. Included by the kernel sources only (compiled once
// per ISA).
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "sdpa/kernel.hpp"
#include "simd.hpp"

namespace sdpa {

template <typename T>
using RowMat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <typename T>
using RowVec = Eigen::Matrix<T, 1, Eigen::Dynamic>;
template <typename T>
using MatMap = Eigen::Map<RowMat<T>, Eigen::Unaligned, Eigen::OuterStride<>>;
template <typename T>
using ConstMatMap = Eigen::Map<const RowMat<T>, Eigen::Unaligned, Eigen::OuterStride<>>;

// Storage type of each DType and the type it is computed in (compute_size in kernel.hpp).
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
    (std::is_same_v<Src, float> || std::is_same_v<Dst, float>) &&
    (std::is_same_v<Src, Eigen::half> || std::is_same_v<Src, Eigen::bfloat16> ||
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
    if (mul == T(1)) {                                     // (K and V rows: a plain conversion)
      for (; c + W <= n; c += W)
        ei::pstoreu(dst + c, Out::from_float(In::to_float(ei::ploadu<typename In::type>(src + c))));
    } else {
      const PacketF m = ei::pset1<PacketF>(mul);
      for (; c + W <= n; c += W) {
        const PacketF x = In::to_float(ei::ploadu<typename In::type>(src + c));
        ei::pstoreu(dst + c, Out::from_float(ei::pmul(x, m)));
      }
    }
    // (the tail element by element: an Eigen expression costs more than a few conversions)
    for (; c < n; ++c) dst[c] = static_cast<Dst>(static_cast<T>(src[c]) * mul);
    return;
  }
#endif
  Eigen::Map<RowVec<Dst>>(dst + c, n - c) =
      (Eigen::Map<const RowVec<Src>>(src + c, n - c).template cast<T>() * mul).template cast<Dst>();
}

// The operand that holds the q8 scales of key-side operand `which` (key or value).
inline Operand scales_of(Operand which) {
  return which == Operand::key ? Operand::key_scales : Operand::value_scales;
}

// A float16 scale as T (one per kv_block elements of a q8 row).
template <typename T>
inline T scale_at(const Eigen::half* scales, int64_t i) {
  return static_cast<T>(static_cast<float>(scales[i]));
}

// dst[c] = T(src[c * ss]) * scale of c's block, for c < n: a q8 row of n int8 values whose blocks
// of `block` elements have the scales sc[b * scs]. (An int8 times a float16 scale is exact in
// float: 8 + 11 significant bits.)
template <typename T>
inline void dequantize_row(T* dst, const int8_t* src, int64_t ss, const Eigen::half* sc,
                           int64_t scs, int64_t n, int64_t block) {
  for (int64_t b0 = 0, b = 0; b0 < n; b0 += block, ++b) {
    const T d = scale_at<T>(sc, b * scs);
    const int64_t b1 = std::min(n, b0 + block);
    int64_t c = b0;
    if constexpr (std::is_same_v<T, float>) {
      if (ss == 1) {
        namespace ei = Eigen::internal;
        const simd::Packet vd = ei::pset1<simd::Packet>(d);
        for (; c + simd::kW <= b1; c += simd::kW)
          ei::pstoreu(dst + c, ei::pmul(simd::load_i8(src + c), vd));
      }
    }
    for (; c < b1; ++c) dst[c] = static_cast<T>(src[c * ss]) * d;
  }
}

// Whether blocks of key-side operand `which` can be read in place as matrices of T (the storage
// is T, columns are contiguous and rows ascend), or need converting into a buffer.
template <typename T>
bool mappable(const Problem& p, Operand which) {
  const View& view = p.view(which);
  const bool same = std::is_same_v<T, float>
                        ? p.kv_dtype == DType::f32
                        : std::is_same_v<T, double> && p.kv_dtype == DType::f64;
  return same && view.col_stride == 1 && view.row_stride > 0;
}

// Row j of key-side operand `which` (D elements, from element offset `base` of its outer index;
// `scale_base` likewise into its q8 scales) converted into dst, in type T.
template <typename T>
void convert_kv_row(const Problem& p, Operand which, int64_t base, int64_t scale_base, int64_t j,
                    int64_t D, T* dst) {
  const View& view = p.view(which);
  const int64_t off = base + j * view.row_stride, cs = view.col_stride;
  switch (p.kv_dtype) {
    case DType::f16:
      return convert_row<T>(dst, 1, static_cast<const Eigen::half*>(view.data) + off, cs, D, T(1));
    case DType::bf16:
      return convert_row<T>(dst, 1, static_cast<const Eigen::bfloat16*>(view.data) + off, cs, D,
                            T(1));
    case DType::f32:
      return convert_row<T>(dst, 1, static_cast<const float*>(view.data) + off, cs, D, T(1));
    case DType::f64:
      return convert_row<T>(dst, 1, static_cast<const double*>(view.data) + off, cs, D, T(1));
    case DType::q8: {
      const View& sv = p.view(scales_of(which));
      const auto* sc = static_cast<const Eigen::half*>(sv.data) + scale_base + j * sv.row_stride;
      return dequantize_row<T>(dst, static_cast<const int8_t*>(view.data) + off, cs, sc,
                               sv.col_stride, D, p.kv_block);
    }
  }
}

// A block of rows [j0, j0 + nk) of a (S x D) key-side operand as a matrix in type T: a direct
// map when it is mappable, else converted (and q8 dequantized) into `buffer`, row by row in
// registers: never a copy of the operand, only of the block.
template <typename T>
ConstMatMap<T> key_side_block(const Problem& p, Operand which, int64_t base, int64_t scale_base,
                              int64_t j0, int64_t nk, int64_t D, T* buffer) {
  if (mappable<T>(p, which)) {
    const View& view = p.view(which);
    return ConstMatMap<T>(static_cast<const T*>(view.data) + base + j0 * view.row_stride, nk, D,
                          Eigen::OuterStride<>(view.row_stride));
  }
  for (int64_t j = 0; j < nk; ++j)
    convert_kv_row<T>(p, which, base, scale_base, j0 + j, D, buffer + j * D);
  return ConstMatMap<T>(buffer, nk, D, Eigen::OuterStride<>(D));
}

// Whether every value of a block (rows x cols, rows ld apart) is finite: a packet sum of x - x,
// which is 0 for finite values and NaN for NaN and Inf (Eigen's allFinite costs ~10x more).
template <typename T>
bool all_finite(const T* x, int64_t ld, int64_t rows, int64_t cols) {
  namespace ei = Eigen::internal;
  using P = typename ei::packet_traits<T>::type;
  constexpr int64_t W = ei::packet_traits<T>::size;
  P acc = ei::pset1<P>(T(0));
  T tail = T(0);
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = x + r * ld;
    int64_t c = 0;
    for (; c + W <= cols; c += W) {
      const P v = ei::ploadu<P>(row + c);
      acc = ei::padd(acc, ei::psub(v, v));
    }
    for (; c < cols; ++c) tail += row[c] - row[c];
  }
  return ei::predux(acc) + tail == T(0);
}

}  // namespace sdpa
