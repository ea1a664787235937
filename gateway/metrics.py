"""The gateway's Prometheus metrics: `quiver_gateway_*`, units in their names.

One `GatewayMetrics` per app, on the app's own registry (no global state), so several
gateways can live in one process (tests). Labels carry a key's *name*, never the key; yet
they name every key, its budget and the replicas' internal URLs, so the exposition is
served where only Prometheus reaches it: `metrics_endpoint` on the `metrics_port`, or on
the main port with the admin key.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Receive, Scope, Send

from common.asgi import DURATION_BUCKETS, HttpMetrics
from common.build_info import register_build_info
from common.errors import send_api_error
from gateway.errors import NotFoundError

if TYPE_CHECKING:
    from gateway.keyring import KeyRing

TTFB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.http = HttpMetrics(r, prefix="quiver_gateway")
        register_build_info(r, component="gateway")
        # routed model traffic
        self.requests = Counter(
            "quiver_gateway_requests_total",
            "Routed model requests by model, variant, key name and HTTP status",
            ["model", "variant", "key", "status"], registry=r)
        self.request_duration = Histogram(
            "quiver_gateway_request_duration_seconds",
            "Routed request duration, until the last byte", ["model", "variant"],
            buckets=DURATION_BUCKETS, registry=r)
        self.time_to_first_byte = Histogram(
            "quiver_gateway_time_to_first_byte_seconds",
            "Time until the upstream's first response byte", ["model", "variant"],
            buckets=TTFB_BUCKETS, registry=r)
        self.time_to_first_token = Histogram(
            "quiver_gateway_time_to_first_token_seconds",
            "Streamed requests: time until the first event carrying generated text",
            ["model", "variant"], buckets=TTFB_BUCKETS, registry=r)
        self.tokens = Counter(
            "quiver_gateway_tokens_total", "Tokens used, by key name, model, variant and kind",
            ["key", "model", "variant", "kind"], registry=r)
        self.stream_errors = Counter(
            "quiver_gateway_stream_errors_total",
            "Streams ended by an upstream failure after they started", ["model", "variant"],
            registry=r)
        # auth, limits, cache
        self.auth_failures = Counter(
            "quiver_gateway_auth_failures_total", "Rejected requests by reason", ["reason"],
            registry=r)
        self.rate_limited = Counter(
            "quiver_gateway_rate_limited_total", "429s by key name and limit kind",
            ["key", "kind"], registry=r)
        self.cache_requests = Counter(
            "quiver_gateway_cache_requests_total", "Cache lookups by result (hit|miss|bypass)",
            ["result"], registry=r)
        for result in ("hit", "miss", "bypass"):
            self.cache_requests.labels(result)
        self.cache_entries = Gauge(
            "quiver_gateway_cache_entries", "Entries in the memory cache", registry=r)
        self.cache_bytes = Gauge(
            "quiver_gateway_cache_size_bytes", "Bytes held by the memory cache", registry=r)
        # routing
        self.route_weight = Gauge(
            "quiver_gateway_route_weight_percent", "Current traffic weight of each variant",
            ["model", "variant"], registry=r)
        self.rollbacks = Counter(
            "quiver_gateway_rollbacks_total", "Automatic canary rollbacks",
            ["model", "variant", "reason"], registry=r)
        self.fallbacks = Counter(
            "quiver_gateway_fallbacks_total",
            "Calls passed on to a fallback model because the one before could not answer, by "
            "routed model, the fallback tried and reason (unavailable|error|timeout|"
            "context_length)", ["model", "fallback", "reason"], registry=r)
        self.canary_agreement = Gauge(
            "quiver_gateway_canary_agreement_ratio", "Mean token agreement of a canary's "
            "replayed answers with stable's over the judging window (0..1)",
            ["model", "variant"], registry=r)
        self.quality_replays = Counter(
            "quiver_gateway_quality_replays_total", "Stable calls replayed on a canary, by "
            "outcome (compared|invalid|skipped|error|dropped)", ["model", "variant", "outcome"],
            registry=r)
        self.shadow_requests = Counter(
            "quiver_gateway_shadow_requests_total", "Mirrored requests by outcome",
            ["model", "variant", "outcome"], registry=r)
        # upstreams
        self.upstream_requests = Counter(
            "quiver_gateway_upstream_requests_total",
            "Attempts against replicas by outcome (ok|http_error|connect_error|timeout|"
            "protocol_error)", ["model", "variant", "replica", "outcome"], registry=r)
        self.upstream_duration = Histogram(
            "quiver_gateway_upstream_request_duration_seconds",
            "One attempt against a replica, until its response body is done",
            ["model", "variant", "replica"], buckets=DURATION_BUCKETS, registry=r)
        self.balance_decisions = Counter(
            "quiver_gateway_balance_decisions_total",
            "Replica choices of prefix-balanced variants: preferred (the affinity key's first "
            "usable replica), spill (a later one: those before were over the load bound), "
            "unkeyed (no key: the least busy)", ["model", "variant", "outcome"], registry=r)
        self.upstream_retries = Counter(
            "quiver_gateway_upstream_retries_total", "Attempts retried on another replica",
            ["model", "variant"], registry=r)
        self.upstream_healthy = Gauge(
            "quiver_gateway_upstream_healthy", "1 when the replica passes health checks",
            ["model", "variant", "replica"], registry=r)
        self.upstream_outstanding = Gauge(
            "quiver_gateway_upstream_outstanding_requests", "In-flight requests per replica",
            ["model", "variant", "replica"], registry=r)
        self.circuit_open = Gauge(
            "quiver_gateway_circuit_open", "1 while the replica's circuit breaker is open",
            ["model", "variant", "replica"], registry=r)
        self._add_shared_state_metrics(r)
        self._add_admission_metrics(r)

    def _add_shared_state_metrics(self, r: CollectorRegistry) -> None:
        """The stores shared by gateway replicas (Redis) and how they fail."""
        self.rate_limit_failures = Counter(
            "quiver_gateway_rate_limit_failures_total",
            "Rate-limit decisions taken without the limiter's backend (Redis unreachable), by "
            "failure mode: fail_open admitted them unchecked, fail_closed refused them (503)",
            ["mode"], registry=r)
        self.route_state_up = Gauge(
            "quiver_gateway_route_state_up",
            "1 while this replica's route state is in sync with its backend (memory: always); "
            "0 while the shared one (Redis) is out of reach and it routes by the last state "
            "it read", registry=r)
        self.route_state_age = Gauge(
            "quiver_gateway_route_state_age_seconds",
            "Seconds since this replica last synced the shared route state (memory: 0)",
            registry=r)
        self.route_state_up.set(1)
        self.rate_limit_fail_open = Gauge(
            "quiver_gateway_rate_limit_fail_open",
            "1 when the rate limiter admits calls unchecked while its backend is unreachable "
            "(rate_limit.failure_mode fail_open), 0 when it refuses them", registry=r)

    def _add_admission_metrics(self, r: CollectorRegistry) -> None:
        """Fair sharing of saturated upstreams (`gateway.admission`)."""
        self.admission_queue_depth = Gauge(
            "quiver_gateway_admission_queued_requests",
            "Calls waiting for a slot of their variant, by priority class",
            ["model", "variant", "priority"], registry=r)
        self.admission_wait = Histogram(
            "quiver_gateway_admission_wait_seconds",
            "Time a call waited for a slot of its variant before it went upstream (0 when "
            "it started at once), by priority class", ["model", "variant", "priority"],
            buckets=(0.0,) + TTFB_BUCKETS, registry=r)
        self.admission_rejections = Counter(
            "quiver_gateway_admission_rejections_total",
            "Calls refused by admission, by key name and reason (queue_full: the tenant's "
            "queue was full, 429; queue_timeout: no slot within queue_timeout_seconds, 503; "
            "concurrency_limit: the key's max_concurrency held it back, 429)",
            ["model", "variant", "key", "reason"], registry=r)
        self.key_in_flight = Gauge(
            "quiver_gateway_key_in_flight_requests",
            "Calls of each key holding an upstream slot now (what max_concurrency caps)",
            ["key"], registry=r)

    def watch_rate_limiter(self, failure_mode: str) -> None:
        """The configured failure mode, as a gauge and a zero counter."""
        self.rate_limit_failures.labels(failure_mode)
        self.rate_limit_fail_open.set(int(failure_mode == "fail_open"))


class KeyLimitsCollector(Collector):
    """Each active key's limits and budget use, read from the keyring at scrape time (so a
    revoked key's series end with it): the tenants dashboard's "usage against limits"."""

    def __init__(self, keyring: KeyRing, *, default_rpm: int | None,
                 default_tpm: int | None) -> None:
        self.keyring = keyring
        self.default_rpm, self.default_tpm = default_rpm, default_tpm

    def collect(self) -> Iterator[Metric]:
        limits = GaugeMetricFamily(
            "quiver_gateway_key_rate_limit_per_minute",
            "Rate limit of each key (its own, else the gateway default) by kind",
            labels=["key", "kind"])
        budget = GaugeMetricFamily("quiver_gateway_key_budget_tokens",
                                   "Lifetime token budget of keys that have one", labels=["key"])
        used = GaugeMetricFamily("quiver_gateway_key_used_tokens",
                                 "Tokens each key has spent (against its budget)",
                                 labels=["key"])
        for key in self.keyring.snapshot():
            for kind, value in (("requests", key.rpm or self.default_rpm),
                                ("tokens", key.tpm or self.default_tpm)):
                if value is not None:
                    limits.add_metric([key.name, kind], value)
            if key.budget_tokens is not None:
                budget.add_metric([key.name], key.budget_tokens)
            used.add_metric([key.name], self.keyring.used_tokens(key))
        yield from (limits, budget, used)


def metrics_endpoint(registry: CollectorRegistry) -> ASGIApp:
    """The app of the metrics port: `GET /metrics` and nothing else."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] != "/metrics" or scope["method"] not in ("GET", "HEAD"):
            await send_api_error(send, NotFoundError(
                f"This port serves GET /metrics only, not {scope['method']} {scope['path']}."))
            return
        body = generate_latest(registry)
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", CONTENT_TYPE_LATEST.encode()),
            (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body",
                    "body": b"" if scope["method"] == "HEAD" else body})

    return app


class KeyStoreCollector(Collector):
    """Whether keys come fresh from the store: while it is unreachable the gateway serves
    its last snapshot (revocations made meanwhile are not applied yet) and says so."""

    def __init__(self, keyring: KeyRing) -> None:
        self.keyring = keyring

    def collect(self) -> Iterator[Metric]:
        age = self.keyring.snapshot_age_s()
        yield GaugeMetricFamily(
            "quiver_gateway_key_snapshot_age_seconds",
            "Seconds since the API keys were last loaded from the key store (refreshed every "
            "key_refresh_seconds; growing: the store is unreachable, revocations wait)",
            value=age if age is not None else float("nan"))
        yield GaugeMetricFamily(
            "quiver_gateway_key_store_up",
            "1 when the last reload of API keys from the key store succeeded",
            value=int(self.keyring.is_store_up))
