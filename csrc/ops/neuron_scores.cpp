// Tensor-facing entry point of the Optimal-Brain-Damage neuron scores: checks, output
// allocation and device dispatch. Math: neuron_scores_cuda.h and
// unlearn_kernels/ops/neuron_scores.py.
#include <torch/library.h>

#include "neuron_scores_cpu.h"
#include "tensor_checks.h"
#ifdef UNLEARN_KERNELS_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include "neuron_scores_cuda.h"
#endif

namespace uk {

namespace {

void check_hessian(const at::Tensor& h, const at::Tensor& weight, const char* name) {
  check_rows(h, name);
  TORCH_CHECK(h.sizes() == weight.sizes(), name, " must have the shape of weight");
  TORCH_CHECK(h.scalar_type() == at::kFloat || h.scalar_type() == weight.scalar_type(), name,
              " must be float32 or the dtype of weight");
  TORCH_CHECK(h.device() == weight.device(), name, " must be on ", weight.device());
}

}  // namespace

// Returns (s_forget, s_retain); s_retain is empty [0] without hess_retain.
std::tuple<at::Tensor, at::Tensor> neuron_scores(const at::Tensor& weight,
                                                 const at::Tensor& hess_forget,
                                                 const c10::optional<at::Tensor>& hess_retain,
                                                 int64_t dim) {
  check_rows(weight, "weight");
  TORCH_CHECK(dim == 0 || dim == 1, "dim must be 0 or 1, got ", dim);
  check_hessian(hess_forget, weight, "hess_forget");
  if (hess_retain) {
    check_hessian(*hess_retain, weight, "hess_retain");
    TORCH_CHECK(hess_retain->scalar_type() == hess_forget.scalar_type(),
                "hess_retain must have the dtype of hess_forget");
  }
  const int64_t rows = weight.size(0), cols = weight.size(1);
  const auto options = weight.options().dtype(accumulate_type(weight));
  at::Tensor s_forget = at::empty({dim == 0 ? rows : cols}, options);
  at::Tensor s_retain = at::empty({hess_retain ? s_forget.size(0) : 0}, options);
  if (rows == 0 || cols == 0) {  // empty sums (and data pointers that may be null)
    s_forget.zero_();
    s_retain.zero_();
    return {s_forget, s_retain};
  }
  if (weight.is_cpu()) {
    UK_CPU_CALL(neuron_scores)(weight, hess_forget, hess_retain ? *hess_retain : at::Tensor(), dim,
                       s_forget, hess_retain ? s_retain : at::Tensor());
    return {s_forget, s_retain};
  }
#ifdef UNLEARN_KERNELS_WITH_CUDA
  TORCH_CHECK(weight.is_cuda(), "weight must be a CPU or CUDA tensor");
  c10::cuda::CUDAGuard guard(weight.device());
  at::Tensor workspace = at::empty({cuda::neuron_scores_workspace_floats(rows, cols, dim)},
                                   weight.options().dtype(at::kFloat));
  cuda::neuron_scores(to_dtype(weight, "weight"), weight.data_ptr(), weight.stride(0),
                      to_dtype(hess_forget, "hess_forget"), hess_forget.data_ptr(),
                      hess_forget.stride(0), hess_retain ? hess_retain->data_ptr() : nullptr,
                      hess_retain ? hess_retain->stride(0) : 0, rows, cols, static_cast<int>(dim),
                      s_forget.data_ptr<float>(),
                      hess_retain ? s_retain.data_ptr<float>() : nullptr,
                      workspace.numel() ? workspace.data_ptr<float>() : nullptr,
                      c10::cuda::getCurrentCUDAStream());
  return {s_forget, s_retain};
#else
  TORCH_CHECK(false, "unlearn_kernels was built without CUDA; weight is on ", weight.device());
#endif
}

}  // namespace uk

TORCH_LIBRARY_FRAGMENT(unlearn_kernels, m) {
  m.def("neuron_scores(Tensor weight, Tensor hess_forget, Tensor? hess_retain, int dim) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(unlearn_kernels, CPU, m) { m.impl("neuron_scores", &uk::neuron_scores); }

#ifdef UNLEARN_KERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(unlearn_kernels, CUDA, m) { m.impl("neuron_scores", &uk::neuron_scores); }
#endif
