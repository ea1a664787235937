"""What `helm template` renders: valid Kubernetes objects (kubernetes-validate --strict, and
the vendored CRD schemas), monitoring/ files verbatim, a gateway config the gateway's own
loader accepts, server commands `quiver serve` accepts, non-root containers with resource
requests, probes on paths the processes serve, and Prometheus job names the alerts match."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.deploy.conftest import (
    ALL_VALUES,
    EXAMPLES,
    NAMESPACE,
    REPO,
    Render,
    by_kind,
    find,
    pod_specs,
    values_args,
    values_id,
)

SCHEMAS = Path(__file__).parent / "schemas"
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring.coreos.com-v1",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring.coreos.com-v1",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda.sh-v1alpha1",
}
K8S_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
# extra value sets rendered alongside the examples, to cover the optional objects
EXTRA_SETS = {
    "server-hpa": ("redis.enabled=true", "autoscaling.servers.enabled=true",
                   "autoscaling.gateway.enabled=true"),
    "http-route": ("httpRoute.enabled=true", "httpRoute.parentRefs[0].name=public",
                   "httpRoute.hostnames[0]=llm.example.com"),
    "redis-password": ("redis.enabled=true", "redis.password=s3cret/+x",
                       "redis.persistence.enabled=false", "networkPolicy.enabled=true"),
}
EXAMPLE = {path.stem: path for path in EXAMPLES}


def rendered_sets() -> list[tuple[str, tuple[Path, ...], tuple[str, ...]]]:
    sets = [(values_id(v), values_args(v), ()) for v in ALL_VALUES]
    return sets + [(name, (), items) for name, items in EXTRA_SETS.items()]


RENDERED = rendered_sets()


@pytest.fixture(params=RENDERED, ids=[r[0] for r in RENDERED])
def docs(request: pytest.FixtureRequest, render: Render) -> list[dict]:
    _, files, sets = request.param
    return render(*files, sets=sets)


# -- schemas ---------------------------------------------------------------------------------

@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_builtin_objects_are_valid_kubernetes(docs: list[dict], version: str) -> None:
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_SCHEMAS or doc["kind"] == "HTTPRoute":
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} on {version}: {exc}")


def crd_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMAS / f"{CRD_SCHEMAS[(api_version, kind)]}.json").read_text())
    return jsonschema.Draft202012Validator(schema)


def test_crd_objects_match_their_schemas(docs: list[dict]) -> None:
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) not in CRD_SCHEMAS:
            continue
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}"
                  for e in crd_validator(doc["apiVersion"], doc["kind"]).iter_errors(doc)]
        assert not errors, f"{doc['kind']}/{doc['metadata']['name']}: {errors}"


def test_crd_schemas_reject_unknown_fields() -> None:
    """The vendored schemas are strict: a misspelt field is an error, not pruned."""
    validator = crd_validator("monitoring.coreos.com/v1", "ServiceMonitor")
    monitor = {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
               "metadata": {"name": "x"},
               "spec": {"selector": {}, "endpoints": [{"port": "http", "intervall": "5s"}]}}
    assert not validator.is_valid({**monitor, "spec": {"selector": {}}})
    assert not validator.is_valid(monitor)


def test_every_kind_is_validated(render: Render) -> None:
    known = {"ConfigMap", "Secret", "Service", "ServiceAccount", "Deployment", "StatefulSet",
             "HorizontalPodAutoscaler", "PodDisruptionBudget", "Ingress", "NetworkPolicy",
             "Pod", "HTTPRoute"} | {kind for _, kind in CRD_SCHEMAS}
    for name, files, sets in RENDERED:
        kinds = {doc["kind"] for doc in render(*files, sets=sets)}
        assert kinds <= known, f"{name}: {kinds - known} are not validated"


def test_http_route_points_at_the_gateway(render: Render) -> None:
    docs = render(sets=EXTRA_SETS["http-route"])
    (route,) = by_kind(docs, "HTTPRoute")
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert set(route["spec"]) == {"parentRefs", "hostnames", "rules"}
    (backend,) = route["spec"]["rules"][0]["backendRefs"]
    service = find(docs, "Service", backend["name"])
    assert backend["port"] == service["spec"]["ports"][0]["port"]


# -- monitoring: one source of truth -----------------------------------------------------------

def test_rules_equal_the_monitoring_files(render: Render) -> None:
    docs = render(EXAMPLE["gpu-vllm"])
    for name in ("recording", "alerts"):
        rule = find(docs, "PrometheusRule", f"prod-quiver-{name}")
        source = yaml.safe_load((REPO / f"monitoring/prometheus/rules/quiver-{name}.yml")
                                .read_text())
        assert rule["spec"] == source
    alerts = find(docs, "PrometheusRule", "prod-quiver-alerts")
    assert "{{ $labels.model }}" in json.dumps(alerts), "alert templates must survive Helm"


def test_dashboards_equal_the_monitoring_files(render: Render) -> None:
    docs = render(EXAMPLE["gpu-vllm"])
    for name in ("overview", "engine", "tenants"):
        config_map = find(docs, "ConfigMap", f"prod-quiver-dashboard-{name}")
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        source = REPO / f"monitoring/grafana/dashboards/{name}.json"
        assert json.loads(config_map["data"][f"quiver-{name}.json"]) == json.loads(
            source.read_text())


def test_job_labels_match_the_target_down_alert(render: Render) -> None:
    """Prometheus Operator names the job after the Service's `jobLabel` label; the alert
    QuiverTargetDown watches up{job=~"quiver.*"} (anchored), whatever the release name."""
    alerts = (REPO / "monitoring/prometheus/rules/quiver-alerts.yml").read_text()
    pattern = re.search(r'up\{job=~"([^"]+)"\}', alerts)[1]
    docs = render(EXAMPLE["gpu-vllm"])
    monitors = by_kind(docs, "ServiceMonitor")
    assert len(monitors) == 2
    for monitor in monitors:
        selector = monitor["spec"]["selector"]["matchLabels"]
        services = [s for s in by_kind(docs, "Service")
                    if selector.items() <= s["metadata"]["labels"].items()]
        assert services, f"{monitor['metadata']['name']} selects no Service"
        for service in services:
            job = service["metadata"]["labels"][monitor["spec"]["jobLabel"]]
            assert re.fullmatch(pattern, job), job
            ports = {p["name"] for p in service["spec"]["ports"]}
            assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
        assert [e["path"] for e in monitor["spec"]["endpoints"]] == ["/metrics"]


def test_keda_scales_on_queue_depth_of_its_own_service(render: Render) -> None:
    docs = render(EXAMPLE["keda-autoscaling"])
    (scaled,) = by_kind(docs, "ScaledObject")
    (trigger,) = scaled["spec"]["triggers"]
    query = trigger["metadata"]["query"]
    assert query == ('sum(vllm:num_requests_waiting{namespace="llm",'
                     'service="prod-quiver-server-stable"})')
    find(docs, "Service", "prod-quiver-server-stable")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "prod-quiver-server-stable"
    deployment = find(docs, "Deployment", "prod-quiver-server-stable")
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count"


def test_hpa_scales_servers_on_the_adapter_metric(render: Render) -> None:
    docs = render(sets=EXTRA_SETS["server-hpa"])
    hpa = find(docs, "HorizontalPodAutoscaler", "prod-quiver-server-stable")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "vllm_num_requests_waiting"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "4"}


# -- the gateway config is what the gateway accepts --------------------------------------------

def gateway_env(docs: list[dict]) -> dict[str, str]:
    """The gateway container's env, secretKeyRefs resolved from the rendered Secrets (or a
    stand-in for an existing Secret the user provides)."""
    secrets = {s["metadata"]["name"]: s.get("stringData", {}) for s in by_kind(docs, "Secret")}
    deployment = find(docs, "Deployment", "prod-quiver-gateway")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
            continue
        ref = item["valueFrom"]["secretKeyRef"]
        stand_in = {"admin-key": "existing-admin-key", "redis-url": "redis://existing:6379/0"}
        env[item["name"]] = secrets.get(ref["name"], stand_in)[ref["key"]]
    return env


@pytest.mark.parametrize("values", ALL_VALUES, ids=values_id)
def test_gateway_config_loads(render: Render, values: Path | None, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.settings import load_settings

    docs = render(*values_args(values))
    config = tmp_path / "gateway.yaml"
    config.write_text(find(docs, "ConfigMap", "prod-quiver-gateway")["data"]["gateway.yaml"])
    env = gateway_env(docs)
    for name in [n for n in os.environ if n.startswith("QUIVER_GATEWAY_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings(config)

    assert settings.host == "0.0.0.0"
    assert settings.admin_key is not None and settings.admin_key.get_secret_value()
    services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
    for model in settings.models:
        assert sum(v.weight for v in model.variants) == 100
        for variant in model.variants:
            (url,) = variant.replicas
            host, port = re.fullmatch(r"http://([^:]+):(\d+)", url).groups()
            assert int(port) in [p["port"] for p in services[host]["spec"]["ports"]]
    replicas = find(docs, "Deployment", "prod-quiver-gateway")["spec"].get("replicas")
    if replicas is None or replicas > 1:
        assert settings.redis_url and settings.key_store.startswith("redis")
        assert (settings.rate_limit.backend == settings.cache.backend
                == settings.routing.backend == "redis")


def test_canary_routes_and_weights(render: Render, tmp_path: Path) -> None:
    docs = render(EXAMPLE["canary"])
    config = yaml.safe_load(find(docs, "ConfigMap", "prod-quiver-gateway")["data"]["gateway.yaml"])
    (model,) = config["models"]
    assert model["stable"] == "stable"
    assert {(v["name"], v["weight"], v["replicas"][0], v["discovery"])
            for v in model["variants"]} == {
        ("stable", 90, "http://prod-quiver-server-stable-pods:8001", "dns"),
        ("canary", 10, "http://prod-quiver-server-canary-pods:8001", "dns")}
    services = {s["metadata"]["name"]: s["spec"] for s in by_kind(docs, "Service")}
    for name in ("stable", "canary"):
        # headless: the name resolves to the variant's ready pods, which the gateway balances
        pods = services[f"prod-quiver-server-{name}-pods"]
        assert pods["clusterIP"] == "None" and not pods["publishNotReadyAddresses"]
        assert pods["selector"] == services[f"prod-quiver-server-{name}"]["selector"]


def test_without_pod_discovery_the_gateway_calls_each_variants_service(
        render: Render) -> None:
    docs = render(EXAMPLE["canary"], sets=("gateway.podDiscovery=false",))
    config = yaml.safe_load(find(docs, "ConfigMap", "prod-quiver-gateway")["data"]["gateway.yaml"])
    (model,) = config["models"]
    assert {v["replicas"][0] for v in model["variants"]} == {
        "http://prod-quiver-server-stable:8001", "http://prod-quiver-server-canary:8001"}
    assert all("discovery" not in v for v in model["variants"])
    assert not [s for s in by_kind(docs, "Service") if s["metadata"]["name"].endswith("-pods")]


# -- the server command is what `quiver serve` accepts -----------------------------------------

def server_containers(docs: list[dict]) -> list[tuple[dict, dict]]:
    return [(d, c) for d in by_kind(docs, "Deployment")
            if d["metadata"]["labels"]["app.kubernetes.io/component"] == "server"
            for c in d["spec"]["template"]["spec"]["containers"]]


@pytest.mark.parametrize("values", ALL_VALUES, ids=values_id)
def test_server_command_parses(render: Render, values: Path | None, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    from quiver.cli import build_parser
    from serving.cli import settings_from_args

    docs = render(*values_args(values))
    for deployment, container in server_containers(docs):
        argv = [*container["command"][1:], *container["args"]]
        args = build_parser().parse_args(argv)
        for item in container["env"]:
            monkeypatch.setenv(item["name"], item["value"])
        settings = settings_from_args(args, model=tmp_path)  # the model dir must exist
        assert settings.host == "0.0.0.0"
        assert settings.port == container["ports"][0]["containerPort"]
        assert str(args.model) in {m["mountPath"] for m in container["volumeMounts"]}
        for init in deployment["spec"]["template"]["spec"].get("initContainers", []):
            if init["command"][:3] == ["quiver", "models", "fetch"]:
                fetch = build_parser().parse_args(init["command"][1:])
                assert str(fetch.dest) == str(args.model)
        for item in container["env"]:
            monkeypatch.delenv(item["name"])


def test_gpu_variant_runs_vllm_on_gpus(render: Render) -> None:
    docs = render(EXAMPLE["gpu-vllm"])
    ((_, container),) = server_containers(docs)
    assert "--engine=vllm" in container["args"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"].startswith("quiver/server-cuda:")
    volumes = find(docs, "Deployment", "prod-quiver-server-stable")["spec"]["template"]["spec"][
        "volumes"]
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "quiver-models",
                                                      "readOnly": True}} in volumes


# -- pods: non-root, resources, probes ---------------------------------------------------------

def test_every_container_is_non_root_with_requests(docs: list[dict]) -> None:
    for name, spec in pod_specs(docs):
        pod_context = spec.get("securityContext", {})
        for container in spec.get("initContainers", []) + spec["containers"]:
            where = f"{name}/{container['name']}"
            context = {**pod_context, **container.get("securityContext", {})}
            assert context.get("runAsNonRoot") is True, where
            assert context.get("runAsUser", 1) != 0, where
            assert context.get("allowPrivilegeEscalation") is False, where
            assert context.get("readOnlyRootFilesystem") is True, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            requests = container.get("resources", {}).get("requests", {})
            assert {"cpu", "memory"} <= set(requests), where
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{where}: read-only root FS needs a writable /tmp"


def served_paths() -> dict[str, set[str]]:
    from gateway import app as gateway_app
    from serving.api import health

    gateway_source = Path(gateway_app.__file__).read_text()
    return {"gateway": set(re.findall(r'@app\.get\("(/[a-z/]*)"\)', gateway_source)),
            "server": {route.path for route in health.router.routes}}


def test_probes_hit_paths_the_code_serves(docs: list[dict]) -> None:
    paths = served_paths()
    assert {"/health", "/ready"} <= paths["gateway"] and {"/health", "/ready"} <= paths["server"]
    for doc in by_kind(docs, "Deployment"):
        component = doc["metadata"]["labels"]["app.kubernetes.io/component"]
        (container,) = doc["spec"]["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        expected = {"livenessProbe": "/health", "readinessProbe": "/ready"}
        if component == "server":
            expected["startupProbe"] = "/health"
        for probe, path in expected.items():
            handler = container[probe]["httpGet"]
            assert handler["path"] == path and handler["path"] in paths[component]
            assert handler["port"] in ports
        startup = container.get("startupProbe")
        if startup:
            budget = startup["periodSeconds"] * startup["failureThreshold"]
            assert budget >= 600, f"{budget} s is short for loading a model"
        assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"


def test_gateway_listens_where_its_probes_look(render: Render) -> None:
    docs = render()
    config = yaml.safe_load(find(docs, "ConfigMap", "prod-quiver-gateway")["data"]["gateway.yaml"])
    (container,) = find(docs, "Deployment", "prod-quiver-gateway")["spec"]["template"]["spec"][
        "containers"]
    assert container["ports"][0]["containerPort"] == config["port"]
    assert container["command"] == ["quiver", "gateway", "--config", "/etc/quiver/gateway.yaml"]


# -- network policies --------------------------------------------------------------------------

def selects(selector: dict, labels: dict) -> bool:
    return selector.get("matchLabels", {}).items() <= labels.items()


def test_network_policies_admit_only_the_intended_peers(render: Render) -> None:
    docs = render(EXAMPLE["gpu-vllm"])
    policies = {p["metadata"]["name"]: p for p in by_kind(docs, "NetworkPolicy")}
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
            for d in docs if d["kind"] in ("Deployment", "StatefulSet")}
    gateway, server = pods["prod-quiver-gateway"], pods["prod-quiver-server-stable"]
    redis = pods["prod-quiver-redis"]

    def peers_of(target: dict) -> list[dict]:
        return [peer for p in policies.values() if selects(p["spec"]["podSelector"], target)
                for rule in p["spec"]["ingress"] for peer in rule.get("from", [{}])]

    server_peers = peers_of(server)
    assert any(selects(p.get("podSelector", {}), gateway) and "namespaceSelector" not in p
               for p in server_peers)
    assert not any(p == {} for p in server_peers), "servers must not be open to everyone"
    assert any("namespaceSelector" in p for p in server_peers), "Prometheus scrapes servers"
    assert [selects(p["podSelector"], gateway) for p in peers_of(redis)] == [True]
    gateway_peers = peers_of(gateway)
    assert {"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "ingress-nginx"}}} in gateway_peers
    assert not any(selects(p.get("podSelector", {}), server) and p.get("podSelector")
                   for p in gateway_peers)


def test_namespace_is_the_release_namespace(render: Render) -> None:
    for doc in by_kind(render(EXAMPLE["gpu-vllm"]), "ServiceMonitor"):
        assert doc["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]


def test_helm_test_pod_checks_ready_and_models(render: Render) -> None:
    docs = render(EXAMPLE["canary"])
    (pod,) = by_kind(docs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = pod["spec"]["containers"][0]["args"][0]
    compile(script, "helm-test", "exec")
    assert '"/ready"' in script and '"/v1/models"' in script
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert json.loads(env["MODELS"]) == ["smollm2-135m-instruct"]


def test_server_settings_reach_the_server_as_it_parses_them(render: Render, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """Helm reads numbers as floats: a large integer must not arrive as `1.048576e+06`, and
    a map (vLLM's engine arguments) arrives as JSON."""
    from serving.settings import ServerSettings

    docs = render(sets=("serverDefaults.engine=vllm",
                        "serverDefaults.settings.max_num_batched_tokens=1048576",
                        "serverDefaults.settings.vllm_engine_args.seed=7"))
    (_, container), = server_containers(docs)
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["QUIVER_SERVER_MAX_NUM_BATCHED_TOKENS"] == "1048576"
    for name, value in env.items():
        if name.startswith("QUIVER_SERVER_"):
            monkeypatch.setenv(name, value)
    settings = ServerSettings(model=tmp_path, engine="vllm")
    assert settings.max_num_batched_tokens == 1048576
    assert settings.vllm_engine_args == {"seed": 7}


def test_gateway_fallbacks_render_into_the_route_and_load(render: Render, tmp_path: Path) -> None:
    from gateway.settings import load_settings

    docs = render(sets=("servers.big.enabled=true", "servers.big.weight=100",
                        "servers.big.model=big-model",
                        "gateway.fallbacks.smollm2-135m-instruct={big-model}"))
    config = tmp_path / "gateway.yaml"
    config.write_text(find(docs, "ConfigMap", "prod-quiver-gateway")["data"]["gateway.yaml"])
    routes = {m.name: m for m in load_settings(config).models}
    assert routes["smollm2-135m-instruct"].fallbacks == ["big-model"]
    assert routes["big-model"].fallbacks == []


def test_admission_settings_and_variant_slots_render_and_load(render: Render,
                                                              tmp_path: Path) -> None:
    """`gateway.config.admission` maps one-to-one onto `AdmissionSettings`; a variant's
    `gatewayMaxConcurrency` becomes its Service's slots, and 0 (the default) none at all."""
    from gateway.settings import load_settings

    def stable_slots(*sets: str):
        docs = render(sets=sets)
        config = tmp_path / "gateway.yaml"
        config.write_text(find(docs, "ConfigMap", "prod-quiver-gateway")["data"]["gateway.yaml"])
        settings = load_settings(config)
        (variant,) = settings.models[0].variants
        return settings, variant.max_concurrency_per_replica

    settings, slots = stable_slots()
    assert slots is None
    assert settings.admission.max_queue_per_tenant == 100
    settings, slots = stable_slots("servers.stable.gatewayMaxConcurrency=128",
                                   "gateway.config.admission.max_tenant_share=0.5")
    assert slots == 128
    assert settings.admission.max_tenant_share == 0.5
