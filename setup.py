"""Build of unlearn_kernels: setuptools hands the one native extension, ``_C``, to CMake.

``pip install -e . --no-build-isolation`` builds against the torch already installed.
Environment: ``UNLEARN_KERNELS_CUDA=auto|0|1`` (CUDA kernels), ``TORCH_CUDA_ARCH_LIST``
(architectures, sm_90 when unset), ``MAX_JOBS`` (parallel compile jobs),
``UNLEARN_KERNELS_SKIP_EXT=1`` (install the pure-Python package only),
``UNLEARN_KERNELS_CPU_ISAS`` (build only these CPU kernel variants, e.g. ``avx2``; the
baseline is always built).

The CPU kernels are compiled once per instruction set (baseline, AVX2+FMA, AVX-512 on x86-64;
never ``-march=native``) and the best one the CPU supports is picked at import time; every
variant gives the same bits (``csrc/include/cpu_vec.h``), so the choice changes speed only. At run
time ``UNLEARN_KERNELS_CPU_CAPABILITY=default|avx2|avx512`` (or ATen's own
``ATEN_CPU_CAPABILITY``) caps the choice; ``unlearn_kernels._extension.cpu_capability()`` tells
which one is active.
"""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        target_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = ROOT / "build" / f"cmake-py{sys.version_info.major}{sys.version_info.minor}"
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda = os.environ.get("UNLEARN_KERNELS_CUDA", "auto")
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir),
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={target_dir}",
            f"-DUNLEARN_KERNELS_CUDA={cuda}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        try:
            import ninja  # noqa: F401  (only its presence matters)
            configure += ["-G", "Ninja"]
        except ImportError:
            pass
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(configure, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)


ext_modules = [] if os.environ.get("UNLEARN_KERNELS_SKIP_EXT") == "1" else [
    CMakeExtension("unlearn_kernels._C")
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild})
