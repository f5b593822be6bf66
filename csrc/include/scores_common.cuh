// Device helpers shared by the SIMU/CMF scoring kernels (hessian.cu, neuron_scores.cu,
// class_means.cu): element conversion, V-wide loads and stores built from 16-byte accesses,
// and launch-shape facts about the current device. CUDA only; no torch headers.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda_dtype.cuh"

namespace uk::cuda::scores {

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Multiprocessors of the current device (cached per device).
inline int sm_count() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices];
  int dev = 0;
  cudaGetDevice(&dev);
  const bool cacheable = dev >= 0 && dev < kMaxDevices;
  if (cacheable) {
    if (const int v = cached[dev].load(std::memory_order_relaxed)) return v;
  }
  int v = 0;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || v < 1)
    return 1;
  if (cacheable) cached[dev].store(v, std::memory_order_relaxed);
  return v;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Whether every row start of a [rows, *] view with row stride `stride` (elements of
// `elem_size` bytes) is 16-byte aligned. nullptr (an absent operand) always is.
inline bool rows_aligned16(const void* p, int64_t stride, int64_t rows, int64_t elem_size) {
  return p == nullptr || (aligned16(p) && (rows <= 1 || (stride * elem_size) % 16 == 0));
}

// The element count of one V-wide access for a kernel reading types A and B: 16 bytes of
// the narrower one (so the wider one moves 32 bytes, two 16-byte accesses).
template <typename A, typename B>
constexpr int vec_width() {
  return 16 / static_cast<int>(sizeof(A) < sizeof(B) ? sizeof(A) : sizeof(B));
}

// V raw elements of T; V * sizeof(T) is 16 or 32 bytes on the vector path, V == 1 otherwise.
template <typename T, int V>
struct alignas(V * sizeof(T) >= 16 ? 16 : alignof(T)) Raw {
  static constexpr int kWords = V * sizeof(T) >= 16 ? V * sizeof(T) / 16 : 0;
  T e[V];
};

// V consecutive elements at p (zeros when !pred). Vector path: 16-byte streaming loads
// (each byte is read once).
template <typename T, int V>
__device__ __forceinline__ Raw<T, V> load(const T* p, bool pred) {
  Raw<T, V> r;
  if constexpr (Raw<T, V>::kWords > 0) {
    const uint4* q = reinterpret_cast<const uint4*>(p);
#pragma unroll
    for (int k = 0; k < Raw<T, V>::kWords; ++k) {
      const uint4 w = pred ? __ldcs(q + k) : make_uint4(0, 0, 0, 0);
      memcpy(reinterpret_cast<char*>(r.e) + 16 * k, &w, 16);
    }
  } else {
    static_assert(V == 1, "the vector path moves multiples of 16 bytes");
    r.e[0] = pred ? p[0] : from_float<T>(0.f);
  }
  return r;
}

// Element i of a loaded pack as float.
template <typename T, int V>
__device__ __forceinline__ float element(const Raw<T, V>& r, int i) {
  return unpack(r.e, i);
}

// Stores V floats at p as T (round to nearest even).
template <typename T, int V>
__device__ __forceinline__ void store(T* p, const float (&v)[V]) {
  Raw<T, V> r;
#pragma unroll
  for (int i = 0; i < V; ++i) r.e[i] = from_float<T>(v[i]);
  if constexpr (Raw<T, V>::kWords > 0) {
    uint4* q = reinterpret_cast<uint4*>(p);
#pragma unroll
    for (int k = 0; k < Raw<T, V>::kWords; ++k) {
      uint4 w;
      memcpy(&w, reinterpret_cast<const char*>(r.e) + 16 * k, 16);
      q[k] = w;
    }
  } else {
    p[0] = r.e[0];
  }
}

// Sum over the 32 lanes of a warp (butterfly: fixed order, every lane gets the result).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

}  // namespace uk::cuda::scores
