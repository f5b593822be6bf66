// The two CUDA language extensions the kernels reach through names of our own, so that the
// CPU execution harness of the tests (tests/cuda_sim) can give them meaning with a plain C++
// compiler: the kernel launch and dynamic shared memory.
//
//   UK_LAUNCH(grid, block, smem, stream, kernel)(args...)
//       is kernel<<<grid, block, smem, stream>>>(args...). The kernel comes last because a
//       template-id such as k<T, V> carries commas the preprocessor would split on.
//   dynamic_shared<T>()
//       is the block's `extern __shared__` array (the launch's dynamic shared memory), 16-byte
//       aligned, as T*.
//
// With nvcc these are exactly the CUDA constructs; under the harness (UK_CUDA_ON_CPU, set by
// tests/cuda_sim/cuda_on_cpu.h) that header defines both itself.
#pragma once

#ifndef UK_CUDA_ON_CPU

#define UK_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>

namespace uk::cuda {

template <typename T>
__device__ __forceinline__ T* dynamic_shared() {
  extern __shared__ __align__(16) unsigned char uk_dynamic_shared[];
  return reinterpret_cast<T*>(uk_dynamic_shared);
}

}  // namespace uk::cuda

#endif  // UK_CUDA_ON_CPU
