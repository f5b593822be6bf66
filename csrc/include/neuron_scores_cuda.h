// Launcher of the Optimal-Brain-Damage neuron scores (CUDA): raw device pointers, no torch
// headers.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

#include "dtype.h"

namespace uk::cuda {

// A weight w [rows, cols] stored as `w_dt` and Hessian diagonals hf, hr of its shape stored
// as `h_dt`, each with unit column stride and its own row stride (elements). fp32 math:
//   dim 0 (neurons are rows):    s_i = 1/2 sum_j h_ij w_ij^2,  i < rows
//   dim 1 (neurons are columns): s_j = 1/2 sum_i h_ij w_ij^2,  j < cols
// for h = hf into s_forget and, when hr != nullptr, h = hr into s_retain (contiguous fp32).
// rows, cols >= 1 (the ops layer zero-fills the scores of an empty weight).
// `workspace`: neuron_scores_workspace_floats(rows, cols, dim) floats (may be nullptr when
// that is 0). Summation order is fixed: the scores are bitwise reproducible.
int64_t neuron_scores_workspace_floats(int64_t rows, int64_t cols, int dim);
void neuron_scores(DType w_dt, const void* w, int64_t w_stride, DType h_dt, const void* hf,
                   int64_t hf_stride, const void* hr, int64_t hr_stride, int64_t rows,
                   int64_t cols, int dim, float* s_forget, float* s_retain, float* workspace,
                   cudaStream_t stream);

}  // namespace uk::cuda
