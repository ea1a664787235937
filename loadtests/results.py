"""Locust's output files read back: exact totals from `--json-file`, time series from the
full stats history CSV, failures from the failures CSV; and the run's headline metrics."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from loadtests.arrivals import ARRIVAL
from loadtests.breakdown import Breakdown
from loadtests.calls import ITL, POST, RATE_LIMITED, TOKENS_PER_S, TTFT


@dataclass
class Entry:
    """One Locust stats entry (request_type, name) with its response-time histogram."""

    request_type: str
    name: str
    num_requests: int
    num_failures: int
    response_times: dict[float, int]   # rounded value -> count (Locust's histogram)
    total_content_length: int = 0
    start_time: float = 0.0
    last_request_timestamp: float | None = None

    @property
    def num_samples(self) -> int:
        return sum(self.response_times.values())

    def percentile(self, fraction: float) -> float | None:
        """The smallest value with at least `fraction` of the samples at or below it."""
        total = self.num_samples
        if total == 0:
            return None
        wanted = max(1, math.ceil(fraction * total))
        seen = 0
        for value in sorted(self.response_times):
            seen += self.response_times[value]
            if seen >= wanted:
                return value
        return max(self.response_times)

    def mean(self) -> float | None:
        total = self.num_samples
        if total == 0:
            return None
        return sum(v * n for v, n in self.response_times.items()) / total


def merge(entries: list[Entry], request_type: str, name: str = "all") -> Entry:
    merged = Entry(request_type, name, 0, 0, {})
    for entry in entries:
        merged.num_requests += entry.num_requests
        merged.num_failures += entry.num_failures
        merged.total_content_length += entry.total_content_length
        for value, count in entry.response_times.items():
            merged.response_times[value] = merged.response_times.get(value, 0) + count
    return merged


@dataclass(frozen=True)
class HistoryRow:
    timestamp: int
    user_count: int
    request_type: str
    name: str
    rps: float
    failures_per_s: float
    percentiles: dict[str, float | None]   # "50%", "95%", ... over Locust's recent window


@dataclass(frozen=True)
class FailureRow:
    request_type: str
    name: str
    error: str
    occurrences: int


@dataclass
class RunResults:
    entries: list[Entry]
    history: list[HistoryRow] = field(default_factory=list)
    failures: list[FailureRow] = field(default_factory=list)

    def of_type(self, request_type: str) -> list[Entry]:
        return [e for e in self.entries if e.request_type == request_type]


@dataclass(frozen=True)
class RunMetrics:
    num_requests: int              # endpoint calls (POST entries), 429s apart
    num_failures: int
    num_rate_limited: int
    duration_s: float
    requests_per_s: float
    error_ratio: float | None
    p95_ttft_ms: float | None
    p99_latency_ms: float | None
    output_tokens_per_s: float
    follow_up_cache_hit_share: float | None = None   # conversations' turns after the first
    max_tenant_p95_ttft_ms: float | None = None       # the worst tenant's p95 TTFT


@dataclass(frozen=True)
class OpenLoopStats:
    """The open loop's arrivals as Locust counted them (`ARRIVAL` entry)."""

    target_rate: float          # arrivals/s asked for
    num_arrivals: int           # every arrival, sent or dropped
    num_dropped: int            # found the in-flight cap reached: nothing sent
    arrival_rate: float | None  # achieved: (arrivals - 1) / (last - first arrival time)
    p50_lateness_ms: float | None   # how late arrivals left against their schedule
    p99_lateness_ms: float | None


def entry_from_json(item: dict) -> Entry:
    return Entry(request_type=item["method"] or "", name=item["name"],
                 num_requests=int(item["num_requests"]), num_failures=int(item["num_failures"]),
                 response_times={float(k): int(v) for k, v in item["response_times"].items()},
                 total_content_length=int(item.get("total_content_length") or 0),
                 start_time=float(item.get("start_time") or 0.0),
                 last_request_timestamp=item.get("last_request_timestamp"))


def number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None   # "N/A"


def read_history(path: Path) -> list[HistoryRow]:
    if not path.is_file():
        return []
    rows = []
    with path.open(newline="") as file:
        for row in csv.DictReader(file):
            percentiles = {k: number(v) for k, v in row.items() if k and k.endswith("%")}
            rows.append(HistoryRow(int(row["Timestamp"]), int(row["User Count"]), row["Type"],
                                   row["Name"], number(row["Requests/s"]) or 0.0,
                                   number(row["Failures/s"]) or 0.0, percentiles))
    return rows


def read_failures(path: Path) -> list[FailureRow]:
    if not path.is_file():
        return []
    with path.open(newline="") as file:
        return [FailureRow(row["Method"], row["Name"], row["Error"], int(row["Occurrences"]))
                for row in csv.DictReader(file)]


def load_results(prefix: Path) -> RunResults:
    """Read `<prefix>.json`, `<prefix>_stats_history.csv` and `<prefix>_failures.csv`."""
    data = json.loads(Path(f"{prefix}.json").read_text())
    return RunResults(entries=[entry_from_json(item) for item in data],
                      history=read_history(Path(f"{prefix}_stats_history.csv")),
                      failures=read_failures(Path(f"{prefix}_failures.csv")))


def run_span_s(entries: list[Entry]) -> float:
    starts = [e.start_time for e in entries if e.start_time]
    ends = [e.last_request_timestamp for e in entries if e.last_request_timestamp]
    if not starts or not ends:
        return 0.0
    return max(ends) - min(starts)


def open_loop_stats(results: RunResults, target_rate: float) -> OpenLoopStats:
    arrivals = merge(results.of_type(ARRIVAL), ARRIVAL)
    entries = results.of_type(ARRIVAL)
    first = min((e.start_time for e in entries if e.start_time), default=0.0)
    last = max((e.last_request_timestamp or 0.0 for e in entries), default=0.0)
    num = arrivals.num_requests
    rate = (num - 1) / (last - first) if num >= 2 and last > first else None
    return OpenLoopStats(target_rate=target_rate, num_arrivals=num,
                         num_dropped=arrivals.num_failures, arrival_rate=rate,
                         p50_lateness_ms=arrivals.percentile(0.5),
                         p99_lateness_ms=arrivals.percentile(0.99))


def compute_metrics(results: RunResults, breakdown: Breakdown | None = None) -> RunMetrics:
    calls = results.of_type(POST)
    endpoint = merge(calls, POST)
    num_calls = endpoint.num_requests
    duration_s = run_span_s(calls + results.of_type(RATE_LIMITED))
    ttft = merge(results.of_type(TTFT), TTFT)
    tokens = merge(results.of_type(TOKENS_PER_S), TOKENS_PER_S).total_content_length
    return RunMetrics(
        num_requests=num_calls, num_failures=endpoint.num_failures,
        num_rate_limited=merge(results.of_type(RATE_LIMITED), RATE_LIMITED).num_requests,
        duration_s=duration_s,
        requests_per_s=num_calls / duration_s if duration_s > 0 else 0.0,
        error_ratio=endpoint.num_failures / num_calls if num_calls else None,
        p95_ttft_ms=ttft.percentile(0.95), p99_latency_ms=endpoint.percentile(0.99),
        output_tokens_per_s=tokens / duration_s if duration_s > 0 else 0.0,
        follow_up_cache_hit_share=breakdown.follow_up_hit_share if breakdown else None,
        max_tenant_p95_ttft_ms=breakdown.max_tenant_p95_ttft_ms if breakdown else None)


ENTRY_TYPES = (POST, TTFT, ITL, TOKENS_PER_S, RATE_LIMITED, ARRIVAL)
