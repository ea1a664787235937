"""Find inner loops of Quiver's C++ kernels that keep their sums on the stack.

    python scripts/kernel_spills.py [--march native,haswell,sapphirerapids]

GCC keeps an array of vector sums in memory when any loop over it is left rolled, and then
stores every sum to the stack on each pass of the hot loop: that made the float32 panels'
6-row blocks run at half speed and hit the AVX-512 one-or-two-row kernel unseen. This
compiles each kernel unit to assembly for each target (the flags `serving/kernels/build.py`
builds with, `-march` swapped) and lists every self-looping block that does multiply-adds
(`vfmadd*`, `vdpbf16ps`) and stores a vector register to the stack. Exit status 1 when any
is found. A target the compiler does not know is reported and skipped.

Not every hit is a defect: where more values are live than there are registers, a spill is
the compiler's answer, and the alternative can be slower (the float32 int4 kernel's
per-group running outputs, kept in the output rows instead, made it 7-9 % slower). What
matters is a loop that stores all of its sums on every pass; time a change with
benchmarks/linear_kernels.py.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving.kernels import build  # noqa: E402

LABEL = re.compile(r"^(\.?[A-Za-z_][\w.$]*):")
JUMP = re.compile(r"^\s+j\w+\s+(\.L\w+)")
MULTIPLY_ADD = re.compile(r"^\s+(vfmadd\w+|vdpbf16ps)\s")
STACK_STORE = re.compile(r"^\s+vmov\w+\s+%[xyz]mm\d+,\s*-?\d*\((%rsp|%rbp)\)")


def spilling_loops(assembly: str) -> list[str]:
    """'function: label (n multiply-adds, m stack stores)' for each self-looping block."""
    found: list[str] = []
    function, label, body = "", "", []

    def close() -> None:
        jumps_back = any((m := JUMP.match(line)) and m.group(1) == label for line in body)
        adds = sum(1 for line in body if MULTIPLY_ADD.match(line))
        stores = sum(1 for line in body if STACK_STORE.match(line))
        if jumps_back and adds and stores:
            found.append(f"{function}: {label} ({adds} multiply-adds, {stores} stack stores)")

    for line in assembly.splitlines():
        match = LABEL.match(line)
        if match:
            close()
            label, body = match.group(1), []
            if not label.startswith("."):
                function = label
        else:
            body.append(line)
    close()
    return found


def compile_to_assembly(source: Path, extra: list[str], march: str, output: Path) -> str:
    flags = [flag if not flag.startswith("-march=") else f"-march={march}"
             for flag in build.compile_flags()]
    subprocess.run([build.compiler(), "-S", str(source), "-o", str(output), *flags, *extra],
                   check=True, capture_output=True, text=True, timeout=build.BUILD_TIMEOUT_S)
    return output.read_text()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--march", default="native,haswell,sapphirerapids",
                        help="comma-separated -march targets")
    args = parser.parse_args()
    targets = []
    for march in args.march.split(","):
        if build.target_macros(march):
            targets.append(march)
        else:
            print(f"{march}: {build.compiler()} does not know this target; skipped")
    jobs = [(march, source, name, extra) for march in targets
            for source, name, extra in build.compile_units()]
    with tempfile.TemporaryDirectory() as scratch, ThreadPoolExecutor(2) as pool:
        texts = pool.map(lambda job: compile_to_assembly(
            job[1], job[3], job[0], Path(scratch) / f"{job[0]}-{job[2]}.s"), jobs)
        failures = 0
        for (march, _, name, _), text in zip(jobs, texts, strict=True):
            for loop in spilling_loops(text):
                failures += 1
                demangled = subprocess.run(["c++filt"], input=loop, capture_output=True,
                                           text=True).stdout.strip() or loop
                print(f"{march} {name}: {demangled}")
    print(f"{failures} inner loop(s) with sums on the stack "
          f"({len(jobs)} units over {', '.join(targets)})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
