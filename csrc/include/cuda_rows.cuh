// Row-streaming helpers shared by the misdirection and moments kernels: launch shape
// (row chunks of an [n, d] problem, about kBlocksPerSM blocks per SM), 16-byte packs and
// the token-mask flags of a group of rows. CUDA only; no torch headers.
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

namespace uk::cuda::rows {

inline constexpr int kThreads = 256;   // threads per block
inline constexpr int kUnroll = 4;      // 16-byte loads in flight per thread
inline constexpr int kBlocksPerSM = 4;
inline constexpr int kTileCols = 256;  // columns of a block on the 16-byte bf16/fp16 path
inline constexpr int kMaxDevices = 64;

inline int sm_count() {  // of the current device, cached per device
  static std::atomic<int> cached[kMaxDevices];
  int dev = 0, v = 0;
  cudaGetDevice(&dev);
  std::atomic<int>* slot = dev >= 0 && dev < kMaxDevices ? &cached[dev] : nullptr;
  if (slot != nullptr && (v = slot->load(std::memory_order_relaxed)) > 0) return v;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || v < 1)
    return 1;
  if (slot != nullptr) slot->store(v, std::memory_order_relaxed);
  return v;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Row chunks of an [n, d] problem: about kBlocksPerSM blocks per SM once multiplied by the
// column tiles of the 16-byte bf16/fp16 path.
inline int64_t row_chunks(int64_t n, int64_t d) {
  const int64_t tiles = std::max<int64_t>(1, ceil_div(d, kTileCols));
  const int64_t chunks = std::max<int64_t>(1, int64_t{sm_count()} * kBlocksPerSM / tiles);
  return std::min(chunks, std::max<int64_t>(n, 1));
}

struct Tiling {
  dim3 grid, block;
  int64_t rows;  // per block
};

// grid.y <= row_chunks(n, d) and grid.x <= max(1, ceil(d / 32)) for any vec.
inline Tiling make_tiling(int64_t n, int64_t d, int vec) {
  const int64_t dv = d / vec;
  int tx = 1;
  while (tx < 32 && tx < dv) tx *= 2;
  const int64_t rows = std::max<int64_t>(1, ceil_div(n, row_chunks(n, d)));
  const dim3 grid(static_cast<unsigned>(std::max<int64_t>(1, ceil_div(dv, tx))),
                  static_cast<unsigned>(std::max<int64_t>(1, ceil_div(n, rows))));
  return {grid, dim3(tx, kThreads / tx), rows};
}

// A view can take the V-wide path if its base is 16-byte aligned and every row start is too.
inline bool aligned(const void* p, int64_t stride, int64_t n, int vec) {
  return p == nullptr ||
         (reinterpret_cast<uintptr_t>(p) % 16 == 0 && (n <= 1 || stride % vec == 0));
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack { T e[V]; };

// V consecutive elements from p if pred, else zeros; one 16-byte access on the vector path.
template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load(const T* p, bool pred) {
  Pack<T, V> out;
  if constexpr (sizeof(out) == 16) {
    uint4 raw = make_uint4(0, 0, 0, 0);
    if (pred) raw = __ldg(reinterpret_cast<const uint4*>(p));
    memcpy(&out, &raw, 16);
  } else {
    static_assert(V == 1, "the vector path moves 16 bytes");
    out.e[0] = pred ? __ldg(p) : T{};
  }
  return out;
}

// Element i of a pack as float.
template <typename T, int V>
__device__ __forceinline__ float element(const Pack<T, V>& p, int i) {
  return unpack(p.e, i);
}

template <typename T, int V>
__device__ __forceinline__ void store(T* p, const Pack<T, V>& v) {
  *reinterpret_cast<Pack<T, V>*>(p) = v;
}

// ok[u]: row r + u * step of the chunk [.., r1) exists and is valid (r < r1). The U mask
// bytes are loaded back to back, before anything waits on them.
template <int U>
__device__ __forceinline__ void row_flags(const bool* mask, int64_t r, int64_t step, int64_t r1,
                                          bool (&ok)[U]) {
  unsigned char m[U];
#pragma unroll
  for (int u = 0; u < U; ++u) m[u] = 1;
  if (mask != nullptr) {
    const auto* bytes = reinterpret_cast<const unsigned char*>(mask);
#pragma unroll
    for (int u = 0; u < U; ++u) m[u] = __ldg(bytes + min64(r + u * step, r1 - 1));
  }
#pragma unroll
  for (int u = 0; u < U; ++u) ok[u] = r + u * step < r1 && m[u] != 0;
}

}  // namespace uk::cuda::rows
