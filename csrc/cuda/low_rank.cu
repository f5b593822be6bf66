// Low-rank projection y = x - s (x U) U^T for x [n, d], U [d, r] (r <= 256), fp32 math.
//
// Arithmetic intensity. Per element of x the op does 4r flops (2r for x U, 2r for
// (x U) U^T) and moves 4 bytes in bf16 (read x, write y): r flop/byte. An H100 streams
// ~3 TB/s, so r = 64 at 2.5 TB/s needs ~160 TFLOP/s: beyond the ~60 TFLOP/s of fp32 FMA
// (balance ~20 flop/byte), well within bf16 tensor cores (balance ~200 flop/byte for
// mma.sync). The half types therefore run on mma.sync m16n8k16 with fp32 accumulation;
// fp32 input (no tensor-core format keeps its precision) and misaligned views take a
// register-blocked FMA kernel.
//
// Where the row tile lives between the two products. A tile of BM rows is needed twice:
// once for c = x_tile U, once for y_tile = x_tile - s c U^T, and c needs all d columns
// before the second product can start. At d = 4096 a 32-row bf16 tile is 256 KiB, more
// than shared memory, and U (512 KiB at r = 64) does not fit either. So:
//  - x is read from HBM once, with an L2 evict_last hint, and re-read for the second product
//    from L2 (evict_first hint); y is written with streaming stores. Persistent CTAs (one per
//    SM) keep 132 tiles x 256 KiB = 34 MiB open, inside the 50 MiB L2.
//  - the two products of consecutive tiles are fused: while the CTA sweeps over the column
//    chunks of tile t (first product) it finishes tile t-1 (second product) with the same
//    U chunk, so U is streamed from L2 once per tile instead of twice.
//  - sweeps alternate direction (boustrophedon): tile t-1 is re-read newest chunk first,
//    which keeps the L2 reuse distance short and degrades gracefully if L2 is contended.
//
// Tensor-core kernel, per CTA (8 warps, BM = 32 rows, BK = 64 columns per chunk, RP = r
// rounded up to 32/64/128/256): a cp.async pipeline of kStages stages, each holding the
// current tile's x chunk, the previous tile's x chunk and the U chunk [BK, RP], rows padded
// by 16 bytes so every ldmatrix is bank-conflict free.
//  - first product: warps split RP (WN ways) and the chunk's four k16 steps (WK ways) and
//    accumulate c in registers; at the end of a sweep the WK partials are summed in shared
//    memory (fp32), which also feeds the optional coeffs output;
//  - second product: warps tile the chunk 2 (rows) x 4 (16 columns); the A operand
//    (-s c as bf16/fp16) stays in registers for the whole sweep, the accumulators start
//    at x, so D = x + (-s c) U^T comes out of the mma directly.
//  - fp16: -s c may exceed the fp16 range, so it is scaled by a power of two sigma chosen
//    per tile (max |s c| sigma in [2^14, 2^15)), the accumulators start at sigma x and the
//    result is multiplied by 1/sigma (exact). bf16 has fp32's range: sigma = 1.
//  - rounding: U and -s c enter the mma in x's type (relative error 2^-9 for bf16), which
//    adds an error of the order of y's own rounding.
//  - budget per 32x64 chunk step (r = 64, bf16, at 2.5 TB/s over 132 SMs: ~750 cycles): 16
//    mma per warp (~30 % of the SM's mma.sync rate), ~55 KiB of shared-memory traffic
//    (~60 % of its bandwidth), and L2 traffic of ~2x the HBM traffic (x in, x re-read,
//    y out, U at 2 d r / BM bytes per row). These are estimates: the kernel's index math
//    was checked against a lane-level emulation, its speed is measured by bench_low_rank.py.
//
// Generic kernel (fp32, or any misaligned view): 16-row tiles, 256 threads; the first product
// stages 32-column chunks of x and U in shared memory and keeps up to 16 coefficients per
// thread; the second product re-reads x from L2 (newest chunk first), the grid sized so that
// at most ~24 MiB of x is waiting to be re-read.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda_launch.cuh"
#include "cuda_ptx.cuh"
#include "low_rank_cuda.h"

namespace uk::cuda {
namespace {

using namespace ptx;

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int device_attribute(cudaDeviceAttr attr) {
  int dev = 0, value = 0;
  cudaGetDevice(&dev);
  if (cudaDeviceGetAttribute(&value, attr, dev) != cudaSuccess) return 0;
  return value;
}

// ---------------------------------------------------------------------------------------
// Tensor-core kernel
// ---------------------------------------------------------------------------------------

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBM = 32;    // rows per tile
constexpr int kBK = 64;    // columns per chunk
constexpr int kPad = 8;    // elements of padding per shared-memory row (16 bytes)

template <int RP>
struct TileConfig {
  static_assert(RP == 32 || RP == 64 || RP == 128 || RP == 256, "RP is 32, 64, 128 or 256");
  // First product: kWarps = WN (split of RP) x WK (split of the four k16 steps).
  static constexpr int WN = RP >= 256 ? 8 : RP >= 128 ? 4 : 2;
  static constexpr int WK = kWarps / WN;
  static constexpr int NT = RP / (8 * WN);  // n8 tiles per warp, even
  static constexpr int kStages = RP <= 64 ? 8 : RP == 128 ? 6 : 4;
  static constexpr int XS = kBK + kPad;     // x chunk row stride (elements)
  static constexpr int US = RP + kPad;      // U chunk row stride (elements)
  static constexpr int CS = RP + 8;         // fp32 coefficient row stride
  static constexpr int kXElems = kBM * XS;
  static constexpr int kUElems = kBK * US;
  static constexpr int kStageElems = 2 * kXElems + kUElems;
  static constexpr size_t kSmemBytes =
      size_t{kStages} * kStageElems * 2 + size_t{kBM} * CS * 4 + kWarps * 4;
  static_assert(NT % 2 == 0 && NT >= 2, "B fragments are loaded in pairs of n8 tiles");
};

int rank_padded(int64_t r) { return r <= 32 ? 32 : r <= 64 ? 64 : r <= 128 ? 128 : 256; }

size_t tensor_core_smem(int rp) {
  switch (rp) {
    case 32: return TileConfig<32>::kSmemBytes;
    case 64: return TileConfig<64>::kSmemBytes;
    case 128: return TileConfig<128>::kSmemBytes;
    default: return TileConfig<256>::kSmemBytes;
  }
}

struct TileArgs {
  const void* x;
  int64_t x_stride;
  const void* u;     // [d, ldu] in x's type, columns r..ldu-1 zero
  int64_t ldu;
  int64_t n, d, r, tiles;
  float neg_scale;
  void* y;
  float* coeffs;
};

// Two consecutive elements of a bf16/fp16 row as one 32-bit register (lower address low).
template <typename T>
using Vec2 = std::conditional_t<std::is_same_v<T, __half>, __half2, __nv_bfloat162>;

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  Vec2<T> v;
  if constexpr (std::is_same_v<T, __half>) v = __floats2half2_rn(lo, hi);
  else v = __floats2bfloat162_rn(lo, hi);
  uint32_t out;
  memcpy(&out, &v, 4);
  return out;
}

template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t w) {
  Vec2<T> v;
  memcpy(&v, &w, 4);
  if constexpr (std::is_same_v<T, __half>) return __half22float2(v);
  else return __bfloat1622float2(v);
}

// Position in the CTA's sequence of (sweep, chunk) steps. Sweep s runs the first product of
// the CTA's tile s (if s < tiles) and the second product of tile s - 1 (if s >= 1); even
// sweeps visit chunks 0..K-1, odd sweeps K-1..0.
struct Step {
  int64_t sweep = 0, pos = 0;
  __device__ void advance(int64_t chunks) {
    if (++pos == chunks) {
      pos = 0;
      ++sweep;
    }
  }
  __device__ int64_t chunk(int64_t chunks) const { return sweep % 2 == 0 ? pos : chunks - 1 - pos; }
};

template <typename T, int RP>
__global__ void __launch_bounds__(kThreads, 1) low_rank_tensor_core_kernel(const TileArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using C = TileConfig<RP>;
  unsigned char* const smem = dynamic_shared<unsigned char>();
  T* stages = reinterpret_cast<T*>(smem);
  float* cbuf = reinterpret_cast<float*>(smem + size_t{C::kStages} * C::kStageElems * sizeof(T));
  float* warp_max = cbuf + kBM * C::CS;

  const T* x = static_cast<const T*>(a.x);
  const T* u = static_cast<const T*>(a.u);
  T* y = static_cast<T*>(a.y);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t my_tiles = ceil_div(a.tiles - blockIdx.x, gridDim.x);
  const int64_t chunks = ceil_div(a.d, kBK);
  const int64_t steps = (my_tiles + 1) * chunks;
  const uint64_t keep = l2_policy_evict_last(), drop = l2_policy_evict_first();
  auto tile_of = [&](int64_t sweep) { return blockIdx.x + sweep * int64_t{gridDim.x}; };

  // One pipeline stage: U chunk k, x chunk k of tile s (first product) and of tile s - 1.
  auto load_stage = [&](const Step& st, int slot) {
    T* xs_cur = stages + slot * C::kStageElems;
    T* xs_prev = xs_cur + C::kXElems;
    T* us = xs_prev + C::kXElems;
    const int64_t k0 = st.chunk(chunks) * kBK;
#pragma unroll
    for (int i = 0; i < RP / 32; ++i) {
      const int v = tid + i * kThreads;
      const int row = v / (RP / 8), col = (v % (RP / 8)) * 8;
      const bool ok = k0 + row < a.d && col < a.ldu;
      cp_async16(us + row * C::US + col, ok ? u + (k0 + row) * a.ldu + col : u, ok, keep);
    }
    const int row = tid / 8, col = (tid % 8) * 8;
    const bool col_ok = k0 + col < a.d;
    if (st.sweep < my_tiles) {
      const int64_t grow = tile_of(st.sweep) * kBM + row;
      const bool ok = col_ok && grow < a.n;
      cp_async16(xs_cur + row * C::XS + col, ok ? x + grow * a.x_stride + k0 + col : x, ok, keep);
    }
    if (st.sweep >= 1) {
      const int64_t grow = tile_of(st.sweep - 1) * kBM + row;
      const bool ok = col_ok && grow < a.n;
      cp_async16(xs_prev + row * C::XS + col, ok ? x + grow * a.x_stride + k0 + col : x, ok, drop);
    }
  };

  // First product: warp (wn, wk) accumulates rows 0..31 x columns [n0, n0 + 8 NT) of c.
  const int wn = warp % C::WN, wk = warp / C::WN;
  const int n0 = wn * 8 * C::NT;
  float acc[2][C::NT][4];
  // Second product: warp (mg, ng) owns rows 16 mg.. and columns 16 ng.. of each chunk.
  const int mg = warp / 4, ng = warp % 4;
  uint32_t afrag[RP / 16][4];  // -s sigma c for rows 16 mg.., as x's type
  float inv_sigma = 1.f;
  auto clear_acc = [&] {
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int nt = 0; nt < C::NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;
  };
  clear_acc();

  auto first_product = [&](int slot) {
    const T* xs = stages + slot * C::kStageElems;
    const T* us = xs + 2 * C::kXElems;
#pragma unroll
    for (int ks = wk; ks < kBK / 16; ks += C::WK) {
      uint32_t af[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
        ldmatrix_x4(af[mt], xs + (16 * mt + lane % 16) * C::XS + 16 * ks + (lane / 16) * 8);
#pragma unroll
      for (int p = 0; p < C::NT / 2; ++p) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, us + (16 * ks + 8 * ((lane / 8) % 2) + lane % 8) * C::US + n0 +
                                 16 * p + 8 * (lane / 16));
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          mma16816<T>(acc[mt][2 * p], af[mt], b[0], b[1]);
          mma16816<T>(acc[mt][2 * p + 1], af[mt], b[2], b[3]);
        }
      }
    }
  };

  auto second_product = [&](int slot, int64_t k0, int64_t tile) {
    const T* xs = stages + slot * C::kStageElems + C::kXElems;
    const T* us = xs + C::kXElems;
    const float sigma = 1.f / inv_sigma;
    float d[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = 16 * mg + g + 8 * h, col = 16 * ng + 8 * nt + 2 * t;
        const float2 v = unpack2<T>(*reinterpret_cast<const uint32_t*>(xs + row * C::XS + col));
        d[nt][2 * h] = sigma * v.x;
        d[nt][2 * h + 1] = sigma * v.y;
      }
#pragma unroll
    for (int kt = 0; kt < RP / 16; ++kt) {
      uint32_t b[4];
      ldmatrix_x4(b, us + (16 * ng + 8 * (lane / 16) + lane % 8) * C::US + 16 * kt +
                         8 * ((lane / 8) % 2));
      mma16816<T>(d[0], afrag[kt], b[0], b[1]);
      mma16816<T>(d[1], afrag[kt], b[2], b[3]);
    }
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t row = tile * kBM + 16 * mg + g + 8 * h;
        const int64_t col = k0 + 16 * ng + 8 * nt + 2 * t;
        if (row < a.n && col < a.d) {
          const uint32_t v = pack2<T>(inv_sigma * d[nt][2 * h], inv_sigma * d[nt][2 * h + 1]);
          __stcs(reinterpret_cast<unsigned int*>(y + row * a.d + col), v);
        }
      }
  };

  // End of a sweep: sum the WK partials of c into cbuf, write coeffs, choose sigma and turn
  // -s sigma c into the A fragments of the next sweep's second product.
  auto finish_tile = [&](int64_t tile) {
#pragma unroll
    for (int grp = 0; grp < C::WK; ++grp) {
      if (wk == grp) {
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int nt = 0; nt < C::NT; ++nt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              float2* p = reinterpret_cast<float2*>(cbuf + (16 * mt + g + 8 * h) * C::CS + n0 +
                                                    8 * nt + 2 * t);
              float2 v = make_float2(acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1]);
              if (grp > 0) {
                const float2 old = *p;
                v.x += old.x;
                v.y += old.y;
              }
              *p = v;
            }
      }
      __syncthreads();
    }
    if (a.coeffs != nullptr) {
      for (int64_t i = tid; i < kBM * a.r; i += kThreads) {
        const int64_t row = i / a.r, col = i % a.r;
        const int64_t grow = tile * kBM + row;
        if (grow < a.n) a.coeffs[grow * a.r + col] = cbuf[row * C::CS + col];
      }
    }
    float sigma = 1.f;
    if constexpr (std::is_same_v<T, __half>) {
      float m = 0.f;
      for (int i = tid; i < kBM * RP; i += kThreads) m = fmaxf(m, fabsf(cbuf[(i / RP) * C::CS + i % RP]));
      for (int o = 16; o > 0; o /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
      if (lane == 0) warp_max[warp] = m;
      __syncthreads();
      m = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) m = fmaxf(m, warp_max[w]);
      m *= fabsf(a.neg_scale);
      if (m > 0.f && m <= 3.0e38f) sigma = ldexpf(1.f, min(max(14 - ilogbf(m), -100), 60));
      __syncthreads();  // warp_max is rewritten at the next tile
    }
    inv_sigma = 1.f / sigma;
    const float f = a.neg_scale * sigma;
#pragma unroll
    for (int kt = 0; kt < RP / 16; ++kt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float* p = cbuf + (16 * mg + g + 8 * (e % 2)) * C::CS + 16 * kt + 8 * (e / 2) + 2 * t;
        afrag[kt][e] = pack2<T>(f * p[0], f * p[1]);
      }
    clear_acc();
  };

  Step fetch;
  for (int s = 0; s < C::kStages - 1; ++s) {
    if (s < steps) {
      load_stage(fetch, s);
      fetch.advance(chunks);
    }
    cp_async_commit();
  }
  Step cur;
  for (int64_t q = 0; q < steps; ++q) {
    cp_async_wait<C::kStages - 2>();
    __syncthreads();  // stage q landed for every thread; stage q - 1 is free again
    if (q + C::kStages - 1 < steps) {
      load_stage(fetch, static_cast<int>((q + C::kStages - 1) % C::kStages));
      fetch.advance(chunks);
    }
    cp_async_commit();
    const int slot = static_cast<int>(q % C::kStages);
    if (cur.sweep < my_tiles) first_product(slot);
    if (cur.sweep >= 1) second_product(slot, cur.chunk(chunks) * kBK, tile_of(cur.sweep - 1));
    if (cur.sweep < my_tiles && cur.pos == chunks - 1) finish_tile(tile_of(cur.sweep));
    cur.advance(chunks);
  }
  cp_async_wait<0>();
#else
  __trap();  // the launcher only picks this kernel on sm_80 and newer
#endif
}

template <typename T, int RP>
void launch_tensor_core(const TileArgs& a, int sms, cudaStream_t stream) {
  auto kernel = low_rank_tensor_core_kernel<T, RP>;
  constexpr size_t smem = TileConfig<RP>::kSmemBytes;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(a.tiles, std::max(sms, 1)));
  UK_LAUNCH(grid, kThreads, smem, stream, low_rank_tensor_core_kernel<T, RP>)(a);
}

template <typename T>
void tensor_core_impl(const TileArgs& a, cudaStream_t stream) {
  const int sms = device_attribute(cudaDevAttrMultiProcessorCount);
  switch (rank_padded(a.r)) {
    case 32: launch_tensor_core<T, 32>(a, sms, stream); break;
    case 64: launch_tensor_core<T, 64>(a, sms, stream); break;
    case 128: launch_tensor_core<T, 128>(a, sms, stream); break;
    default: launch_tensor_core<T, 256>(a, sms, stream); break;
  }
}

// ---------------------------------------------------------------------------------------
// Generic kernel
// ---------------------------------------------------------------------------------------

constexpr int kGenRows = 16;      // rows per tile: thread i = tid / 16 owns row i
constexpr int kGenCols = 32;      // columns per chunk
constexpr int kGenCoeffs = kLowRankMaxRank / 16;  // coefficients per thread
constexpr int64_t kGenericOpenBytes = int64_t{24} << 20;

struct GenericArgs {
  const void* x;
  int64_t x_stride;
  const float* u;  // contiguous [d, r]
  int64_t n, d, r, tiles;
  int ldu;         // shared-memory row stride of U chunks and coefficients (odd)
  float scale;
  void* y;
  float* coeffs;
};

int generic_ldu(int64_t r) { return static_cast<int>(r % 2 == 0 ? r + 1 : r); }

size_t generic_smem(int64_t r) {
  return (size_t{kGenCols + kGenRows} * generic_ldu(r) + kGenRows * (kGenCols + 1)) * sizeof(float);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) low_rank_generic_kernel(const GenericArgs a) {
  float* const gsm = dynamic_shared<float>();
  float* us = gsm;                         // [kGenCols][ldu]: rows c0.. of U
  float* cs = us + kGenCols * a.ldu;       // [kGenRows][ldu]: c of the tile
  float* xs = cs + kGenRows * a.ldu;       // [kGenRows][kGenCols + 1]
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  const int tid = threadIdx.x, i = tid / 16, l16 = tid % 16;
  const int r = static_cast<int>(a.r);

  auto load_u = [&](int64_t c0) {
    for (int e = tid; e < kGenCols * r; e += kThreads) {
      const int row = e / r, col = e % r;
      us[row * a.ldu + col] = c0 + row < a.d ? a.u[(c0 + row) * r + col] : 0.f;
    }
  };

  for (int64_t tile = blockIdx.x; tile < a.tiles; tile += gridDim.x) {
    const int64_t row0 = tile * kGenRows, row = row0 + i;
    float acc[kGenCoeffs];
#pragma unroll
    for (int m = 0; m < kGenCoeffs; ++m) acc[m] = 0.f;
    for (int64_t c0 = 0; c0 < a.d; c0 += kGenCols) {
      __syncthreads();  // the previous chunk's us/xs are no longer read
      for (int e = tid; e < kGenRows * kGenCols; e += kThreads) {
        const int rr = e / kGenCols, cc = e % kGenCols;
        const bool ok = row0 + rr < a.n && c0 + cc < a.d;
        xs[rr * (kGenCols + 1) + cc] = ok ? static_cast<float>(x[(row0 + rr) * a.x_stride + c0 + cc]) : 0.f;
      }
      load_u(c0);
      __syncthreads();
      for (int kk = 0; kk < kGenCols; ++kk) {
        const float xv = xs[i * (kGenCols + 1) + kk];
#pragma unroll
        for (int m = 0; m < kGenCoeffs; ++m) {
          const int k = l16 + 16 * m;
          if (k < r) acc[m] += xv * us[kk * a.ldu + k];
        }
      }
    }
#pragma unroll
    for (int m = 0; m < kGenCoeffs; ++m) {
      const int k = l16 + 16 * m;
      if (k < r) cs[i * a.ldu + k] = acc[m];
    }
    __syncthreads();
    if (a.coeffs != nullptr) {
      for (int e = tid; e < kGenRows * r; e += kThreads) {
        const int rr = e / r, k = e % r;
        if (row0 + rr < a.n) a.coeffs[(row0 + rr) * r + k] = cs[rr * a.ldu + k];
      }
    }
    for (int64_t c0 = (a.d - 1) / kGenCols * kGenCols; c0 >= 0; c0 -= kGenCols) {
      __syncthreads();
      load_u(c0);
      __syncthreads();
      float p0 = 0.f, p1 = 0.f;
      for (int k = 0; k < r; ++k) {
        const float c = cs[i * a.ldu + k];
        p0 += c * us[l16 * a.ldu + k];
        p1 += c * us[(l16 + 16) * a.ldu + k];
      }
      if (row < a.n) {
        const int64_t j0 = c0 + l16, j1 = j0 + 16;
        if (j0 < a.d) y[row * a.d + j0] = T(static_cast<float>(x[row * a.x_stride + j0]) - a.scale * p0);
        if (j1 < a.d) y[row * a.d + j1] = T(static_cast<float>(x[row * a.x_stride + j1]) - a.scale * p1);
      }
    }
  }
}

template <typename T>
void generic_impl(const GenericArgs& a, cudaStream_t stream) {
  const size_t smem = generic_smem(a.r);
  cudaFuncSetAttribute(low_rank_generic_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                       static_cast<int>(smem));
  // Tiles in flight: at least one per SM, at most four, and within kGenericOpenBytes of x
  // (read once, not yet re-read) so that the second pass over each tile hits L2.
  const int64_t sms = std::max(device_attribute(cudaDevAttrMultiProcessorCount), 1);
  const int64_t open = std::clamp<int64_t>(
      kGenericOpenBytes / std::max<int64_t>(1, kGenRows * a.d * int64_t{sizeof(T)}), sms, 4 * sms);
  const unsigned grid = static_cast<unsigned>(std::min(a.tiles, open));
  UK_LAUNCH(grid, kThreads, smem, stream, low_rank_generic_kernel<T>)(a);
}

}  // namespace

bool low_rank_tensor_core_ok(DType dt, const void* x, int64_t x_stride, int64_t n, int64_t d,
                             int64_t r) {
  if (dt == DType::F32 || d % 8 != 0 || r < 1 || r > kLowRankMaxRank) return false;
  if (reinterpret_cast<uintptr_t>(x) % 16 != 0 || (n > 1 && x_stride % 8 != 0)) return false;
  if (device_attribute(cudaDevAttrComputeCapabilityMajor) < 8) return false;
  const int64_t optin = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
  return static_cast<int64_t>(tensor_core_smem(rank_padded(r))) <= optin;
}

void low_rank_project_tensor_core(DType dt, const void* x, int64_t x_stride, const void* basis,
                                  int64_t ldu, int64_t n, int64_t d, int64_t r, float scale,
                                  void* y, float* coeffs, cudaStream_t stream) {
  if (n == 0 || d == 0) return;
  const TileArgs a{x, x_stride, basis, ldu, n, d, r, ceil_div(n, kBM), -scale, y, coeffs};
  if (dt == DType::BF16)
    tensor_core_impl<__nv_bfloat16>(a, stream);
  else
    tensor_core_impl<__half>(a, stream);
}

void low_rank_project_generic(DType dt, const void* x, int64_t x_stride, const float* basis,
                              int64_t n, int64_t d, int64_t r, float scale, void* y,
                              float* coeffs, cudaStream_t stream) {
  if (n == 0 || d == 0) return;
  const GenericArgs a{x, x_stride, basis, n, d, r, ceil_div(n, kGenRows), generic_ldu(r), scale,
                      y, coeffs};
  switch (dt) {
    case DType::F32: generic_impl<float>(a, stream); break;
    case DType::BF16: generic_impl<__nv_bfloat16>(a, stream); break;
    case DType::F16: generic_impl<__half>(a, stream); break;
  }
}

}  // namespace uk::cuda
