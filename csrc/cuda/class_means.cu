// Per-class feature means and counts (semantics in class_means_cuda.h).
//
// Deterministic without float atomics: the rows are put in a stable order by label, then
// each class's rows are summed in that order.
//   1. rank (one warp per chunk of rows): chunk k's histogram hist[k][c] and each row's rank
//      among the earlier rows of its chunk with the same label (__match_any_sync per 32
//      rows, so equal labels in a slice are ranked by lane; the running counts live in
//      shared memory for up to kSharedClasses classes).
//   2. scan (one block): counts[c] = sum_k hist[k][c]; start[c] = exclusive scan of counts;
//      hist[k][c] becomes the exclusive prefix over the chunks; seg_first[c] = exclusive
//      scan of ceil(counts[c] / seg_rows) (a class's rows are cut into segments).
//   3. scatter: perm[start[c] + hist[k][c] + rank_i] = i, a stable counting sort.
//   4. segment sums (the one pass over x): block (segment, column tile) sums its segment's
//      rows of its columns (tx lanes x V columns, ty thread rows, kUnroll rows in flight,
//      fixed-tree combination in shared memory), each row scaled by 1 / counts[c] before it
//      is added (so no partial sum leaves the range of the values: features near 3e38 give a
//      finite mean), and writes the mean directly when the class has one segment, else the
//      segment's partial row.
//   5. merge: for classes with several segments, their partials are added in order; empty
//      classes get zeros.
// Bytes moved: n d sizeof(x) once, plus O(n) label/permutation traffic and the partials
// of classes longer than one segment.
#include "class_means_cuda.h"
#include "cuda_launch.cuh"
#include "scores_common.cuh"

namespace uk::cuda {
namespace {

using namespace scores;

constexpr int kThreads = 256;
constexpr int kUnroll = 4;
constexpr int kBlocksPerSM = 8;
constexpr int kTileCols = 256;       // nominal column tile (sizes the segments)
constexpr int kRankWarps = 4;        // warps per block of the rank kernel
constexpr int kSlices = 4;           // 32-row slices of labels loaded at once
constexpr int64_t kSharedClasses = 2048;  // rank histograms in shared memory up to this
constexpr int64_t kChunkRows = 1024;      // rows per rank chunk, at least
constexpr int64_t kMaxChunks = 256;
constexpr int64_t kMaxHist = int64_t{1} << 22;  // hist entries, at most
constexpr int kScanBatch = 8;        // hist loads in flight per thread of the scan
constexpr int kScanThreads = 1024;
constexpr int kMergeThreads = 128;

struct Plan {
  int64_t chunks, chunk_rows, seg_rows, max_segs;
};

Plan make_plan(int64_t n, int64_t d, int64_t classes) {
  Plan p{};
  const int64_t by_rows = std::min(kMaxChunks, ceil_div(n, kChunkRows));
  p.chunks = std::max<int64_t>(1, std::min(by_rows, kMaxHist / std::max<int64_t>(classes, 1)));
  p.chunk_rows = std::max<int64_t>(1, ceil_div(n, p.chunks));
  // Segments of a power-of-two length in [64, 2048]: about kBlocksPerSM blocks per SM.
  const int64_t tiles = std::max<int64_t>(1, ceil_div(d, kTileCols));
  const int64_t wanted = ceil_div(n * tiles, int64_t{sm_count()} * kBlocksPerSM);
  p.seg_rows = 64;
  while (p.seg_rows < 2048 && p.seg_rows < wanted) p.seg_rows *= 2;
  p.max_segs = ceil_div(n, p.seg_rows) + classes;
  return p;
}

struct Workspace {
  int* hist;       // [chunks][classes]
  int* rank;       // [n]
  int* perm;       // [n]
  int* start;      // [classes]
  int* seg_first;  // [classes + 1]
  float* partials; // [max_segs][d]
  size_t bytes;
};

size_t align_up(size_t v) { return (v + 255) / 256 * 256; }

Workspace carve(void* base, const Plan& p, int64_t n, int64_t d, int64_t classes) {
  char* at = static_cast<char*>(base);
  size_t off = 0;
  auto take = [&](size_t bytes) {
    char* q = at == nullptr ? nullptr : at + off;
    off += align_up(bytes);
    return q;
  };
  Workspace w{};
  w.hist = reinterpret_cast<int*>(take(sizeof(int) * p.chunks * classes));
  w.rank = reinterpret_cast<int*>(take(sizeof(int) * n));
  w.perm = reinterpret_cast<int*>(take(sizeof(int) * n));
  w.start = reinterpret_cast<int*>(take(sizeof(int) * classes));
  w.seg_first = reinterpret_cast<int*>(take(sizeof(int) * (classes + 1)));
  w.partials = reinterpret_cast<float*>(take(sizeof(float) * p.max_segs * d));
  w.bytes = off;
  return w;
}

// ---- 1. rank --------------------------------------------------------------------------

// One warp per chunk. With kShared the warp counts in its own shared-memory histogram
// (classes <= kSharedClasses) and copies it to hist at the end; otherwise it counts in hist
// directly (zeroed beforehand). Labels are read kSlices * 32 at a time, ahead of use.
template <bool kShared>
__global__ void __launch_bounds__(kRankWarps * 32)
rank_kernel(const int64_t* labels, int64_t n, int64_t classes, int64_t chunks,
            int64_t chunk_rows, int* hist, int* rank) {
  int* const s_hist = dynamic_shared<int>();
  const int64_t chunk = int64_t{blockIdx.x} * kRankWarps + threadIdx.x / 32;
  if (chunk >= chunks) return;
  const unsigned lane = threadIdx.x & 31;
  const unsigned lower = (1u << lane) - 1;
  int* h = kShared ? s_hist + (threadIdx.x / 32) * classes : hist + chunk * classes;
  if constexpr (kShared) {
    for (int64_t c = lane; c < classes; c += 32) h[c] = 0;
    __syncwarp();
  }
  const int64_t r1 = min(n, (chunk + 1) * chunk_rows);
  for (int64_t r0 = chunk * chunk_rows; r0 < r1; r0 += 32 * kSlices) {
    int64_t label[kSlices];
#pragma unroll
    for (int u = 0; u < kSlices; ++u) {
      const int64_t row = r0 + u * 32 + lane;
      label[u] = row < r1 ? labels[row] : -1;
      if (label[u] >= classes) label[u] = -1;  // out of range: left out (the caller refuses them)
    }
#pragma unroll
    for (int u = 0; u < kSlices; ++u) {
      const unsigned peers = __match_any_sync(0xffffffffu, label[u]);
      const int base = label[u] >= 0 ? h[label[u]] : 0;
      __syncwarp();
      if (label[u] >= 0) {
        if ((peers & lower) == 0) h[label[u]] = base + __popc(peers);  // the lowest peer
        rank[r0 + u * 32 + lane] = base + __popc(peers & lower);
      }
      __syncwarp();
    }
  }
  if constexpr (kShared) {
    for (int64_t c = lane; c < classes; c += 32) hist[chunk * classes + c] = h[c];
  }
}

// ---- 2. scan --------------------------------------------------------------------------

// Inclusive scan of the pairs (a, b) over the lanes of a warp.
__device__ __forceinline__ void warp_inclusive_scan(int& a, int& b) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int o = 1; o < 32; o *= 2) {
    const int ua = __shfl_up_sync(0xffffffffu, a, o), ub = __shfl_up_sync(0xffffffffu, b, o);
    if (lane >= o) {
      a += ua;
      b += ub;
    }
  }
}

// Exclusive scan of (a, b) over the block; returns the block totals in (*ta, *tb).
__device__ void block_exclusive_scan(int& a, int& b, int* ta, int* tb) {
  constexpr int kWarps = kScanThreads / 32;
  static_assert(kWarps == 32, "the warp totals are scanned by one warp");
  __shared__ int s_a[kWarps], s_b[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
  int ia = a, ib = b;
  warp_inclusive_scan(ia, ib);
  if (lane == 31) {
    s_a[warp] = ia;
    s_b[warp] = ib;
  }
  __syncthreads();
  if (warp == 0) {
    int wa = s_a[lane], wb = s_b[lane];
    warp_inclusive_scan(wa, wb);
    s_a[lane] = wa;
    s_b[lane] = wb;
  }
  __syncthreads();
  *ta = s_a[kWarps - 1];
  *tb = s_b[kWarps - 1];
  a = (warp > 0 ? s_a[warp - 1] : 0) + ia - a;
  b = (warp > 0 ? s_b[warp - 1] : 0) + ib - b;
  __syncthreads();  // s_a / s_b are reused by the next call
}

__global__ void __launch_bounds__(kScanThreads)
scan_kernel(int* hist, int64_t chunks, int64_t classes, int64_t seg_rows, int64_t* counts,
            int* start, int* seg_first) {
  int carry_rows = 0, carry_segs = 0;
  for (int64_t c0 = 0; c0 < classes; c0 += kScanThreads) {
    const int64_t c = c0 + threadIdx.x;
    int total = 0;
    if (c < classes) {
      for (int64_t k0 = 0; k0 < chunks; k0 += kScanBatch) {
        int h[kScanBatch];
#pragma unroll
        for (int u = 0; u < kScanBatch; ++u)
          h[u] = k0 + u < chunks ? hist[(k0 + u) * classes + c] : 0;
#pragma unroll
        for (int u = 0; u < kScanBatch; ++u) {
          if (k0 + u < chunks) hist[(k0 + u) * classes + c] = total;
          total += h[u];
        }
      }
      counts[c] = total;
    }
    int rows = total, segs = static_cast<int>(ceil_div(total, seg_rows)), tile_rows, tile_segs;
    block_exclusive_scan(rows, segs, &tile_rows, &tile_segs);
    if (c < classes) {
      start[c] = carry_rows + rows;
      seg_first[c] = carry_segs + segs;
    }
    carry_rows += tile_rows;
    carry_segs += tile_segs;
  }
  if (threadIdx.x == 0) seg_first[classes] = carry_segs;
}

// ---- 3. scatter -----------------------------------------------------------------------

__global__ void scatter_kernel(const int64_t* labels, const int* rank, const int* hist,
                               const int* start, int64_t n, int64_t classes, int64_t chunk_rows,
                               int* perm) {
  const int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t c = labels[i];
  if (c < 0 || c >= classes) return;
  perm[start[c] + hist[(i / chunk_rows) * classes + c] + rank[i]] = static_cast<int>(i);
}

// ---- 4. segment sums ------------------------------------------------------------------

struct SegArgs {
  const void* x;
  int64_t x_stride, d, classes, seg_rows;
  const int* perm;
  const int* start;
  const int* seg_first;
  const int64_t* counts;
  float* means;
  float* partials;
};

// The class owning segment s: the last c with seg_first[c] <= s (seg_first is sorted).
__device__ __forceinline__ int64_t segment_class(const int* seg_first, int64_t classes, int64_t s) {
  int64_t lo = 0, hi = classes;  // seg_first[lo] <= s < seg_first[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (seg_first[mid] <= s) lo = mid; else hi = mid;
  }
  return lo;
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) segment_sums_kernel(const SegArgs a) {
  __shared__ float s_acc[V][kThreads];
  const int64_t s = blockIdx.x;
  if (s >= a.seg_first[a.classes]) return;
  const int64_t c = segment_class(a.seg_first, a.classes, s);
  const int64_t count = a.counts[c];
  const float inv = 1.f / static_cast<float>(count);  // a segment's class is never empty
  const int64_t local = s - a.seg_first[c];
  const int64_t p0 = a.start[c] + local * a.seg_rows;
  const int64_t p1 = a.start[c] + min(count, (local + 1) * a.seg_rows);
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int64_t col = (int64_t{blockIdx.y} * blockDim.x + threadIdx.x) * V;
  const bool active = col < a.d;
  const T* x = static_cast<const T*>(a.x) + col;
  const int64_t step = blockDim.y;

  float acc[V];
#pragma unroll
  for (int k = 0; k < V; ++k) acc[k] = 0.f;
  for (int64_t p = p0 + threadIdx.y; p < p1; p += step * kUnroll) {
    int64_t row[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) row[u] = p + u * step < p1 ? a.perm[p + u * step] : -1;
    Raw<T, V> v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      v[u] = load<T, V>(x + (row[u] < 0 ? 0 : row[u]) * a.x_stride, active && row[u] >= 0);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int k = 0; k < V; ++k) acc[k] += element(v[u], k) * inv;
    }
  }

#pragma unroll
  for (int k = 0; k < V; ++k) s_acc[k][tid] = acc[k];
  for (int h = blockDim.y / 2; h > 0; h /= 2) {
    __syncthreads();
    if (threadIdx.y < h) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        acc[k] += s_acc[k][tid + h * blockDim.x];
        s_acc[k][tid] = acc[k];
      }
    }
  }
  if (threadIdx.y != 0 || !active) return;
  const bool single = a.seg_first[c + 1] - a.seg_first[c] == 1;
  float* out = single ? a.means + c * a.d + col : a.partials + s * a.d + col;
#pragma unroll
  for (int k = 0; k < V; ++k) out[k] = acc[k];
}

// ---- 5. merge -------------------------------------------------------------------------

__global__ void __launch_bounds__(kMergeThreads)
merge_kernel(const float* partials, const int* seg_first, int64_t d, float* means) {
  const int64_t c = blockIdx.x;
  const int64_t j = int64_t{blockIdx.y} * blockDim.x + threadIdx.x;
  if (j >= d) return;
  const int64_t s0 = seg_first[c], s1 = seg_first[c + 1];
  if (s1 - s0 == 1) return;  // written by segment_sums_kernel
  float sum = 0.f;
  for (int64_t s = s0; s < s1; ++s) sum += partials[s * d + j];
  means[c * d + j] = sum;  // 0 for an empty class
}

template <typename T>
void segment_sums(const SegArgs& a, int64_t max_segs, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const bool vec = a.d % V == 0 && rows_aligned16(a.x, a.x_stride, 2, sizeof(T));
  const int v = vec ? V : 1;
  const int64_t vectors = ceil_div(a.d, v);
  int tx = 1;
  while (tx < 32 && tx < vectors) tx *= 2;
  const dim3 grid(static_cast<unsigned>(max_segs), static_cast<unsigned>(ceil_div(vectors, tx)));
  const dim3 block(tx, kThreads / tx);
  if (vec)
    UK_LAUNCH(grid, block, 0, stream, segment_sums_kernel<T, V>)(a);
  else
    UK_LAUNCH(grid, block, 0, stream, segment_sums_kernel<T, 1>)(a);
}

}  // namespace

int64_t class_means_workspace_bytes(int64_t n, int64_t d, int64_t classes) {
  return static_cast<int64_t>(carve(nullptr, make_plan(n, d, classes), n, d, classes).bytes);
}

void class_means(DType dt, const void* x, int64_t x_stride, const int64_t* labels, int64_t n,
                 int64_t d, int64_t classes, float* means, int64_t* counts, void* workspace,
                 cudaStream_t stream) {
  if (classes == 0) return;
  if (n == 0) {
    cudaMemsetAsync(counts, 0, sizeof(int64_t) * classes, stream);
    cudaMemsetAsync(means, 0, sizeof(float) * classes * d, stream);
    return;
  }
  const Plan p = make_plan(n, d, classes);
  const Workspace w = carve(workspace, p, n, d, classes);
  const auto rank_blocks = static_cast<unsigned>(ceil_div(p.chunks, kRankWarps));
  if (classes <= kSharedClasses) {
    const size_t smem = sizeof(int) * kRankWarps * classes;
    UK_LAUNCH(rank_blocks, kRankWarps * 32, smem, stream, rank_kernel<true>)(
        labels, n, classes, p.chunks, p.chunk_rows, w.hist, w.rank);
  } else {
    cudaMemsetAsync(w.hist, 0, sizeof(int) * p.chunks * classes, stream);
    UK_LAUNCH(rank_blocks, kRankWarps * 32, 0, stream, rank_kernel<false>)(
        labels, n, classes, p.chunks, p.chunk_rows, w.hist, w.rank);
  }
  UK_LAUNCH(1, kScanThreads, 0, stream, scan_kernel)(w.hist, p.chunks, classes, p.seg_rows,
                                                     counts, w.start, w.seg_first);
  UK_LAUNCH(static_cast<unsigned>(ceil_div(n, 256)), 256, 0, stream, scatter_kernel)(
      labels, w.rank, w.hist, w.start, n, classes, p.chunk_rows, w.perm);
  if (d == 0) return;
  const SegArgs a{x, x_stride, d, classes, p.seg_rows, w.perm, w.start, w.seg_first, counts,
                  means, w.partials};
  switch (dt) {
    case DType::F32: segment_sums<float>(a, p.max_segs, stream); break;
    case DType::BF16: segment_sums<__nv_bfloat16>(a, p.max_segs, stream); break;
    case DType::F16: segment_sums<__half>(a, p.max_segs, stream); break;
  }
  const dim3 grid(static_cast<unsigned>(classes), static_cast<unsigned>(ceil_div(d, kMergeThreads)));
  UK_LAUNCH(grid, kMergeThreads, 0, stream, merge_kernel)(w.partials, w.seg_first, d, means);
}

}  // namespace uk::cuda
