// CPU kernel of the Optimal-Brain-Damage neuron scores (semantics in neuron_scores_cuda.h).
// Inputs arrive validated by the ops layer: 2-D weight and Hessians of one shape with unit
// column stride, rows and cols >= 1; Hessians fp32 or the weight's dtype (both the same);
// hess_retain and s_retain undefined together. fp64 weights compute in fp64 into fp64 scores.
#pragma once

#include "cpu_isa.h"

#include <ATen/ATen.h>

UK_CPU_KERNELS(
void neuron_scores(const at::Tensor& weight, const at::Tensor& hess_forget,
                   const at::Tensor& hess_retain, int64_t dim, const at::Tensor& s_forget,
                   const at::Tensor& s_retain);
)  // UK_CPU_KERNELS

