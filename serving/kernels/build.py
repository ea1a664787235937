"""Build Quiver's C++ CPU kernels once per host and load them, or say why not.

The library is compiled with the host's C++ compiler (`CXX`, else `c++`) against the running
torch, for this CPU (`-march=native`; `QUIVER_KERNEL_MARCH` names another target, e.g.
`x86-64-v3` so an AVX-512 host builds and tests the AVX2 code paths), and cached under
`<cache_dir>/kernels/<key>/`, where the key hashes the sources, the compiler's version,
torch's version, the target and the CPU's flags: a restart loads it in milliseconds, and a
cache dir shared by different hosts or torch versions never hands one of them the wrong
binary. Builds take a file lock, so two servers starting together build once. A missing or
failing compiler is not an error: `load_cpu_kernels` returns None with the reason, and the
engine runs its pure-torch fallback.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sysconfig
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = tuple(CSRC / name for name in ("paged_attention.cpp", "paged_decode.cpp",
                                         "packed_linear.cpp"))
LIBRARY_NAME = "libquiver_kernels.so"
BUILD_TIMEOUT_S = 600
# paged_decode.cpp instantiates its kernels for three dtypes; compiled once per dtype (a
# -D picks which) its three parts build side by side instead of one taking 3x as long.
DECODE_DTYPES = 3


def compile_units() -> list[tuple[Path, str, list[str]]]:
    """(source, object name, extra flags) of every compiler run."""
    units: list[tuple[Path, str, list[str]]] = []
    for source in SOURCES:
        if source.name == "paged_decode.cpp":
            units += [(source, f"{source.stem}-{i}", [f"-DQUIVER_DECODE_DTYPE={i}"])
                      for i in range(DECODE_DTYPES)]
        else:
            units.append((source, source.stem, []))
    return units


@dataclass(frozen=True)
class KernelLoad:
    """The outcome of `load_cpu_kernels`: the loaded library, or why there is none."""

    library: Path | None
    reason: str = ""
    built: bool = False  # compiled now (False: loaded from the cache)


def compiler() -> str:
    return os.environ.get("CXX") or "c++"


def target_arch() -> str:
    """The `-march` the kernels are built for: this CPU unless `QUIVER_KERNEL_MARCH` says."""
    return os.environ.get("QUIVER_KERNEL_MARCH", "").strip() or "native"


def compile_flags() -> list[str]:
    from torch.utils import cpp_extension

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return ["-fPIC", "-std=c++17", "-O3", f"-march={target_arch()}", "-fopenmp",
            "-DTORCH_ASSERT_ONLY_METHOD_OPERATORS", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            *(f"-I{path}" for path in cpp_extension.include_paths()),
            f"-I{sysconfig.get_paths()['include']}"]


def link_flags() -> list[str]:
    torch_lib = Path(torch.__file__).parent / "lib"
    return ["-shared", "-fopenmp", f"-L{torch_lib}", "-lc10", "-ltorch_cpu",
            f"-Wl,-rpath,{torch_lib}"]


def cache_key() -> str:
    """Hash of everything the binary depends on (see the module docstring)."""
    digest = hashlib.sha256()
    for source in sorted(CSRC.iterdir()):  # sources and the headers they share
        digest.update(source.read_bytes())
    digest.update(torch.__version__.encode())
    digest.update(_compiler_version().encode())
    digest.update(target_arch().encode())
    digest.update(_cpu_flags().encode())
    return digest.hexdigest()[:16]


def load_cpu_kernels(cache_dir: Path) -> KernelLoad:
    """Build (or find) the kernel library and load it into this process."""
    try:
        directory = Path(cache_dir) / "kernels" / cache_key()
    except (OSError, subprocess.SubprocessError) as exc:
        return KernelLoad(None, f"no working C++ compiler ({compiler()}): {exc}")
    library = directory / LIBRARY_NAME
    built = False
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with _locked(directory / ".lock"):
            if not library.is_file():
                _build(library)
                built = True
        torch.ops.load_library(str(library))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return KernelLoad(None, f"building the C++ kernels failed: {_first_lines(exc)}")
    return KernelLoad(library, built=built)


def _build(library: Path) -> None:
    """Compile every source at once (one per core: most of the time is torch's headers),
    link, then move the library into place."""
    logger.info("building Quiver's C++ CPU kernels into %s (once per host)", library.parent)
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        units = compile_units()
        objects = [Path(scratch) / f"{name}.o" for _, name, _ in units]
        _run([[compiler(), "-c", str(source), "-o", str(obj), *compile_flags(), *extra]
              for (source, _, extra), obj in zip(units, objects, strict=True)])
        output = Path(scratch) / LIBRARY_NAME
        _run([[compiler(), *(str(obj) for obj in objects), "-o", str(output), *link_flags()]])
        os.replace(output, library)  # atomic: readers see no library or a whole one


def _run(commands: list[list[str]]) -> None:
    """Run the commands side by side; raise with the compiler's errors if any fails."""
    processes = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True) for command in commands]
    failures = []
    try:
        for process in processes:
            _, stderr = process.communicate(timeout=BUILD_TIMEOUT_S)
            if process.returncode != 0:
                errors = [line for line in stderr.splitlines() if "error" in line]
                failures.append(f"{compiler()} exited {process.returncode}: "
                                + "\n".join(errors or stderr.splitlines()[-5:]))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    if failures:
        raise RuntimeError("\n".join(failures))


class _locked:
    """An exclusive `flock` on `path` for the duration of a `with` block."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        self.file = open(self.path, "a")  # noqa: SIM115 - closed in __exit__
        fcntl.flock(self.file, fcntl.LOCK_EX)

    def __exit__(self, *exc_info: object) -> None:
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def _compiler_version() -> str:
    if shutil.which(compiler()) is None:
        raise FileNotFoundError(f"{compiler()} is not on PATH")
    result = subprocess.run([compiler(), "--version"], capture_output=True, text=True,
                            timeout=30, check=True)
    return result.stdout


def builds_panel_kernel() -> bool:
    """Whether the library built here has `csrc/panel_linear.h`'s kernel: its target has AVX2
    and FMA but not AVX-512 (an AVX2-only CPU, or `QUIVER_KERNEL_MARCH=x86-64-v3`)."""
    macros = target_macros()
    return {"__AVX2__", "__FMA__"} <= macros and "__AVX512F__" not in macros


def target_macros(march: str | None = None) -> frozenset[str]:
    """The macros the compiler defines for `-march=march` (default: the kernels' target);
    empty where the compiler is missing or refuses the target."""
    return _target_macros(compiler(), march or target_arch())


@lru_cache(maxsize=8)
def _target_macros(cxx: str, march: str) -> frozenset[str]:
    try:
        result = subprocess.run([cxx, f"-march={march}", "-dM", "-E", "-x", "c++",
                                 "/dev/null"], capture_output=True, text=True, timeout=30,
                                check=True)
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    return frozenset(line.split()[1] for line in result.stdout.splitlines()
                     if line.startswith("#define __") and len(line.split()) >= 2)


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return os.uname().machine


def _first_lines(exc: BaseException, limit: int = 600) -> str:
    text = str(exc).strip()
    return text if len(text) <= limit else text[:limit] + " ..."
