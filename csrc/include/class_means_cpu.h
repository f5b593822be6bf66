// CPU kernel of the per-class feature means (semantics in class_means_cuda.h). Inputs arrive
// validated by the ops layer: x [n, d] with unit column stride, contiguous int64 labels [n]
// (their range [0, classes) is checked again here). fp64 features give fp64 means, all
// others fp32.
#pragma once

#include "cpu_isa.h"

#include <ATen/ATen.h>

UK_CPU_KERNELS(
void class_means(const at::Tensor& x, const at::Tensor& labels, int64_t classes,
                 const at::Tensor& means, const at::Tensor& counts);
)  // UK_CPU_KERNELS

