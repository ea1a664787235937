"""values.schema.json and the chart's own checks reject bad values with a message that
names the value; the README documents every value."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.deploy.conftest import CHART, REPO, run_helm

BAD_VALUES = [
    # (--set-json items, text the error must contain)
    (["gateway.replicaCount=0"], "at '/gateway/replicaCount': minimum: got 0, want 1"),
    (["servers.stable.weight=150"], "at '/servers/stable/weight': maximum: got 150, want 100"),
    (['servers.stable.engine="tgi"'], "at '/servers/stable/engine': value must be one of"),
    (['servers.stable.modelSource.type="pvc"'], "missing property 'pvc'"),
    (['servers.stable.modelSource.type="s3"'], "at '/servers/stable/modelSource/type'"),
    (["image.tag=1.2"], "at '/image/tag': got number, want string"),
    (["gateway.config.no_such_setting=1"], "additional properties 'no_such_setting' not allowed"),
    (["servers.stable.settings.max_num_seqs=0"], "at '/servers/stable/settings/max_num_seqs'"),
    (["servers.Canary_1.weight=0"], "'Canary_1' does not match pattern"),
    (['redis.external.url="http://redis:6379"'], "at '/redis/external/url'"),
    # rules a schema cannot express: the templates fail with a message
    (["servers.stable.weight=90"],
     'weights of the enabled variants of model "smollm2-135m-instruct" sum to 90, not 100'),
    (["gateway.replicaCount=2"], "needs shared keys, limits and cache: set redis.enabled=true"),
    (["servers.stable.enabled=false"], "enable at least one model-server variant"),
    (["servers.stable.enabled=false", "servers.prod.weight=90", "servers.canary.weight=10"],
     "has variants [canary prod] but none named `stable`"),
    (['redis.maxMemory="lots"'], "at '/redis/maxMemory'"),
    (['servers.stable.artifactGate="failed"'],
     "servers.stable: the artifact's quality gate failed (artifactGate: failed)"),
    (['servers.stable.artifactGate="unknown"'], "at '/servers/stable/artifactGate'"),
]


@pytest.mark.parametrize("sets,message", BAD_VALUES, ids=[s[0] for s, _ in BAD_VALUES])
def test_bad_values_are_rejected(helm: str, sets: list[str], message: str) -> None:
    args = ["template", "prod", str(CHART)]
    for item in sets:
        args += ["--set-json", item]
    result = run_helm(helm, *args)
    assert result.returncode != 0, f"{sets} rendered"
    assert message in result.stderr, result.stderr


def test_good_canary_weights_render(helm: str) -> None:
    result = run_helm(helm, "template", "prod", str(CHART), "--set", "servers.stable.weight=90",
                      "--set", "servers.canary.weight=10")
    assert result.returncode == 0, result.stderr


def test_a_failed_gate_is_served_only_when_allowed(helm: str) -> None:
    """The chart refuses an ungated artifact unless the values say so, and then passes the
    server the flag its own check at start needs."""
    def server_args(*sets: str) -> list[str]:
        args = ["template", "prod", str(CHART)]
        for item in sets:
            args += ["--set", item]
        result = run_helm(helm, *args)
        assert result.returncode == 0, result.stderr
        deployments = [doc for doc in yaml.safe_load_all(result.stdout)
                       if doc and doc["kind"] == "Deployment"
                       and doc["spec"]["template"]["spec"]["containers"][0]["name"] == "server"]
        return deployments[0]["spec"]["template"]["spec"]["containers"][0]["args"]

    assert "--allow-failed-gate" not in server_args("servers.stable.artifactGate=passed")
    allowed = server_args("servers.stable.artifactGate=failed",
                          "servers.stable.allowFailedGate=true")
    assert "--allow-failed-gate" in allowed


def test_schema_is_strict_at_the_top_level() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    for key in ("gateway", "servers", "redis", "autoscaling", "monitoring", "networkPolicy",
                "image"):
        assert key in schema["properties"]


def test_readme_table_is_current() -> None:
    """The README's values table is what deploy/k8s/values_table.py generates."""
    table = subprocess.run([sys.executable, str(REPO / "deploy/k8s/values_table.py")],
                           capture_output=True, text=True, check=True).stdout
    readme = (CHART / "README.md").read_text()
    assert table.strip() in readme, "regenerate: python deploy/k8s/values_table.py"


def test_every_value_is_documented() -> None:
    sys.path.insert(0, str(REPO / "deploy/k8s"))
    try:
        from values_table import undocumented_leaves
    finally:
        sys.path.pop(0)
    assert undocumented_leaves() == []
