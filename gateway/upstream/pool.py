"""`UpstreamPool`: the model-server replicas of every (model, variant), and the requests
the gateway sends them.

A request goes to a healthy replica whose circuit lets it through, chosen by the variant's
`balance` (`gateway.upstream.balance`): for `prefix`, the first of its affinity key's
rendezvous ranking within a bounded load; for `least_outstanding` (or a call without a key),
the one with the fewest outstanding requests (ties broken at random). Connect errors, a
connection dropped before the whole answer, malformed HTTP and 502/503 answers are retried,
with exponential backoff and jitter, on another replica when there is one (a prefix-balanced
call on the next of its ranking); any other answer (200, 4xx, 500, 504) is returned as it is.
Time limits: `connect_seconds` to connect, `first_byte_seconds` until the response headers,
`total_seconds` for everything, and (streams) `idle_seconds` per chunk.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp

from gateway.errors import (
    GatewayError,
    NotFoundError,
    NoUpstreamError,
    UpstreamError,
    UpstreamTimeoutError,
)
from gateway.metrics import GatewayMetrics
from gateway.settings import GatewaySettings
from gateway.upstream.balance import choose_by_prefix, choose_least_outstanding
from gateway.upstream.discovery import DnsDiscovery
from gateway.upstream.health import HealthChecker
from gateway.upstream.replica import Outcome, Replica, status_outcome
from gateway.upstream.stream import (
    UpstreamStream,
    UpstreamStreamError,
    describe_transport_error,
    response_headers,
)

__all__ = ["UpstreamPool", "UpstreamResult", "UpstreamStream", "UpstreamStreamError"]

logger = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({502, 503})
FORWARDED_HEADERS = frozenset({"content-type", "accept", "x-request-id", "traceparent",
                               "tracestate"})
T = TypeVar("T")


@dataclass(frozen=True)
class UpstreamResult:
    status: int
    headers: dict[str, str]  # lower-case names, hop-by-hop dropped
    body: bytes
    replica: str             # the base URL that answered
    attempts: int


@dataclass(frozen=True)
class _Call:
    model: str
    variant: str
    path: str
    body: bytes
    headers: dict[str, str]  # what goes upstream
    deadline: float          # loop time
    affinity: str | None     # what keeps it with others on one replica (balance: prefix)

    @property
    def description(self) -> str:
        return f"{self.model}/{self.variant}"


class _AttemptFailed(Exception):
    def __init__(self, outcome: Outcome, detail: str, *, is_retryable: bool,
                 result: Any = None) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.detail = detail
        self.is_retryable = is_retryable
        self.result = result  # a whole answer to fall back on (fetch, 502/503)


class UpstreamPool:
    def __init__(self, settings: GatewaySettings, metrics: GatewayMetrics, *,
                 clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self._settings = settings
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._replicas: dict[tuple[str, str], list[Replica]] = {}
        self._api_keys: dict[tuple[str, str], str | None] = {}
        self._is_prefix_balanced: dict[tuple[str, str], bool] = {}
        self._load_factors: dict[tuple[str, str], float] = {}
        self._clock = clock
        self._replica_args: dict[tuple[str, str], dict[str, Any]] = {}
        discovered: dict[tuple[str, str], list[str]] = {}
        self._replica_slots: dict[tuple[str, str], int | None] = {}
        for route in settings.models:
            for variant in route.variants:
                key = (route.name, variant.name)
                self._is_prefix_balanced[key] = variant.balance == "prefix"
                self._load_factors[key] = variant.balance_load_factor
                self._replica_slots[key] = variant.max_concurrency_per_replica
                if variant.balance == "prefix":
                    for outcome in ("preferred", "spill", "unkeyed"):  # zeros
                        metrics.balance_decisions.labels(route.name, variant.name, outcome)
                self._api_keys[key] = (variant.api_key.get_secret_value()
                                       if variant.api_key else None)
                headers = ({"authorization": f"Bearer {self._api_keys[key]}"}
                           if self._api_keys[key] else {})
                self._replica_args[key] = {"upstream_model": variant.upstream_model,
                                           "headers": headers}
                if variant.discovery == "dns":
                    discovered[key] = list(variant.replicas)
                    self._replicas[key] = []  # until the names resolve, at start
                else:
                    self._replicas[key] = [self._new_replica(key, url)
                                           for url in variant.replicas]
        self._discovery = (DnsDiscovery(discovered, apply=self.set_replicas,
                                        interval_seconds=settings.discovery_interval_seconds)
                           if discovered else None)
        self._session: aiohttp.ClientSession | None = None
        self._probe_session: aiohttp.ClientSession | None = None
        self._health: HealthChecker | None = None

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if self._session is not None:
            return
        connector = aiohttp.TCPConnector(
            limit=4096, limit_per_host=0,
            keepalive_timeout=self._settings.timeouts.keep_alive_seconds)
        timeout = aiohttp.ClientTimeout(total=None,
                                        sock_connect=self._settings.timeouts.connect_seconds)
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout)
        if self._settings.health_checks.enabled:
            # Probes get their own pool: aiohttp reuses the oldest idle connection first,
            # so a probe every few seconds would keep a burst's connections alive for ever.
            self._probe_session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit_per_host=1,
                    keepalive_timeout=self._settings.timeouts.keep_alive_seconds),
                timeout=timeout)
            replicas = [r for group in self._replicas.values() for r in group]
            self._health = HealthChecker(replicas, self._settings.health_checks,
                                         self._probe_session)
            self._health.start()
        if self._discovery is not None:
            await self._discovery.refresh()
            self._discovery.start()

    async def close(self) -> None:
        if self._discovery is not None:
            await self._discovery.stop()
        if self._health is not None:
            await self._health.stop()
            self._health = None
        for session in (self._probe_session, self._session):
            if session is not None:
                await session.close()
        self._session = self._probe_session = None

    def set_replicas(self, key: tuple[str, str], urls: list[str]) -> None:
        """The variant's replicas are now `urls` (DNS discovery): one that stays keeps its
        health, circuit and load; a new one is health-checked before it takes calls."""
        current = {replica.url: replica for replica in self._replicas[key]}
        if list(current) == urls:
            return
        self._replicas[key] = [current.get(url) or self._new_replica(key, url, probed=True)
                               for url in urls]
        for url, replica in current.items():
            if url not in urls:
                replica.retire()
                if self._health is not None:
                    self._health.remove(replica)
        for replica in self._replicas[key]:
            if replica.url not in current and self._health is not None:
                self._health.add(replica)
        logger.info("replicas of %s/%s now: %s", *key, ", ".join(urls) or "none")

    def _new_replica(self, key: tuple[str, str], url: str, *, probed: bool = False) -> Replica:
        return Replica(*key, url, self._settings.circuit_breaker, self._metrics, self._clock,
                       is_healthy=not (probed and self._settings.health_checks.enabled),
                       **self._replica_args[key])

    # -- state -------------------------------------------------------------------------

    def can_serve(self, model: str, variant: str) -> bool:
        """True when a replica of the variant is healthy: with health checks on, it has
        passed one since start (a replica never probed yet may be dead)."""
        must_pass = self._settings.health_checks.enabled
        return any(r.is_healthy and (r.num_checks_passed > 0 or not must_pass)
                   for r in self._replicas.get((model, variant), []))

    def capacity(self, model: str, variant: str) -> int | None:
        """Calls the variant's usable replicas take at once (`max_concurrency_per_replica`
        each); None when unbounded, or when none is usable (the call then fails fast or
        falls back rather than wait)."""
        per_replica = self._replica_slots.get((model, variant))
        if per_replica is None:
            return None
        num_usable = sum(1 for r in self._replicas[(model, variant)] if r.is_usable())
        return per_replica * num_usable or None

    def context_tokens(self, model: str) -> int | None:
        """The largest context length any replica of the model reported, if any did."""
        lengths = [r.max_model_len for (name, _), group in self._replicas.items()
                   if name == model for r in group if r.max_model_len is not None]
        return max(lengths) if lengths else None

    def replica_states(self) -> list[dict[str, Any]]:
        """Every replica's health, circuit and load, JSON-ready (`GET /admin/upstreams`)."""
        return [r.state_dict() for group in self._replicas.values() for r in group]

    # -- requests ----------------------------------------------------------------------

    async def fetch(self, model: str, variant: str, path: str, body: bytes,
                    headers: dict[str, str], *, affinity: str | None = None) -> UpstreamResult:
        """POST `body` to a replica's `path` and read the whole answer."""
        return await self._with_retries(
            self._call(model, variant, path, body, headers, affinity), self._fetch_once)

    async def open_stream(self, model: str, variant: str, path: str, body: bytes,
                          headers: dict[str, str], *,
                          affinity: str | None = None) -> UpstreamStream:
        """POST `body` and return once the answer's headers arrive; the caller reads the
        body from the stream and must `aclose()` it."""
        return await self._with_retries(
            self._call(model, variant, path, body, headers, affinity), self._stream_once)

    # -- internals ---------------------------------------------------------------------

    def _call(self, model: str, variant: str, path: str, body: bytes,
              headers: dict[str, str], affinity: str | None) -> _Call:
        if self._session is None:
            raise RuntimeError("UpstreamPool.start() has not been called")
        if (model, variant) not in self._replicas:
            raise NotFoundError(f"model {model!r} has no variant {variant!r}",
                                param="model", code="model_not_found")
        forwarded = {name.lower(): value for name, value in headers.items()
                     if name.lower() in FORWARDED_HEADERS}
        forwarded.setdefault("content-type", "application/json")
        forwarded["accept-encoding"] = "identity"
        api_key = self._api_keys[(model, variant)]
        if api_key:
            forwarded["authorization"] = f"Bearer {api_key}"
        deadline = asyncio.get_running_loop().time() + self._settings.timeouts.total_seconds
        return _Call(model, variant, path, body, forwarded, deadline, affinity)

    async def _with_retries(self, call: _Call,
                            attempt_once: Callable[[_Call, Replica, int, bool], Awaitable[T]],
                            ) -> T:
        max_attempts = self._settings.retries.max_attempts
        tried: set[str] = set()
        failure: _AttemptFailed | None = None
        attempt = 0
        while attempt < max_attempts:
            replica = self._pick(call, tried)
            if replica is None:
                break
            attempt += 1
            tried.add(replica.url)
            try:
                return await attempt_once(call, replica, attempt, attempt == max_attempts)
            except _AttemptFailed as exc:
                failure = exc
                logger.warning("attempt %d of %s on %s failed: %s", attempt,
                               call.description, replica.url, exc.detail)
            if (not failure.is_retryable or attempt == max_attempts
                    or not await self._backoff(call, attempt)):
                break
            self._metrics.upstream_retries.labels(model=call.model,
                                                  variant=call.variant).inc()
        if failure is not None and failure.result is not None:
            return failure.result
        raise self._final_error(call, failure, attempt)

    def _pick(self, call: _Call, tried: set[str]) -> Replica | None:
        """A usable replica by the variant's balance, untried ones first; None if none.
        A prefix-balanced variant's first pick of a call is counted by its outcome."""
        key = (call.model, call.variant)
        usable = [r for r in self._replicas[key] if r.is_usable()]
        candidates = [r for r in usable if r.url not in tried] or usable
        if not candidates:
            return None
        if self._is_prefix_balanced[key] and call.affinity is not None:
            choice = choose_by_prefix(call.affinity, candidates, usable,
                                      self._load_factors[key])
        else:
            choice = choose_least_outstanding(candidates, self._rng)
        if self._is_prefix_balanced[key] and not tried:
            self._metrics.balance_decisions.labels(*key, choice.outcome).inc()
        return choice.replica

    async def _backoff(self, call: _Call, attempt: int) -> bool:
        """Sleep before the next attempt; False when that would pass the deadline."""
        retries = self._settings.retries
        delay = min(retries.backoff_max_seconds,
                    retries.backoff_base_seconds * 2 ** (attempt - 1))
        delay *= 0.5 + 0.5 * self._rng.random()
        if asyncio.get_running_loop().time() + delay >= call.deadline:
            return False
        await asyncio.sleep(delay)
        return True

    async def _fetch_once(self, call: _Call, replica: Replica, attempt: int,
                          is_last: bool) -> UpstreamResult:
        lease = replica.lease()
        outcome: Outcome | None = None
        try:
            try:
                response = await self._send(call, replica)
                body = await self._read_body(call, response)
            except _AttemptFailed as exc:
                lease.report(is_failure=True)
                outcome = exc.outcome
                raise
            outcome = status_outcome(response.status)
            result = UpstreamResult(response.status, response_headers(response), body,
                                    replica.url, attempt)
            lease.report(is_failure=result.status in RETRY_STATUSES)
            if result.status in RETRY_STATUSES and not is_last:
                raise _AttemptFailed("http_error", f"answered HTTP {result.status}",
                                     is_retryable=True, result=result)
            return result
        finally:
            lease.finish(outcome)

    async def _stream_once(self, call: _Call, replica: Replica, attempt: int,
                           is_last: bool) -> UpstreamStream:
        lease = replica.lease()
        outcome: Outcome | None = None
        is_handed_over = False
        try:
            try:
                response = await self._send(call, replica)
            except _AttemptFailed as exc:
                lease.report(is_failure=True)
                outcome = exc.outcome
                raise
            lease.report(is_failure=response.status in RETRY_STATUSES)
            if response.status in RETRY_STATUSES and not is_last:
                response.close()
                outcome = "http_error"
                raise _AttemptFailed("http_error", f"answered HTTP {response.status}",
                                     is_retryable=True)
            stream = UpstreamStream(response, lease, description=call.description,
                                    attempts=attempt,
                                    idle_seconds=self._settings.timeouts.idle_seconds,
                                    deadline=call.deadline)
            is_handed_over = True  # the stream finishes the lease
            return stream
        finally:
            if not is_handed_over:
                lease.finish(outcome)

    async def _send(self, call: _Call, replica: Replica) -> aiohttp.ClientResponse:
        """POST, until the response headers arrive."""
        assert self._session is not None
        remaining = call.deadline - asyncio.get_running_loop().time()
        timeout = min(self._settings.timeouts.first_byte_seconds, remaining)
        if timeout <= 0:
            raise _AttemptFailed("timeout", "total time limit passed", is_retryable=False)
        try:
            async with asyncio.timeout(timeout):
                return await self._session.post(replica.url + call.path, data=call.body,
                                                headers=call.headers)
        except (aiohttp.ClientError, OSError) as exc:  # TimeoutError is an OSError too
            if _is_deadline(exc):
                raise _AttemptFailed("timeout", "sent no response headers within "
                                     f"{timeout:.3g} s", is_retryable=False) from exc
            raise _classify(exc) from exc

    async def _read_body(self, call: _Call, response: aiohttp.ClientResponse) -> bytes:
        is_read = False
        try:
            async with asyncio.timeout_at(call.deadline):
                body = await response.read()
            is_read = True
            return body
        except (aiohttp.ClientError, OSError) as exc:
            if _is_deadline(exc):
                raise _AttemptFailed("timeout", "did not finish its answer within "
                                     f"{self._settings.timeouts.total_seconds:g} s",
                                     is_retryable=False) from exc
            raise _classify(exc) from exc
        finally:
            if is_read:
                response.release()
            else:
                response.close()  # never reuse a connection with unread bytes

    def _final_error(self, call: _Call, failure: _AttemptFailed | None,
                     num_attempts: int) -> GatewayError:
        where = f"model {call.model!r} variant {call.variant!r}"
        if failure is None:
            return NoUpstreamError(f"no healthy upstream replica for {where}",
                                   retry_after_s=self._retry_after(call))
        tries = f"after {num_attempts} attempt{'s' if num_attempts != 1 else ''}"
        if failure.outcome == "timeout":
            return UpstreamTimeoutError(f"the upstream of {where} {failure.detail}")
        if failure.outcome in ("connect_error", "http_error"):
            return NoUpstreamError(f"no upstream replica of {where} could serve the request "
                                   f"({failure.detail}) {tries}",
                                   retry_after_s=self._retry_after(call))
        return UpstreamError(f"the upstream of {where} failed ({failure.detail}) {tries}")

    def _retry_after(self, call: _Call) -> float:
        waits = [r.breaker.seconds_until_trial()
                 for r in self._replicas[(call.model, call.variant)]
                 if r.breaker.state == "open"]
        return min(waits) if waits else self._settings.health_checks.interval_seconds


def _classify(exc: BaseException) -> _AttemptFailed:
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return _AttemptFailed("connect_error", "could not connect", is_retryable=True)
    return _AttemptFailed("protocol_error", describe_transport_error(exc), is_retryable=True)


def _is_deadline(exc: BaseException) -> bool:
    """One of our own time limits (not aiohttp's connect timeout, also a TimeoutError)."""
    return isinstance(exc, TimeoutError) and not isinstance(exc, aiohttp.ClientError)
