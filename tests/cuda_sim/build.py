"""Compiles csrc/cuda with the CPU execution harness into a shared library (g++, no CUDA).

Every translation unit (each ``csrc/cuda/*.cu``, the harness runtime, the launcher shim) is
compiled to an object cached under a key of its text, every header it can include, the flags
and the compiler's version; a library is linked per set of objects. A change to a kernel is
therefore what gets tested, and a deliberately broken copy of one kernel recompiles only that
file. ``overrides`` maps a path under csrc (``cuda/misdirection.cu``, ``include/cuda_rows.cuh``)
to replacement text; a changed header is seen through a copy of csrc/include.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SIM = ROOT / "tests" / "cuda_sim"
KERNELS = ROOT / "csrc" / "cuda"
INCLUDE = ROOT / "csrc" / "include"
HARNESS_SOURCES = ("sim_runtime.cpp", "launchers_shim.cpp", "semantics_kernels.cpp")

FLAGS = ["-std=c++17", "-O2", "-fPIC", "-fno-strict-aliasing", "-ffp-contract=off", "-fdata-sections",
         "-Wno-unknown-pragmas", "-I", str(SIM / "include"), "-I", str(SIM)]
KERNEL_FLAGS = ["-x", "c++", "-include", "cuda_on_cpu.h"]
JOBS = 2


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++")


def cache_dir() -> Path:
    base = os.environ.get("UK_CUDA_SIM_CACHE")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "unlearn_kernels" / "cuda_sim"


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()[:24]


def _headers(overrides: dict[str, str]) -> dict[str, str]:
    """csrc/include as {file name: text}, with the overridden headers replaced."""
    headers = {f.name: f.read_text() for f in sorted(INCLUDE.iterdir()) if f.is_file()}
    for path in [p for p in overrides if p.startswith("include/")]:
        name = path.split("/", 1)[1]
        if name not in headers:
            raise KeyError(f"no csrc/include file named {name}")
        headers[name] = overrides.pop(path)
    return headers


def _include_dir(headers: dict[str, str], out: Path) -> Path:
    """csrc/include itself, or a copy holding the overridden headers."""
    if all((INCLUDE / n).read_text() == t for n, t in headers.items()):
        return INCLUDE
    copy = out / f"include-{_digest(*(n.encode() + t.encode() for n, t in sorted(headers.items())))}"
    if not copy.exists():
        partial = Path(tempfile.mkdtemp(dir=out))
        for name, text in headers.items():
            (partial / name).write_text(text)
        try:
            os.replace(partial, copy)
        except OSError:  # made by a concurrent build meanwhile
            shutil.rmtree(partial, ignore_errors=True)
    return copy


def _headers_digest(headers: dict[str, str]) -> bytes:
    sim = sorted(SIM.glob("*.h")) + sorted((SIM / "include").glob("*.h"))
    return (b"".join(n.encode() + t.encode() for n, t in sorted(headers.items()))
            + b"".join(f.name.encode() + f.read_bytes() for f in sim))


def _compiler_version(cxx: str) -> bytes:
    return subprocess.run([cxx, "--version"], capture_output=True, check=True).stdout


def _compile(cxx: str, name: str, text: str, is_kernel: bool, key_base: bytes, include: Path,
             out: Path) -> Path:
    flags = FLAGS + ["-I", str(include)] + (KERNEL_FLAGS if is_kernel else [])
    key = _digest(key_base, name.encode(), text.encode(), " ".join(FLAGS + flags[len(FLAGS) + 2:]).encode())
    obj = out / f"{Path(name).stem}-{key}.o"
    if obj.exists():
        return obj
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        src = Path(tmp) / name
        src.write_text(text)
        partial = Path(tmp) / "out.o"
        run = subprocess.run([cxx, *flags, "-c", str(src), "-o", str(partial)],
                             capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"g++ failed on {name}:\n{run.stderr[-6000:]}")
        _gather_shared(partial)
        os.replace(partial, obj)  # atomic: a concurrent build sees all or nothing
    return obj


def _gather_shared(obj: Path) -> None:
    """Renames the section of every ``__shared__`` variable (alignment 2**11, see
    cuda_on_cpu.h) to uk_sim_shared, whose bounds the runtime poisons before each block."""
    table = subprocess.run(["objdump", "-h", "-w", str(obj)], capture_output=True, text=True,
                           check=True).stdout
    names = [cols[1] for cols in (line.split() for line in table.splitlines())
             if len(cols) >= 7 and cols[0].isdigit() and cols[6] == "2**11"]
    if names:
        subprocess.run(["objcopy", *(f"--rename-section={n}=uk_sim_shared" for n in names), str(obj)],
                       check=True)


def build(overrides: dict[str, str] | None = None) -> Path:
    """The shared library of every kernel (with ``overrides``), the runtime and the shim."""
    cxx = compiler()
    if cxx is None:
        raise FileNotFoundError("g++ not found")
    out = cache_dir()
    out.mkdir(parents=True, exist_ok=True)
    overrides = dict(overrides or {})
    headers = _headers(overrides)
    include = _include_dir(headers, out)
    units = []
    for path in sorted(KERNELS.glob("*.cu")):
        units.append((path.name, overrides.pop(f"cuda/{path.name}", None) or path.read_text(), True))
    if overrides:
        raise KeyError(f"no csrc file {sorted(overrides)}")
    for name in HARNESS_SOURCES:
        units.append((name, (SIM / name).read_text(), False))
    key_base = _headers_digest(headers) + _compiler_version(cxx)
    with ThreadPoolExecutor(JOBS) as pool:
        objs = list(pool.map(lambda u: _compile(cxx, u[0], u[1], u[2], key_base, include, out), units))
    lib = out / f"cuda_sim-{_digest(*(str(o).encode() for o in objs))}.so"
    if not lib.exists():
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            partial = Path(tmp) / "lib.so"
            run = subprocess.run([cxx, "-shared", "-Wl,-Bsymbolic", *map(str, objs), "-o", str(partial)],
                                 capture_output=True, text=True)
            if run.returncode != 0:
                raise RuntimeError(f"linking the harness failed:\n{run.stderr[-6000:]}")
            os.replace(partial, lib)
    return lib


def load(overrides: dict[str, str] | None = None) -> ctypes.CDLL:
    return ctypes.CDLL(str(build(overrides)))
