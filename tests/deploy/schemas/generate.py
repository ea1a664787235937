"""Regenerate the vendored CRD schemas (run by hand, not by the tests).

No registry we can reach ships the CRDs' openAPIV3Schema as JSON (the npm @kubernetes-models
packages ship compiled ajv validators, not schemas), so these come from the PyPI packages
`cloudcoil-models-prometheus-operator` and `cloudcoil-models-keda`: pydantic models generated
from the upstream CRDs. Their JSON schema (by alias = the CRD field names) is written with
`additionalProperties: false` on every structural object (one with `properties`), so an
unknown field anywhere is an error, as the API server's structural pruning would drop it.

    python3 -m venv /tmp/cc
    /tmp/cc/bin/pip install cloudcoil-models-prometheus-operator==0.80.1.0 \
        cloudcoil-models-keda==2.16.1.0
    /tmp/cc/bin/python tests/deploy/schemas/generate.py
"""

import json
from pathlib import Path

from cloudcoil.models.keda.v1alpha1 import ScaledObject
from cloudcoil.models.prometheus_operator.v1 import PrometheusRule, ServiceMonitor

HERE = Path(__file__).parent


def close(node: object) -> None:
    """additionalProperties: false on every object schema that lists its properties."""
    if isinstance(node, dict):
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for value in node.values():
            close(value)
    elif isinstance(node, list):
        for value in node:
            close(value)


for model, name in ((ServiceMonitor, "servicemonitor-monitoring.coreos.com-v1"),
                    (PrometheusRule, "prometheusrule-monitoring.coreos.com-v1"),
                    (ScaledObject, "scaledobject-keda.sh-v1alpha1")):
    schema = model.model_json_schema(by_alias=True, mode="validation")
    close(schema)
    (HERE / f"{name}.json").write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
    print(name)
