// Launchers of the low-rank projection kernels: raw device pointers, no torch headers.
// Conventions as in cuda_launchers.h (row-major x with unit column stride and a row stride
// in elements, fp32 arithmetic, contiguous outputs, everything on `stream`).
//
//   y      = x - scale (x U) U^T          (contiguous [n, d], type dt)
//   coeffs = x U                          (contiguous [n, r], fp32; nullptr: not written)
//
// U = basis [d, r], r <= kLowRankMaxRank. Two kernels compute this:
//  - the tensor-core kernel (bf16/fp16): basis in x's type, row-major with a row stride
//    `ldu` >= r that is a multiple of 8, columns r..ldu-1 zero; usable when
//    low_rank_tensor_core_ok() says so (alignment, architecture, shared memory);
//  - the generic kernel (any dt, any alignment): basis fp32, contiguous [d, r].
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

#include "dtype.h"

namespace uk::cuda {

constexpr int64_t kLowRankMaxRank = 256;

bool low_rank_tensor_core_ok(DType dt, const void* x, int64_t x_stride, int64_t n, int64_t d,
                             int64_t r);

void low_rank_project_tensor_core(DType dt, const void* x, int64_t x_stride, const void* basis,
                                  int64_t ldu, int64_t n, int64_t d, int64_t r, float scale,
                                  void* y, float* coeffs, cudaStream_t stream);

void low_rank_project_generic(DType dt, const void* x, int64_t x_stride, const float* basis,
                              int64_t n, int64_t d, int64_t r, float scale, void* y,
                              float* coeffs, cudaStream_t stream);

}  // namespace uk::cuda
