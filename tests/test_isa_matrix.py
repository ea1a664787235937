"""scripts/isa_matrix.py: which levels run on this CPU and what pytest is asked to select."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.file_modules import load_file_module


def load_script():
    return load_file_module(Path("scripts/isa_matrix.py"), "isa_matrix")


def test_a_marker_expression_is_anded_with_isa():
    isa_matrix = load_script()
    assert isa_matrix.with_isa_marker(["-q"]) == ["-m", "isa", "-q"]
    assert isa_matrix.with_isa_marker(["-m", "not slow", "-x"]) == \
        ["-m", "isa and (not slow)", "-x"]


def test_levels_cap_both_torch_and_onednn_and_need_the_hosts_flags():
    isa_matrix = load_script()
    levels = {level.name: level for level in isa_matrix.LEVELS}
    assert levels["avx2"].env == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert levels["amx"].needs == {"amx_bf16", "amx_tile"}
    assert "avx2" in isa_matrix.cpu_flags()  # every host this project supports has AVX2


def test_the_avx2_level_builds_the_kernels_for_avx2_on_an_avx512_host():
    """A native build on an AVX-512 CPU has no AVX2-only kernel code (float32 panels, 8-lane
    attention): there the avx2 level asks for an x86-64-v3 build; an AVX2 host's own build
    already is one, and the other levels keep the native build even if the shell exports
    another target."""
    isa_matrix = load_script()
    levels = {level.name: level for level in isa_matrix.LEVELS}
    avx512_host = {"avx2", "fma", "avx512f", "avx512_bf16"}
    assert levels["avx2"].env_on(avx512_host) == {
        "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
        "QUIVER_KERNEL_MARCH": "x86-64-v3"}
    native = {"QUIVER_KERNEL_MARCH": ""}  # the host's own build, whatever the shell exports
    assert levels["avx2"].env_on({"avx2", "fma"}) == {**levels["avx2"].env, **native}
    assert levels["avx512_bf16"].env_on(avx512_host) == {**levels["avx512_bf16"].env, **native}


def test_an_x86_64_v3_kernel_target_has_the_avx2_panel_kernel(monkeypatch):
    """`QUIVER_KERNEL_MARCH` decides what the library holds, whatever the host: x86-64-v3
    has the float32 panel kernel, an AVX-512 target does not; each is its own cache entry."""
    from serving.kernels import build

    if shutil.which(build.compiler()) is None:
        pytest.skip(f"no C++ compiler ({build.compiler()}) to ask for its target's macros")
    for march in ("x86-64-v3", "skylake-avx512"):
        if not build.target_macros(march):
            pytest.skip(f"{build.compiler()} does not know -march={march} (GCC 11+ does)")
    keys = {}
    for march, panels in (("x86-64-v3", True), ("skylake-avx512", False)):
        monkeypatch.setenv("QUIVER_KERNEL_MARCH", march)
        assert build.target_arch() == march
        assert f"-march={march}" in build.compile_flags()
        assert build.builds_panel_kernel() is panels
        keys[march] = build.cache_key()
    assert keys["x86-64-v3"] != keys["skylake-avx512"]
