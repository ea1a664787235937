"""scripts/kernel_spills.py: which inner loops of the kernels' assembly it reports."""

from __future__ import annotations

from pathlib import Path

from tests.file_modules import load_file_module

ASSEMBLY = """\
_Z9spillsv:
.L3:
\tvbroadcastss\t(%rdi), %ymm14
\tvfmadd231ps\t%ymm1, %ymm14, %ymm2
\tvmovaps\t%ymm2, -120(%rsp)
\tvfmadd231ps\t%ymm0, %ymm14, %ymm3
\tvmovaps\t%ymm3, -88(%rsp)
\tcmpq\t%rdx, %r9
\tjne\t.L3
.L4:
\tvmovaps\t%ymm2, 8(%rsp)
\tvfmadd231ps\t%ymm0, %ymm14, %ymm3
\tret
_Z8cleanv:
.L7:
\tvdpbf16ps\t%zmm5, %zmm4, %zmm0
\tvmovaps\t(%rsp), %zmm6
\tjg\t.L7
.L8:
\tvmovaps\t%ymm2, 8(%rsp)
\tjne\t.L7
"""


def load_script():
    return load_file_module(Path("scripts/kernel_spills.py"), "kernel_spills")


def test_only_self_looping_blocks_that_store_sums_are_reported():
    """A loop storing its sums each pass is reported with its function; a block that stores
    but does not loop (an epilogue), and a loop that only loads from the stack or jumps to
    another block, are not."""
    found = load_script().spilling_loops(ASSEMBLY)
    assert found == ["_Z9spillsv: .L3 (2 multiply-adds, 2 stack stores)"]
