// CPU kernel of the fused multi-tensor masked Sophia-G step (math in sophia.h).
#pragma once

#include "cpu_isa.h"

#include <cstdint>

#include "sophia.h"

UK_CPU_KERNELS(
// Updates the `count` tensors in place: one at::parallel_for over fixed-size chunks of all
// the tensors together. Tensors may have different dtypes.
void masked_sophia_step(const SophiaTensor* tensors, int64_t count, const SophiaHyper& hyper);
)  // UK_CPU_KERNELS

