"""deploy/docker/: hadolint-clean, multi-stage, pinned bases, non-root; the build context
keeps models and virtualenvs out."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.deploy.conftest import REPO

DOCKERFILES = sorted((REPO / "deploy" / "docker").glob("*.Dockerfile"))


def test_the_three_images_exist() -> None:
    assert [p.name for p in DOCKERFILES] == ["gateway.Dockerfile", "server-cpu.Dockerfile",
                                             "server-cuda.Dockerfile"]


def test_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(REPO / ".tools/bin/hadolint")
    if not Path(hadolint).is_file():
        pytest.skip("hadolint is not installed (not on PATH, no .tools/bin/hadolint): "
                    "run scripts/install-system-deps.sh")
    result = subprocess.run([hadolint, "--no-color", *map(str, DOCKERFILES)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.stem)
def test_multi_stage_pinned_non_root(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)[1]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base)
    assert len(re.findall(r"^FROM ", text, re.M)) == 2, "build stage + runtime stage"
    assert "COPY --from=build /opt/quiver /opt/quiver" in text
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user == ["10001:10001"], "the runtime stage ends as the chart's non-root UID"
    assert f"docker build -f deploy/docker/{dockerfile.name}" in text


def installed_packages() -> set[str]:
    """The top-level packages pyproject.toml installs (`include = ["common*", ...]`)."""
    text = (REPO / "pyproject.toml").read_text()
    include = re.search(r"^include = \[(.*)\]$", text, re.M)[1]
    return {name.strip().strip('"').rstrip("*") for name in include.split(",")}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.stem)
def test_every_package_is_copied_into_the_image(dockerfile: Path) -> None:
    copied = set(re.findall(r"^COPY (\w+) \./\1$", dockerfile.read_text(), re.M))
    assert installed_packages() <= copied


def test_dockerignore_keeps_models_out() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    assert lines[lines.index("**")] == "**", "ignore everything, then allow the sources"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert {"pyproject.toml", "constraints.txt", *installed_packages()} <= allowed
    assert not allowed & {"models", "artifacts", ".venv", ".tools"}
