// C entry points (for ctypes) onto the real launchers of csrc/cuda, compiled with the CPU
// execution harness. Each takes the launcher's arguments as they are; tests/cuda_sim/ops.py
// prepares them as csrc/ops/*.cpp does. The stream is the null stream.
#include <vector>

#include "class_means_cuda.h"
#include "cuda_launchers.h"
#include "disruption_mask_cuda.h"
#include "hessian_cuda.h"
#include "low_rank_cuda.h"
#include "neuron_scores_cuda.h"
#include "sophia_cuda.h"

using uk::DType;
namespace kc = uk::cuda;

extern "C" {

int64_t uks_misdirection_workspace_floats(int64_t n, int64_t d) {
  return kc::misdirection_workspace_floats(n, d);
}

void uks_misdirection_fwd_bwd(int dt, const void* h, int64_t h_stride, const float* control,
                              const float* importance, const void* anchor, int64_t anchor_stride,
                              const bool* mask, int64_t n, int64_t d, float scale, float* loss,
                              void* grad, float* workspace) {
  kc::misdirection_fwd_bwd(static_cast<DType>(dt), h, h_stride, control, importance, anchor,
                           anchor_stride, mask, n, d, scale, loss, grad, workspace, nullptr);
}

void uks_masked_edit(int dt, const void* h, int64_t h_stride, const float* importance,
                     const float* control, float alpha, const bool* mask, int64_t n, int64_t d,
                     void* out) {
  kc::masked_edit(static_cast<DType>(dt), h, h_stride, importance, control, alpha, mask, n, d,
                  out, nullptr);
}

int64_t uks_masked_moments_workspace_floats(int64_t n, int64_t d) {
  return kc::masked_moments_workspace_floats(n, d);
}

void uks_masked_moments(int dt, const void* x, int64_t x_stride, const bool* mask,
                        const int64_t* pivot_row, int64_t n, int64_t d, int64_t* count,
                        float* mean, float* m2, float* workspace) {
  kc::masked_moments(static_cast<DType>(dt), x, x_stride, mask, pivot_row, n, d, count, mean, m2,
                     workspace, nullptr);
}

void uks_feature_scores(const float* mean_f, const float* var_f, const float* mean_r,
                        const float* var_r, float eps, int64_t d, float* scores) {
  kc::feature_scores(mean_f, var_f, mean_r, var_r, eps, d, scores, nullptr);
}

int uks_low_rank_tensor_core_ok(int dt, const void* x, int64_t x_stride, int64_t n, int64_t d,
                                int64_t r) {
  return kc::low_rank_tensor_core_ok(static_cast<DType>(dt), x, x_stride, n, d, r) ? 1 : 0;
}

void uks_low_rank_project_tensor_core(int dt, const void* x, int64_t x_stride, const void* basis,
                                      int64_t ldu, int64_t n, int64_t d, int64_t r, float scale,
                                      void* y, float* coeffs) {
  kc::low_rank_project_tensor_core(static_cast<DType>(dt), x, x_stride, basis, ldu, n, d, r,
                                   scale, y, coeffs, nullptr);
}

void uks_low_rank_project_generic(int dt, const void* x, int64_t x_stride, const float* basis,
                                  int64_t n, int64_t d, int64_t r, float scale, void* y,
                                  float* coeffs) {
  kc::low_rank_project_generic(static_cast<DType>(dt), x, x_stride, basis, n, d, r, scale, y,
                               coeffs, nullptr);
}

void uks_hessian_ema(int hess_dt, void* hess, int ab_dt, const void* a, const void* b, int64_t n,
                     float beta, float one_minus_beta) {
  kc::hessian_ema(static_cast<DType>(hess_dt), hess, static_cast<DType>(ab_dt), a, b, n, beta,
                  one_minus_beta, nullptr);
}

void uks_disruption_mask(int dt, const void* grad, const void* retain, float scale, void* out,
                         int64_t n, int64_t* kept) {
  kc::disruption_mask(static_cast<DType>(dt), grad, retain, scale, out, n, kept, nullptr);
}

int64_t uks_neuron_scores_workspace_floats(int64_t rows, int64_t cols, int dim) {
  return kc::neuron_scores_workspace_floats(rows, cols, dim);
}

void uks_neuron_scores(int w_dt, const void* w, int64_t w_stride, int h_dt, const void* hf,
                       int64_t hf_stride, const void* hr, int64_t hr_stride, int64_t rows,
                       int64_t cols, int dim, float* s_forget, float* s_retain,
                       float* workspace) {
  kc::neuron_scores(static_cast<DType>(w_dt), w, w_stride, static_cast<DType>(h_dt), hf,
                    hf_stride, hr, hr_stride, rows, cols, dim, s_forget, s_retain, workspace,
                    nullptr);
}

int64_t uks_class_means_workspace_bytes(int64_t n, int64_t d, int64_t classes) {
  return kc::class_means_workspace_bytes(n, d, classes);
}

void uks_class_means(int dt, const void* x, int64_t x_stride, const int64_t* labels, int64_t n,
                     int64_t d, int64_t classes, float* means, int64_t* counts,
                     void* workspace) {
  kc::class_means(static_cast<DType>(dt), x, x_stride, labels, n, d, classes, means, counts,
                  workspace, nullptr);
}

// The tensor list as parallel arrays (one entry per tensor), the scalars as make_sophia_hyper
// takes them.
void uks_masked_sophia_step(int64_t count, void* const* params, const void* const* grads,
                            void* const* exp_avgs, const void* const* hessians,
                            const void* const* masks, const int64_t* numel, const int64_t* inner,
                            const int* param_dtype, const int* state_dtype, const int* mode,
                            double lr, double beta1, double rho, double weight_decay, double eps,
                            double bs) {
  std::vector<uk::SophiaTensor> tensors(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i)
    tensors[i] = {params[i], grads[i], exp_avgs[i], hessians[i],
                  static_cast<const bool*>(masks[i]), numel[i], inner[i],
                  static_cast<DType>(param_dtype[i]), static_cast<DType>(state_dtype[i]),
                  static_cast<uk::MaskMode>(mode[i])};
  kc::masked_sophia_step(tensors.data(), count,
                         uk::make_sophia_hyper(lr, beta1, rho, weight_decay, eps, bs), nullptr);
}

}  // extern "C"
