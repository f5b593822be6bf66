"""The ``unlearn-kernels`` command.

    unlearn-kernels info                 which backends run here
    unlearn-kernels selfcheck            every backend against the reference
    unlearn-kernels bench [--device ..]  throughput table of the fused ops
    unlearn-kernels demo                 self-check, then a small benchmark table
"""

from __future__ import annotations

import argparse
import sys

import torch


def _info(_args) -> int:
    import unlearn_kernels as uk

    print(f"unlearn_kernels {uk.__version__}, torch {torch.__version__}")
    print(f"compiled C++: {uk.compiled()}, compiled CUDA: {uk.compiled_with_cuda()}")
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        usable = [name for name, ok in uk.backends(device).items() if ok]
        print(f"backends on {device}: {', '.join(usable)}")
    return 0


def _selfcheck(_args) -> int:
    from . import selfcheck

    return 0 if selfcheck.run() else 1


def _parse_shapes(shapes: list[str]) -> list[tuple[int, int]]:
    try:
        return [tuple(int(v) for v in s.lower().split("x")) for s in shapes]
    except ValueError:
        raise SystemExit(f"--shapes takes ROWSxFEATURES such as 16384x4096, got {shapes}") from None


def _bench(args) -> int:
    from . import benchmark

    benchmark.run(_parse_shapes(args.shapes), getattr(torch, args.dtype), torch.device(args.device),
                  args.repeats, compile_baseline=not args.no_compile)
    return 0


def _demo(args) -> int:
    from . import benchmark, selfcheck

    _info(args)
    print("\nSelf-check against the plain-PyTorch reference:")
    ok = selfcheck.run()
    print("\nCPU throughput (compiled C++ kernels vs eager PyTorch and torch.compile):")
    benchmark.run([(2048, 1024)], torch.float32, torch.device("cpu"), repeats=10)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unlearn-kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="which backends run here").set_defaults(func=_info)
    sub.add_parser("selfcheck", help="every backend against the reference").set_defaults(func=_selfcheck)
    bench = sub.add_parser("bench", help="throughput table of the fused ops")
    bench.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    bench.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    bench.add_argument("--shapes", nargs="+", default=["4096x4096", "16384x4096", "65536x4096"],
                       help="ROWSxFEATURES, several allowed")
    bench.add_argument("--repeats", type=int, default=50, help="timed runs per figure (median)")
    bench.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    bench.set_defaults(func=_bench)
    sub.add_parser("demo", help="self-check and a CPU benchmark table").set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
