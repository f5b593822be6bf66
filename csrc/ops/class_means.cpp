// Tensor-facing entry point of the per-class feature means: checks, output allocation and
// device dispatch. Math: class_means_cuda.h and unlearn_kernels/ops/class_means.py.
#include <torch/library.h>

#include "class_means_cpu.h"
#include "tensor_checks.h"
#ifdef UNLEARN_KERNELS_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include "class_means_cuda.h"
#endif

namespace uk {

// Returns (means [num_classes, d], counts int64 [num_classes]). Labels must lie in
// [0, num_classes): the Python layer checks them (a host sync) before calling.
std::tuple<at::Tensor, at::Tensor> class_means(const at::Tensor& features,
                                               const at::Tensor& labels, int64_t num_classes) {
  check_rows(features, "features");
  const int64_t n = features.size(0), d = features.size(1);
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == n, "labels must have shape [", n, "]");
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.is_contiguous(),
              "labels must be contiguous int64");
  TORCH_CHECK(labels.device() == features.device(), "labels must be on ", features.device());
  TORCH_CHECK(num_classes >= 1, "num_classes must be >= 1, got ", num_classes);
  at::Tensor means =
      at::empty({num_classes, d}, features.options().dtype(accumulate_type(features)));
  at::Tensor counts = at::empty({num_classes}, features.options().dtype(at::kLong));
  if (features.is_cpu()) {
    UK_CPU_CALL(class_means)(features, labels, num_classes, means, counts);
    return {means, counts};
  }
#ifdef UNLEARN_KERNELS_WITH_CUDA
  TORCH_CHECK(features.is_cuda(), "features must be a CPU or CUDA tensor");
  TORCH_CHECK(n < (int64_t{1} << 31), "features must have fewer than 2^31 rows");
  c10::cuda::CUDAGuard guard(features.device());
  at::Tensor workspace = at::empty({cuda::class_means_workspace_bytes(n, d, num_classes)},
                                   features.options().dtype(at::kByte));
  cuda::class_means(to_dtype(features, "features"), features.data_ptr(), features.stride(0),
                    labels.data_ptr<int64_t>(), n, d, num_classes, means.data_ptr<float>(),
                    counts.data_ptr<int64_t>(), workspace.data_ptr(),
                    c10::cuda::getCurrentCUDAStream());
  return {means, counts};
#else
  TORCH_CHECK(false, "unlearn_kernels was built without CUDA; features is on ", features.device());
#endif
}

}  // namespace uk

TORCH_LIBRARY_FRAGMENT(unlearn_kernels, m) {
  m.def("class_means(Tensor features, Tensor labels, int num_classes) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(unlearn_kernels, CPU, m) { m.impl("class_means", &uk::class_means); }

#ifdef UNLEARN_KERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(unlearn_kernels, CUDA, m) { m.impl("class_means", &uk::class_means); }
#endif
