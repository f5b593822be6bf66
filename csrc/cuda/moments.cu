// Masked per-feature moments and the feature scores, on fp32 / bf16 / fp16 rows with fp32
// arithmetic (semantics in cuda_launchers.h):
//
//   count = #valid rows, mean_j = sum_i x_ij / count, M2_j = sum_i (x_ij - mean_j)^2
//   (valid rows i; count 0, mean 0, M2 0 without any), one read of x;
//   score_j = (mean_f_j - mean_r_j)^2 / (var_f_j + var_r_j + eps).
//
// Design (memory bound). Pass 1: a block is 256 threads shaped tx x ty: its tx lanes cover
// tx * V consecutive columns, V elements (16 bytes) per lane when the pointer, row stride
// and d allow it, else V = 1; its ty thread rows stride through one contiguous chunk of rows
// with kUnroll loads in flight, each thread running Welford on its columns. The ty thread
// rows are then combined in shared memory with Chan's formula along a fixed tree, and the
// block writes its chunk's (mean, M2) for its columns and the chunk's valid-row count.
// Grid = (column tiles, row chunks), about kBlocksPerSM blocks per SM. Workspace, for
// `chunks` = grid.y row chunks: [chunks][d] means, [chunks][d] M2s, [chunks] int32 counts.
// Pass 2: one thread per column merges the chunks in order (Chan): deterministic.
//
// Range and precision: every row is shifted by a pivot p (the first valid row, `pivot_row`)
// and scaled by kShiftScale = 1/8 (exact) before the Welford updates, c = x/8 - p/8, and the
// outputs are mean = (p/8 + mean_c) * 8, M2 = M2_c * 64. The shift makes the centred terms
// exact differences at mean/sigma = 1e6; the scale keeps |c| and every difference of two
// means of c inside fp32's range, and Welford/Chan never form a sum larger than the values,
// so the mean of rows near 3e38 stays finite. An M2 beyond fp32's range is +inf: each product
// that may overflow is formed with its possibly-zero weight first, so it never meets a 0.
// Workspace after the M2s: [d] scaled pivots p/8, then the counts.
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

constexpr int kMergeThreads = 128;  // pass 2 and feature_scores
constexpr float kShiftScale = 0.125f;

struct MomentsArgs {
  const void* x;
  int64_t x_stride;
  const bool* mask;
  const int64_t* pivot_row;  // device scalar; nullptr: row 0
  int64_t n, d, rows;  // rows per block
  float* partials;     // the workspace, laid out as in the header comment
};

template <typename T, int V>
__global__ void __launch_bounds__(kThreads, kBlocksPerSM)
moments_partial_kernel(const MomentsArgs a) {
  __shared__ float s_mean[V][kThreads], s_m2[V][kThreads];
  __shared__ int s_count[kThreads];
  const T* x = static_cast<const T*>(a.x);
  const unsigned tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int64_t col = (int64_t{blockIdx.x} * blockDim.x + threadIdx.x) * V;
  const bool active = col < a.d;  // inactive lanes still count rows (d may be 0)
  const int64_t r0 = int64_t{blockIdx.y} * a.rows;
  const int64_t r1 = min64(r0 + a.rows, a.n);
  const int64_t step = blockDim.y;

  int count = 0;
  float mean[V], m2[V], pivot[V];
  {
    const int64_t pr = a.pivot_row != nullptr ? *a.pivot_row : 0;
    const Pack<T, V> pp = load<T, V>(x + pr * a.x_stride + col, active && a.n > 0);
#pragma unroll
    for (int i = 0; i < V; ++i) pivot[i] = element(pp, i) * kShiftScale;
  }
#pragma unroll
  for (int i = 0; i < V; ++i) mean[i] = m2[i] = 0.f;
  for (int64_t r = r0 + threadIdx.y; r < r1; r += step * kUnroll) {
    bool ok[kUnroll];
    row_flags(a.mask, r, step, r1, ok);
    Pack<T, V> xp[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      xp[u] = load<T, V>(x + (r + u * step) * a.x_stride + col, ok[u] && active);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (!ok[u]) continue;
      ++count;
      const float inv = __frcp_rn(static_cast<float>(count));
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float v = element(xp[u], i) * kShiftScale - pivot[i];
        const float delta = v - mean[i];
        mean[i] += delta * inv;
        m2[i] += delta * (v - mean[i]);
      }
    }
  }

  // Chan's combination of the ty thread rows, pairing row y with y + s for s = ty/2 .. 1.
#pragma unroll
  for (int i = 0; i < V; ++i) {
    s_mean[i][tid] = mean[i];
    s_m2[i][tid] = m2[i];
  }
  s_count[tid] = count;
  for (unsigned s = blockDim.y / 2; s > 0; s /= 2) {
    __syncthreads();
    if (threadIdx.y < s) {
      const unsigned other = tid + s * blockDim.x;
      const int nb = s_count[other];
      if (nb > 0 && count == 0) {  // adopt the other summary (no 0 * inf below)
#pragma unroll
        for (int i = 0; i < V; ++i) {
          mean[i] = s_mean[i][other];
          m2[i] = s_m2[i][other];
          s_mean[i][tid] = mean[i];
          s_m2[i][tid] = m2[i];
        }
        count = nb;
        s_count[tid] = count;
      } else if (nb > 0) {
        const float f = static_cast<float>(nb) / static_cast<float>(count + nb);
        const float g = static_cast<float>(count) * f;
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const float delta = s_mean[i][other] - mean[i];
          mean[i] += delta * f;
          m2[i] += s_m2[i][other] + (delta * g) * delta;
          s_mean[i][tid] = mean[i];
          s_m2[i][tid] = m2[i];
        }
        count += nb;
        s_count[tid] = count;
      }
    }
  }

  if (threadIdx.y == 0) {
    const int64_t chunk = blockIdx.y, chunks = gridDim.y;
    if (active) {
#pragma unroll
      for (int i = 0; i < V; ++i) {
        a.partials[chunk * a.d + col + i] = mean[i];
        a.partials[(chunks + chunk) * a.d + col + i] = m2[i];
        if (chunk == 0) a.partials[2 * chunks * a.d + col + i] = pivot[i];
      }
    }
    if (blockIdx.x == 0 && threadIdx.x == 0)
      reinterpret_cast<int*>(a.partials + (2 * chunks + 1) * a.d)[chunk] = count;
  }
}

// Thread j merges column j over the chunks in order; thread 0 also writes the count.
__global__ void __launch_bounds__(kMergeThreads)
moments_merge_kernel(const float* partials, int64_t chunks, int64_t d, int64_t* count,
                     float* mean, float* m2) {
  const int64_t j = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (j >= d && j != 0) return;
  const bool column = j < d;
  const int* counts = reinterpret_cast<const int*>(partials + (2 * chunks + 1) * d);
  int64_t total = 0;
  float m = 0.f, s = 0.f;
#pragma unroll 4
  for (int64_t c = 0; c < chunks; ++c) {
    const int nb = counts[c];
    const float mb = column ? partials[c * d + j] : 0.f;
    const float sb = column ? partials[(chunks + c) * d + j] : 0.f;
    // An empty chunk (nb == 0, mean and M2 written as 0) leaves the running state as is.
    const float f = nb > 0 ? static_cast<float>(nb) / static_cast<float>(total + nb) : 0.f;
    const float delta = mb - m;
    m += delta * f;
    s += sb + (delta * (static_cast<float>(total) * f)) * delta;  // 0 when total == 0
    total += nb;
  }
  if (j == 0) *count = total;
  if (column) {
    const float inv = 1.f / kShiftScale;
    mean[j] = total > 0 ? (partials[2 * chunks * d + j] + m) * inv : 0.f;
    m2[j] = s * (inv * inv);
  }
}

template <typename T>
void masked_moments_impl(const MomentsArgs& args, int64_t* count, float* mean, float* m2,
                         cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const bool vec = args.d % V == 0 && reinterpret_cast<uintptr_t>(args.x) % 16 == 0 &&
                   (args.n <= 1 || args.x_stride % V == 0);
  const Tiling t = make_tiling(args.n, args.d, vec ? V : 1);
  MomentsArgs a = args;
  a.rows = t.rows;
  if (vec)
    UK_LAUNCH(t.grid, t.block, 0, stream, moments_partial_kernel<T, V>)(a);
  else
    UK_LAUNCH(t.grid, t.block, 0, stream, moments_partial_kernel<T, 1>)(a);
  const auto blocks = static_cast<unsigned>(std::max<int64_t>(1, ceil_div(a.d, kMergeThreads)));
  UK_LAUNCH(blocks, kMergeThreads, 0, stream, moments_merge_kernel)(a.partials, t.grid.y, a.d,
                                                                    count, mean, m2);
}

__global__ void __launch_bounds__(kMergeThreads)
feature_scores_kernel(const float* mean_f, const float* var_f, const float* mean_r,
                      const float* var_r, float eps, int64_t d, float* scores) {
  const int64_t j = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (j >= d) return;
  const float diff = mean_f[j] - mean_r[j];
  scores[j] = diff * diff / (var_f[j] + var_r[j] + eps);
}

}  // namespace

int64_t masked_moments_workspace_floats(int64_t n, int64_t d) {
  return row_chunks(n, d) * (2 * d + 1) + d;
}

void masked_moments(DType dt, const void* x, int64_t x_stride, const bool* mask,
                    const int64_t* pivot_row, int64_t n, int64_t d, int64_t* count, float* mean,
                    float* m2, float* workspace, cudaStream_t stream) {
  const MomentsArgs a{x, x_stride, mask, pivot_row, n, d, 0, workspace};
  switch (dt) {
    case DType::F32: masked_moments_impl<float>(a, count, mean, m2, stream); break;
    case DType::BF16: masked_moments_impl<__nv_bfloat16>(a, count, mean, m2, stream); break;
    case DType::F16: masked_moments_impl<__half>(a, count, mean, m2, stream); break;
  }
}

void feature_scores(const float* mean_f, const float* var_f, const float* mean_r,
                    const float* var_r, float eps, int64_t d, float* scores,
                    cudaStream_t stream) {
  if (d == 0) return;
  const auto blocks = static_cast<unsigned>(ceil_div(d, kMergeThreads));
  UK_LAUNCH(blocks, kMergeThreads, 0, stream, feature_scores_kernel)(mean_f, var_f, mean_r,
                                                                     var_r, eps, d, scores);
}

}  // namespace uk::cuda
