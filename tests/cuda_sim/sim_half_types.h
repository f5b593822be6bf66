// __half and __nv_bfloat16 for the CPU execution harness: 16-bit storage types with the
// conversions the kernels use, bit for bit as cuda_fp16.hpp / cuda_bf16.hpp define them.
//
// float -> 16 bits rounds to nearest, ties to even, keeps subnormals, overflows to +-inf
// (fp16 from 65520 up, the midpoint between 65504 and 2^16), and turns a NaN into the
// canonical NaN (0x7fff), as CUDA's conversions do. 16 bits -> float is exact. Only the
// operations the kernels need exist (construction from float, conversion to float, the
// *_rn intrinsics, the two-element types); arithmetic on the 16-bit types does not.
#pragma once

#include <cstdint>
#include <cstring>

#include "sim_vector_types.h"

namespace uk_sim {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even: keep `value >> shift`, drop the `shift` low bits.
inline uint32_t round_shift_rne(uint32_t value, int shift) {
  const uint32_t kept = value >> shift;
  const uint32_t rest = value & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1);
  return kept + (rest > half || (rest == half && (kept & 1u)) ? 1u : 0u);
}

inline uint16_t float_to_bf16_bits(float f) {
  const uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;  // NaN
  // The carry of a round-up moves into the exponent: the largest finite values round to inf.
  return static_cast<uint16_t>(round_shift_rne(x, 16));
}

inline float bf16_bits_to_float(uint16_t h) { return bits_float(uint32_t{h} << 16); }

inline uint16_t float_to_half_bits(float f) {
  const uint32_t x = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return 0x7fffu;                   // NaN
  if (a >= 0x477ff000u) return sign | 0x7c00u;           // >= 65520: inf
  if (a >= 0x38800000u) {                                // >= 2^-14: normal
    const uint32_t rebased = a - (uint32_t{127 - 15} << 23);
    return sign | static_cast<uint16_t>(round_shift_rne(rebased, 13));
  }
  if (a <= 0x33000000u) return sign;                     // <= 2^-25: rounds to zero
  // Subnormal: the value in units of 2^-24 is mant * 2^(e - 150 + 24), e the biased exponent.
  const uint32_t e = a >> 23;
  const uint32_t mant = (a & 0x7fffffu) | 0x800000u;
  return sign | static_cast<uint16_t>(round_shift_rne(mant, static_cast<int>(126 - e)));
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t{h & 0x8000u} << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0x1f) return bits_float(sign | 0x7f800000u | (m << 13));   // inf, NaN
  if (e != 0) return bits_float(sign | ((e + 127 - 15) << 23) | (m << 13));
  const float mag = static_cast<float>(m) * 5.9604644775390625e-8f;  // m * 2^-24, exact
  return sign ? -mag : mag;
}

}  // namespace uk_sim

struct __nv_bfloat16 {
  uint16_t __x;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) : __x(uk_sim::float_to_bf16_bits(f)) {}
  __nv_bfloat16(double f) : __x(uk_sim::float_to_bf16_bits(static_cast<float>(f))) {}
  operator float() const { return uk_sim::bf16_bits_to_float(__x); }
};

struct __half {
  uint16_t __x;
  __half() = default;
  __half(float f) : __x(uk_sim::float_to_half_bits(f)) {}
  __half(double f) : __x(uk_sim::float_to_half_bits(static_cast<float>(f))) {}
  operator float() const { return uk_sim::half_bits_to_float(__x); }
};

struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

struct alignas(4) __half2 {
  __half x, y;
};

inline float __bfloat162float(__nv_bfloat16 v) { return uk_sim::bf16_bits_to_float(v.__x); }
inline float __half2float(__half v) { return uk_sim::half_bits_to_float(v.__x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rz(float f) {  // toward zero: the low 16 bits dropped
  __nv_bfloat16 r;
  const uint32_t x = uk_sim::float_bits(f);
  r.__x = (x & 0x7fffffffu) > 0x7f800000u ? uint16_t{0x7fff} : static_cast<uint16_t>(x >> 16);
  return r;
}
inline __half __float2half_rn(float f) { return __half(f); }
inline __half __float2half(float f) { return __half(f); }

inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__nv_bfloat16(lo), __nv_bfloat16(hi)};
}
inline __half2 __floats2half2_rn(float lo, float hi) { return {__half(lo), __half(hi)}; }

inline float2 __bfloat1622float2(__nv_bfloat162 v) { return {float(v.x), float(v.y)}; }
inline float2 __half22float2(__half2 v) { return {float(v.x), float(v.y)}; }
