// Tensor-facing entry points of the disruption mask (MUDMAN): checks, output allocation and
// device dispatch. Math and conventions: disruption_mask_cuda.h and
// unlearn_kernels/ops/disruption_mask.py.
//   disruption_mask(grad, retain_grad, scale) -> (out, kept)     out: a new contiguous tensor
//   disruption_mask_(grad!, retain_grad, scale) -> kept           out is grad itself
#include <torch/library.h>

#include <cmath>

#include "disruption_mask_cpu.h"
#include "tensor_checks.h"
#ifdef UNLEARN_KERNELS_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include "disruption_mask_cuda.h"
#endif

namespace uk {

namespace {

void check_pair(const at::Tensor& grad, const at::Tensor& retain) {
  TORCH_CHECK(grad.is_contiguous(), "grad must be contiguous");
  TORCH_CHECK(retain.is_contiguous(), "retain_grad must be contiguous");
  TORCH_CHECK(retain.sizes() == grad.sizes(), "retain_grad must have the shape of grad ",
              grad.sizes(), ", got ", retain.sizes());
  TORCH_CHECK(retain.scalar_type() == grad.scalar_type(),
              "retain_grad must have the dtype of grad (", grad.scalar_type(), "), got ",
              retain.scalar_type());
  TORCH_CHECK(retain.device() == grad.device(), "retain_grad must be on ", grad.device());
}

// Runs the kernel of grad's device with `out` as the output (out may be grad); returns kept.
at::Tensor run(const at::Tensor& grad, const at::Tensor& retain, double scale,
               const at::Tensor& out) {
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  if (grad.is_cpu()) {
    TORCH_CHECK(grad.scalar_type() == at::kDouble || grad.scalar_type() == at::kFloat ||
                    grad.scalar_type() == at::kBFloat16 || grad.scalar_type() == at::kHalf,
                "grad must be float32, bfloat16, float16 or float64, got ", grad.scalar_type());
    const int64_t kept = UK_CPU_CALL(disruption_mask)(grad, retain, scale, out);
    return at::scalar_tensor(kept, grad.options().dtype(at::kLong));
  }
#ifdef UNLEARN_KERNELS_WITH_CUDA
  TORCH_CHECK(grad.is_cuda(), "grad must be a CPU or CUDA tensor");
  c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor kept = at::empty({}, grad.options().dtype(at::kLong));
  cuda::disruption_mask(to_dtype(grad, "grad"), grad.data_ptr(), retain.data_ptr(),
                        static_cast<float>(scale), out.data_ptr(), grad.numel(),
                        kept.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream());
  return kept;
#else
  TORCH_CHECK(false, "unlearn_kernels was built without CUDA; grad is on ", grad.device());
#endif
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> disruption_mask(const at::Tensor& grad,
                                                   const at::Tensor& retain_grad, double scale) {
  check_pair(grad, retain_grad);
  at::Tensor out = at::empty_like(grad, at::MemoryFormat::Contiguous);
  at::Tensor kept = run(grad, retain_grad, scale, out);
  return {out, kept};
}

at::Tensor disruption_mask_(at::Tensor& grad, const at::Tensor& retain_grad, double scale) {
  check_pair(grad, retain_grad);
  return run(grad, retain_grad, scale, grad);
}

}  // namespace uk

TORCH_LIBRARY_FRAGMENT(unlearn_kernels, m) {
  m.def("disruption_mask(Tensor grad, Tensor retain_grad, float scale) -> (Tensor, Tensor)");
  m.def("disruption_mask_(Tensor(a!) grad, Tensor retain_grad, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(unlearn_kernels, CPU, m) {
  m.impl("disruption_mask", &uk::disruption_mask);
  m.impl("disruption_mask_", &uk::disruption_mask_);
}

#ifdef UNLEARN_KERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(unlearn_kernels, CUDA, m) {
  m.impl("disruption_mask", &uk::disruption_mask);
  m.impl("disruption_mask_", &uk::disruption_mask_);
}
#endif
