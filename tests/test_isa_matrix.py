"""scripts/isa_matrix.py: which levels run on this CPU and what pytest is asked to select."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("isa_matrix", ROOT / "scripts/isa_matrix.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("isa_matrix", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


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
