// Launcher of the disruption mask (CUDA): raw device pointers, no torch headers.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

#include "dtype.h"

namespace uk::cuda {

// Over n contiguous elements of dtype `dt` (fp32 arithmetic, one rounding to dt):
//   out_i = (g_i > 0 and r_i > 0) or (g_i < 0 and r_i < 0) ? scale * g_i : 0
//   *kept = the number of i that agree (written: the launcher zeroes it first)
// out may be grad itself (in place); it must not otherwise overlap grad or retain. Nothing
// synchronises.
void disruption_mask(DType dt, const void* grad, const void* retain, float scale, void* out,
                     int64_t n, int64_t* kept, cudaStream_t stream);

}  // namespace uk::cuda
