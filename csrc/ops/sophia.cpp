// Tensor-facing entry point of the fused masked Sophia-G step: checks, the per-tensor
// descriptors (sophia.h) and device dispatch. Math and conventions:
// unlearn_kernels/ops/sophia.py.
#include <torch/library.h>

#include <vector>

#include "sophia_cpu.h"
#include "tensor_checks.h"
#ifdef UNLEARN_KERNELS_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include "sophia_cuda.h"
#endif

namespace uk {

namespace {

void check_like(const at::Tensor& t, const at::Tensor& param, const char* name, int64_t i) {
  TORCH_CHECK(t.sizes() == param.sizes(), name, "[", i, "] must have the shape of params[", i,
              "] ", param.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.device() == param.device(), name, "[", i, "] must be on ", param.device());
  TORCH_CHECK(t.is_contiguous(), name, "[", i, "] must be contiguous");
}

// mask_dim 0: a mask over the first dim (rows of numel / size(0) elements); -1: over the
// last dim (columns). A row mask of one-element rows is the same as a column mask over
// the whole flat tensor, which the kernels walk faster.
void set_mask(SophiaTensor& d, const at::Tensor& param, const at::Tensor& mask, int64_t dim,
              int64_t i) {
  TORCH_CHECK(param.dim() >= 1, "masks[", i, "] needs a param with at least one dim");
  TORCH_CHECK(dim == 0 || dim == -1, "mask_dims[", i, "] must be 0 or -1, got ", dim);
  const int64_t n = dim == 0 ? param.size(0) : param.size(-1);
  TORCH_CHECK(mask.dim() == 1 && mask.size(0) == n, "masks[", i, "] must have shape [", n,
              "], got ", mask.sizes());
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous(),
              "masks[", i, "] must be a contiguous bool tensor");
  TORCH_CHECK(mask.device() == param.device(), "masks[", i, "] must be on ", param.device());
  d.mask = mask.data_ptr<bool>();
  d.mode = dim == 0 ? MaskMode::kRows : MaskMode::kCols;
  d.inner = dim == 0 ? param.numel() / n : n;
  if (d.mode == MaskMode::kRows && d.inner == 1) {
    d.mode = MaskMode::kCols;
    d.inner = param.numel();
  }
}

std::vector<SophiaTensor> describe(at::TensorList params, at::TensorList grads,
                                   at::TensorList exp_avgs, at::TensorList hessians,
                                   const c10::List<std::optional<at::Tensor>>& masks,
                                   at::IntArrayRef mask_dims) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && hessians.size() == n &&
                  masks.size() == n && mask_dims.size() == n,
              "params, grads, exp_avgs, hessians, masks and mask_dims must have the same length");
  std::vector<SophiaTensor> out;
  out.reserve(n);
  for (size_t k = 0; k < n; ++k) {
    const auto i = static_cast<int64_t>(k);
    const at::Tensor& p = params[k];
    TORCH_CHECK(p.device() == params[0].device(), "params[", i, "] must be on ", params[0].device());
    TORCH_CHECK(p.is_contiguous(), "params[", i, "] must be contiguous");
    check_like(grads[k], p, "grads", i);
    check_like(exp_avgs[k], p, "exp_avgs", i);
    check_like(hessians[k], p, "hessians", i);
    TORCH_CHECK(grads[k].scalar_type() == p.scalar_type(), "grads[", i, "] must have the dtype of params[", i, "]");
    const at::ScalarType state = exp_avgs[k].scalar_type();
    TORCH_CHECK(state == at::kFloat || state == p.scalar_type(),
                "exp_avgs[", i, "] must be float32 or the dtype of params[", i, "]");
    TORCH_CHECK(hessians[k].scalar_type() == state, "hessians[", i, "] must have the dtype of exp_avgs[", i, "]");
    if (p.numel() == 0) continue;
    SophiaTensor d{p.data_ptr(), grads[k].data_ptr(), exp_avgs[k].data_ptr(),
                   hessians[k].data_ptr(), nullptr, p.numel(), 1,
                   to_dtype(p, "params"), to_dtype(exp_avgs[k], "exp_avgs"), MaskMode::kNone};
    const std::optional<at::Tensor> mask = masks[k];
    if (mask.has_value()) set_mask(d, p, *mask, mask_dims[k], i);
    out.push_back(d);
  }
  return out;
}

}  // namespace

void masked_sophia_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList hessians,
                         const c10::List<std::optional<at::Tensor>>& masks,
                         at::IntArrayRef mask_dims, double lr, double beta1, double rho,
                         double weight_decay, double eps, double bs) {
  const std::vector<SophiaTensor> tensors =
      describe(params, grads, exp_avgs, hessians, masks, mask_dims);
  if (tensors.empty()) return;
  const SophiaHyper hyper = make_sophia_hyper(lr, beta1, rho, weight_decay, eps, bs);
  const auto count = static_cast<int64_t>(tensors.size());
  if (params[0].is_cpu()) {
    UK_CPU_CALL(masked_sophia_step)(tensors.data(), count, hyper);
    return;
  }
#ifdef UNLEARN_KERNELS_WITH_CUDA
  TORCH_CHECK(params[0].is_cuda(), "params must be CPU or CUDA tensors");
  c10::cuda::CUDAGuard guard(params[0].device());
  cuda::masked_sophia_step(tensors.data(), count, hyper, c10::cuda::getCurrentCUDAStream());
#else
  TORCH_CHECK(false, "unlearn_kernels was built without CUDA; params are on ", params[0].device());
#endif
}

}  // namespace uk

TORCH_LIBRARY_FRAGMENT(unlearn_kernels, m) {
  m.def("masked_sophia_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
        "Tensor[] hessians, Tensor?[] masks, int[] mask_dims, float lr, float beta1, float rho, "
        "float weight_decay, float eps, float bs) -> ()");
}

TORCH_LIBRARY_IMPL(unlearn_kernels, CPU, m) {
  m.impl("masked_sophia_step_", &uk::masked_sophia_step_);
}

#ifdef UNLEARN_KERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(unlearn_kernels, CUDA, m) {
  m.impl("masked_sophia_step_", &uk::masked_sophia_step_);
}
#endif
