// Device-side conversions between the storage types of DType and fp32, for the .cu files.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace uk::cuda {

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float(float v) { return v; }
template <> __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

// Round to nearest even.
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }

// Element i of V packed values as float. bf16 pairs are read through their 32-bit word (a
// shift or a mask), which keeps the unpacking out of 16-bit registers.
template <typename T, int V>
__device__ __forceinline__ float unpack(const T (&e)[V], int i) {
  if constexpr (std::is_same_v<T, __nv_bfloat16> && V % 2 == 0) {
    uint32_t w;
    memcpy(&w, &e[i & ~1], 4);
    return __uint_as_float(i & 1 ? w & 0xffff0000u : w << 16);
  } else {
    return to_float(e[i]);
  }
}

}  // namespace uk::cuda
