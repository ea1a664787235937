"""The gateway's /metrics names every key, budget and internal URL: the chart serves it on
its own port (`gateway.metricsPort` -> `metrics_port`), scraped by the ServiceMonitor,
opened by the NetworkPolicy to Prometheus alone and never exposed by Ingress or HTTPRoute."""

from __future__ import annotations

import yaml

from tests.deploy.conftest import CHART, NAMESPACE, RELEASE, Render, by_kind, find, run_helm
from tests.deploy.test_chart_manifests import EXAMPLE

EXPOSED = ("ingress.enabled=true", "ingress.hosts[0]=llm.example.com",
           "httpRoute.enabled=true", "httpRoute.parentRefs[0].name=public")


def gateway_config(docs: list[dict]) -> dict:
    return yaml.safe_load(find(docs, "ConfigMap", "prod-quiver-gateway")["data"]["gateway.yaml"])


def test_prometheus_scrapes_the_gateway_on_its_metrics_port(render: Render) -> None:
    docs = render(EXAMPLE["gpu-vllm"])
    config = gateway_config(docs)
    assert (config["port"], config["metrics_port"]) == (8000, 9100)
    (container,) = find(docs, "Deployment", "prod-quiver-gateway")["spec"]["template"][
        "spec"]["containers"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "http": 8000, "metrics": 9100}
    service = find(docs, "Service", "prod-quiver-gateway")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
        "http": 8000, "metrics": 9100}
    monitors = {m["metadata"]["name"]: m for m in by_kind(docs, "ServiceMonitor")}
    assert [e["port"] for e in monitors["prod-quiver-gateway"]["spec"]["endpoints"]] == [
        "metrics"]
    assert [e["port"] for e in monitors["prod-quiver-server"]["spec"]["endpoints"]] == ["http"]


def test_ingress_and_http_route_never_expose_the_metrics_port(render: Render) -> None:
    docs = render(sets=EXPOSED)
    (ingress,) = by_kind(docs, "Ingress")
    backends = [path["backend"]["service"] for rule in ingress["spec"]["rules"]
                for path in rule["http"]["paths"]]
    assert backends and all(b["port"] == {"name": "http"} for b in backends)
    (route,) = by_kind(docs, "HTTPRoute")
    assert [b["port"] for rule in route["spec"]["rules"] for b in rule["backendRefs"]] == [8000]


def test_only_prometheus_reaches_the_metrics_port(render: Render) -> None:
    docs = render(EXAMPLE["gpu-vllm"])
    policy = find(docs, "NetworkPolicy", "prod-quiver-gateway")
    rules = [rule for rule in policy["spec"]["ingress"]
             if any(port["port"] == "metrics" for port in rule["ports"])]
    assert len(rules) == 1
    (peer,) = rules[0]["from"]
    assert set(peer) == {"namespaceSelector", "podSelector"}  # Prometheus' selectors
    assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
    assert all(port["port"] == "http" for rule in policy["spec"]["ingress"]
               if rule is not rules[0] for port in rule["ports"])


def test_the_metrics_port_must_differ_from_the_api_port(helm: str) -> None:
    result = run_helm(helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                      "--set", "gateway.metricsPort=8000")
    assert result.returncode != 0
    assert "gateway.metricsPort must differ from gateway.port" in result.stderr
