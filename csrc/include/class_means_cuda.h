// Launcher of the per-class feature means (CUDA): raw device pointers, no torch headers.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

#include "dtype.h"

namespace uk::cuda {

// x [n, d] stored as `dt` (unit column stride, row stride x_stride), labels int64 [n] in
// [0, classes) (the ops layer checks; a row with another label is left out), n < 2^31. Writes
//   counts[c] = #{i : labels_i = c}                                  (int64 [classes])
//   means[c, j] = sum_{i : labels_i = c} x_ij / counts[c], 0 when counts[c] = 0
// (fp32 [classes, d], contiguous). Deterministic: rows are summed in a fixed order (a stable
// counting sort by label, then per-class segments added in order), no float atomics.
// `workspace`: class_means_workspace_bytes(n, d, classes) bytes of device memory.
int64_t class_means_workspace_bytes(int64_t n, int64_t d, int64_t classes);
void class_means(DType dt, const void* x, int64_t x_stride, const int64_t* labels, int64_t n,
                 int64_t d, int64_t classes, float* means, int64_t* counts, void* workspace,
                 cudaStream_t stream);

}  // namespace uk::cuda
