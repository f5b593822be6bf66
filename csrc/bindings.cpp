// The compiled module. Importing it loads every op family's TORCH_LIBRARY_FRAGMENT (schemas
// and CPU/CUDA kernels, one csrc/ops/<family>.cpp each); fake kernels live in Python.
#include <pybind11/pybind11.h>

PYBIND11_MODULE(_C, module) {
  module.doc() = "unlearn_kernels compiled kernels (ops live in torch.ops.unlearn_kernels)";
#ifdef UNLEARN_KERNELS_WITH_CUDA
  module.attr("with_cuda") = true;
#else
  module.attr("with_cuda") = false;
#endif
}
