// Launchers of the CUDA kernels: raw device pointers, no torch headers.
//
// Conventions for every launcher:
//  - activations are row-major [n, d] with unit column stride and a row stride in
//    elements (`*_stride`), stored as `dt` (fp32, bf16 or fp16); all arithmetic in fp32;
//  - per-feature vectors (control, importance, means) are contiguous fp32 [d];
//  - `mask` is nullptr (every row valid) or a contiguous bool [n] (1 byte per row);
//  - outputs are contiguous; `workspace` is device memory of the size the matching
//    `*_workspace_floats` returns, contents undefined on entry;
//  - every launch goes on `stream` and nothing synchronises.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

#include "dtype.h"

namespace uk::cuda {

// Fused misdirection loss and its gradient.
//   w_j = importance[j]  if importance != nullptr
//       = 1              if importance == nullptr and control != nullptr
//       = 0              if control == nullptr
//   e_ij = w_j (h_ij - control_j)^2 + [anchor != nullptr] (1 - w_j) (h_ij - anchor_ij)^2
//   *loss = scale * sum over valid rows i, all j of e_ij            (fp32 scalar)
//   grad_ij = 2 scale [ w_j (h_ij - control_j) + [anchor] (1 - w_j)(h_ij - anchor_ij) ]
//   for valid rows, 0 for masked rows; grad (contiguous [n, d], type dt) may be nullptr.
// The summation order is fixed (per-block partials, then one ordered reduction), so the
// loss is bitwise reproducible run to run.
int64_t misdirection_workspace_floats(int64_t n, int64_t d);
void misdirection_fwd_bwd(DType dt, const void* h, int64_t h_stride, const float* control,
                          const float* importance, const void* anchor, int64_t anchor_stride,
                          const bool* mask, int64_t n, int64_t d, float scale, float* loss,
                          void* grad, float* workspace, cudaStream_t stream);

// Per-feature count, mean and M2 = sum (x - mean)^2 over valid rows (Chan's parallel
// combination of per-block Welford partials). With no valid row: count 0, mean 0, m2 0.
// `pivot_row` (device int64 scalar, nullptr: row 0) is a valid row when there is one; the rows
// are summarised shifted by it (and scaled by 1/8), so a mean/sigma of 1e6 keeps the variance
// and rows near 3e38 a finite mean; an M2 beyond fp32's range is +inf, never NaN.
int64_t masked_moments_workspace_floats(int64_t n, int64_t d);
void masked_moments(DType dt, const void* x, int64_t x_stride, const bool* mask,
                    const int64_t* pivot_row, int64_t n, int64_t d, int64_t* count, float* mean,
                    float* m2, float* workspace, cudaStream_t stream);

// scores_j = (mean_f_j - mean_r_j)^2 / (var_f_j + var_r_j + eps), all fp32 [d].
void feature_scores(const float* mean_f, const float* var_f, const float* mean_r,
                    const float* var_r, float eps, int64_t d, float* scores,
                    cudaStream_t stream);

// out_ij = h_ij + alpha * importance_j * (control_j - h_ij) on valid rows, h_ij on masked
// rows; out is contiguous [n, d] of type dt.
void masked_edit(DType dt, const void* h, int64_t h_stride, const float* importance,
                 const float* control, float alpha, const bool* mask, int64_t n, int64_t d,
                 void* out, cudaStream_t stream);

}  // namespace uk::cuda
