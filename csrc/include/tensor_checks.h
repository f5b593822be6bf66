// Argument checks shared by the tensor-facing ops. The Python layer validates first and
// raises ValueError/TypeError; these are the last line for direct torch.ops callers.
#pragma once

#include <ATen/ATen.h>

#include "dtype.h"

namespace uk {

inline DType to_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kBFloat16: return DType::BF16;
    case at::kHalf: return DType::F16;
    default: TORCH_CHECK(false, name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

// Activations: 2-D, unit column stride, fp32/bf16/fp16 (and fp64 on the CPU, for gradcheck).
inline void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D [n, d], got ", t.dim(), " dims");
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, name, " must have unit stride in its last dim");
  if (!(t.is_cpu() && t.scalar_type() == at::kDouble)) (void)to_dtype(t, name);
}

// fp64 activations get an fp64 loss; all others an fp32 one.
inline at::ScalarType accumulate_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_vector(const at::Tensor& t, int64_t d, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == d, name, " must have shape [", d, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous(), name, " must be contiguous float32");
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device());
}

inline void check_mask(const at::Tensor& m, int64_t n, const at::Tensor& like) {
  TORCH_CHECK(m.dim() == 1 && m.size(0) == n, "token_mask must have shape [", n, "], got ", m.sizes());
  TORCH_CHECK(m.scalar_type() == at::kBool && m.is_contiguous(), "token_mask must be contiguous bool");
  TORCH_CHECK(m.device() == like.device(), "token_mask must be on ", like.device());
}

inline const bool* mask_ptr(const c10::optional<at::Tensor>& m) {
  return m.has_value() ? m->data_ptr<bool>() : nullptr;
}

inline const float* float_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

}  // namespace uk
