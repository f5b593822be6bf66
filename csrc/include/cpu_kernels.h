// CPU kernels (at::parallel_for, fp32 accumulation; the same bits on every instruction set and
// thread count, see cpu_vec.h). Inputs arrive validated by the ops
// layer: 2-D [n, d] activations with unit column stride, contiguous fp32 [d] vectors and
// a contiguous bool [n] mask (or undefined). Semantics as in cuda_launchers.h.
#pragma once

#include "cpu_isa.h"

#include <ATen/ATen.h>

UK_CPU_KERNELS(
// CPU also takes fp64 activations (for gradcheck), computing in fp64 then.
// Returns the loss; writes grad (contiguous [n, d], h's dtype) when it is defined.
double misdirection_fwd_bwd(const at::Tensor& h, const at::Tensor& control,
                            const at::Tensor& importance, const at::Tensor& anchor,
                            const at::Tensor& mask, double scale, const at::Tensor& grad);

// Writes mean and m2 (fp32 [d]); returns the number of valid rows.
int64_t masked_moments(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& mean,
                       const at::Tensor& m2);

void feature_scores(const at::Tensor& mean_f, const at::Tensor& var_f,
                    const at::Tensor& mean_r, const at::Tensor& var_r, double eps,
                    const at::Tensor& scores);

void masked_edit(const at::Tensor& h, const at::Tensor& importance, const at::Tensor& control,
                 double alpha, const at::Tensor& mask, const at::Tensor& out);
)  // UK_CPU_KERNELS

