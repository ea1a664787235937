"""One upstream replica: its health, circuit breaker and outstanding requests.

`Replica.lease()` is the only way to use a replica: it counts the request as outstanding
until `Lease.finish`, whatever way the attempt ends (the pool calls it in `finally`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

from gateway.metrics import GatewayMetrics
from gateway.settings import CircuitBreakerSettings, HealthCheckSettings

logger = logging.getLogger(__name__)

Outcome = Literal["ok", "http_error", "connect_error", "timeout", "protocol_error"]
CircuitState = Literal["closed", "open", "half_open"]


def status_outcome(status: int) -> Outcome:
    """An HTTP answer's outcome: a 5xx is an `http_error`, anything else `ok`."""
    return "http_error" if status >= 500 else "ok"


class CircuitBreaker:
    """`failure_threshold` consecutive failures open it for `reset_seconds`; then one trial
    request is let through (half-open): its success closes it, its failure re-opens it."""

    def __init__(self, settings: CircuitBreakerSettings,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._state: CircuitState = "closed"
        self._opened_at = 0.0
        self._is_trial_running = False
        self.num_consecutive_failures = 0

    @property
    def state(self) -> CircuitState:
        if self._state == "open" and self.seconds_until_trial() <= 0:
            self._state = "half_open"
        return self._state

    def seconds_until_trial(self) -> float:
        if self._state != "open":
            return 0.0
        return max(0.0, self._opened_at + self.settings.reset_seconds - self._clock())

    def can_acquire(self) -> bool:
        state = self.state
        return state == "closed" or (state == "half_open" and not self._is_trial_running)

    def acquire(self) -> bool:
        """Note a request going out; True when it is the half-open trial."""
        if self.state == "half_open":
            self._is_trial_running = True
            return True
        return False

    def on_success(self) -> None:
        self._state = "closed"
        self.num_consecutive_failures = 0
        self._is_trial_running = False

    def on_failure(self) -> None:
        self.num_consecutive_failures += 1
        self._is_trial_running = False
        if (self._state == "half_open"
                or self.num_consecutive_failures >= self.settings.failure_threshold):
            self._state = "open"
            self._opened_at = self._clock()

    def on_abandon(self, was_trial: bool) -> None:
        """A request ended with no verdict (cancelled): free the trial slot it held."""
        if was_trial:
            self._is_trial_running = False


NUM_RECENT_FAILURES = 5


@dataclass(frozen=True)
class RecentFailure:
    outcome: Outcome           # never "ok"
    seconds_ago: float


@dataclass(frozen=True)
class ReplicaState:
    """A replica as an operator sees it during an incident (`GET /admin/upstreams`)."""

    model: str
    variant: str
    url: str
    is_healthy: bool                 # passes its health checks
    num_failed_health_checks: int    # in a row
    circuit: CircuitState
    circuit_retry_in_s: float        # while open: time until the half-open trial; else 0
    num_outstanding: int             # requests in flight on it now
    num_consecutive_failures: int    # failed attempts in a row (what opens the circuit)
    recent_failures: tuple[RecentFailure, ...]  # failed attempts, newest first
    max_model_len: int | None        # its /v1/models context length, once read


class Replica:
    def __init__(self, model: str, variant: str, url: str,
                 breaker: CircuitBreakerSettings, metrics: GatewayMetrics,
                 clock: Callable[[], float] = time.monotonic, *,
                 upstream_model: str | None = None,
                 headers: dict[str, str] | None = None, is_healthy: bool = True) -> None:
        self.model, self.variant, self.url = model, variant, url.rstrip("/")
        self.upstream_model = upstream_model or model  # the name the replica serves
        self.headers = dict(headers or {})             # sent with every probe
        self.breaker = CircuitBreaker(breaker, clock)
        self.is_healthy = is_healthy       # False: takes calls once a health check passes
        self.num_checks_passed = 0         # health checks passed since start
        self.max_model_len: int | None = None  # from its /v1/models, once read
        self.num_outstanding = 0
        self._clock = clock
        self._recent_failures: deque[tuple[Outcome, float]] = deque(maxlen=NUM_RECENT_FAILURES)
        self._num_health_failures = 0
        self._num_health_successes = 0
        self._metrics = metrics
        self._labels = {"model": model, "variant": variant, "replica": self.url}
        self._gauges = (metrics.upstream_healthy, metrics.upstream_outstanding,
                        metrics.circuit_open)
        self.is_retired = False            # left the variant (DNS discovery)
        self._set(metrics.upstream_healthy, int(is_healthy))
        self._set(metrics.upstream_outstanding, 0)
        self._set(metrics.circuit_open, 0)
        # zeros from the start, so rate() and increase() show 0 rather than no data
        metrics.upstream_retries.labels(model=model, variant=variant)
        metrics.stream_errors.labels(model, variant)

    def is_usable(self) -> bool:
        return self.is_healthy and self.breaker.can_acquire()

    def retire(self) -> None:
        """It left its variant: its gauges go (calls still on it finish unseen there)."""
        self.is_retired = True
        for gauge in self._gauges:
            with contextlib.suppress(KeyError):  # never set
                gauge.remove(*self._labels.values())

    def lease(self) -> Lease:
        return Lease(self)

    def record_health(self, is_ok: bool, settings: HealthCheckSettings) -> None:
        if is_ok:
            self.num_checks_passed += 1
            self._num_health_successes += 1
            self._num_health_failures = 0
            if (not self.is_healthy
                    and self._num_health_successes >= settings.healthy_threshold):
                self.is_healthy = True
                logger.info("replica %s of %s/%s is healthy again", self.url, self.model,
                            self.variant)
        else:
            self._num_health_failures += 1
            self._num_health_successes = 0
            if self.is_healthy and self._num_health_failures >= settings.unhealthy_threshold:
                self.is_healthy = False
                logger.warning("replica %s of %s/%s is unhealthy after %d failed checks",
                               self.url, self.model, self.variant,
                               self._num_health_failures)
        self._set(self._metrics.upstream_healthy, int(self.is_healthy))

    def state(self) -> ReplicaState:
        now = self._clock()
        return ReplicaState(
            model=self.model, variant=self.variant, url=self.url, is_healthy=self.is_healthy,
            num_failed_health_checks=self._num_health_failures, circuit=self.breaker.state,
            circuit_retry_in_s=round(self.breaker.seconds_until_trial(), 3),
            num_outstanding=self.num_outstanding,
            num_consecutive_failures=self.breaker.num_consecutive_failures,
            recent_failures=tuple(RecentFailure(outcome, round(now - at, 3))
                                  for outcome, at in self._recent_failures),
            max_model_len=self.max_model_len)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self.state())

    # -- bookkeeping, through Lease ----------------------------------------------------

    def _acquire(self) -> bool:
        self.num_outstanding += 1
        self._set(self._metrics.upstream_outstanding, self.num_outstanding)
        return self.breaker.acquire()

    def _release(self) -> None:
        self.num_outstanding -= 1
        assert self.num_outstanding >= 0, self.url
        self._set(self._metrics.upstream_outstanding, self.num_outstanding)

    def _report(self, is_failure: bool) -> None:
        was_open = self.breaker.state != "closed"
        if is_failure:
            self.breaker.on_failure()
        else:
            self.breaker.on_success()
        is_open = self.breaker.state != "closed"
        if is_open and not was_open:
            logger.warning("circuit of replica %s (%s/%s) opened after %d failures",
                           self.url, self.model, self.variant,
                           self.breaker.num_consecutive_failures)
        elif was_open and not is_open:
            logger.info("circuit of replica %s (%s/%s) closed", self.url, self.model,
                        self.variant)
        self._set(self._metrics.circuit_open, int(is_open))

    def _set(self, gauge: Any, value: float) -> None:
        if not self.is_retired:
            gauge.labels(**self._labels).set(value)

    def _count(self, outcome: Outcome, duration_s: float) -> None:
        if outcome != "ok":
            self._recent_failures.appendleft((outcome, self._clock()))
        self._metrics.upstream_requests.labels(**self._labels, outcome=outcome).inc()
        self._metrics.upstream_duration.labels(**self._labels).observe(duration_s)


class Lease:
    """One attempt's hold on a replica: outstanding until `finish`, which is idempotent."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self._is_trial = replica._acquire()
        self._started = time.perf_counter()
        self._has_verdict = False
        self._is_finished = False

    def report(self, is_failure: bool) -> None:
        """The breaker's verdict on this attempt (a stream may report twice: ok at its
        headers, then a failure mid-body)."""
        self._has_verdict = True
        self.replica._report(is_failure)

    def finish(self, outcome: Outcome | None) -> None:
        """Release the replica; `outcome` None means abandoned (cancelled): not counted."""
        if self._is_finished:
            return
        self._is_finished = True
        if not self._has_verdict:
            self.replica.breaker.on_abandon(self._is_trial)
        if outcome is not None:
            self.replica._count(outcome, time.perf_counter() - self._started)
        self.replica._release()
