"""GPU/CPU throughput table of the fused ops (same as ``unlearn-kernels bench``).

On the device machine:  python benchmarks/bench_ops.py
On a CPU:               python benchmarks/bench_ops.py --device cpu --shapes 4096x1024
"""

import sys

from unlearn_kernels.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
