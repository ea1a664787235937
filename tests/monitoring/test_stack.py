"""The monitoring assets against the running code: `quiver up --monitoring` starts the tiny
model as stable and canary, the gateway and a real Prometheus with Quiver's rules; mixed
traffic goes through (streamed, plain, completions, cached, rate-limited, refused, invalid);
then every dashboard panel's query, every template variable, every recording rule and every
metric an alert reads must have data in Prometheus. No panel may show "No data" for the
traffic it describes."""

from __future__ import annotations

import concurrent.futures
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway.conftest import CHILD_ENV, create_key, free_port, wait_until
from tests.monitoring.promql import metric_names, panel_queries, rules, variable_queries
from tests.quiver.test_up import read_log, start_up, stop

pytestmark = pytest.mark.slow
UP_KEY = "qk-monitoring-test-key-with-variant-pinning"
SCRAPE = "1s"


@dataclass
class Stack:
    gateway: str
    prometheus: str
    model: str
    store: str
    metrics: str               # the gateway's metrics_port: what Prometheus scrapes

    def query(self, promql: str) -> list[dict]:
        reply = httpx.get(f"{self.prometheus}/api/v1/query", params={"query": promql},
                          timeout=30)
        body = reply.json()
        assert reply.status_code == 200 and body["status"] == "success", (promql, body)
        return body["data"]["result"]


@pytest.fixture(scope="module")
def stack(tiny_model_dir, tmp_path_factory) -> Iterator[Stack]:
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is not installed (make system-deps installs it)")
    tmp_path = tmp_path_factory.mktemp("monitoring-stack")
    prometheus_port, metrics_port = free_port(), free_port()
    process, log, port = start_up(
        tmp_path, "--model", str(tiny_model_dir), "--canary-model", str(tiny_model_dir),
        "--canary-weight", "50", "--monitoring", "--prometheus-port", str(prometheus_port),
        "--metrics-port", str(metrics_port), "--scrape-interval", SCRAPE,
        env={"QUIVER_API_KEY": UP_KEY, "QUIVER_GATEWAY_ROLLBACK__QUALITY__SAMPLE_SHARE": "1",
             "QUIVER_GATEWAY_ADMISSION__MAX_QUEUE_PER_TENANT": "1", **CHILD_ENV})
    try:
        wait_until(lambda: "Prometheus: http://" in read_log(log) or process.poll() is not None,
                   240, "quiver up --monitoring")
        assert process.poll() is None, read_log(log)[-3000:]
        wait_until(lambda: _is_ready(f"http://127.0.0.1:{port}/ready"), 30, "the gateway")
        yield Stack(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{prometheus_port}",
                    tiny_model_dir.name, str(tmp_path / "keys.db"),
                    f"http://127.0.0.1:{metrics_port}")
    finally:
        output = read_log(log)
        stop(process, log)
    assert process.returncode == 0, output[-3000:]


def _is_ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def call(stack: Stack, key: str, path: str, body: dict, **headers: str) -> httpx.Response:
    return httpx.post(f"{stack.gateway}{path}", json={"model": stack.model, **body},
                      headers={"authorization": f"Bearer {key}", **headers}, timeout=60)


def chat(stack: Stack, key: str, text: str, *, stream: bool = False, variant: str = "",
         temperature: float = 0.0) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 6,
            "temperature": temperature, "stream": stream}
    headers = {"x-quiver-variant": variant} if variant else {}
    response = call(stack, key, "/v1/chat/completions", body, **headers)
    if stream:
        assert response.text.rstrip().endswith("data: [DONE]"), response.text[-300:]
    return response


def gateway_sample(stack: Stack, name: str, **labels: str) -> float:
    text = httpx.get(f"{stack.metrics}/metrics", timeout=30).text
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples if sample.name == name
               and all(sample.labels.get(k) == v for k, v in labels.items()))


def overrun_a_concurrency_cap(stack: Stack, key: str) -> list[int]:
    """A key with max_concurrency 1 (and tenant queues of 1): one call runs, one waits, a
    third is refused; returns the three statuses. The calls are long (1500 tokens, EOS
    ignored: seconds on the tiny model) so the first still runs when the third comes."""
    body = {"messages": [{"role": "user", "content": "long"}], "max_tokens": 1500,
            "ignore_eos": True}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = pool.submit(call, stack, key, "/v1/chat/completions", body)
        wait_until(lambda: gateway_sample(stack, "quiver_gateway_key_in_flight_requests",
                                          key="capped") == 1, 30, "the capped key's call")
        waiting = pool.submit(call, stack, key, "/v1/chat/completions", body)
        wait_until(lambda: gateway_sample(stack, "quiver_gateway_admission_queued_requests")
                   == 1, 30, "the capped key's second call queued")
        refused = call(stack, key, "/v1/chat/completions", body)
        return [running.result().status_code, waiting.result().status_code,
                refused.status_code]


def send_mixed_traffic(stack: Stack, *, rounds: int = 4, pause_s: float = 2.0) -> dict[str, int]:
    """Every kind of request the dashboards describe, in rounds a few scrapes apart (a
    counter's rate needs to be seen rising); returns the count of each status."""
    tenant = create_key(stack.store, "tenant-a", budget_tokens=1_000_000)
    limited = create_key(stack.store, "tenant-b", rpm=2, tpm=100_000)
    capped = create_key(stack.store, "capped", max_concurrency=1)
    time.sleep(1.5)  # the gateway reloads keys every second
    statuses: dict[str, int] = {}

    def count(response: httpx.Response) -> httpx.Response:
        statuses[str(response.status_code)] = statuses.get(str(response.status_code), 0) + 1
        return response

    for round_ in range(rounds):
        for variant in ("stable", "canary"):
            count(chat(stack, UP_KEY, f"stream {round_} to {variant}", stream=True,
                       variant=variant, temperature=1.0))
            count(chat(stack, UP_KEY, f"plain {round_} to {variant}", variant=variant,
                       temperature=1.0))
            count(call(stack, UP_KEY, "/v1/completions", {"prompt": "Once upon",
                                                         "max_tokens": 5},
                       **{"x-quiver-variant": variant}))
        # deterministic, answered by stable: replayed on the canary (rollback.quality)
        count(chat(stack, UP_KEY, f"greedy {round_}", variant="stable"))
        # deterministic and repeated: a miss, then hits
        cached = count(chat(stack, tenant, "What is the capital of France?"))
        assert cached.headers["x-quiver-cache"] == ("miss" if round_ == 0 else "hit")
        count(chat(stack, tenant, f"tenant call {round_}", temperature=1.0, stream=True))
        for i in range(2):  # rpm 2: the first round passes, the rest is refused
            count(chat(stack, limited, f"limited {round_} {i}", temperature=1.0))
        count(chat(stack, "qk-not-a-key", "refused"))
        count(call(stack, UP_KEY, "/v1/chat/completions", {"messages": "not a list"}))
        count(httpx.post(f"{stack.gateway}/v1/chat/completions", timeout=30,
                         headers={"authorization": f"Bearer {UP_KEY}"},
                         json={"model": "no-such-model", "messages": []}))
        if round_ == 0:
            for status in overrun_a_concurrency_cap(stack, capped):
                statuses[str(status)] = statuses.get(str(status), 0) + 1
        time.sleep(pause_s)
    return statuses


@pytest.fixture(scope="module")
def traffic(stack) -> dict[str, int]:
    statuses = send_mixed_traffic(stack)
    routed = _gateway_requests(stack)
    assert routed >= 30
    wait_until(lambda: _scraped_requests(stack) >= routed, 60,
               "Prometheus seeing the gateway's requests")
    time.sleep(3)  # a few more scrapes and rule evaluations after the last request
    return statuses


def _gateway_requests(stack: Stack) -> float:
    """Routed requests as the gateway's own /metrics counts them."""
    text = httpx.get(f"{stack.metrics}/metrics", timeout=30).text
    return sum(sample.value for family in text_string_to_metric_families(text)
               if family.name == "quiver_gateway_requests" for sample in family.samples
               if sample.name == "quiver_gateway_requests_total")


def _scraped_requests(stack: Stack) -> float:
    result = stack.query("sum(quiver_gateway_requests_total)")
    return float(result[0]["value"][1]) if result else 0.0


def has_numbers(result: list[dict]) -> bool:
    return any(not math.isnan(float(series["value"][1])) for series in result)


def test_the_traffic_was_mixed(traffic):
    assert traffic["200"] >= 4 * 8 + 2
    assert traffic["429"] == 3 * 2 + 1   # rpm, and one call over a concurrency cap
    assert traffic["401"] == 4
    assert traffic.get("400", 0) + traffic.get("404", 0) + traffic.get("422", 0) >= 2


def test_prometheus_scrapes_every_part_of_the_stack(stack, traffic):
    targets = httpx.get(f"{stack.prometheus}/api/v1/targets", timeout=30).json()
    active = targets["data"]["activeTargets"]
    assert sorted(t["labels"]["job"] for t in active) == ["quiver-gateway", "quiver-server",
                                                        "quiver-server"]
    assert all(t["health"] == "up" for t in active), active


def test_every_dashboard_panel_shows_data(stack, traffic):
    empty = [f"{q.dashboard} / {q.panel}: {q.promql}" for q in panel_queries()
             if not has_numbers(stack.query(q.promql))]
    assert empty == [], "panels with no data:\n" + "\n".join(empty)


def test_every_template_variable_lists_values(stack, traffic):
    for uid, name, query in variable_queries():
        assert stack.query(query), f"{uid}: ${name} would list nothing ({query})"
    variants = {s["metric"]["variant"] for s in stack.query(
        "count by (variant) (quiver_gateway_route_weight_percent)")}
    assert variants == {"stable", "canary"}


def test_every_rule_is_loaded_healthy_and_every_recording_rule_has_data(stack, traffic):
    groups = httpx.get(f"{stack.prometheus}/api/v1/rules", timeout=30).json()["data"]["groups"]
    loaded = {rule["name"]: rule for group in groups for rule in group["rules"]}
    expected = [rule.get("record") or rule.get("alert") for rule in rules()]
    assert sorted(loaded) == sorted(expected)
    assert [name for name, rule in loaded.items() if rule["health"] != "ok"] == []

    def recorded() -> list[str]:
        return [rule["record"] for rule in rules() if "record" in rule
                and not has_numbers(stack.query(rule["record"]))]

    wait_until(lambda: not recorded(), 15, "every recording rule's series")
    for rule in rules():
        if "record" in rule:
            assert has_numbers(stack.query(rule["expr"])), rule["record"]


def test_alerts_read_only_series_the_stack_exports(stack, traffic):
    names = set(httpx.get(f"{stack.prometheus}/api/v1/label/__name__/values",
                          timeout=30).json()["data"])
    names |= {rule["record"] for rule in rules() if "record" in rule}
    for rule in rules():
        if "alert" in rule:
            missing = metric_names(rule["expr"]) - names
            assert missing == set(), f"{rule['alert']} reads {missing}, which nothing exports"


def test_no_alert_fires_on_a_healthy_stack(stack, traffic):
    alerts = httpx.get(f"{stack.prometheus}/api/v1/alerts", timeout=30).json()
    assert [a["labels"]["alertname"] for a in alerts["data"]["alerts"]
            if a["state"] == "firing"] == []


def test_the_gateways_metrics_stay_off_its_public_port(stack):
    """Prometheus reads the metrics port; the API port shows no key names or URLs."""
    assert httpx.get(f"{stack.gateway}/metrics", timeout=30).status_code == 404
    assert httpx.get(f"{stack.metrics}/v1/models", timeout=30).status_code == 404
