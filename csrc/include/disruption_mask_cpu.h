// CPU kernel of the disruption mask (semantics in disruption_mask_cuda.h and
// unlearn_kernels/ops/disruption_mask.py). Inputs arrive validated by the ops layer:
// contiguous grad, retain and out of one numel and one dtype (fp32 / bf16 / fp16 / fp64);
// out may be grad itself (the in-place op).
#pragma once

#include "cpu_isa.h"

#include <ATen/ATen.h>

UK_CPU_KERNELS(
// out_i = scale * grad_i where grad_i and retain_i are nonzero with the same sign, else 0;
// returns the number of such i. fp64 computes in fp64, the others in fp32 (one rounding).
int64_t disruption_mask(const at::Tensor& grad, const at::Tensor& retain, double scale,
                        const at::Tensor& out);
)  // UK_CPU_KERNELS
