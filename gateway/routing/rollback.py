"""`RollbackMonitor`: sliding windows of call outcomes per (model, variant), and the verdict
that a canary does worse than its stable variant.

What a window holds, so that no client can steer the verdict:
- Only calls the variant is answerable for: an error is a 5xx or a stream broken by the
  upstream; a client's error (any 4xx, or a stream ended by an `invalid_request_error`
  event) is no sample at all, neither against the variant nor for it.
- Latency per token, not per call (a call's length is the client's choice): time to the
  first token (streams) and inter-token latency (streams: between the first and the last
  token; unary calls: their duration per output token). Each is judged on its p95 against
  stable's, with `max_p95_latency_ratio`.
- No single API key decides: a key holds at most `max_key_share` of a window (and at
  least ceil(`max_key_share` x `min_samples`) samples; over its share, a new sample
  replaces its own oldest), so one key can neither flood nor dilute a window; and a
  verdict must still hold with the one key that weighs most against the canary left
  out. A verdict therefore needs at least two keys' traffic, and a full window at the
  default 0.2 five. `max_key_share: 1` turns both off (a single-tenant gateway).

The monitor only judges; `Router` owns the weights and applies a verdict. Samples are kept
in arrival order (for expiry) with sorted latencies (so a p95 is one index).
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from gateway.routing import CallOutcome
from gateway.settings import RollbackSettings

MAX_SAMPLES_PER_WINDOW = 10_000
RollbackReason = Literal["error_rate", "latency", "quality"]


@dataclass(frozen=True)
class WindowStats:
    num_samples: int
    num_keys: int
    error_rate: float
    p95_ttft_s: float | None   # None without latency samples of that kind
    p95_itl_s: float | None
    num_ttft: int = 0          # latency samples of each kind
    num_itl: int = 0


@dataclass(frozen=True)
class RollbackVerdict:
    model: str
    variant: str
    reason: RollbackReason
    detail: str  # the numbers, for the log line and the admin API


@dataclass(eq=False)
class _Sample:
    at: float
    outcome: CallOutcome
    is_live: bool = True


def _p95(values: list[float]) -> float | None:
    return values[math.ceil(0.95 * len(values)) - 1] if values else None  # nearest rank


LatencyKind = Literal["ttft_s", "itl_s"]


class OutcomeWindow:
    """Outcomes of the last `window_seconds`, at most `max_samples`, each key at most
    `max_key_share` of them (but `min_key_samples` always)."""

    def __init__(self, window_seconds: float, *, max_key_share: float = 1.0,
                 min_key_samples: int = 1, max_samples: int = MAX_SAMPLES_PER_WINDOW) -> None:
        self.window_seconds = window_seconds
        self.max_key_share = max_key_share
        self.min_key_samples = min_key_samples
        self.max_samples = max_samples
        self._samples: deque[_Sample] = deque()          # arrival order, dropped ones too
        self._by_key: dict[str, deque[_Sample]] = {}     # live samples per key
        self._ttfts: list[float] = []                    # sorted
        self._itls: list[float] = []                     # sorted
        self._num_live = 0
        self._num_errors = 0
        self._errors_by_key: dict[str, int] = {}

    def add(self, now: float, outcome: CallOutcome) -> None:
        self.expire(now)
        own = self._by_key.setdefault(outcome.key, deque())
        key_limit = max(self.min_key_samples,
                        math.floor(self.max_key_share * (self._num_live + 1)))
        if len(own) >= key_limit:
            self._drop(own[0])
        if self._num_live >= self.max_samples:
            self._drop(self._oldest_live())
        sample = _Sample(now, outcome)
        self._samples.append(sample)
        own.append(sample)
        self._num_live += 1
        self._num_errors += outcome.is_error
        if outcome.is_error:
            self._errors_by_key[outcome.key] = self._errors_by_key.get(outcome.key, 0) + 1
        for values, value in ((self._ttfts, outcome.ttft_s), (self._itls, outcome.itl_s)):
            if value is not None:
                bisect.insort(values, value)

    def expire(self, now: float) -> None:
        cutoff = now - self.window_seconds
        while self._samples and (not self._samples[0].is_live or self._samples[0].at <= cutoff):
            sample = self._samples.popleft()
            if sample.is_live:
                self._drop(sample)

    def stats(self, now: float) -> WindowStats:
        self.expire(now)
        if self._num_live == 0:
            return WindowStats(0, 0, 0.0, None, None)
        return WindowStats(self._num_live, len(self._by_key), self._num_errors / self._num_live,
                           _p95(self._ttfts), _p95(self._itls), len(self._ttfts),
                           len(self._itls))

    def error_rate_without_worst_key(self) -> float:
        """The lowest error rate left after taking out any one key's samples (1.0 when a
        single key made the whole window: nothing is left to judge by)."""
        rates = [(self._num_errors - errors) / (self._num_live - len(self._by_key[key]))
                 for key, errors in self._errors_by_key.items()
                 if self._num_live > len(self._by_key[key])]
        if len(rates) < len(self._errors_by_key):
            return 0.0  # one key holds every sample
        return min(rates, default=self._num_errors / max(1, self._num_live))

    def p95_without_worst_key(self, kind: LatencyKind, limit: float) -> float | None:
        """The p95 of `kind` without the key with the most samples over `limit`."""
        slow = {key: sum(1 for s in own if (getattr(s.outcome, kind) or 0.0) > limit)
                for key, own in self._by_key.items()}
        worst = max(slow, key=slow.__getitem__, default=None)
        values = sorted(value for key, own in self._by_key.items() if key != worst
                        for s in own if (value := getattr(s.outcome, kind)) is not None)
        return _p95(values)

    def _oldest_live(self) -> _Sample:
        return next(sample for sample in self._samples if sample.is_live)

    def _drop(self, sample: _Sample) -> None:
        """Take a live sample out of the counts (the queue forgets it lazily)."""
        sample.is_live = False
        outcome = sample.outcome
        own = self._by_key[outcome.key]
        own.remove(sample)  # almost always its first element
        if not own:
            del self._by_key[outcome.key]
        self._num_live -= 1
        self._num_errors -= outcome.is_error
        if outcome.is_error:
            self._errors_by_key[outcome.key] -= 1
            if not self._errors_by_key[outcome.key]:
                del self._errors_by_key[outcome.key]
        for values, value in ((self._ttfts, outcome.ttft_s), (self._itls, outcome.itl_s)):
            if value is not None:
                del values[bisect.bisect_left(values, value)]


class RollbackMonitor:
    def __init__(self, settings: RollbackSettings, *,
                 clock: Callable[[], float]) -> None:
        self.settings = settings
        self._clock = clock
        self._windows: dict[tuple[str, str], OutcomeWindow] = {}

    def record(self, model: str, variant: str, outcome: CallOutcome, *,
               at: float | None = None) -> None:
        """`at`: when the call ended (default now; another replica's samples carry theirs)."""
        self._window(model, variant).add(self._clock() if at is None else at, outcome)

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
        window = self._window(model, variant)
        if candidate.error_rate > error_limit:
            robust = (window.error_rate_without_worst_key() if self._is_key_capped
                      else candidate.error_rate)
            if robust > error_limit:
                detail = (f"error rate {candidate.error_rate:.3f} ({robust:.3f} without its "
                          f"worst key) over {candidate.num_samples} calls of "
                          f"{candidate.num_keys} keys > {error_limit:.3f} (stable "
                          f"{baseline_error_rate:.3f} + "
                          f"{self.settings.max_error_rate_increase:.3f})")
                return RollbackVerdict(model, variant, "error_rate", detail)
        return self._judge_latency(model, variant, candidate, baseline)

    @property
    def _is_key_capped(self) -> bool:
        return self.settings.max_key_share < 1

    def _judge_latency(self, model: str, variant: str, candidate: WindowStats,
                       baseline: WindowStats) -> RollbackVerdict | None:
        ratio = self.settings.max_p95_latency_ratio
        kinds: tuple[tuple[str, LatencyKind, float | None, float | None, int], ...] = (
            ("time to first token", "ttft_s", candidate.p95_ttft_s, baseline.p95_ttft_s,
             min(candidate.num_ttft, baseline.num_ttft)),
            ("inter-token latency", "itl_s", candidate.p95_itl_s, baseline.p95_itl_s,
             min(candidate.num_itl, baseline.num_itl)))
        for name, kind, mine, theirs, num in kinds:
            if num < self.settings.min_samples or mine is None or theirs is None:
                continue
            limit = theirs * ratio
            if mine <= limit:
                continue
            robust = (self._window(model, variant).p95_without_worst_key(kind, limit)
                      if self._is_key_capped else mine)
            if robust is not None and robust > limit:
                detail = (f"p95 {name} {mine:.4f} s ({robust:.4f} s without its worst key) "
                          f"> {limit:.4f} s (stable p95 {theirs:.4f} s x {ratio:g})")
                return RollbackVerdict(model, variant, "latency", detail)
        return None

    def _window(self, model: str, variant: str) -> OutcomeWindow:
        key = (model, variant)
        window = self._windows.get(key)
        if window is None:
            share = self.settings.max_key_share
            window = self._windows[key] = OutcomeWindow(
                self.settings.window_seconds, max_key_share=share,
                min_key_samples=math.ceil(share * self.settings.min_samples))
        return window
