// Tensor-facing entry points of the misdirection family: misdirection_fwd_bwd and
// masked_edit. Checks, output allocation and device dispatch.
#include <torch/library.h>

#include "cpu_kernels.h"
#include "tensor_checks.h"
#ifdef UNLEARN_KERNELS_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include "cuda_launchers.h"
#endif

namespace uk {

namespace {
at::Tensor value_or_undefined(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}
}  // namespace

// Schemas, math and conventions: cuda_launchers.h and unlearn_kernels/ops/misdirection.py.
std::tuple<at::Tensor, at::Tensor> misdirection_fwd_bwd(
    const at::Tensor& h, const c10::optional<at::Tensor>& control,
    const c10::optional<at::Tensor>& importance, const c10::optional<at::Tensor>& anchor,
    const c10::optional<at::Tensor>& token_mask, double scale, bool need_grad) {
  check_rows(h, "h");
  const int64_t n = h.size(0), d = h.size(1);
  TORCH_CHECK(control.has_value() || anchor.has_value(), "need control or anchor");
  TORCH_CHECK(!importance.has_value() || control.has_value(), "importance needs control");
  if (control) check_vector(*control, d, h, "control");
  if (importance) check_vector(*importance, d, h, "importance");
  if (anchor) {
    check_rows(*anchor, "anchor");
    TORCH_CHECK(anchor->sizes() == h.sizes(), "anchor must have the shape of h");
    TORCH_CHECK(anchor->scalar_type() == h.scalar_type(), "anchor must have the dtype of h");
    TORCH_CHECK(anchor->device() == h.device(), "anchor must be on ", h.device());
  }
  if (token_mask) check_mask(*token_mask, n, h);

  at::Tensor loss = at::empty({}, h.options().dtype(accumulate_type(h)));
  at::Tensor grad = need_grad ? at::empty({n, d}, h.options()) : at::empty({0}, h.options());
  if (h.is_cpu()) {
    double value = UK_CPU_CALL(misdirection_fwd_bwd)(h, value_or_undefined(control),
                                             value_or_undefined(importance),
                                             value_or_undefined(anchor),
                                             value_or_undefined(token_mask), scale,
                                             need_grad ? grad : at::Tensor());
    loss.fill_(value);
    return {loss, grad};
  }
#ifdef UNLEARN_KERNELS_WITH_CUDA
  TORCH_CHECK(h.is_cuda(), "h must be a CPU or CUDA tensor");
  c10::cuda::CUDAGuard guard(h.device());
  at::Tensor workspace =
      at::empty({cuda::misdirection_workspace_floats(n, d)}, h.options().dtype(at::kFloat));
  cuda::misdirection_fwd_bwd(to_dtype(h, "h"), h.data_ptr(), h.stride(0), float_ptr(control),
                             float_ptr(importance), anchor ? anchor->data_ptr() : nullptr,
                             anchor ? anchor->stride(0) : 0, mask_ptr(token_mask), n, d,
                             static_cast<float>(scale), loss.data_ptr<float>(),
                             need_grad ? grad.data_ptr() : nullptr, workspace.data_ptr<float>(),
                             c10::cuda::getCurrentCUDAStream());
  return {loss, grad};
#else
  TORCH_CHECK(false, "unlearn_kernels was built without CUDA; h is on ", h.device());
#endif
}

at::Tensor masked_edit(const at::Tensor& h, const at::Tensor& importance,
                       const at::Tensor& control, double alpha,
                       const c10::optional<at::Tensor>& token_mask) {
  check_rows(h, "h");
  const int64_t n = h.size(0), d = h.size(1);
  check_vector(importance, d, h, "importance");
  check_vector(control, d, h, "control");
  if (token_mask) check_mask(*token_mask, n, h);
  at::Tensor out = at::empty({n, d}, h.options());
  if (h.is_cpu()) {
    UK_CPU_CALL(masked_edit)(h, importance, control, alpha, value_or_undefined(token_mask), out);
    return out;
  }
#ifdef UNLEARN_KERNELS_WITH_CUDA
  TORCH_CHECK(h.is_cuda(), "h must be a CPU or CUDA tensor");
  c10::cuda::CUDAGuard guard(h.device());
  cuda::masked_edit(to_dtype(h, "h"), h.data_ptr(), h.stride(0), importance.data_ptr<float>(),
                    control.data_ptr<float>(), static_cast<float>(alpha), mask_ptr(token_mask),
                    n, d, out.data_ptr(), c10::cuda::getCurrentCUDAStream());
  return out;
#else
  TORCH_CHECK(false, "unlearn_kernels was built without CUDA; h is on ", h.device());
#endif
}

}  // namespace uk

TORCH_LIBRARY_FRAGMENT(unlearn_kernels, m) {
  m.def("misdirection_fwd_bwd(Tensor h, Tensor? control, Tensor? importance, Tensor? anchor, "
        "Tensor? token_mask, float scale, bool need_grad) -> (Tensor, Tensor)");
  m.def("masked_edit(Tensor h, Tensor importance, Tensor control, float alpha, "
        "Tensor? token_mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(unlearn_kernels, CPU, m) {
  m.impl("misdirection_fwd_bwd", &uk::misdirection_fwd_bwd);
  m.impl("masked_edit", &uk::masked_edit);
}

#ifdef UNLEARN_KERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(unlearn_kernels, CUDA, m) {
  m.impl("misdirection_fwd_bwd", &uk::misdirection_fwd_bwd);
  m.impl("masked_edit", &uk::masked_edit);
}
#endif
