"""`GatewaySettings`: everything `quiver gateway` is configured by.

A YAML file (`--config`) validated at start, with `QUIVER_GATEWAY_*` environment variables
overriding it (nested fields with `__`, e.g. `QUIVER_GATEWAY_CACHE__BACKEND=redis`). A bad
value fails start-up with a message that names its key (`models.0.variants.1.weight: ...`).
Helm values map one-to-one onto these fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

DEFAULT_KEY_STORE = ".quiver/keys.db"
# The native engine's default max_num_seqs: beyond it the engine queues calls itself (FIFO),
# so queueing them in the gateway instead costs no throughput and makes the order fair.
DEFAULT_MAX_CONCURRENCY_PER_REPLICA = 64


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VariantSettings(_Section):
    """One variant of a public model (e.g. `stable`, `canary`): a weight and its replicas."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    weight: float = Field(ge=0, le=100, description="share of traffic, percent")
    replicas: list[str] = Field(min_length=1, description="base URLs, e.g. http://host:8001")
    upstream_model: str | None = Field(
        None, description="model name the replicas serve (default: the public name)")
    api_key: SecretStr | None = Field(None, description="sent to the replicas as a Bearer key")
    balance: Literal["prefix", "least_outstanding"] = Field(
        "prefix", description="prefix: calls sharing a prompt prefix (or a session) go to the "
        "same replica, within a bounded load; least_outstanding: the least busy replica")
    discovery: Literal["static", "dns"] = Field(
        "static", description="static: each URL is one replica; dns: each URL names a host "
        "whose addresses (e.g. a Kubernetes headless Service's ready pods) are the replicas, "
        "re-resolved every discovery_interval_seconds")
    balance_load_factor: float = Field(
        1.5, ge=1.0, le=10.0, description="balance: prefix: a replica takes a call while "
        "its outstanding requests stay within this many times the average; over it the call "
        "spills to the next replica (higher: more prefix-cache hits, less even load)")

    max_concurrency_per_replica: int | None = Field(
        DEFAULT_MAX_CONCURRENCY_PER_REPLICA, ge=1, description="calls one replica takes at "
        "once (its engine's max_num_seqs); beyond it the gateway queues calls per tenant and "
        "starts them in a fair order (`admission`); null: unbounded, no queueing but per-key "
        "max_concurrency")

    @model_validator(mode="after")
    def _check_urls(self) -> VariantSettings:
        for url in self.replicas:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"replica {url!r} must be an http:// or https:// URL")
        return self


class ShadowSettings(_Section):
    """Mirror a share of a model's traffic to a variant and discard its answers."""

    variant: str
    percent: float = Field(ge=0, le=100)


class ModelRouteSettings(_Section):
    name: str = Field(min_length=1, description="public model name clients send")
    stable: str = Field("stable", description="the baseline variant canaries are judged by")
    variants: list[VariantSettings] = Field(min_length=1)
    shadow: ShadowSettings | None = None
    max_context_tokens: int | None = Field(
        None, ge=1, description="context length for token estimates of calls without "
        "max_tokens (default: the replicas' /v1/models max_model_len)")
    fallbacks: list[str] = Field(
        default_factory=list, description="models tried in order when this one cannot "
        "answer (no healthy replica, 5xx, timeout, prompt over its context)")

    @model_validator(mode="after")
    def _check_variants(self) -> ModelRouteSettings:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique, got {names}")
        if self.stable not in names:
            raise ValueError(f"stable variant {self.stable!r} is not one of {names}")
        if self.shadow is not None and self.shadow.variant not in names:
            raise ValueError(f"shadow variant {self.shadow.variant!r} is not one of {names}")
        if sum(v.weight for v in self.variants) <= 0:
            raise ValueError("at least one variant needs a weight above 0")
        return self


class QualitySettings(_Section):
    """Canaries judged by their answers: a share of stable's deterministic calls is replayed
    on each canary, off the client's path, and the two answers compared
    (`gateway.routing.quality`)."""

    enabled: bool = False
    sample_share: float = Field(0.1, ge=0, le=1, description="of stable's deterministic "
                                "calls (temperature 0, or seeded) replayed on each canary")
    min_agreement: float = Field(0.9, ge=0, le=1, description="a canary whose mean "
                                 "agreement over the window is lower is rolled back")
    min_samples: int = Field(10, ge=1, description="replays in the window before a verdict")
    max_tokens: int = Field(64, ge=1, description="cap on a replay's completion tokens")
    max_concurrency: int = Field(2, ge=1, description="replays in flight at once")
    max_queue: int = Field(64, ge=1, description="replays waiting; more are dropped")


class RollbackSettings(_Section):
    """Automatic canary rollback: a variant's weight drops to 0 when it does worse than stable."""

    enabled: bool = True
    window_seconds: float = Field(60.0, gt=0)
    min_samples: int = Field(20, ge=1)
    max_error_rate_increase: float = Field(0.05, ge=0, le=1,
                                           description="absolute, e.g. 0.05 = 5 points")
    max_p95_latency_ratio: float = Field(2.0, ge=1, description="of time to first token "
                                         "and of inter-token latency, each against stable's")
    max_key_share: float = Field(0.2, gt=0, le=1, description="most of a judging window "
                                 "one API key's calls may fill (1 = no cap)")
    quality: QualitySettings = QualitySettings()


class RoutingSettings(_Section):
    """Where the route state (weights, rollbacks, judging windows) lives."""

    backend: Literal["memory", "redis"] = Field(
        "memory", description="memory: this gateway's own; redis: one state for every "
        "gateway replica (through redis_url), which survives restarts")
    sync_seconds: float = Field(0.25, gt=0, le=5, description="redis: how often a replica "
                                "syncs (an admin change is obeyed by all within about this)")


class TimeoutSettings(_Section):
    connect_seconds: float = Field(2.0, gt=0)
    first_byte_seconds: float = Field(120.0, gt=0)
    idle_seconds: float = Field(60.0, gt=0, description="between two stream chunks")
    total_seconds: float = Field(600.0, gt=0)
    keep_alive_seconds: float = Field(30.0, gt=0, description="idle upstream connections "
                                      "are closed after this (keep it below the servers' "
                                      "keep_alive_timeout_seconds)")


class RetrySettings(_Section):
    max_attempts: int = Field(3, ge=1, le=10)
    backoff_base_seconds: float = Field(0.05, ge=0)
    backoff_max_seconds: float = Field(1.0, ge=0)


class HealthCheckSettings(_Section):
    enabled: bool = True
    path: str = "/ready"
    interval_seconds: float = Field(2.0, gt=0)
    timeout_seconds: float = Field(1.0, gt=0)
    unhealthy_threshold: int = Field(2, ge=1)
    healthy_threshold: int = Field(1, ge=1)


class CircuitBreakerSettings(_Section):
    failure_threshold: int = Field(5, ge=1, description="consecutive failures that open it")
    reset_seconds: float = Field(10.0, gt=0, description="open this long, then one trial")


class RateLimitSettings(_Section):
    backend: Literal["memory", "redis"] = "memory"
    default_rpm: int | None = Field(None, ge=1, description="for keys without their own rpm")
    default_tpm: int | None = Field(None, ge=1, description="for keys without their own tpm")
    default_max_tokens: int = Field(256, ge=1,
                                    description="completion estimate when max_tokens is absent "
                                    "and the model's context length is unknown")
    failure_mode: Literal["fail_open", "fail_closed"] = Field(
        "fail_open", description="redis backend unreachable: admit calls unchecked "
        "(fail_open) or refuse them with 503 (fail_closed)")


class AdmissionSettings(_Section):
    """Fair sharing of saturated upstreams between tenants (`gateway.admission`); a variant's
    slots are its `max_concurrency_per_replica` x its usable replicas."""

    max_queue_per_tenant: int = Field(100, ge=1, description="calls of one tenant waiting "
                                      "for one variant; beyond it a 429")
    queue_timeout_seconds: float = Field(30.0, gt=0, description="longest wait for a slot; "
                                         "then a 503 upstreams_saturated (or a 429 when the "
                                         "key's own max_concurrency held it back)")
    max_tenant_share: float = Field(1.0, gt=0, le=1, description="most of a variant's slots "
                                    "one tenant may hold at once: below 1 keeps slots free "
                                    "for other tenants' calls to start at once (isolation), "
                                    "at the cost of a lone tenant's throughput")
    spare_slots_per_tenant: int = Field(1, ge=0, description="a tenant beyond its fair "
                                        "share (slots / active tenants) takes a free slot "
                                        "only while this many stay free per other active "
                                        "tenant, so their next call starts at once; 0: "
                                        "fill every slot")
    active_tenant_seconds: float = Field(10.0, gt=0, description="a tenant counts as active "
                                         "while it holds or waits for a slot and this long "
                                         "after its last call arrived")
    retry_after_seconds: float = Field(1.0, gt=0, description="Retry-After of the 503")


class CacheSettings(_Section):
    enabled: bool = True
    backend: Literal["memory", "redis"] = "memory"
    max_bytes: int = Field(256 * 1024 * 1024, ge=1024, description="memory backend cap")
    max_entry_bytes: int = Field(1024 * 1024, ge=1024)
    ttl_seconds: float = Field(3600.0, gt=0)
    cache_nondeterministic: bool = Field(
        False, description="also cache requests with temperature > 0 and no seed")


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QUIVER_GATEWAY_", env_nested_delimiter="__",
                                      extra="forbid", protected_namespaces=())

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="serve /metrics (and only it) on this port, for "
        "Prometheus; on the main port /metrics needs the admin key")
    models: list[ModelRouteSettings] = Field(min_length=1)
    key_store: str = Field(DEFAULT_KEY_STORE,
                           description="SQLite file path, or a redis:// URL")
    admin_key: SecretStr | None = Field(None, description="guards /admin; unset = no admin API")
    redis_url: str | None = Field(None, description="for rate limits, cache and route "
                                  "state in Redis")
    redis_timeout_seconds: float = Field(0.5, gt=0, description="bound on every Redis call "
                                         "(connect, reply, a free pooled connection)")
    key_refresh_seconds: float = Field(1.0, gt=0)
    discovery_interval_seconds: float = Field(
        5.0, gt=0, description="how often variants with discovery: dns re-resolve")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    # HTTP-level limits (common.http_limits), the same fields as the model server's
    max_header_bytes: int = Field(32 * 1024, ge=1024, description="request line + headers")
    header_timeout_seconds: float = Field(10.0, gt=0, description="until a request's "
                                          "headers are in; then the connection is closed")
    keep_alive_timeout_seconds: float = Field(75.0, gt=0, description="idle keep-alive "
                                              "connections close after this (keep it above "
                                              "a load balancer's idle timeout)")
    max_connections: int = Field(4096, ge=1, description="beyond it a request gets 503")
    backlog: int = Field(2048, ge=1, description="listen() queue of unaccepted connections")
    rate_limit: RateLimitSettings = RateLimitSettings()
    cache: CacheSettings = CacheSettings()
    admission: AdmissionSettings = AdmissionSettings()
    rollback: RollbackSettings = RollbackSettings()
    routing: RoutingSettings = RoutingSettings()
    timeouts: TimeoutSettings = TimeoutSettings()
    retries: RetrySettings = RetrySettings()
    health_checks: HealthCheckSettings = HealthCheckSettings()
    circuit_breaker: CircuitBreakerSettings = CircuitBreakerSettings()
    log_json: bool = False
    shutdown_grace_seconds: float = Field(30.0, ge=0)

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                   init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides the YAML file (passed as init kwargs).
        return env_settings, init_settings

    @model_validator(mode="after")
    def _check(self) -> GatewaySettings:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        check_fallbacks({m.name: m.fallbacks for m in self.models})
        needs_redis = [name for name, backend in (("rate_limit", self.rate_limit.backend),
                                                  ("cache", self.cache.backend),
                                                  ("routing", self.routing.backend))
                       if backend == "redis"]
        if needs_redis and not self.redis_url:
            raise ValueError(f"{', '.join(needs_redis)} backend is redis but redis_url is unset")
        if self.metrics_port is not None and self.metrics_port == self.port:
            raise ValueError(f"metrics_port must differ from port ({self.port})")
        return self


def check_fallbacks(fallbacks: dict[str, list[str]]) -> None:
    """Each fallback names another configured model, once, and no chain leads back."""
    for model, names in fallbacks.items():
        for name in names:
            if name not in fallbacks:
                raise ValueError(f"model {model!r} falls back to {name!r}, which is not a "
                                 f"configured model ({', '.join(fallbacks)})")
        if model in names or len(set(names)) != len(names):
            raise ValueError(f"model {model!r} fallbacks {names} must not repeat a model nor "
                             "name the model itself")
    for model in fallbacks:
        _walk(model, fallbacks, [model])


def _walk(model: str, fallbacks: dict[str, list[str]], path: list[str]) -> None:
    for name in fallbacks[model]:
        if name in path:
            cycle = " -> ".join([*path[path.index(name):], name])
            raise ValueError(f"fallbacks form a cycle: {cycle}")
        _walk(name, fallbacks, [*path, name])


class ConfigError(ValueError):
    """The gateway config is unreadable or invalid; the message names the bad key."""


def format_validation_error(source: str, exc: ValidationError) -> str:
    lines = [f"invalid gateway config {source}:"]
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        lines.append(f"  {where}: {error['msg']}")
    return "\n".join(lines)


def load_settings(path: Path | None = None, **overrides: Any) -> GatewaySettings:
    """Read the YAML file (if any), apply env overrides and `overrides`, validate."""
    data: dict[str, Any] = {}
    source = str(path) if path is not None else "(environment)"
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read gateway config {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"gateway config {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"gateway config {path} must be a mapping at the top level")
        data = loaded or {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return GatewaySettings(**data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc)) from exc
    except SettingsError as exc:  # an env override that is not valid JSON for its field
        raise ConfigError(f"invalid gateway config (environment): {exc}") from exc
