"""`helm lint --strict` on the chart with its defaults and with every example values file,
and `helm package` keeping the monitoring/ files that files/ links to."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import ALL_VALUES, CHART, REPO, run_helm, values_args, values_id


@pytest.mark.parametrize("values", ALL_VALUES, ids=values_id)
def test_lint_strict(helm: str, values: Path | None) -> None:
    args = ["lint", "--strict", str(CHART)]
    for path in values_args(values):
        args += ["-f", str(path)]
    result = run_helm(helm, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


def test_every_example_is_linted() -> None:
    names = {p.stem for p in ALL_VALUES if p is not None}
    assert names == {"cpu-dev", "gpu-vllm", "canary", "keda-autoscaling", "external-redis"}


def test_files_are_links_into_monitoring() -> None:
    """One source of truth: the chart's rules and dashboards are symlinks, not copies."""
    for link, target in (("rules", "monitoring/prometheus/rules"),
                         ("dashboards", "monitoring/grafana/dashboards")):
        path = CHART / "files" / link
        assert path.is_symlink(), f"{path} must be a symlink to {target}"
        assert path.resolve() == (REPO / target).resolve()


def test_package_follows_the_links(helm: str, tmp_path: Path) -> None:
    result = run_helm(helm, "package", str(CHART), "--destination", str(tmp_path))
    assert result.returncode == 0, result.stderr
    (archive,) = tmp_path.glob("quiver-*.tgz")
    with tarfile.open(archive) as tar:
        packaged = {m.name: m for m in tar.getmembers()}
        for source in sorted((REPO / "monitoring/prometheus/rules").glob("*.yml")):
            member = packaged[f"quiver/files/rules/{source.name}"]
            assert member.isfile(), f"{member.name} is not a regular file in the package"
            data = tar.extractfile(member).read().decode()
            assert yaml.safe_load(data) == yaml.safe_load(source.read_text())
        for source in sorted((REPO / "monitoring/grafana/dashboards").glob("*.json")):
            member = packaged[f"quiver/files/dashboards/{source.name}"]
            assert tar.extractfile(member).read() == source.read_bytes()
    # and the packaged chart renders the rules from its own copy
    result = run_helm(helm, "template", "prod", str(archive),
                      "--set", "monitoring.prometheusRule.enabled=true")
    assert result.returncode == 0, result.stderr
    assert "QuiverTargetDown" in result.stdout
