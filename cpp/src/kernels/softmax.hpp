// The online softmax (Milakov & Gimelshein 2018; Rabe & Staats 2021; Dao et al. 2022): one rule
// for every path of the kernel. The general path applies it to one row at a time (V = float or
// double), the panel path to a packet of rows, one per lane (V = simd::Packet), and the split-K
// merge to the partial results of key chunks, each folded in as one block of keys.
//
// State of a row: m, the running max of its scores, and l, the running sum of exp(s - m); the
// caller keeps the accumulator acc = sum_j exp(s_j - m) v_j. One step over a block of scores s_j:
//   m_new = max(m, max_j s_j)
//   m_use = m_new, or 0 while m_new is -inf (no key yet: then every exp below is exp(-inf) = 0,
//           never exp(-inf - -inf))
//   alpha = exp(m - m_use)                       rescales l and acc; 0 while m is -inf
//   p_j   = exp(s_j - m_use)                     the caller's (removed keys, -inf, give 0)
//   l     = alpha l + sum_j p_j,    acc = alpha acc + sum_j p_j v_j
//   m     = m_new, or NaN where l is NaN
// NaN: a NaN score makes its p_j and so the row's l NaN; m follows l, because a max may skip a
// NaN and the split-K merge reads m first. At the end, out = acc / l and lse = m + log l, except
// where l == 0 (a row with no key): out 0 and lse -inf. A NaN l gives NaN in both, but for a row
// whose max is +inf (a +inf score): its out is NaN and its lse +inf, as in sdpa.reference.
// Included by the kernel sources only (compiled once per ISA).
#pragma once

#include <cmath>
#include <limits>
#include <type_traits>

#include "simd.hpp"

namespace sdpa {
namespace softmax {

namespace ei = Eigen::internal;

// exp(x) for x <= 0 (and -inf, which gives 0) in the lane type V.
template <typename V>
inline V exp_nonpositive(const V& x) {
  if constexpr (std::is_arithmetic_v<V>) {
    return std::exp(x);
  } else {
    return simd::exp_nonpositive_packet(x);
  }
}

template <typename V>
struct Step {
  V m_new;  // the new running max
  V m_use;  // what the block's scores are shifted by before their exp
  V alpha;  // the factor that rescales l and acc
};

// Opens a step for rows whose running max is m and whose new scores have max block_max.
template <typename V>
inline Step<V> begin(const V& m, const V& block_max) {
  using Scalar = typename ei::unpacket_traits<V>::type;
  Step<V> st;
  st.m_new = ei::pmax(block_max, m);
  const V no_key = ei::pcmp_eq(st.m_new, ei::pset1<V>(-std::numeric_limits<Scalar>::infinity()));
  st.m_use = ei::pandnot(st.m_new, no_key);
  st.alpha = exp_nonpositive(ei::psub(m, st.m_use));
  return st;
}

// Closes the step: block_sum is the sum of the block's p_j (of the partial sums it folds in).
template <typename V>
inline void end(const Step<V>& st, const V& block_sum, V& m, V& l) {
  using Scalar = typename ei::unpacket_traits<V>::type;
  l = ei::pmadd(l, st.alpha, block_sum);
  // l - l: 0 for a finite l, NaN for a NaN l. A +inf max (a +inf score) stays: its l is NaN, but
  // its lse is +inf.
  const V inf_max = ei::pcmp_eq(st.m_new, ei::pset1<V>(std::numeric_limits<Scalar>::infinity()));
  m = ei::pselect(inf_max, st.m_new, ei::padd(st.m_new, ei::psub(l, l)));
}

// The weight of a partial result with running max m_part within the step (split-K merge).
template <typename V>
inline V partial_weight(const Step<V>& st, const V& m_part) {
  return exp_nonpositive(ei::psub(m_part, st.m_use));
}

// The factor that turns acc into the output: 1 / l, or 0 for a row with no key.
template <typename T>
inline T out_factor(T l) {
  return l == T(0) ? T(0) : T(1) / l;
}

// The row's log-sum-exp, m + log l: -inf for a row with no key, +inf for a row with a +inf score.
template <typename T>
inline T lse(T m, T l) {
  constexpr T inf = std::numeric_limits<T>::infinity();
  return l == T(0) ? -inf : m == inf ? inf : m + std::log(l);
}

}  // namespace softmax
}  // namespace sdpa
