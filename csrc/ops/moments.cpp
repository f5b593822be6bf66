// Tensor-facing entry points of the statistics family: masked_moments and feature_scores.
#include <torch/library.h>

#include "cpu_kernels.h"
#include "tensor_checks.h"
#ifdef UNLEARN_KERNELS_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include "cuda_launchers.h"
#endif

namespace uk {

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_moments(
    const at::Tensor& x, const c10::optional<at::Tensor>& token_mask) {
  check_rows(x, "x");
  const int64_t n = x.size(0), d = x.size(1);
  if (token_mask) check_mask(*token_mask, n, x);
  at::Tensor mean = at::empty({d}, x.options().dtype(at::kFloat));
  at::Tensor m2 = at::empty({d}, x.options().dtype(at::kFloat));
  if (x.is_cpu()) {
    int64_t count = UK_CPU_CALL(masked_moments)(x, token_mask ? *token_mask : at::Tensor(), mean, m2);
    return {at::scalar_tensor(count, x.options().dtype(at::kLong)), mean, m2};
  }
#ifdef UNLEARN_KERNELS_WITH_CUDA
  TORCH_CHECK(x.is_cuda(), "x must be a CPU or CUDA tensor");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor count = at::empty({}, x.options().dtype(at::kLong));
  at::Tensor workspace =
      at::empty({cuda::masked_moments_workspace_floats(n, d)}, x.options().dtype(at::kFloat));
  // The first valid row is the pivot the rows are shifted by (argmax of the mask: no sync).
  at::Tensor pivot_row;
  if (token_mask && n > 0) pivot_row = at::argmax(token_mask->to(at::kByte));
  cuda::masked_moments(to_dtype(x, "x"), x.data_ptr(), x.stride(0), mask_ptr(token_mask),
                       pivot_row.defined() ? pivot_row.data_ptr<int64_t>() : nullptr, n, d,
                       count.data_ptr<int64_t>(), mean.data_ptr<float>(), m2.data_ptr<float>(),
                       workspace.data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
  return {count, mean, m2};
#else
  TORCH_CHECK(false, "unlearn_kernels was built without CUDA; x is on ", x.device());
#endif
}

at::Tensor feature_scores(const at::Tensor& mean_f, const at::Tensor& var_f,
                          const at::Tensor& mean_r, const at::Tensor& var_r, double eps) {
  TORCH_CHECK(mean_f.dim() == 1, "mean_f must be 1-D");
  const int64_t d = mean_f.size(0);
  check_vector(mean_f, d, mean_f, "mean_f");
  check_vector(var_f, d, mean_f, "var_f");
  check_vector(mean_r, d, mean_f, "mean_r");
  check_vector(var_r, d, mean_f, "var_r");
  at::Tensor scores = at::empty({d}, mean_f.options());
  if (mean_f.is_cpu()) {
    UK_CPU_CALL(feature_scores)(mean_f, var_f, mean_r, var_r, eps, scores);
    return scores;
  }
#ifdef UNLEARN_KERNELS_WITH_CUDA
  TORCH_CHECK(mean_f.is_cuda(), "mean_f must be a CPU or CUDA tensor");
  c10::cuda::CUDAGuard guard(mean_f.device());
  cuda::feature_scores(mean_f.data_ptr<float>(), var_f.data_ptr<float>(), mean_r.data_ptr<float>(),
                       var_r.data_ptr<float>(), static_cast<float>(eps), d,
                       scores.data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
  return scores;
#else
  TORCH_CHECK(false, "unlearn_kernels was built without CUDA; mean_f is on ", mean_f.device());
#endif
}

}  // namespace uk

TORCH_LIBRARY_FRAGMENT(unlearn_kernels, m) {
  m.def("masked_moments(Tensor x, Tensor? token_mask) -> (Tensor, Tensor, Tensor)");
  m.def("feature_scores(Tensor mean_f, Tensor var_f, Tensor mean_r, Tensor var_r, float eps) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(unlearn_kernels, CPU, m) {
  m.impl("masked_moments", &uk::masked_moments);
  m.impl("feature_scores", &uk::feature_scores);
}

#ifdef UNLEARN_KERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(unlearn_kernels, CUDA, m) {
  m.impl("masked_moments", &uk::masked_moments);
  m.impl("feature_scores", &uk::feature_scores);
}
#endif
