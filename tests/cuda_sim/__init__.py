"""The CPU execution harness of the CUDA kernels (csrc/cuda): see cuda_on_cpu.h and ops.py."""
