// The compiled module. Importing it loads every op family's TORCH_LIBRARY_FRAGMENT (schemas
// and CPU/CUDA kernels, one csrc/ops/<family>.cpp each); fake kernels live in Python.
#include <pybind11/pybind11.h>

#include "cpu_isa.h"

PYBIND11_MODULE(_C, module) {
  module.doc() = "unlearn_kernels compiled kernels (ops live in torch.ops.unlearn_kernels)";
#ifdef UNLEARN_KERNELS_WITH_CUDA
  module.attr("with_cuda") = true;
#else
  module.attr("with_cuda") = false;
#endif
  module.def(
      "cpu_capability", [] { return uk::cpu::isa_name(uk::cpu::active_isa()); },
      "Instruction set of the CPU kernels in use: 'default', 'avx2' or 'avx512' (the best this "
      "CPU and build support, or UNLEARN_KERNELS_CPU_CAPABILITY / ATEN_CPU_CAPABILITY).");
  module.def(
      "best_cpu_capability", [] { return uk::cpu::isa_name(uk::cpu::best_isa()); },
      "The best instruction set this CPU and build support, whatever the environment asks.");
}
