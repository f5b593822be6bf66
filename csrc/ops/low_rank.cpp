// Tensor-facing entry points of the low-rank family: low_rank_project and masked_gram.
// Checks, output allocation and device dispatch; the math is in unlearn_kernels/ops/low_rank.py.
#include <torch/library.h>

#include "low_rank_cpu.h"
#include "tensor_checks.h"
#ifdef UNLEARN_KERNELS_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include "low_rank_cuda.h"
#endif

namespace uk {

namespace {
constexpr int64_t kMaxRank = 256;
}  // namespace

// (y, coeffs): y = x - scale (x U) U^T in x's dtype; coeffs = x U in the accumulation type
// (fp32, fp64 for fp64 x) when need_coeffs, else an empty tensor.
std::tuple<at::Tensor, at::Tensor> low_rank_project(const at::Tensor& x, const at::Tensor& basis,
                                                    double scale, bool need_coeffs) {
  check_rows(x, "x");
  const int64_t n = x.size(0), d = x.size(1);
  TORCH_CHECK(basis.dim() == 2 && basis.size(0) == d, "basis must have shape [", d, ", r], got ",
              basis.sizes());
  const int64_t r = basis.size(1);
  TORCH_CHECK(r >= 1 && r <= d && r <= kMaxRank, "basis rank must be in [1, min(d, ", kMaxRank,
              ")], got ", r);
  const auto acc = accumulate_type(x);
  TORCH_CHECK(basis.scalar_type() == acc || basis.scalar_type() == x.scalar_type(),
              "basis must be ", acc, " or x's dtype, got ", basis.scalar_type());
  TORCH_CHECK(basis.device() == x.device(), "basis must be on ", x.device());
  at::Tensor y = at::empty({n, d}, x.options());
  const at::Tensor coeffs = need_coeffs ? at::empty({n, r}, x.options().dtype(acc))
                                        : at::empty({0}, x.options().dtype(acc));
  if (x.is_cpu()) {
    UK_CPU_CALL(low_rank_project)(x, basis, scale, y, need_coeffs ? coeffs : at::Tensor());
    return {y, coeffs};
  }
#ifdef UNLEARN_KERNELS_WITH_CUDA
  TORCH_CHECK(x.is_cuda(), "x must be a CPU or CUDA tensor");
  c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const DType dt = to_dtype(x, "x");
  float* coeff_ptr = need_coeffs ? coeffs.data_ptr<float>() : nullptr;
  if (n > 0 && cuda::low_rank_tensor_core_ok(dt, x.data_ptr(), x.stride(0), n, d, r)) {
    // The basis in x's dtype, its row stride padded to a multiple of 8 (zeros).
    at::Tensor u = basis.to(x.scalar_type());
    if (r % 8 != 0) u = at::constant_pad_nd(u, {0, 8 - r % 8});
    u = u.contiguous();
    if (reinterpret_cast<uintptr_t>(u.data_ptr()) % 16 != 0) u = u.clone();  // 16-byte copies
    cuda::low_rank_project_tensor_core(dt, x.data_ptr(), x.stride(0), u.data_ptr(), u.size(1), n,
                                       d, r, static_cast<float>(scale), y.data_ptr(), coeff_ptr,
                                       stream);
  } else if (n > 0) {
    const at::Tensor u = basis.to(at::kFloat).contiguous();
    cuda::low_rank_project_generic(dt, x.data_ptr(), x.stride(0), u.data_ptr<float>(), n, d, r,
                                   static_cast<float>(scale), y.data_ptr(), coeff_ptr, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, coeffs};
#else
  TORCH_CHECK(false, "unlearn_kernels was built without CUDA; x is on ", x.device());
#endif
}

// X^T X over the kept rows, fp32 [d, d] (fp64 for fp64 x on the CPU).
at::Tensor masked_gram(const at::Tensor& x, const c10::optional<at::Tensor>& token_mask) {
  check_rows(x, "x");
  if (token_mask) check_mask(*token_mask, x.size(0), x);
  if (x.is_cpu()) return UK_CPU_CALL(masked_gram)(x, token_mask ? *token_mask : at::Tensor());
#ifdef UNLEARN_KERNELS_WITH_CUDA
  TORCH_CHECK(x.is_cuda(), "x must be a CPU or CUDA tensor");
  c10::cuda::CUDAGuard guard(x.device());
  // Masked rows are zeroed (no host sync to count them); cuBLAS accumulates in fp32 and
  // writes fp32 for the half types too (aten::mm.dtype).
  const at::Tensor rows =
      token_mask ? at::where(token_mask->unsqueeze(1), x, at::zeros({}, x.options())) : x;
  if (x.scalar_type() == at::kFloat) return at::mm(rows.t(), rows);
  return at::mm(rows.t(), rows, at::kFloat);
#else
  TORCH_CHECK(false, "unlearn_kernels was built without CUDA; x is on ", x.device());
#endif
}

}  // namespace uk

TORCH_LIBRARY_FRAGMENT(unlearn_kernels, m) {
  m.def("low_rank_project(Tensor x, Tensor basis, float scale, bool need_coeffs) -> (Tensor, Tensor)");
  m.def("masked_gram(Tensor x, Tensor? token_mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(unlearn_kernels, CPU, m) {
  m.impl("low_rank_project", &uk::low_rank_project);
  m.impl("masked_gram", &uk::masked_gram);
}

#ifdef UNLEARN_KERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(unlearn_kernels, CUDA, m) {
  m.impl("low_rank_project", &uk::low_rank_project);
  m.impl("masked_gram", &uk::masked_gram);
}
#endif
