"""Run the ISA-sensitive tests as lower-ISA hosts would see them: `make test-isa`.

Torch picks its vectorised ATen kernels by `ATEN_CPU_CAPABILITY` and oneDNN its GEMM and
bf16 kernels by `ONEDNN_MAX_CPU_ISA`; both can be capped below what this CPU has (never
raised above it). Each level runs `pytest -m isa` (the modules marked as depending on
kernels and rounding) in a fresh process with both caps set, so a developer on an AMX Xeon
sees what an AVX2-only EPYC would, and the other way round as far as the hardware allows.
Quiver's own C++ kernels are built for the host (`-march=native`); on a CPU with AVX-512 the
avx2 level builds them for `x86-64-v3` too (`QUIVER_KERNEL_MARCH`, cached beside the native
build), so their AVX2-only code — float32 panels, 8-lane attention — runs there as well.

    python scripts/isa_matrix.py [--levels avx2,avx512,avx512_bf16,amx] [-- PYTEST_ARGS]

A `-m EXPR` in PYTEST_ARGS narrows the selection (`isa and (EXPR)`). A level needing flags
this CPU lacks is reported as not run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class IsaLevel:
    name: str
    aten: str  # ATEN_CPU_CAPABILITY
    onednn: str  # ONEDNN_MAX_CPU_ISA
    needs: frozenset[str]  # /proc/cpuinfo flags the level needs
    kernel_march: str = ""  # QUIVER_KERNEL_MARCH where the host has AVX-512 (else native)

    @property
    def env(self) -> dict[str, str]:
        return {"ATEN_CPU_CAPABILITY": self.aten, "ONEDNN_MAX_CPU_ISA": self.onednn}

    def env_on(self, host_flags: set[str]) -> dict[str, str]:
        """The caps and the kernels' target: this level's own where the host's build would
        skip its code (a native build on an AVX-512 CPU has no AVX2-only paths), else the
        host's (an empty value: a target exported in the shell does not leak in)."""
        if self.kernel_march and "avx512f" in host_flags:
            return {**self.env, "QUIVER_KERNEL_MARCH": self.kernel_march}
        return {**self.env, "QUIVER_KERNEL_MARCH": ""}


LEVELS = [
    IsaLevel("avx2", "avx2", "AVX2", frozenset({"avx2"}), kernel_march="x86-64-v3"),
    IsaLevel("avx512", "avx512", "AVX512_CORE", frozenset({"avx512f"})),
    IsaLevel("avx512_bf16", "avx512", "AVX512_CORE_BF16", frozenset({"avx512_bf16"})),
    IsaLevel("amx", "avx512", "AVX512_CORE_AMX", frozenset({"amx_bf16", "amx_tile"})),
]


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def with_isa_marker(pytest_args: list[str]) -> list[str]:
    """`-m isa`, and-ed with a `-m EXPR` among the arguments (the last -m wins in pytest)."""
    args, expression = list(pytest_args), "isa"
    if "-m" in args:
        index = args.index("-m")
        expression = f"isa and ({args[index + 1]})"
        del args[index : index + 2]
    return ["-m", expression, *args]


def run_level(level: IsaLevel, pytest_args: list[str]) -> tuple[int, float]:
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
               *with_isa_marker(pytest_args)]
    env = level.env_on(cpu_flags())
    print(f"\n=== {level.name}: {' '.join(f'{k}={v}' for k, v in env.items())} "
          f"{' '.join(repr(part) if ' ' in part else part for part in command[1:])}",
          flush=True)
    began = time.monotonic()
    returncode = subprocess.call(command, cwd=ROOT, env={**os.environ, **env})
    return returncode, time.monotonic() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default=",".join(level.name for level in LEVELS))
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    args = parser.parse_args()
    wanted = args.levels.split(",")
    unknown = set(wanted) - {level.name for level in LEVELS}
    if unknown:
        parser.error(f"unknown levels {sorted(unknown)}; known: "
                     f"{', '.join(level.name for level in LEVELS)}")
    flags = cpu_flags()
    results: dict[str, str] = {}
    for level in (level for level in LEVELS if level.name in wanted):
        missing = level.needs - flags
        if missing:
            results[level.name] = f"not run: this CPU lacks {' '.join(sorted(missing))}"
            continue
        returncode, seconds = run_level(level, args.pytest_args)
        results[level.name] = f"{'passed' if returncode == 0 else 'FAILED'} " \
                              f"(exit {returncode}, {seconds:.0f} s)"
    print("\nISA matrix (host flags: " + " ".join(sorted(
        f for f in flags if f.startswith(("avx2", "avx512", "amx")))) + ")")
    for name, verdict in results.items():
        print(f"  {name:<12} {verdict}")
    return 1 if any(v.startswith("FAILED") for v in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
