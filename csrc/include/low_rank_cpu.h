// CPU kernels of the low-rank family. Inputs arrive validated by the ops layer: x is 2-D
// [n, d] with unit column stride (fp32, bf16, fp16 or fp64), basis is [d, r] in fp32 (fp64
// for fp64 x) or x's dtype, token masks are contiguous bool [n] (or undefined).
#pragma once

#include "cpu_isa.h"

#include <ATen/ATen.h>

UK_CPU_KERNELS(
// y = x - scale (x U) U^T into y (contiguous [n, d], x's dtype); when coeffs is defined it
// receives x U (contiguous [n, r], fp32 or fp64 for fp64 x).
void low_rank_project(const at::Tensor& x, const at::Tensor& basis, double scale,
                      const at::Tensor& y, const at::Tensor& coeffs);

// X^T X over the rows the mask keeps, as a new [d, d] fp32 (fp64 for fp64 x) tensor.
at::Tensor masked_gram(const at::Tensor& x, const at::Tensor& mask);
)  // UK_CPU_KERNELS

