// Tensor-facing entry point of the Hessian-diagonal EMA: checks and device dispatch.
// Math and conventions: hessian_cuda.h and unlearn_kernels/ops/hessian.py.
#include <torch/library.h>

#include "hessian_cpu.h"
#include "tensor_checks.h"
#ifdef UNLEARN_KERNELS_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include "hessian_cuda.h"
#endif

namespace uk {

namespace {

void check_operand(const at::Tensor& t, const at::Tensor& hess, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.numel() == hess.numel(), name, " must have ", hess.numel(), " elements, got ",
              t.numel());
  TORCH_CHECK(t.device() == hess.device(), name, " must be on ", hess.device());
}

}  // namespace

void hessian_ema_(at::Tensor& hess, const at::Tensor& a, const c10::optional<at::Tensor>& b,
                  double beta) {
  TORCH_CHECK(hess.is_contiguous(), "hess must be contiguous");
  check_operand(a, hess, "a");
  TORCH_CHECK(hess.scalar_type() == at::kFloat || hess.scalar_type() == a.scalar_type(),
              "hess must be float32 or the dtype of a (", a.scalar_type(), "), got ",
              hess.scalar_type());
  if (b) {
    check_operand(*b, hess, "b");
    TORCH_CHECK(b->scalar_type() == a.scalar_type(), "b must have the dtype of a");
  }
  TORCH_CHECK(beta >= 0.0 && beta <= 1.0, "beta must lie in [0, 1], got ", beta);
  if (hess.is_cpu()) {
    TORCH_CHECK(a.is_cpu(), "a must be a CPU tensor");
    UK_CPU_CALL(hessian_ema)(hess, a, b ? *b : at::Tensor(), beta);
    return;
  }
#ifdef UNLEARN_KERNELS_WITH_CUDA
  TORCH_CHECK(hess.is_cuda(), "hess must be a CPU or CUDA tensor");
  c10::cuda::CUDAGuard guard(hess.device());
  cuda::hessian_ema(to_dtype(hess, "hess"), hess.data_ptr(), to_dtype(a, "a"), a.data_ptr(),
                    b ? b->data_ptr() : nullptr, hess.numel(), static_cast<float>(beta),
                    static_cast<float>(1.0 - beta), c10::cuda::getCurrentCUDAStream());
#else
  TORCH_CHECK(false, "unlearn_kernels was built without CUDA; hess is on ", hess.device());
#endif
}

}  // namespace uk

TORCH_LIBRARY_FRAGMENT(unlearn_kernels, m) {
  m.def("hessian_ema_(Tensor(a!) hess, Tensor a, Tensor? b, float beta) -> ()");
}

TORCH_LIBRARY_IMPL(unlearn_kernels, CPU, m) { m.impl("hessian_ema_", &uk::hessian_ema_); }

#ifdef UNLEARN_KERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(unlearn_kernels, CUDA, m) { m.impl("hessian_ema_", &uk::hessian_ema_); }
#endif
