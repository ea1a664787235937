"""Prometheus rules and config: promtool's own checks and unit tests, run as the suite runs."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from quiver.monitoring import ScrapeTargets, prometheus_config
from tests.monitoring.promql import MONITORING, RULE_FILES, metric_names, rules

PROMETHEUS_DIR = MONITORING / "prometheus"
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))


@pytest.fixture(scope="module")
def promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (make system-deps installs Prometheus)")
    return binary


def run(promtool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], cwd=PROMETHEUS_DIR, capture_output=True,
                          text=True, timeout=120)


def test_there_are_rules_and_a_test_for_each_rule_file():
    assert {path.name for path in RULE_FILES} == {"quiver-recording.yml", "quiver-alerts.yml"}
    assert {path.name for path in RULE_TESTS} == {"quiver-recording.test.yml",
                                                  "quiver-alerts.test.yml"}


def test_promtool_check_rules(promtool):
    result = run(promtool, "check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 15 rules found" in result.stdout  # recording
    assert "SUCCESS: 17 rules found" in result.stdout  # alerts


def test_promtool_test_rules(promtool):
    result = run(promtool, "test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_TESTS)


def test_every_alert_has_a_unit_test_that_expects_it_to_fire():
    tested = set()
    for path in RULE_TESTS:
        text = path.read_text(encoding="utf-8")
        for rule in rules():
            name = rule.get("alert")
            if name and f"alertname: {name}\n    exp_alerts:\n    - exp_labels" in text:
                tested.add(name)
    alerts = {rule["alert"] for rule in rules() if "alert" in rule}
    assert len(alerts) == 17
    assert alerts - tested == set()


def test_a_broken_rule_file_fails_the_check(promtool, tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("groups:\n  - name: x\n    rules:\n      - alert: Broken\n"
                   "        expr: sum(rate(quiver_gateway_requests_total[5m])\n")
    result = run(promtool, "check", "rules", str(bad))
    assert result.returncode != 0


def test_committed_and_generated_prometheus_configs_are_valid(promtool, tmp_path):
    result = run(promtool, "check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    import yaml

    generated = tmp_path / "prometheus.yml"
    generated.write_text(yaml.safe_dump(prometheus_config(
        ScrapeTargets("127.0.0.1:18000", ("127.0.0.1:18001", "127.0.0.1:18002")))))
    result = run(promtool, "check", "config", str(generated))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 2 rule files found" in result.stdout


def test_alerts_use_recording_rules_that_exist():
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    used = set().union(*(metric_names(rule["expr"]) for rule in rules() if "alert" in rule))
    assert {name for name in used if name.startswith("quiver:")} <= recorded


def test_every_alert_says_how_bad_and_what_to_do():
    for rule in rules():
        if "alert" in rule:
            assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
