// The fused masked Sophia-G step: one tensor of the list, the step's scalars and the
// per-element update. Shared by the CPU kernel, the CUDA kernel and the ops layer (no torch
// headers).
//
// Every element x of a tensor that its neuron mask selects is updated, in fp32, as the
// official Sophia-G step (Liuhong99/Sophia, _single_tensor_sophiag):
//   p <- p * decay                                   decay  = 1 - lr * weight_decay
//   m <- beta1 * m + (1 - beta1) * g
//   p <- p - lr * sign(m) * min(|m| / (rho_bs * h + eps), 1)      rho_bs = rho * bs
// and p, m are rounded once to their storage types. Unselected elements are neither read
// nor written where the kernel can skip them, and keep their exact bits where it cannot.
// As in torch.clamp, a NaN ratio stays NaN.
#pragma once

#include <cmath>
#include <cstdint>

#include "dtype.h"

#ifdef __CUDACC__
#define UK_HOST_DEVICE __host__ __device__
#else
#define UK_HOST_DEVICE
#endif

namespace uk {

// How a tensor's elements are selected. The tensor is contiguous and read as rows of
// `inner` elements: kRows selects element i when mask[i / inner], kCols when
// mask[i % inner], kNone always (mask unused).
enum class MaskMode : uint8_t { kNone = 0, kRows = 1, kCols = 2 };

// One tensor of the list: param and grad are `param_dtype`, exp_avg and hessian are
// `state_dtype` (fp32 or param_dtype); all contiguous with `numel` elements.
struct SophiaTensor {
  void* param;
  const void* grad;
  void* exp_avg;
  const void* hessian;
  const bool* mask;
  int64_t numel;
  int64_t inner;
  DType param_dtype;
  DType state_dtype;
  MaskMode mode;
};

// The step's scalars, derived once in double and rounded to fp32.
struct SophiaHyper {
  float decay;            // 1 - lr * weight_decay
  float beta1;
  float one_minus_beta1;  // 1 - beta1
  float rho_bs;           // rho * bs
  float eps;
  float lr;
};

inline SophiaHyper make_sophia_hyper(double lr, double beta1, double rho, double weight_decay,
                                     double eps, double bs) {
  return {static_cast<float>(1.0 - lr * weight_decay), static_cast<float>(beta1),
          static_cast<float>(1.0 - beta1), static_cast<float>(rho * bs),
          static_cast<float>(eps), static_cast<float>(lr)};
}

// The update of one selected element, in place on its fp32 values.
UK_HOST_DEVICE inline void sophia_element(float& p, float g, float& m, float h,
                                          const SophiaHyper& hp) {
  p *= hp.decay;
  m = hp.beta1 * m + hp.one_minus_beta1 * g;
  float ratio = std::fabs(m) / (hp.rho_bs * h + hp.eps);
  ratio = ratio > 1.f ? 1.f : ratio;
  const float sign = static_cast<float>(m > 0.f) - static_cast<float>(m < 0.f);
  p -= hp.lr * sign * ratio;
}

}  // namespace uk
