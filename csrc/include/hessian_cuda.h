// Launcher of the Hessian-diagonal EMA (CUDA): raw device pointers, no torch headers.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

#include "dtype.h"

namespace uk::cuda {

// In place, over n contiguous elements, all arithmetic in fp32:
//   hess_i <- beta * hess_i + one_minus_beta * a_i * (b ? b_i : a_i)
// hess is stored as `hess_dt`, a and b (nullptr: b = a) as `ab_dt`; the result is rounded
// once to hess_dt. Nothing synchronises.
void hessian_ema(DType hess_dt, void* hess, DType ab_dt, const void* a, const void* b, int64_t n,
                 float beta, float one_minus_beta, cudaStream_t stream);

}  // namespace uk::cuda
