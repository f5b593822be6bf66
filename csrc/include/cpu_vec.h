// at::vec helpers of the CPU kernels (csrc/cpu/*.cpp only: they are compiled once per
// instruction set, and these helpers live in that set's namespace, uk::cpu::<CPU_CAPABILITY>).
//
// Io<T> moves kStep consecutive elements of T between memory and two vectors of its
// arithmetic type A (float for fp32 / bf16 / fp16, double for fp64): fp32 and fp64 are two
// plain loads, bf16 / fp16 one load converted to float (and back on store, rounding to
// nearest even as static_cast does). The `n` overloads move the first n < kStep elements
// only (zeros beyond on load), for the tail of a row.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <tuple>

namespace uk::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

template <typename T>
struct Io {
  using A = T;
  using V = Vectorized<A>;
  static constexpr int64_t kStep = 2 * V::size();
  static void load(const T* p, V& a, V& b) {
    a = V::loadu(p);
    b = V::loadu(p + V::size());
  }
  static void load(const T* p, int64_t n, V& a, V& b) {
    a = V::loadu(p, static_cast<int64_t>(std::min<int64_t>(n, V::size())));
    b = n > V::size() ? V::loadu(p + V::size(), n - V::size()) : V(A(0));
  }
  static void store(T* p, const V& a, const V& b) {
    a.store(p);
    b.store(p + V::size());
  }
  static void store(T* p, int64_t n, const V& a, const V& b) {
    a.store(p, static_cast<int>(std::min<int64_t>(n, V::size())));
    if (n > V::size()) b.store(p + V::size(), static_cast<int>(n - V::size()));
  }
};

template <typename R>
struct IoReduced {
  using A = float;
  using V = Vectorized<float>;
  using RV = Vectorized<R>;
  static_assert(RV::size() == 2 * V::size(), "a bf16/fp16 vector holds two float vectors");
  static constexpr int64_t kStep = RV::size();
  static void load(const R* p, V& a, V& b) { std::tie(a, b) = at::vec::convert_to_float<R>(RV::loadu(p)); }
  static void load(const R* p, int64_t n, V& a, V& b) {
    std::tie(a, b) = at::vec::convert_to_float<R>(RV::loadu(p, n));
  }
  static void store(R* p, const V& a, const V& b) { at::vec::convert_from_float<R>(a, b).store(p); }
  static void store(R* p, int64_t n, const V& a, const V& b) {
    at::vec::convert_from_float<R>(a, b).store(p, static_cast<int>(n));
  }
};

template <>
struct Io<c10::BFloat16> : IoReduced<c10::BFloat16> {};
template <>
struct Io<c10::Half> : IoReduced<c10::Half> {};

// Loads kStep elements of a T row as its arithmetic type; `n` < kStep: a partial load.
template <typename T>
inline void load2(const T* p, int64_t n, typename Io<T>::V& a, typename Io<T>::V& b) {
  if (n >= Io<T>::kStep) Io<T>::load(p, a, b);
  else Io<T>::load(p, n, a, b);
}

template <typename T>
inline void store2(T* p, int64_t n, const typename Io<T>::V& a, const typename Io<T>::V& b) {
  if (n >= Io<T>::kStep) Io<T>::store(p, a, b);
  else Io<T>::store(p, n, a, b);
}

// The lanes of v added in a fixed order (deterministic).
template <typename A>
inline A sum_lanes(const Vectorized<A>& v) {
  return at::vec::vec_reduce_all<A>([](const Vectorized<A>& x, const Vectorized<A>& y) { return x + y; }, v);
}

}  // namespace uk::cpu::CPU_CAPABILITY
