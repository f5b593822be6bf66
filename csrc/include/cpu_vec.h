// Vector helpers of the CPU kernels: the same bits on every instruction set.
//
// The CPU kernels (csrc/cpu/*.cpp) are compiled once per instruction set (DEFAULT, AVX2,
// AVX512; see cpu_isa.h) and must give bit-identical results on all of them, so that a
// result does not depend on the machine it ran on. Three rules make that true:
//
// 1. A fixed number of lanes, kLanes = 16, whatever the vector width. Every loop walks a row
//    in blocks of 16 elements held in a Lanes<A> (A = float, or double for fp64 input):
//    one AVX-512 vector of floats, two AVX2 vectors, two (or four) of at::vec's default
//    width; element j of a row always lands in lane j mod 16. A reduction accumulates lane
//    by lane in row order, the tail block is the same 16-lane block zero-filled beyond the
//    row (adding +0 never changes a sum), and the 16 lanes are combined at the end in a fixed
//    tree (reduce_lanes: lane k += lane k+8, then +4, +2, +1). Parallel chunking
//    (at::parallel_for ranges) is a function of the shape only, never of the vector width.
// 2. No fused multiply-add anywhere: an explicit multiply, rounded, then an add, on every
//    instruction set, and the kernel sources are compiled with -ffp-contract=off (CMakeLists)
//    so the compiler does not fuse a*b+c on its own (GCC would, through the AVX2 intrinsics
//    too). Chosen over "exact fma everywhere" because the DEFAULT (SSE2) variant has no fma
//    instruction: std::fma there is a slow library call, while mul+add runs at full speed on
//    every variant and is also what the torch reference computes in eager mode.
// 3. One implementation of every function beyond + - * / and sqrt (correctly rounded IEEE
//    operations, the same everywhere). The CPU kernels use none today (no exp/log/tanh/erf);
//    a kernel that needs one must evaluate it with the same scalar or +-*/-only code on
//    every variant, never at::vec's (Sleef on AVX2/AVX-512, std:: on DEFAULT).
//
// bf16 / fp16 are widened to fp32 exactly on load and rounded to nearest even on store
// (at::vec's conversions and c10's scalar ones agree for every non-NaN value). NaN payloads
// are not part of the promise (x86 keeps the first operand's payload, and the compiler may
// swap the operands of a commutative operation).
//
// Io<T> moves one block of kLanes elements of T between memory and a Lanes of its
// arithmetic type A (float for fp32 / bf16 / fp16, double for fp64); the `n` overloads move
// the first n < kLanes elements only (zeros beyond on load).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace uk::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

constexpr int64_t kLanes = 16;

// kLanes values of A in kVecs at::vec vectors of this instruction set.
template <typename A>
struct Lanes {
  using V = Vectorized<A>;
  static constexpr int64_t kWidth = V::size();
  static_assert(kLanes % kWidth == 0, "the vector width divides the lane count");
  static constexpr int kVecs = static_cast<int>(kLanes / kWidth);
  V v[kVecs];

  Lanes() = default;
  explicit Lanes(A x) {
    for (int k = 0; k < kVecs; ++k) v[k] = V(x);
  }
  static Lanes load(const A* p) {
    Lanes r;
    for (int k = 0; k < kVecs; ++k) r.v[k] = V::loadu(p + k * kWidth);
    return r;
  }
  // The first n (0 <= n < kLanes) values, zeros beyond.
  static Lanes load(const A* p, int64_t n) {
    Lanes r;
    for (int k = 0; k < kVecs; ++k) {
      const int64_t m = n - k * kWidth;
      r.v[k] = m >= kWidth ? V::loadu(p + k * kWidth) : m > 0 ? V::loadu(p + k * kWidth, m) : V(A(0));
    }
    return r;
  }
  void store(A* p) const {
    for (int k = 0; k < kVecs; ++k) v[k].store(p + k * kWidth);
  }
  void store(A* p, int64_t n) const {
    for (int k = 0; k < kVecs; ++k) {
      const int64_t m = n - k * kWidth;
      if (m >= kWidth) v[k].store(p + k * kWidth);
      else if (m > 0) v[k].store(p + k * kWidth, static_cast<int>(m));
    }
  }
};

// Lane-wise IEEE arithmetic (each operation rounded on its own: never fused).
#define UK_LANES_OP(op)                                                      \
  template <typename A>                                                      \
  inline Lanes<A> operator op(const Lanes<A>& a, const Lanes<A>& b) {        \
    Lanes<A> r;                                                              \
    for (int k = 0; k < Lanes<A>::kVecs; ++k) r.v[k] = a.v[k] op b.v[k];     \
    return r;                                                                \
  }
UK_LANES_OP(+)
UK_LANES_OP(-)
UK_LANES_OP(*)
UK_LANES_OP(/)
#undef UK_LANES_OP

// The sum of the kLanes lanes in the fixed tree: k += k+8, then k += k+4, k+2, k+1.
template <typename A>
inline A reduce_lanes(const Lanes<A>& x) {
  A t[kLanes];
  x.store(t);
  for (int64_t width = kLanes / 2; width > 0; width /= 2)
    for (int64_t k = 0; k < width; ++k) t[k] = t[k] + t[k + width];
  return t[0];
}

// One block of T as its arithmetic type: fp32 and fp64 load in place.
template <typename T>
struct Io {
  using A = T;
  using L = Lanes<A>;
  static L load(const T* p) { return L::load(p); }
  static L load(const T* p, int64_t n) { return L::load(p, n); }
  static void store(T* p, const L& x) { x.store(p); }
  static void store(T* p, int64_t n, const L& x) { x.store(p, n); }
};

// bf16 / fp16: widened to fp32 on load (exact), rounded to nearest even on store. A vector of
// R holds twice as many elements as a float vector: a block is kLanes / RV::size() of them
// (AVX2, DEFAULT), or the first half of one (AVX-512: masked load / store of 16 elements).
template <typename R>
struct IoReduced {
  using A = float;
  using L = Lanes<float>;
  using V = Vectorized<float>;
  using RV = Vectorized<R>;
  static_assert(RV::size() == 2 * V::size(), "a bf16/fp16 vector holds two float vectors");
  static constexpr int64_t kPieces = RV::size() <= kLanes ? kLanes / RV::size() : 1;
  static constexpr int64_t kPiece = RV::size() <= kLanes ? RV::size() : kLanes;

  static void from(const RV& r, int k, L& x) {
    auto halves = at::vec::convert_to_float<R>(r);
    x.v[2 * k] = std::get<0>(halves);
    if constexpr (L::kVecs > 1) x.v[2 * k + 1] = std::get<1>(halves);
  }
  static RV to(const L& x, int k) {
    if constexpr (L::kVecs > 1) return at::vec::convert_from_float<R>(x.v[2 * k], x.v[2 * k + 1]);
    else return at::vec::convert_from_float<R>(x.v[0], V(0.f));
  }
  static L load(const R* p) {
    L x;
    for (int k = 0; k < kPieces; ++k) {
      if constexpr (RV::size() <= kLanes) from(RV::loadu(p + k * kPiece), k, x);
      else from(RV::loadu(p, kLanes), k, x);
    }
    return x;
  }
  // The first n (0 <= n < kLanes) elements, zeros beyond.
  static L load(const R* p, int64_t n) {
    L x;
    for (int k = 0; k < kPieces; ++k) {
      const int64_t m = std::clamp<int64_t>(n - k * kPiece, 0, kPiece);
      from(RV::loadu(p + k * kPiece, m), k, x);
    }
    return x;
  }
  static void store(R* p, const L& x) {
    for (int k = 0; k < kPieces; ++k) {
      if constexpr (RV::size() <= kLanes) to(x, k).store(p + k * kPiece);
      else to(x, k).store(p, static_cast<int>(kLanes));
    }
  }
  static void store(R* p, int64_t n, const L& x) {
    for (int k = 0; k < kPieces; ++k) {
      const int64_t m = std::min<int64_t>(n - k * kPiece, kPiece);
      if (m > 0) to(x, k).store(p + k * kPiece, static_cast<int>(m));
    }
  }
};

template <>
struct Io<c10::BFloat16> : IoReduced<c10::BFloat16> {};
template <>
struct Io<c10::Half> : IoReduced<c10::Half> {};

// Block j of a row of d elements: whole, or the zero-filled tail when fewer than kLanes remain.
template <typename T>
inline Lanes<typename Io<T>::A> load_block(const T* p, int64_t remaining) {
  return remaining >= kLanes ? Io<T>::load(p) : Io<T>::load(p, remaining);
}

template <typename T>
inline void store_block(T* p, int64_t remaining, const Lanes<typename Io<T>::A>& x) {
  if (remaining >= kLanes) Io<T>::store(p, x);
  else Io<T>::store(p, remaining, x);
}

// A length rounded up to whole blocks (for zero-padded per-feature vectors).
inline int64_t padded_length(int64_t d) { return (d + kLanes - 1) / kLanes * kLanes; }

}  // namespace uk::cpu::CPU_CAPABILITY
