// Stand-in for the CUDA toolkit header under the CPU execution harness (see ../cuda_on_cpu.h).
#pragma once
#include "../cuda_on_cpu.h"
