// CPU kernel of the Hessian-diagonal EMA (semantics in hessian_cuda.h). Inputs arrive
// validated by the ops layer: contiguous tensors of one numel; hess fp32 or a's dtype; b
// undefined or a's dtype. fp64 tensors compute in fp64, all others in fp32.
#pragma once

#include "cpu_isa.h"

#include <ATen/ATen.h>

UK_CPU_KERNELS(
void hessian_ema(const at::Tensor& hess, const at::Tensor& a, const at::Tensor& b, double beta);
)  // UK_CPU_KERNELS

