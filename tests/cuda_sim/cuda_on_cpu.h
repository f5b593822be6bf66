// CUDA's semantics for a plain C++ compiler: the CPU execution harness of csrc/cuda.
//
// The kernels compile unchanged with `g++ -x c++ -include cuda_on_cpu.h`; the stub headers in
// tests/cuda_sim/include stand in for <cuda_runtime.h>, <cuda_bf16.h> and <cuda_fp16.h>.
// The launch is UK_LAUNCH (csrc/include/cuda_launch.cuh) and the tensor-core PTX goes through
// csrc/include/cuda_ptx.cuh; this header defines both for the CPU.
//
// Execution model (sim_runtime.cpp). A launch runs synchronously on the calling thread. The
// blocks of the grid run one after another (in ascending or descending order, by schedule);
// every CUDA thread of a block is a fiber with its own stack, so all threads of a block are
// alive at once and each runs until it reaches __syncthreads(), a warp collective or its end.
// The scheduler then picks the next runnable thread by a policy: the lowest thread first
// (earlier warps run ahead), the highest first (later warps run ahead), or a seeded random
// order. A missing barrier therefore shows: under one of the first two policies a reader runs
// before its writer, or a writer overwrites what a reader has not read yet.
//  - __syncthreads() waits for every thread of the block; threads that exited while others
//    wait, or that wait at different __syncthreads() calls, are reported as errors (undefined
//    behaviour in CUDA), as are deadlocks.
//  - Warps are 32 consecutive linear thread ids. __shfl_*_sync, __syncwarp, __ballot_sync and
//    __match_any_sync wait for every non-exited lane of their mask (as shfl.sync et al. do) and
//    follow PTX's rules: source lanes outside the width segment give the caller's own value, a
//    source lane outside the mask gives an undefined value (all bits set: NaN for floats), and
//    a calling lane outside its own mask is an error.
//  - Shared memory: `__shared__` variables are function-local statics gathered in the section
//    uk_sim_shared; they are per block because blocks never run concurrently. Dynamic shared
//    memory is one buffer of the launch's size. Both are filled with 0xff bytes before each
//    block, so a read of shared memory no thread of the block wrote is visible.
//  - Global memory is the caller's memory; within a block the fibers interleave only at the
//    synchronisation points, so the model is sequentially consistent between them. Atomics are
//    plain read-modify-writes (no fiber switch can split them). Streams are the host thread:
//    cudaMemsetAsync and launches complete before they return.
//  - Arithmetic is IEEE fp32 without contraction (nvcc may fuse a*b+c into an fma: results can
//    differ by an fp32 rounding). Fast-math intrinsics are the exact function they
//    approximate (__expf is expf, rsqrtf is 1/sqrtf): within their documented error bounds.
//    __half/__nv_bfloat16 round as cuda_fp16.hpp/cuda_bf16.hpp (sim_half_types.h).
#pragma once

#define UK_CUDA_ON_CPU 1
#define __CUDA_ARCH__ 900    // the simulated device is an sm_90 part
#define CUDART_VERSION 13000

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <tuple>
#include <type_traits>
#include <utility>

#include "sim_half_types.h"
#include "sim_vector_types.h"

// ---- qualifiers -----------------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) __attribute__((aligned(n)))
// A __shared__ variable is a function-local static with an alignment nothing else uses, by
// which build.py finds its section in each object and renames it uk_sim_shared (GCC ignores a
// section attribute on the statics of function templates).
#define UK_SIM_SHARED_ALIGN 2048
#define __shared__ __attribute__((aligned(UK_SIM_SHARED_ALIGN))) static

// ---- built-in variables (set by the scheduler before it resumes a thread) --------------------

extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;
constexpr int warpSize = 32;

// ---- the runtime behind the intrinsics (sim_runtime.cpp) -------------------------------------

namespace uk_sim {

enum class Shfl : int { kIdx = 0, kUp = 1, kDown = 2, kBfly = 3 };

void syncthreads();
void syncwarp(unsigned mask);
uint64_t shuffle(Shfl mode, unsigned mask, uint64_t bits, int b, int width);
unsigned ballot(unsigned mask, bool pred);
unsigned match_any(unsigned mask, uint64_t bits);
[[noreturn]] void trap(const char* what);
void* dynamic_shared_base();

}  // namespace uk_sim

// ---- synchronisation and warp intrinsics ----------------------------------------------------

inline void __syncthreads() { uk_sim::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { uk_sim::syncwarp(mask); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
[[noreturn]] inline void __trap() { uk_sim::trap("__trap()"); }

namespace uk_sim {
template <typename T>
T shuffle_as(Shfl mode, unsigned mask, T var, int b, int width) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "a 32- or 64-bit value");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = shuffle(mode, mask, bits, b, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}
}  // namespace uk_sim

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  return uk_sim::shuffle_as(uk_sim::Shfl::kIdx, mask, var, src_lane, width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return uk_sim::shuffle_as(uk_sim::Shfl::kUp, mask, var, static_cast<int>(delta), width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return uk_sim::shuffle_as(uk_sim::Shfl::kDown, mask, var, static_cast<int>(delta), width);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  return uk_sim::shuffle_as(uk_sim::Shfl::kBfly, mask, var, lane_mask, width);
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return uk_sim::ballot(mask, pred != 0); }
template <typename T>
unsigned __match_any_sync(unsigned mask, T value) {
  static_assert(std::is_arithmetic_v<T> && (sizeof(T) == 4 || sizeof(T) == 8), "32/64-bit");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  return uk_sim::match_any(mask, bits);
}

// ---- memory access intrinsics (caching hints have no effect) --------------------------------

template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcs(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return *p; }
template <typename T> inline T __ldlu(const T* p) { return *p; }
template <typename T> inline void __stcs(T* p, T v) { *p = v; }
template <typename T> inline void __stcg(T* p, T v) { *p = v; }
template <typename T> inline void __stwt(T* p, T v) { *p = v; }

template <typename T> inline T atomicAdd(T* p, T v) { const T old = *p; *p = old + v; return old; }
template <typename T> inline T atomicMax(T* p, T v) { const T old = *p; *p = old < v ? v : old; return old; }
template <typename T> inline T atomicMin(T* p, T v) { const T old = *p; *p = v < old ? v : old; return old; }
template <typename T> inline T atomicExch(T* p, T v) { const T old = *p; *p = v; return old; }
template <typename T> inline T atomicCAS(T* p, T cmp, T v) {
  const T old = *p;
  if (old == cmp) *p = v;
  return old;
}

// ---- arithmetic intrinsics ------------------------------------------------------------------

inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }

// Correctly rounded IEEE operations (the _rn intrinsics) are the host's.
inline float __frcp_rn(float x) { return 1.f / x; }
inline float __fdividef(float a, float b) { return a / b; }  // exact division (fast: ~2 ulp)
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : x > 1.f ? 1.f : x; }
// Fast-math intrinsics as the exact function (their results are within its error bounds).
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __powf(float a, float b) { return std::pow(a, b); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }

// CUDA's global min/max overloads.
#define UK_SIM_MINMAX(T)                                  \
  inline T min(T a, T b) { return b < a ? b : a; }        \
  inline T max(T a, T b) { return a < b ? b : a; }
UK_SIM_MINMAX(int)
UK_SIM_MINMAX(unsigned int)
UK_SIM_MINMAX(long)
UK_SIM_MINMAX(unsigned long)
UK_SIM_MINMAX(long long)
UK_SIM_MINMAX(unsigned long long)
#undef UK_SIM_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

// ---- runtime API: synchronous, one simulated device at a time -------------------------------

typedef struct CUstream_st* cudaStream_t;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorLaunchFailure = 719,
};
typedef cudaError_t cudaError;

enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};

cudaError_t cudaGetDevice(int* device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t stream = nullptr);
cudaError_t cudaMemset(void* p, int value, size_t bytes);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t error);

namespace uk_sim {
cudaError_t set_func_attribute(const void* kernel, cudaFuncAttribute attr, int value);
}

template <typename F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  return uk_sim::set_func_attribute(reinterpret_cast<const void*>(kernel), attr, value);
}

// ---- the launch -----------------------------------------------------------------------------

namespace uk_sim {

struct LaunchConfig {
  dim3 grid, block;
  size_t dynamic_smem;
  const void* kernel;
  const char* name;     // the kernel instantiation, for errors and the launch log
  size_t param_bytes;   // the size of the kernel's parameter list
};

// Runs `thread_body(ctx)` as every thread of every block of the grid.
void run_grid(const LaunchConfig& config, void (*thread_body)(void*), void* ctx);

template <auto Kernel>
struct Launch;

template <typename... P, void (*Kernel)(P...)>
struct Launch<Kernel> {
  LaunchConfig config;

  // Like CUDA, the arguments are converted to the parameter types once, into a parameter
  // block; every thread then receives its own copy of the parameters.
  template <typename... A>
  void operator()(A&&... args) {
    using Params = std::tuple<std::decay_t<P>...>;
    Params params(std::forward<A>(args)...);
    config.param_bytes = (size_t{0} + ... + sizeof(std::decay_t<P>));
    run_grid(config, [](void* p) { std::apply(Kernel, *static_cast<Params*>(p)); }, &params);
  }
};

template <auto Kernel>
const char* kernel_name() {
  return __PRETTY_FUNCTION__;  // "... [with auto Kernel = <the instantiation>]"
}

template <auto Kernel>
Launch<Kernel> launch(dim3 grid, dim3 block, size_t dynamic_smem, cudaStream_t) {
  return Launch<Kernel>{{grid, block, dynamic_smem, reinterpret_cast<const void*>(Kernel),
                         kernel_name<Kernel>(), 0}};
}

}  // namespace uk_sim

#define UK_LAUNCH(grid, block, smem, stream, ...) \
  ::uk_sim::launch<__VA_ARGS__>(grid, block, smem, stream)

namespace uk::cuda {
template <typename T>
inline T* dynamic_shared() {
  return reinterpret_cast<T*>(::uk_sim::dynamic_shared_base());
}
}  // namespace uk::cuda

#include "sim_ptx.h"
