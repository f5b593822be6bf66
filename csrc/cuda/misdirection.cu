// Fused misdirection loss + gradient, and the masked edit, on fp32 / bf16 / fp16 rows with
// fp32 arithmetic (semantics in cuda_launchers.h):
//
//   w_j     = importance_j (1 without importance, 0 without control)
//   e_ij    = w_j (h_ij - c_j)^2 + [anchor] (1 - w_j)(h_ij - a_ij)^2
//   loss    = scale * sum over valid rows i, all j of e_ij
//   grad_ij = 2 scale (w_j (h_ij - c_j) + [anchor] (1 - w_j)(h_ij - a_ij)), 0 on masked rows
//   edit_ij = h_ij + alpha importance_j (c_j - h_ij) on valid rows, h_ij on masked rows
//
// Design (memory bound). A block is 256 threads shaped tx x ty: its tx lanes cover tx * V
// consecutive columns, V elements (16 bytes) per lane when the pointers, row strides and d
// allow it, else V = 1; its ty thread rows stride through one contiguous chunk of rows,
// each thread keeping kUnroll 16-byte loads in flight (masked rows are not read). Grid =
// (column tiles, row chunks), about kBlocksPerSM blocks per SM. A lane keeps its columns'
// control and weight in registers. The loss is deterministic: each block writes one fp32
// partial (fixed-order block reduction) to the workspace, then a single block sums the
// partials in a fixed order.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda_launch.cuh"
#include "cuda_launchers.h"
#include "cuda_rows.cuh"

namespace uk::cuda {
namespace {

using namespace rows;


// Sum over the kThreads threads of the block in a fixed order; the result is in thread 0.
__device__ float block_sum(float v) {
  __shared__ float warp_sums[kThreads / 32];
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  if (tid % 32 == 0) warp_sums[tid / 32] = v;
  __syncthreads();
  v = 0.f;
  if (tid < 32) {
    v = tid < kThreads / 32 ? warp_sums[tid] : 0.f;
    for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  }
  return v;
}

struct MisdirectionArgs {
  const void* h;
  int64_t h_stride;
  const float *control, *importance;
  const void* anchor;
  int64_t anchor_stride;
  const bool* mask;
  int64_t n, d, rows;  // rows per block
  float two_scale;
  void* grad;
  float* partials;  // one per block, blockIdx.y * gridDim.x + blockIdx.x
  float root_scale;  // sqrt(scale): each term is scaled before it is summed (no overflow)
};

template <typename T, int V, bool kControl, bool kAnchor>
__global__ void __launch_bounds__(kThreads, kBlocksPerSM)
misdirection_kernel(const MisdirectionArgs a) {
  const T* h = static_cast<const T*>(a.h);
  const T* anchor = static_cast<const T*>(a.anchor);
  T* grad = static_cast<T*>(a.grad);
  const int64_t col = (int64_t{blockIdx.x} * blockDim.x + threadIdx.x) * V;
  const int64_t r0 = int64_t{blockIdx.y} * a.rows;
  const int64_t r1 = min64(r0 + a.rows, a.n);
  const int64_t step = blockDim.y;
  constexpr int U = kAnchor ? kUnroll / 2 : kUnroll;  // 16-byte loads in flight: kUnroll
  float acc = 0.f;
  if (col < a.d) {
    float w[V], c[V];
#pragma unroll
    for (int i = 0; i < V; ++i) {
      w[i] = !kControl ? 0.f : a.importance ? __ldg(a.importance + col + i) : 1.f;
      c[i] = kControl ? __ldg(a.control + col + i) : 0.f;
    }
    for (int64_t r = r0 + threadIdx.y; r < r1; r += step * U) {
      bool ok[U];
      row_flags(a.mask, r, step, r1, ok);
      Pack<T, V> hp[U], ap[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        hp[u] = load<T, V>(h + (r + u * step) * a.h_stride + col, ok[u]);
        if constexpr (kAnchor)
          ap[u] = load<T, V>(anchor + (r + u * step) * a.anchor_stride + col, ok[u]);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t row = r + u * step;
        if (row >= r1) break;
        Pack<T, V> g;
#pragma unroll
        for (int i = 0; i < V; ++i) {
          float e = 0.f, residual = 0.f;
          if (ok[u]) {
            const float x = element(hp[u], i);
            if constexpr (kControl) {
              const float delta = x - c[i];
              const float scaled = delta * a.root_scale;
              residual = w[i] * delta;
              e = w[i] * scaled * scaled;
            }
            if constexpr (kAnchor) {
              const float delta = x - element(ap[u], i);
              const float scaled = delta * a.root_scale;
              residual += (1.f - w[i]) * delta;
              e += (1.f - w[i]) * scaled * scaled;
            }
          }
          acc += e;
          g.e[i] = from_float<T>(a.two_scale * residual);
        }
        if (grad != nullptr) store<T, V>(grad + row * a.d + col, g);
      }
    }
  }
  const float total = block_sum(acc);
  if (threadIdx.x == 0 && threadIdx.y == 0)
    a.partials[int64_t{blockIdx.y} * gridDim.x + blockIdx.x] = total;
}

__global__ void __launch_bounds__(kThreads)
sum_partials_kernel(const float* partials, int64_t count, float scale, float* loss) {
  float v = 0.f;
  for (int64_t i = threadIdx.x; i < count; i += kThreads) v += partials[i];
  v = block_sum(v);
  if (threadIdx.x == 0) *loss = scale * v;
}

template <typename T, int V>
void launch_misdirection(const MisdirectionArgs& a, const Tiling& t, cudaStream_t stream) {
  if (a.control != nullptr && a.anchor != nullptr)
    UK_LAUNCH(t.grid, t.block, 0, stream, misdirection_kernel<T, V, true, true>)(a);
  else if (a.control != nullptr)
    UK_LAUNCH(t.grid, t.block, 0, stream, misdirection_kernel<T, V, true, false>)(a);
  else
    UK_LAUNCH(t.grid, t.block, 0, stream, misdirection_kernel<T, V, false, true>)(a);
}

template <typename T>
void misdirection_impl(MisdirectionArgs a, float scale, float* loss, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  int64_t partials = 0;
  if (a.n > 0 && a.d > 0) {
    const bool vec = a.d % V == 0 && aligned(a.h, a.h_stride, a.n, V) &&
                     aligned(a.anchor, a.anchor_stride, a.n, V) && aligned(a.grad, a.d, a.n, V);
    const Tiling t = make_tiling(a.n, a.d, vec ? V : 1);
    a.rows = t.rows;
    if (vec)
      launch_misdirection<T, V>(a, t, stream);
    else
      launch_misdirection<T, 1>(a, t, stream);
    partials = int64_t{t.grid.x} * t.grid.y;
  }
  // The terms are pre-scaled: the partials are summed with scale 1.
  UK_LAUNCH(1, kThreads, 0, stream, sum_partials_kernel)(a.partials, partials, 1.f, loss);
}

struct EditArgs {
  const void* h;
  int64_t h_stride;
  const float *importance, *control;
  float alpha;
  const bool* mask;
  int64_t n, d, rows;  // rows per block
  void* out;
};

template <typename T, int V>
__global__ void __launch_bounds__(kThreads, kBlocksPerSM) masked_edit_kernel(const EditArgs a) {
  const T* h = static_cast<const T*>(a.h);
  T* out = static_cast<T*>(a.out);
  const int64_t col = (int64_t{blockIdx.x} * blockDim.x + threadIdx.x) * V;
  if (col >= a.d) return;
  const int64_t r0 = int64_t{blockIdx.y} * a.rows;
  const int64_t r1 = min64(r0 + a.rows, a.n);
  const int64_t step = blockDim.y;
  float k[V], c[V];
#pragma unroll
  for (int i = 0; i < V; ++i) {
    k[i] = a.alpha * __ldg(a.importance + col + i);
    c[i] = __ldg(a.control + col + i);
  }
  for (int64_t r = r0 + threadIdx.y; r < r1; r += step * kUnroll) {
    bool ok[kUnroll];
    row_flags(a.mask, r, step, r1, ok);
    Pack<T, V> hp[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      hp[u] = load<T, V>(h + (r + u * step) * a.h_stride + col, r + u * step < r1);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t row = r + u * step;
      if (row >= r1) break;
      Pack<T, V> o = hp[u];
      if (ok[u]) {
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const float x = element(hp[u], i);
          o.e[i] = from_float<T>(x + k[i] * (c[i] - x));
        }
      }
      store<T, V>(out + row * a.d + col, o);
    }
  }
}

template <typename T>
void masked_edit_impl(EditArgs a, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const bool vec = a.d % V == 0 && aligned(a.h, a.h_stride, a.n, V) && aligned(a.out, a.d, a.n, V);
  const Tiling t = make_tiling(a.n, a.d, vec ? V : 1);
  a.rows = t.rows;
  if (vec)
    UK_LAUNCH(t.grid, t.block, 0, stream, masked_edit_kernel<T, V>)(a);
  else
    UK_LAUNCH(t.grid, t.block, 0, stream, masked_edit_kernel<T, 1>)(a);
}

}  // namespace

int64_t misdirection_workspace_floats(int64_t n, int64_t d) {
  return row_chunks(n, d) * std::max<int64_t>(1, ceil_div(d, 32));
}

void misdirection_fwd_bwd(DType dt, const void* h, int64_t h_stride, const float* control,
                          const float* importance, const void* anchor, int64_t anchor_stride,
                          const bool* mask, int64_t n, int64_t d, float scale, float* loss,
                          void* grad, float* workspace, cudaStream_t stream) {
  const MisdirectionArgs a{h,    h_stride, control,   importance, anchor, anchor_stride, mask,
                           n,    d,        0,         2.f * scale, grad,  workspace, sqrtf(scale)};
  switch (dt) {
    case DType::F32: misdirection_impl<float>(a, scale, loss, stream); break;
    case DType::BF16: misdirection_impl<__nv_bfloat16>(a, scale, loss, stream); break;
    case DType::F16: misdirection_impl<__half>(a, scale, loss, stream); break;
  }
}

void masked_edit(DType dt, const void* h, int64_t h_stride, const float* importance,
                 const float* control, float alpha, const bool* mask, int64_t n, int64_t d,
                 void* out, cudaStream_t stream) {
  if (n == 0 || d == 0) return;
  const EditArgs a{h, h_stride, importance, control, alpha, mask, n, d, 0, out};
  switch (dt) {
    case DType::F32: masked_edit_impl<float>(a, stream); break;
    case DType::BF16: masked_edit_impl<__nv_bfloat16>(a, stream); break;
    case DType::F16: masked_edit_impl<__half>(a, stream); break;
  }
}

}  // namespace uk::cuda
