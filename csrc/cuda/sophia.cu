// The fused multi-tensor masked Sophia-G step (math in sophia.h).
//
// Design (memory bound: per selected element read p, g, m, h and write p, m; 24 bytes in
// fp32). One launch covers a whole list of tensors: the launcher packs a table of up to
// kMaxTensors 64-byte slots (pointers, sizes, mask mode, dtypes, first block) into a
// __grid_constant__ kernel parameter, so no host-to-device copy is needed; a longer list
// takes one launch per kMaxTensors tensors. Every block owns a chunk of kChunk elements
// of one tensor and finds its slot by a binary search over the first-block column. A block
// then switches on the slot's dtype combination (uniform, so no divergence) and has each
// thread move kChunk / kThreads elements as 16-byte vectors of p and g (E = 4 fp32 or 8
// bf16/fp16 elements) with the matching 16- or 32-byte vectors of m and h, all loads
// issued before any arithmetic, using streaming (evict-first) loads and stores since
// every byte is touched once. Neuron masks are read per vector: a row mask gives one byte
// per vector (whole unselected rows are never loaded), a column mask E bytes; only the
// selected lanes of a loaded vector change, the others are written back bit for bit.
// Tensors whose pointers are not 16-byte aligned, or whose mask rows do not split into
// whole vectors, take a scalar loop instead.
#include <climits>
#include <cstdint>
#include <cstring>

#include <cuda_runtime.h>

#include "cuda_launch.cuh"
#include "cuda_dtype.cuh"
#include "sophia_cuda.h"

namespace uk::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 4096;  // elements per block
#if CUDART_VERSION >= 12010
constexpr int kMaxTensors = 448;  // kernel parameters of up to 32 KB (CUDA 12.1+, sm_70+)
constexpr size_t kParamBytes = 32764;
#else
constexpr int kMaxTensors = 56;   // the classic 4 KB kernel-parameter limit
constexpr size_t kParamBytes = 4096;
#endif

// (param dtype, state dtype) pairs the ops layer allows.
enum Kind : uint8_t { kF32, kBF16F32, kBF16, kF16F32, kF16 };

struct Slot {
  void* param;
  const void* grad;
  void* exp_avg;
  const void* hessian;
  const unsigned char* mask;
  int64_t numel;
  int64_t inner;
  int32_t first_block;  // blocks of the launch before this tensor's
  uint8_t kind;
  uint8_t mode;         // MaskMode
  uint8_t vec;          // the 16-byte path applies
  uint8_t narrow;       // inner < 2^31: 32-bit index arithmetic within a chunk
};
static_assert(sizeof(Slot) == 64, "a slot is 64 bytes");

struct Table {
  Slot slot[kMaxTensors];
  int32_t count;
};
static_assert(sizeof(Table) + sizeof(SophiaHyper) <= kParamBytes, "kernel parameters too large");

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// E consecutive elements of type T held as raw 16-byte words.
template <typename T, int E>
struct Vec {
  static constexpr int kWords = E * static_cast<int>(sizeof(T)) / 16;
  static_assert(kWords >= 1 && kWords * 16 == E * static_cast<int>(sizeof(T)), "whole 16-byte words");
  uint4 w[kWords];

  __device__ __forceinline__ void load(const T* p) {
#pragma unroll
    for (int k = 0; k < kWords; ++k) w[k] = __ldcs(reinterpret_cast<const uint4*>(p) + k);
  }
  __device__ __forceinline__ void store(T* p) const {
#pragma unroll
    for (int k = 0; k < kWords; ++k) __stcs(reinterpret_cast<uint4*>(p) + k, w[k]);
  }
  __device__ __forceinline__ float get(int e) const {
    T v;
    memcpy(&v, reinterpret_cast<const char*>(w) + e * sizeof(T), sizeof(T));
    return to_float(v);
  }
  __device__ __forceinline__ void set(int e, float f) {
    const T v = from_float<T>(f);
    memcpy(reinterpret_cast<char*>(w) + e * sizeof(T), &v, sizeof(T));
  }
};

// Which of the E elements starting at chunk offset `o` the mask selects (bit e for element
// o + e). `row0`, `col0`: row and column of the chunk's first element. Requires inner % E == 0
// for masked slots, so that the E elements share a row.
template <int E>
__device__ __forceinline__ unsigned vector_selection(const Slot& s, int64_t row0, int64_t col0,
                                                     int64_t o) {
  constexpr unsigned kAll = (1u << E) - 1u;
  if (s.mode == static_cast<uint8_t>(MaskMode::kNone)) return kAll;
  int64_t q, r;  // (col0 + o) = q * inner + r
  if (s.narrow) {
    const auto x = static_cast<uint32_t>(col0 + o), d = static_cast<uint32_t>(s.inner);
    q = x / d;
    r = x - static_cast<uint32_t>(q) * d;
  } else {
    q = (col0 + o) / s.inner;
    r = (col0 + o) - q * s.inner;
  }
  if (s.mode == static_cast<uint8_t>(MaskMode::kRows)) return __ldg(s.mask + row0 + q) ? kAll : 0u;
  unsigned bits = 0;
#pragma unroll
  for (int e = 0; e < E; ++e) bits |= (__ldg(s.mask + r + e) ? 1u : 0u) << e;
  return bits;
}

__device__ __forceinline__ bool element_selected(const Slot& s, int64_t i) {
  if (s.mode == static_cast<uint8_t>(MaskMode::kNone)) return true;
  const int64_t q = i / s.inner;
  return __ldg(s.mask + (s.mode == static_cast<uint8_t>(MaskMode::kRows) ? q : i - q * s.inner)) != 0;
}

// Elements [begin, end) of slot s, kChunk at most; P: param/grad type, S: state type.
template <typename P, typename S>
__device__ __forceinline__ void sophia_chunk(const Slot& s, int64_t begin, int64_t end,
                                             const SophiaHyper& hp) {
  constexpr int E = 16 / sizeof(P);
  constexpr int U = static_cast<int>(kChunk / (kThreads * E));  // vectors per thread
  P* p = static_cast<P*>(s.param);
  const P* g = static_cast<const P*>(s.grad);
  S* m = static_cast<S*>(s.exp_avg);
  const S* h = static_cast<const S*>(s.hessian);

  int64_t scalar_begin = begin;
  if (s.vec) {
    const int64_t nvec = (end - begin) / E;
    scalar_begin = begin + nvec * E;
    int64_t row0 = 0, col0 = 0;
    if (s.mode != static_cast<uint8_t>(MaskMode::kNone)) {
      row0 = begin / s.inner;
      col0 = begin - row0 * s.inner;
    }
    Vec<P, E> pv[U], gv[U];
    Vec<S, E> mv[U], hv[U];
    unsigned sel[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t v = static_cast<int64_t>(u) * kThreads + threadIdx.x;
      sel[u] = v < nvec ? vector_selection<E>(s, row0, col0, v * E) : 0u;
      if (sel[u]) {
        const int64_t i = begin + v * E;
        pv[u].load(p + i);
        gv[u].load(g + i);
        mv[u].load(m + i);
        hv[u].load(h + i);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (!sel[u]) continue;
#pragma unroll
      for (int e = 0; e < E; ++e) {
        if (!(sel[u] >> e & 1u)) continue;
        float pe = pv[u].get(e), me = mv[u].get(e);
        sophia_element(pe, gv[u].get(e), me, hv[u].get(e), hp);
        pv[u].set(e, pe);
        mv[u].set(e, me);
      }
      const int64_t i = begin + (static_cast<int64_t>(u) * kThreads + threadIdx.x) * E;
      pv[u].store(p + i);
      mv[u].store(m + i);
    }
  }
  for (int64_t i = scalar_begin + threadIdx.x; i < end; i += kThreads) {
    if (!element_selected(s, i)) continue;
    float pe = to_float(p[i]), me = to_float(m[i]);
    sophia_element(pe, to_float(g[i]), me, to_float(h[i]), hp);
    p[i] = from_float<P>(pe);
    m[i] = from_float<S>(me);
  }
}

__global__ void __launch_bounds__(kThreads)
sophia_kernel(const __grid_constant__ Table table, const SophiaHyper hp) {
  const auto block = static_cast<int32_t>(blockIdx.x);
  int lo = 0, hi = table.count;  // table.slot[lo].first_block <= block < ...[hi].first_block
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (table.slot[mid].first_block <= block) lo = mid; else hi = mid;
  }
  const Slot s = table.slot[lo];
  const int64_t begin = static_cast<int64_t>(block - s.first_block) * kChunk;
  const int64_t end = begin + kChunk < s.numel ? begin + kChunk : s.numel;
  switch (s.kind) {
    case kF32: sophia_chunk<float, float>(s, begin, end, hp); break;
    case kBF16F32: sophia_chunk<__nv_bfloat16, float>(s, begin, end, hp); break;
    case kBF16: sophia_chunk<__nv_bfloat16, __nv_bfloat16>(s, begin, end, hp); break;
    case kF16F32: sophia_chunk<__half, float>(s, begin, end, hp); break;
    case kF16: sophia_chunk<__half, __half>(s, begin, end, hp); break;
  }
}

uint8_t kind_of(const SophiaTensor& t) {
  const bool fp32_state = t.state_dtype == DType::F32;
  switch (t.param_dtype) {
    case DType::BF16: return fp32_state ? kBF16F32 : kBF16;
    case DType::F16: return fp32_state ? kF16F32 : kF16;
    default: return kF32;
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

Slot make_slot(const SophiaTensor& t, int32_t first_block) {
  const int elems = t.param_dtype == DType::F32 ? 4 : 8;  // E of sophia_chunk
  const bool vec = aligned16(t.param) && aligned16(t.grad) && aligned16(t.exp_avg) &&
                   aligned16(t.hessian) && (t.mode == MaskMode::kNone || t.inner % elems == 0);
  return {t.param, t.grad, t.exp_avg, t.hessian, reinterpret_cast<const unsigned char*>(t.mask),
          t.numel, t.inner, first_block, kind_of(t), static_cast<uint8_t>(t.mode),
          static_cast<uint8_t>(vec), static_cast<uint8_t>(t.inner < (int64_t{1} << 31))};
}

}  // namespace

void masked_sophia_step(const SophiaTensor* tensors, int64_t count, const SophiaHyper& hyper,
                        cudaStream_t stream) {
  Table table;  // 28 KB on the host stack, passed by value as the kernel parameter
  int64_t blocks = 0;
  table.count = 0;
  auto launch = [&] {
    if (table.count > 0)
      UK_LAUNCH(static_cast<unsigned>(blocks), kThreads, 0, stream, sophia_kernel)(table, hyper);
    table.count = 0;
    blocks = 0;
  };
  for (int64_t i = 0; i < count; ++i) {
    if (tensors[i].numel == 0) continue;
    const int64_t need = ceil_div(tensors[i].numel, kChunk);
    if (table.count == kMaxTensors || blocks + need > INT_MAX) launch();
    table.slot[table.count++] = make_slot(tensors[i], static_cast<int32_t>(blocks));
    blocks += need;
  }
  launch();
}

}  // namespace uk::cuda
