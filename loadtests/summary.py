"""After the run: Locust's files and the call log read back, the report and `results.json`
written, the summary printed, the SLO checked (a breach raises, naming each SLO)."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loadtests.breakdown import FIRST_TURNS, FOLLOW_UPS, Breakdown, CacheShare, compute_breakdown
from loadtests.calllog import read_call_log
from loadtests.errors import SloBreachError
from loadtests.report import RunDetails, RunInfo, write_report
from loadtests.results import RunMetrics, compute_metrics, load_results, open_loop_stats
from loadtests.runner import CALL_LOG, LOCUST_PREFIX
from loadtests.server_metrics import ServerCacheStats
from loadtests.slo import Slo, SloCheck, breach_message, check_slo
from loadtests.tenants import Tenant

logger = logging.getLogger(__name__)

RESULTS_JSON = "results.json"


def finish(info: RunInfo, slo: Slo, tenants: list[Tenant], out_dir: Path, returncode: int,
           server_cache: ServerCacheStats | None) -> int:
    results = load_results(out_dir / LOCUST_PREFIX)
    breakdown = compute_breakdown(read_call_log(out_dir / CALL_LOG), tenants)
    metrics = compute_metrics(results, breakdown)
    open_loop = open_loop_stats(results, info.rate) if info.rate is not None else None
    details = RunDetails(breakdown, open_loop, server_cache)
    checks = check_slo(slo, metrics)
    write_report(out_dir / "report.html", info, results, metrics, checks, details)
    write_results_json(out_dir / RESULTS_JSON, info, metrics, checks, details)
    print(summary_text(metrics, details, out_dir))
    for check in checks:
        print(f"  SLO {check.describe()}")
    if (message := breach_message(checks)) is not None:
        raise SloBreachError(message)
    if metrics.num_failures:
        logger.warning("%d of %d calls failed (Locust exit code %d); see %s",
                       metrics.num_failures, metrics.num_requests, returncode,
                       out_dir / "locust_failures.csv")
    return 0


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def detail_lines(details: RunDetails) -> list[str]:
    lines = []
    if (loop := details.open_loop) is not None:
        lines.append(f"open loop: target {loop.target_rate:g} arrivals/s, achieved "
                     f"{fmt(loop.arrival_rate)} ({loop.num_arrivals} arrivals, "
                     f"{loop.num_dropped} dropped, p99 lateness {fmt(loop.p99_lateness_ms)} ms)")
    for tenant in details.breakdown.tenants:
        lines.append(f"tenant {tenant.tenant}: {tenant.num_calls} calls "
                     f"({tenant.calls_per_s:.3g}/s), TTFT p50 {fmt(tenant.ttft.p50_ms)} ms, "
                     f"p95 {fmt(tenant.ttft.p95_ms)} ms, prefix-cache hits "
                     f"{pct(tenant.cache.hit_share)}")
    first, follow = (details.breakdown.turn(label) for label in (FIRST_TURNS, FOLLOW_UPS))
    if first is not None and follow is not None:
        lines.append(f"prefix cache: first turns {pct(first.cache.hit_share)}, follow-ups "
                     f"{pct(follow.cache.hit_share)} of their prompt tokens (ceiling "
                     f"{pct(follow.cache.ceiling)}; follow-up TTFT p50 "
                     f"{fmt(follow.ttft.p50_ms)} ms, p95 {fmt(follow.ttft.p95_ms)} ms)")
    if (server := details.server_cache) is not None:
        lines.append(f"servers' prefix cache over the run: {pct(server.hit_share)} of "
                     f"{server.queries:.0f} prompt tokens")
    return lines


def summary_text(metrics: RunMetrics, details: RunDetails, out_dir: Path) -> str:
    head = (f"quiver loadtest: {metrics.num_requests} calls, {metrics.num_failures} failed, "
            f"{metrics.num_rate_limited} rate-limited (429) in {metrics.duration_s:.1f} s: "
            f"{metrics.requests_per_s:.3g} req/s, p95 TTFT {fmt(metrics.p95_ttft_ms)} ms, "
            f"p99 latency {fmt(metrics.p99_latency_ms)} ms, "
            f"{metrics.output_tokens_per_s:.4g} output tokens/s")
    return "\n".join([head, *(f"  {line}" for line in detail_lines(details)),
                      f"report: {out_dir / 'report.html'} (Locust's: "
                      f"{out_dir / 'locust.html'}; numbers: {out_dir / RESULTS_JSON})"])


def cache_json(cache: CacheShare) -> dict[str, Any]:
    return {**asdict(cache), "hit_share": cache.hit_share, "ceiling": cache.ceiling}


def breakdown_json(breakdown: Breakdown) -> dict[str, Any]:
    return {
        "tenants": [{**asdict(t), "cache": cache_json(t.cache)} for t in breakdown.tenants],
        "turns": [{**asdict(t), "cache": cache_json(t.cache)} for t in breakdown.turns],
    }


def write_results_json(path: Path, info: RunInfo, metrics: RunMetrics,
                       checks: list[SloCheck], details: RunDetails) -> None:
    server = details.server_cache
    data = {
        "run": asdict(info),
        "metrics": asdict(metrics),
        "slo": [{**asdict(c), "passed": c.passed} for c in checks],
        "open_loop": asdict(details.open_loop) if details.open_loop else None,
        **breakdown_json(details.breakdown),
        "server_prefix_cache": {**asdict(server), "hit_share": server.hit_share}
        if server else None,
    }
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
