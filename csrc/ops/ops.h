// The tensor-facing ops registered in bindings.cpp (schemas there).
#pragma once

#include <ATen/ATen.h>
#include <tuple>

namespace uk {

std::tuple<at::Tensor, at::Tensor> misdirection_fwd_bwd(
    const at::Tensor& h, const c10::optional<at::Tensor>& control,
    const c10::optional<at::Tensor>& importance, const c10::optional<at::Tensor>& anchor,
    const c10::optional<at::Tensor>& token_mask, double scale, bool need_grad);

at::Tensor masked_edit(const at::Tensor& h, const at::Tensor& importance,
                       const at::Tensor& control, double alpha,
                       const c10::optional<at::Tensor>& token_mask);

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_moments(
    const at::Tensor& x, const c10::optional<at::Tensor>& token_mask);

at::Tensor feature_scores(const at::Tensor& mean_f, const at::Tensor& var_f,
                          const at::Tensor& mean_r, const at::Tensor& var_r, double eps);

}  // namespace uk
