"""What the report adds from the call log and the servers: per-tenant TTFT percentiles, the
prefix-cache hit share of first turns against follow-ups, the servers' own counters, and the
open loop's achieved rate from Locust's ARRIVAL entry."""

from __future__ import annotations

import pytest

from loadtests.arrivals import ARRIVAL, ARRIVAL_NAME
from loadtests.breakdown import FIRST_TURNS, FOLLOW_UPS, compute_breakdown, percentile
from loadtests.calllog import FAILED, OK, RATE_LIMITED, CallLog, CallRecord, read_call_log
from loadtests.results import Entry, RunResults, open_loop_stats
from loadtests.server_metrics import PrefixCounters, parse_counters, server_cache_stats
from loadtests.tenants import Tenant


def record(tenant: str, ttft: float | None, *, turn: int | None = None, prompt: int = 100,
           cached: int | None = 0, status: str = OK, started_at: float = 0.0,
           reusable: int | None = None) -> CallRecord:
    return CallRecord(started_at=started_at, tenant=tenant, kind="conversation", turn=turn,
                      status=status, latency_ms=50.0, ttft_ms=ttft, prompt_tokens=prompt,
                      cached_tokens=cached, completion_tokens=10, reusable_tokens=reusable)


def test_percentiles_are_exact_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 0.5), percentile(values, 0.95), percentile(values, 0.99)) == (
        50.0, 95.0, 99.0)
    assert percentile([], 0.5) is None and percentile([7.0], 0.99) == 7.0


def test_each_tenant_gets_its_own_ttft_percentiles_and_counts():
    records = [record("quiet", float(ms), started_at=ms / 100) for ms in range(10, 110, 10)]
    records += [record("noisy", 500.0, started_at=1.0) for _ in range(30)]
    records += [record("noisy", None, status=FAILED, cached=None, started_at=0.5),
                record("noisy", None, status=RATE_LIMITED, cached=None, started_at=0.5)]
    tenants = compute_breakdown(records, [Tenant("quiet", "k", 1), Tenant("noisy", "k", 10),
                                          Tenant("idle", "k", 1)]).tenants
    by_name = {t.tenant: t for t in tenants}
    assert [t.tenant for t in tenants] == ["quiet", "noisy", "idle"]
    quiet, noisy = by_name["quiet"], by_name["noisy"]
    assert (quiet.num_calls, quiet.ttft.num_samples, quiet.ttft.p50_ms, quiet.ttft.p95_ms) == (
        10, 10, 50.0, 100.0)
    assert (noisy.num_calls, noisy.num_failures, noisy.num_rate_limited) == (32, 1, 1)
    assert noisy.ttft.num_samples == 30 and noisy.ttft.p95_ms == 500.0
    assert noisy.calls_per_s == pytest.approx(32 / 0.9)   # over the run's span, 0.1 .. 1.0 s
    assert by_name["idle"].num_calls == 0 and by_name["idle"].ttft.p50_ms is None


def test_hit_share_splits_first_turns_from_follow_ups():
    records = [record("a", 10.0, turn=1, prompt=500, cached=0),
               record("a", 11.0, turn=1, prompt=500, cached=400),
               record("a", 12.0, turn=2, prompt=600, cached=560, reusable=580),
               record("a", 13.0, turn=3, prompt=700, cached=672, reusable=690),
               record("a", 14.0, turn=3, prompt=700, cached=None),          # not reported
               record("a", None, turn=2, prompt=600, cached=0, status=FAILED),
               record("a", 20.0, turn=None, prompt=50, cached=0)]
    breakdown = compute_breakdown(records, [Tenant("a", "k")])
    assert [t.label for t in breakdown.turns] == ["single calls", "turn 1", "turn 2", "turn 3",
                                                  FIRST_TURNS, FOLLOW_UPS]
    first, follow = breakdown.turn(FIRST_TURNS), breakdown.turn(FOLLOW_UPS)
    assert first.cache.hit_share == pytest.approx(400 / 1000)
    assert follow.cache.hit_share == pytest.approx((560 + 672) / (600 + 700))
    assert follow.cache.ceiling == pytest.approx((580 + 690) / (600 + 700))
    assert first.cache.ceiling is None
    assert (follow.num_calls, follow.cache.num_calls, follow.ttft.num_samples) == (4, 2, 3)
    assert breakdown.follow_up_hit_share == follow.cache.hit_share


def test_the_call_log_round_trips_and_skips_a_torn_line(tmp_path):
    path = tmp_path / "calls.jsonl"
    log = CallLog(path)
    records = [record("a", 1.5, turn=2, reusable=3), record("b", None, status=FAILED)]
    for item in records:
        log.write(item)
    log.close()
    with path.open("a") as file:
        file.write('{"started_at": 1.0, "ten')
    assert read_call_log(path) == records
    assert read_call_log(tmp_path / "absent.jsonl") == []


METRICS = """# HELP vllm:prefix_cache_queries_total Prompt tokens looked up in the prefix cache.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{model_name="m",engine="0"} 1000.0
vllm:prefix_cache_queries_total{model_name="m",engine="1"} 500.0 1796452883000
vllm:prefix_cache_queries_created{model_name="m"} 1.79e+09
vllm:prefix_cache_hits_total{model_name="m"} 900.0
vllm:prefix_cache_hits_totally_other 5
"""


def test_server_counters_are_summed_over_labels_and_compared_before_and_after():
    assert parse_counters(METRICS) == PrefixCounters(queries=1500.0, hits=900.0)
    assert parse_counters("vllm:num_requests_running 1\n") is None
    before = {"u1": PrefixCounters(100, 50), "u2": None}
    after = {"u1": PrefixCounters(1100, 950), "u2": PrefixCounters(10, 10)}
    stats = server_cache_stats(before, after)
    assert (stats.urls, stats.queries, stats.hits, stats.hit_share) == (["u1"], 1000, 900, 0.9)
    assert server_cache_stats({"u": None}, {"u": None}) is None


def test_open_loop_rate_comes_from_the_arrival_entry():
    arrivals = Entry(ARRIVAL, ARRIVAL_NAME, num_requests=41, num_failures=3,
                     response_times={1.0: 40, 30.0: 1}, start_time=1000.0,
                     last_request_timestamp=1010.0)
    stats = open_loop_stats(RunResults(entries=[arrivals]), target_rate=4.0)
    assert (stats.num_arrivals, stats.num_dropped, stats.arrival_rate) == (41, 3, 4.0)
    assert (stats.p50_lateness_ms, stats.p99_lateness_ms) == (1.0, 30.0)
    assert open_loop_stats(RunResults(entries=[]), 4.0).arrival_rate is None
