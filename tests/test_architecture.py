"""The layout DESIGN.md promises: imports run one way, the gateway carries no model code,
modules stay readable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "serving", "gateway", "optimize", "loadtests", "quiver")
MAX_MODULE_LINES = 500


def test_the_import_contract_holds():
    """pyproject.toml's [tool.importlinter] contracts: common <- stages <- quiver, the
    gateway imports no serving/optimize/torch, common imports no stage and no torch."""
    lint_imports = Path(sys.executable).with_name("lint-imports")
    if not lint_imports.is_file():
        pytest.skip(f"{lint_imports} is missing: install the dev extra (import-linter)")
    result = subprocess.run([str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("module", ["gateway.app", "gateway.cli", "common.asgi"])
def test_importing_the_gateway_loads_no_torch_and_no_engine(module):
    """What a gateway process really loads, lazy imports included at start-up."""
    code = (f"import sys, {module}; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'transformers', 'serving', 'optimize')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def test_no_module_outside_benchmarks_and_tests_is_over_500_lines():
    too_long = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            num_lines = len(path.read_text(encoding="utf-8").splitlines())
            if num_lines > MAX_MODULE_LINES:
                too_long[str(path.relative_to(ROOT))] = num_lines
    assert not too_long, too_long
