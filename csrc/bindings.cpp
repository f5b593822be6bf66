// The compiled module: pybind11 entry (build facts) and the TORCH_LIBRARY schemas of every
// op, with their CPU and CUDA implementations. Fake kernels live in Python.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "ops/ops.h"

TORCH_LIBRARY(unlearn_kernels, m) {
  m.def("misdirection_fwd_bwd(Tensor h, Tensor? control, Tensor? importance, Tensor? anchor, "
        "Tensor? token_mask, float scale, bool need_grad) -> (Tensor, Tensor)");
  m.def("masked_edit(Tensor h, Tensor importance, Tensor control, float alpha, "
        "Tensor? token_mask) -> Tensor");
  m.def("masked_moments(Tensor x, Tensor? token_mask) -> (Tensor, Tensor, Tensor)");
  m.def("feature_scores(Tensor mean_f, Tensor var_f, Tensor mean_r, Tensor var_r, float eps) "
        "-> Tensor");
}

#define UK_REGISTER_IMPLS(key)                                  \
  TORCH_LIBRARY_IMPL(unlearn_kernels, key, m) {                 \
    m.impl("misdirection_fwd_bwd", &uk::misdirection_fwd_bwd);  \
    m.impl("masked_edit", &uk::masked_edit);                    \
    m.impl("masked_moments", &uk::masked_moments);              \
    m.impl("feature_scores", &uk::feature_scores);              \
  }

UK_REGISTER_IMPLS(CPU)
#ifdef UNLEARN_KERNELS_WITH_CUDA
UK_REGISTER_IMPLS(CUDA)
#endif

PYBIND11_MODULE(_C, module) {
  module.doc() = "unlearn_kernels compiled kernels (ops live in torch.ops.unlearn_kernels)";
#ifdef UNLEARN_KERNELS_WITH_CUDA
  module.attr("with_cuda") = true;
#else
  module.attr("with_cuda") = false;
#endif
}
