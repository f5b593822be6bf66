"""GPU/CPU throughput table of the fused ops (see unlearn_kernels.benchmark).

On the device machine:  python benchmarks/bench_ops.py
On a CPU:               python benchmarks/bench_ops.py --device cpu --shapes 4096x1024
"""

import argparse

import torch

from unlearn_kernels import benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "16384x4096", "65536x4096"],
                        help="rows x features")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    benchmark.run(shapes, getattr(torch, args.dtype), torch.device(args.device), args.repeats,
                  compile_baseline=not args.no_compile)


if __name__ == "__main__":
    main()
