// Conversions between the storage types (float16, bfloat16, float32, float64) and the compute
// type, and Eigen views of key-side blocks. Included by the kernel sources only (compiled once
// per ISA).
#pragma once

#include <Eigen/Core>
#include <cstdint>
#include <type_traits>

#include "sdpa/kernel.hpp"

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

// Whether blocks of a key-side operand can be read in place as matrices of T (the storage is T,
// columns are contiguous and rows ascend), or need converting into a buffer.
template <typename T, typename Store>
bool mappable(const View& view) {
  return std::is_same_v<T, Store> && view.col_stride == 1 && view.row_stride > 0;
}

// A block of rows [j0, j0 + nk) of a (S x D) key-side operand as a matrix in type T: a direct
// map when it is mappable, else converted into `buffer`.
template <typename T, typename Store>
ConstMatMap<T> key_side_block(const View& view, int64_t base, int64_t j0, int64_t nk, int64_t D,
                              T* buffer) {
  const auto* src = static_cast<const Store*>(view.data) + base + j0 * view.row_stride;
  if constexpr (std::is_same_v<T, Store>) {
    if (mappable<T, Store>(view))
      return ConstMatMap<T>(src, nk, D, Eigen::OuterStride<>(view.row_stride));
  }
  for (int64_t j = 0; j < nk; ++j)
    convert_row<T>(buffer + j * D, 1, src + j * view.row_stride, view.col_stride, D, T(1));
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
