"""Fixtures for the Helm chart tests: the helm binary, and `render(values...)`, which runs
`helm template` once per distinct set of values and returns the parsed objects."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "k8s" / "quiver"
EXAMPLES = sorted((REPO / "deploy" / "k8s" / "examples").glob("*.yaml"))
RELEASE = "prod"  # a release name without "quiver" in it: names must still work
NAMESPACE = "llm"


def find_helm() -> str | None:
    return shutil.which("helm") or next(
        (str(p) for p in [REPO / ".tools" / "bin" / "helm"] if p.is_file()), None)


@pytest.fixture(scope="session")
def helm() -> str:
    path = find_helm()
    if path is None:
        pytest.skip("helm is not installed (not on PATH, no .tools/bin/helm): "
                    "run scripts/install-system-deps.sh")
    return path


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=60,
                          check=False)


Render = Callable[..., list[dict]]


@pytest.fixture(scope="session")
def render(helm: str) -> Render:
    cache: dict[tuple, list[dict]] = {}

    def _render(*values_files: Path, sets: tuple[str, ...] = ()) -> list[dict]:
        key = (tuple(map(str, values_files)), tuple(sets))
        if key not in cache:
            args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
            for path in values_files:
                args += ["-f", str(path)]
            for item in sets:
                args += ["--set", item]
            result = run_helm(helm, *args)
            assert result.returncode == 0, result.stderr
            cache[key] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
        return cache[key]

    return _render


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def find(docs: list[dict], kind: str, name: str) -> dict:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} objects"
    return matches[0]


def pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    """(object name, pod spec) of every workload and bare pod."""
    specs = []
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            specs.append((doc["metadata"]["name"], doc["spec"]["template"]["spec"]))
        elif doc["kind"] == "Pod":
            specs.append((doc["metadata"]["name"], doc["spec"]))
    return specs


def example_id(path: Path) -> str:
    return path.stem


ALL_VALUES = [None, *EXAMPLES]


def values_id(value: Path | None) -> str:
    return "defaults" if value is None else value.stem


def values_args(value: Path | None) -> tuple[Path, ...]:
    return () if value is None else (value,)


def load_yaml(path: Path) -> object:
    return yaml.safe_load(path.read_text(encoding="utf-8"))
