"""`RollbackMonitor`: sliding windows of request outcomes per (model, variant), and the
verdict that a canary does worse than its stable variant.

The monitor only judges; `Router` owns the weights and applies a verdict. Each window keeps
its samples in arrival order (for expiry) and its latencies sorted (so p95 is one index),
with a running error count, so recording and judging stay cheap on the request path.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from gateway.settings import RollbackSettings

MAX_SAMPLES_PER_WINDOW = 10_000
RollbackReason = Literal["error_rate", "latency"]


@dataclass(frozen=True)
class WindowStats:
    num_samples: int
    error_rate: float
    p95_s: float | None  # None while the window is empty


@dataclass(frozen=True)
class RollbackVerdict:
    model: str
    variant: str
    reason: RollbackReason
    detail: str  # the numbers, for the log line and the admin API


@dataclass(frozen=True)
class _Sample:
    at: float
    is_error: bool
    latency_s: float


class OutcomeWindow:
    """Outcomes of the last `window_seconds`, at most `max_samples` of them."""

    def __init__(self, window_seconds: float, max_samples: int = MAX_SAMPLES_PER_WINDOW) -> None:
        self.window_seconds = window_seconds
        self.max_samples = max_samples
        self._samples: deque[_Sample] = deque()
        self._sorted_latencies: list[float] = []
        self._num_errors = 0

    def add(self, now: float, *, is_error: bool, latency_s: float) -> None:
        self.expire(now)
        if len(self._samples) >= self.max_samples:
            self._drop_oldest()
        self._samples.append(_Sample(now, is_error, latency_s))
        bisect.insort(self._sorted_latencies, latency_s)
        self._num_errors += is_error

    def expire(self, now: float) -> None:
        cutoff = now - self.window_seconds
        while self._samples and self._samples[0].at <= cutoff:
            self._drop_oldest()

    def stats(self, now: float) -> WindowStats:
        self.expire(now)
        num_samples = len(self._samples)
        if num_samples == 0:
            return WindowStats(0, 0.0, None)
        rank = math.ceil(0.95 * num_samples) - 1  # nearest-rank percentile
        return WindowStats(num_samples, self._num_errors / num_samples,
                           self._sorted_latencies[rank])

    def _drop_oldest(self) -> None:
        sample = self._samples.popleft()
        index = bisect.bisect_left(self._sorted_latencies, sample.latency_s)
        del self._sorted_latencies[index]
        self._num_errors -= sample.is_error


class RollbackMonitor:
    def __init__(self, settings: RollbackSettings, *,
                 clock: Callable[[], float]) -> None:
        self.settings = settings
        self._clock = clock
        self._windows: dict[tuple[str, str], OutcomeWindow] = {}

    def record(self, model: str, variant: str, *, is_error: bool, latency_s: float) -> None:
        self._window(model, variant).add(self._clock(), is_error=is_error,
                                         latency_s=latency_s)

    def stats(self, model: str, variant: str) -> WindowStats:
        return self._window(model, variant).stats(self._clock())

    def forget(self, model: str, variant: str) -> None:
        """Drop a variant's samples (its weight was set again; judge it afresh)."""
        self._windows.pop((model, variant), None)

    def judge(self, model: str, variant: str, stable: str) -> RollbackVerdict | None:
        """A verdict when `variant` does measurably worse than `stable`, else None."""
        if not self.settings.enabled or variant == stable:
            return None
        candidate = self.stats(model, variant)
        if candidate.num_samples < self.settings.min_samples:
            return None
        baseline = self.stats(model, stable)
        has_baseline = baseline.num_samples >= self.settings.min_samples
        baseline_error_rate = baseline.error_rate if has_baseline else 0.0
        error_limit = baseline_error_rate + self.settings.max_error_rate_increase
        if candidate.error_rate > error_limit:
            detail = (f"error rate {candidate.error_rate:.3f} over {candidate.num_samples} "
                      f"requests > {error_limit:.3f} (stable {baseline_error_rate:.3f} + "
                      f"{self.settings.max_error_rate_increase:.3f})")
            return RollbackVerdict(model, variant, "error_rate", detail)
        if not has_baseline or baseline.p95_s is None or candidate.p95_s is None:
            return None
        latency_limit = baseline.p95_s * self.settings.max_p95_latency_ratio
        if candidate.p95_s > latency_limit:
            detail = (f"p95 latency {candidate.p95_s:.3f} s > {latency_limit:.3f} s "
                      f"(stable p95 {baseline.p95_s:.3f} s x "
                      f"{self.settings.max_p95_latency_ratio:g})")
            return RollbackVerdict(model, variant, "latency", detail)
        return None

    def _window(self, model: str, variant: str) -> OutcomeWindow:
        key = (model, variant)
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = OutcomeWindow(self.settings.window_seconds)
        return window
