// Element types the kernels understand. Shared by the CUDA launchers (which see no torch
// headers) and the tensor-facing ops that translate at::ScalarType into it.
#pragma once

namespace uk {

enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

}  // namespace uk
