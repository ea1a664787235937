"""Reproducible installs and a CI that cannot pass by running nothing."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The pins ../shared/BUILD-NOTES.md checked together on these hosts.
BUILD_NOTES_PINS = {
    "torch": "2.13.0", "transformers": "5.17.0", "tokenizers": "0.23.3",
    "safetensors": "0.8.0", "accelerate": "1.15.0", "llmcompressor": "0.14.0.1",
    "compressed-tensors": "0.19.0", "auto-round": "0.15.1", "datasets": "5.2.0",
    "onnx": "1.23.2", "onnx-ir": "1.1.0", "onnxruntime": "1.32.0",
    "onnxruntime-genai": "0.18.0", "numpy": "2.4.6",
}


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def test_constraints_pin_the_build_notes_set_exactly():
    pins = _pins(REPO / "constraints.txt")
    for name, version in BUILD_NOTES_PINS.items():
        assert pins.get(name) == version, f"{name}: {pins.get(name)} != {version}"
    # Every package of the main venv is pinned, not just the famous ones.
    assert {"fastapi", "uvicorn", "pydantic", "openai", "locust", "pytest"} <= pins.keys()


def test_pyproject_declares_the_extras_and_one_console_script():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert set(project["optional-dependencies"]) == {
        "serve", "gateway", "optimize", "loadtest", "dev", "vllm"}
    assert project["scripts"] == {"quiver": "quiver.cli:main"}
    assert project["requires-python"] == ">=3.11"


def test_pytest_collecting_nothing_fails_make(tmp_path):
    result = subprocess.run(
        ["make", "--no-print-directory", "pytest",
         "PYTEST_ARGS=tests/test_build.py -k no_test_has_this_name -p no:cacheprovider"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode != 0
    assert "pytest collected NO tests" in result.stderr
