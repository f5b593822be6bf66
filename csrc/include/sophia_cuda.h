// Launcher of the fused multi-tensor masked Sophia-G step (math in sophia.h); raw device
// pointers, no torch headers.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

#include "sophia.h"

namespace uk::cuda {

// Updates the `count` tensors in place with as few launches as the kernel-parameter table
// allows (one for any list of up to a few hundred tensors; see sophia.cu), on `stream`.
// Tensors may have different dtypes. Empty tensors are skipped; nothing synchronises.
void masked_sophia_step(const SophiaTensor* tensors, int64_t count, const SophiaHyper& hyper,
                        cudaStream_t stream);

}  // namespace uk::cuda
