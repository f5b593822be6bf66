// Disruption mask (MUDMAN), elementwise (semantics in disruption_mask_cuda.h):
//   out_i = (g_i > 0 and r_i > 0) or (g_i < 0 and r_i < 0) ? scale * g_i : 0
//   kept  = number of agreeing i
//
// Design (streaming, memory bound: read g and r, write out, 3 n sizeof(T) bytes). The sign
// test compares signs (exact: no product that could underflow; NaN agrees with nothing) and
// scale * g_i is one fp32 multiply rounded once to T, as on every other backend. Elements
// are taken in packs of V = 16 bytes (4 fp32, 8 bf16/fp16) when grad, retain and out are all
// 16-byte aligned, else V = 1. A grid of kBlocksPerSM blocks per SM (one resident wave; fewer
// for small n) strides over the packs, each thread issuing the loads of kUnroll packs before
// any arithmetic; the n % V elements past the last pack are done by the first threads of
// block 0 after the loop. Each thread counts its agreeing elements; a warp sums them by
// shuffles and its lane 0 adds the sum to *kept with one 64-bit atomic (integer addition:
// exact in any order, so the count does not depend on the schedule). In place (out == grad)
// is safe: a thread reads its elements before it writes them, and no thread touches another's.
#include "cuda_launch.cuh"
#include "disruption_mask_cuda.h"
#include "scores_common.cuh"

namespace uk::cuda {
namespace {

using namespace scores;

constexpr int kThreads = 256;
constexpr int kUnroll = 2;
constexpr int kBlocksPerSM = 4;  // all resident at once (<= 64 registers a thread): one wave

struct MaskArgs {
  const void* grad;
  const void* retain;
  void* out;
  int64_t n;
  float scale;
  unsigned long long* kept;
};

__device__ __forceinline__ bool agree(float g, float r) {
  return (g > 0.f && r > 0.f) || (g < 0.f && r < 0.f);
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads, kBlocksPerSM) disruption_mask_kernel(const MaskArgs a) {
  const T* grad = static_cast<const T*>(a.grad);
  const T* retain = static_cast<const T*>(a.retain);
  T* out = static_cast<T*>(a.out);
  const int64_t packs = a.n / V;
  const int64_t stride = int64_t{gridDim.x} * kThreads;
  const int64_t tid = int64_t{blockIdx.x} * kThreads + threadIdx.x;
  unsigned long long kept = 0;
  for (int64_t p0 = tid; p0 < packs; p0 += stride * kUnroll) {
    Raw<T, V> g[kUnroll], r[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t p = p0 + u * stride;
      const bool ok = p < packs;
      g[u] = load<T, V>(grad + p * V, ok);
      r[u] = load<T, V>(retain + p * V, ok);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t p = p0 + u * stride;
      if (p >= packs) break;
      float o[V];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const float gk = element(g[u], k);
        const bool keep = agree(gk, element(r[u], k));
        kept += keep;
        o[k] = keep ? a.scale * gk : 0.f;
      }
      store<T, V>(out + p * V, o);
    }
  }
  // the tail: fewer than V elements after the last pack
  const int64_t i = packs * V + tid;
  if (i < a.n) {
    const float gk = to_float(grad[i]);
    const bool keep = agree(gk, to_float(retain[i]));
    kept += keep;
    out[i] = from_float<T>(keep ? a.scale * gk : 0.f);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2)
    kept += __shfl_xor_sync(0xffffffffu, kept, offset);
  if (threadIdx.x % 32 == 0 && kept != 0) atomicAdd(a.kept, kept);
}

template <typename T>
void launch(const MaskArgs& a, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const bool vec = aligned16(a.grad) && aligned16(a.retain) && aligned16(a.out);
  const int64_t items = vec ? a.n / V : a.n;  // packs (each thread also may take a tail element)
  const int64_t wanted = ceil_div(ceil_div(items, kUnroll), kThreads);
  const int64_t resident = int64_t{sm_count()} * kBlocksPerSM;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(wanted, resident));
  if (vec)
    UK_LAUNCH(static_cast<unsigned>(blocks), kThreads, 0, stream, disruption_mask_kernel<T, V>)(a);
  else
    UK_LAUNCH(static_cast<unsigned>(blocks), kThreads, 0, stream, disruption_mask_kernel<T, 1>)(a);
}

}  // namespace

void disruption_mask(DType dt, const void* grad, const void* retain, float scale, void* out,
                     int64_t n, int64_t* kept, cudaStream_t stream) {
  cudaMemsetAsync(kept, 0, sizeof(int64_t), stream);
  if (n == 0) return;
  const MaskArgs a{grad, retain, out, n, scale, reinterpret_cast<unsigned long long*>(kept)};
  switch (dt) {
    case DType::F32: launch<float>(a, stream); break;
    case DType::BF16: launch<__nv_bfloat16>(a, stream); break;
    case DType::F16: launch<__half>(a, stream); break;
  }
}

}  // namespace uk::cuda
