// Optimal-Brain-Damage neuron scores, forget and retain in one pass over the weight
// (semantics in neuron_scores_cuda.h):  s = 1/2 sum over the non-neuron dim of h * w^2.
//
// Memory bound: the weight and both Hessians are read once, with V-wide accesses, V = 16
// bytes of the narrower type (bf16 w + fp32 h: 16-byte w and 32-byte h accesses), when every
// row start is 16-byte aligned and V divides the row length; V = 1 otherwise.
// Bytes moved: rows * cols * (sizeof(w) + sizeof(h) * (1 + [retain])).
//
// dim 0 (row sums). A row is reduced by a group of S threads (S a power of two, <= 256,
// about kUnroll V-wide accesses per thread and array), kThreads / S rows per block, one
// block per row group. Lanes stride the row S * V elements apart with kUnroll accesses in
// flight, then reduce by xor-shuffles and, for S > 32, over the group's warps in shared
// memory in warp order.
//
// dim 1 (column sums). A block is tx x ty threads: tx lanes cover tx * V consecutive
// columns (coalesced), ty thread rows stride through one chunk of rows with kUnroll rows in
// flight; the ty partial columns are combined along a fixed tree in shared memory. With one
// chunk the block writes the scores; otherwise it writes its chunk's partial columns to the
// workspace ([chunks][cols] forget, then [chunks][cols] retain) and a second kernel sums the
// chunks of each column in chunk order. Grid = (column tiles, chunks), about kBlocksPerSM
// blocks per SM.
#include "neuron_scores_cuda.h"
#include "cuda_launch.cuh"
#include "scores_common.cuh"

namespace uk::cuda {
namespace {

using namespace scores;

constexpr int kThreads = 256;
constexpr int kUnroll = 2;
constexpr int kBlocksPerSM = 8;
constexpr int kTileCols = 256;       // nominal column tile of dim 1 (sizes the workspace)
constexpr int kMinChunkRows = 64;    // dim 1: rows per chunk at least
constexpr int kMergeThreads = 128;

struct ScoreArgs {
  const void* w;
  const void* hf;
  const void* hr;  // nullptr: no retain scores
  int64_t w_stride, hf_stride, hr_stride;
  int64_t rows, cols;
  int64_t chunk_rows;  // dim 1: rows per chunk
  float* s_forget;
  float* s_retain;
  float* partials;     // dim 1 with more than one chunk
};

// Adds h * w^2 over the V elements of a pack to acc.
template <typename W, typename H, int V>
__device__ __forceinline__ float dot_w2(const Raw<W, V>& w, const Raw<H, V>& h, float acc) {
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const float x = element(w, k);
    acc = fmaf(element(h, k), x * x, acc);
  }
  return acc;
}

// ---- dim 0 ---------------------------------------------------------------------------

// Sum over the S lanes of an aligned group of a warp (S <= 32), fixed butterfly order.
__device__ __forceinline__ float group_sum(float v, int S) {
  for (int offset = (S < 32 ? S : 32) / 2; offset > 0; offset /= 2)
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename W, typename H, int V, bool kRetain>
__global__ void __launch_bounds__(kThreads) row_scores_kernel(const ScoreArgs a, int group_log2) {
  __shared__ float s_warp[2][kThreads / 32];
  const int S = 1 << group_log2;
  const int lane = threadIdx.x & (S - 1);
  const int64_t row = int64_t{blockIdx.x} * (kThreads >> group_log2) + (threadIdx.x >> group_log2);
  float f = 0.f, r = 0.f;
  if (row < a.rows) {
    const W* w = static_cast<const W*>(a.w) + row * a.w_stride;
    const H* hf = static_cast<const H*>(a.hf) + row * a.hf_stride;
    const H* hr = kRetain ? static_cast<const H*>(a.hr) + row * a.hr_stride : nullptr;
    const int64_t step = int64_t{S} * V;
    for (int64_t c0 = int64_t{lane} * V; c0 < a.cols; c0 += step * kUnroll) {
      Raw<W, V> wv[kUnroll];
      Raw<H, V> fv[kUnroll], rv[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t c = c0 + u * step;
        const bool ok = c < a.cols;
        wv[u] = load<W, V>(w + c, ok);
        fv[u] = load<H, V>(hf + c, ok);
        if constexpr (kRetain) rv[u] = load<H, V>(hr + c, ok);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        f = dot_w2(wv[u], fv[u], f);
        if constexpr (kRetain) r = dot_w2(wv[u], rv[u], r);
      }
    }
  }
  f = group_sum(f, S);
  if constexpr (kRetain) r = group_sum(r, S);
  if (S > 32) {  // combine the group's warps in order; every thread reaches the barrier
    const int warp = threadIdx.x / 32;
    if ((threadIdx.x & 31) == 0) {
      s_warp[0][warp] = f;
      s_warp[1][warp] = r;
    }
    __syncthreads();
    if (lane == 0) {
      f = r = 0.f;
      for (int k = 0; k < S / 32; ++k) {
        f += s_warp[0][warp + k];
        r += s_warp[1][warp + k];
      }
    }
  }
  if (lane == 0 && row < a.rows) {
    a.s_forget[row] = 0.5f * f;
    if constexpr (kRetain) a.s_retain[row] = 0.5f * r;
  }
}

template <typename W, typename H, int V, bool kRetain>
void launch_rows(const ScoreArgs& a, cudaStream_t stream) {
  const int64_t vectors = ceil_div(a.cols, V);
  int group_log2 = 0;
  while ((1 << group_log2) < kThreads && (int64_t{1} << group_log2) * kUnroll < vectors)
    ++group_log2;
  const int64_t rows_per_block = kThreads >> group_log2;
  const auto blocks = static_cast<unsigned>(ceil_div(a.rows, rows_per_block));
  UK_LAUNCH(blocks, kThreads, 0, stream, row_scores_kernel<W, H, V, kRetain>)(a, group_log2);
}

// ---- dim 1 ---------------------------------------------------------------------------

// Row chunks of a [rows, cols] column reduction: about kBlocksPerSM blocks per SM with the
// nominal column tile, at least kMinChunkRows rows each.
int64_t col_chunks(int64_t rows, int64_t cols) {
  const int64_t tiles = std::max<int64_t>(1, ceil_div(cols, kTileCols));
  const int64_t wanted = std::max<int64_t>(1, int64_t{sm_count()} * kBlocksPerSM / tiles);
  return std::max<int64_t>(1, std::min(wanted, ceil_div(rows, kMinChunkRows)));
}

template <typename W, typename H, int V, bool kRetain>
__global__ void __launch_bounds__(kThreads) col_scores_kernel(const ScoreArgs a) {
  __shared__ float s_acc[kRetain ? 2 : 1][V][kThreads];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int64_t col = (int64_t{blockIdx.x} * blockDim.x + threadIdx.x) * V;
  const bool active = col < a.cols;
  const int64_t r0 = int64_t{blockIdx.y} * a.chunk_rows;
  const int64_t r1 = min(r0 + a.chunk_rows, a.rows);
  const int64_t step = blockDim.y;
  const W* w = static_cast<const W*>(a.w) + col;
  const H* hf = static_cast<const H*>(a.hf) + col;
  const H* hr = kRetain ? static_cast<const H*>(a.hr) + col : nullptr;

  float f[V], r[V];
#pragma unroll
  for (int k = 0; k < V; ++k) f[k] = r[k] = 0.f;
  for (int64_t i = r0 + threadIdx.y; i < r1; i += step * kUnroll) {
    Raw<W, V> wv[kUnroll];
    Raw<H, V> fv[kUnroll], rv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t row = i + u * step;
      const bool ok = active && row < r1;
      wv[u] = load<W, V>(w + row * a.w_stride, ok);
      fv[u] = load<H, V>(hf + row * a.hf_stride, ok);
      if constexpr (kRetain) rv[u] = load<H, V>(hr + row * a.hr_stride, ok);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const float x = element(wv[u], k);
        const float x2 = x * x;
        f[k] = fmaf(element(fv[u], k), x2, f[k]);
        if constexpr (kRetain) r[k] = fmaf(element(rv[u], k), x2, r[k]);
      }
    }
  }

  // Thread row y adds row y + s for s = ty/2 .. 1.
#pragma unroll
  for (int k = 0; k < V; ++k) {
    s_acc[0][k][tid] = f[k];
    if constexpr (kRetain) s_acc[kRetain ? 1 : 0][k][tid] = r[k];
  }
  for (int s = blockDim.y / 2; s > 0; s /= 2) {
    __syncthreads();
    if (threadIdx.y < s) {
      const int other = tid + s * blockDim.x;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        f[k] += s_acc[0][k][other];
        s_acc[0][k][tid] = f[k];
        if constexpr (kRetain) {
          r[k] += s_acc[kRetain ? 1 : 0][k][other];
          s_acc[kRetain ? 1 : 0][k][tid] = r[k];
        }
      }
    }
  }
  if (threadIdx.y != 0 || !active) return;
  if (gridDim.y == 1) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      a.s_forget[col + k] = 0.5f * f[k];
      if constexpr (kRetain) a.s_retain[col + k] = 0.5f * r[k];
    }
  } else {
    float* pf = a.partials + int64_t{blockIdx.y} * a.cols + col;
    float* pr = pf + int64_t{gridDim.y} * a.cols;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      pf[k] = f[k];
      if constexpr (kRetain) pr[k] = r[k];
    }
  }
}

// Column j: the sum of its chunks' partials in chunk order, halved.
__global__ void __launch_bounds__(kMergeThreads)
col_merge_kernel(const float* partials, int64_t chunks, int64_t cols, bool retain,
                 float* s_forget, float* s_retain) {
  const int64_t j = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (j >= cols) return;
  float f = 0.f, r = 0.f;
  for (int64_t c = 0; c < chunks; ++c) {
    f += partials[c * cols + j];
    if (retain) r += partials[(chunks + c) * cols + j];
  }
  s_forget[j] = 0.5f * f;
  if (retain) s_retain[j] = 0.5f * r;
}

template <typename W, typename H, int V, bool kRetain>
void launch_cols(ScoreArgs a, cudaStream_t stream) {
  const int64_t vectors = ceil_div(a.cols, V);
  int tx = 1;
  while (tx < 32 && tx < vectors) tx *= 2;
  a.chunk_rows = ceil_div(a.rows, col_chunks(a.rows, a.cols));
  const int64_t chunks = ceil_div(a.rows, a.chunk_rows);
  const dim3 grid(static_cast<unsigned>(ceil_div(vectors, tx)), static_cast<unsigned>(chunks));
  UK_LAUNCH(grid, dim3(tx, kThreads / tx), 0, stream, col_scores_kernel<W, H, V, kRetain>)(a);
  if (chunks > 1) {
    const auto blocks = static_cast<unsigned>(ceil_div(a.cols, kMergeThreads));
    UK_LAUNCH(blocks, kMergeThreads, 0, stream, col_merge_kernel)(a.partials, chunks, a.cols,
                                                                  kRetain, a.s_forget, a.s_retain);
  }
}

template <typename W, typename H, int V>
void launch(const ScoreArgs& a, int dim, cudaStream_t stream) {
  const bool retain = a.hr != nullptr;
  if (dim == 0) {
    retain ? launch_rows<W, H, V, true>(a, stream) : launch_rows<W, H, V, false>(a, stream);
  } else {
    retain ? launch_cols<W, H, V, true>(a, stream) : launch_cols<W, H, V, false>(a, stream);
  }
}

template <typename W, typename H>
void scores_impl(const ScoreArgs& a, int dim, cudaStream_t stream) {
  constexpr int V = vec_width<W, H>();
  const bool vec = a.cols % V == 0 && rows_aligned16(a.w, a.w_stride, a.rows, sizeof(W)) &&
                   rows_aligned16(a.hf, a.hf_stride, a.rows, sizeof(H)) &&
                   rows_aligned16(a.hr, a.hr_stride, a.rows, sizeof(H));
  vec ? launch<W, H, V>(a, dim, stream) : launch<W, H, 1>(a, dim, stream);
}

template <typename W>
void dispatch_hess(DType h_dt, const ScoreArgs& a, int dim, cudaStream_t stream) {
  if (h_dt == DType::F32) {
    scores_impl<W, float>(a, dim, stream);
  } else {
    scores_impl<W, W>(a, dim, stream);  // the ops layer admits fp32 or w's dtype only
  }
}

}  // namespace

int64_t neuron_scores_workspace_floats(int64_t rows, int64_t cols, int dim) {
  if (dim == 0) return 0;
  const int64_t chunks = col_chunks(rows, cols);
  return chunks > 1 ? 2 * chunks * cols : 0;
}

void neuron_scores(DType w_dt, const void* w, int64_t w_stride, DType h_dt, const void* hf,
                   int64_t hf_stride, const void* hr, int64_t hr_stride, int64_t rows,
                   int64_t cols, int dim, float* s_forget, float* s_retain, float* workspace,
                   cudaStream_t stream) {
  const ScoreArgs a{w, hf, hr, w_stride, hf_stride, hr_stride, rows, cols, 0,
                    s_forget, s_retain, workspace};
  switch (w_dt) {
    case DType::F32: dispatch_hess<float>(h_dt, a, dim, stream); break;
    case DType::BF16: dispatch_hess<__nv_bfloat16>(h_dt, a, dim, stream); break;
    case DType::F16: dispatch_hess<__half>(h_dt, a, dim, stream); break;
  }
}

}  // namespace uk::cuda
