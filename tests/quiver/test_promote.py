"""`quiver promote`'s pieces without a gateway: steps, a step's metrics and its SLO checks.
The walk itself runs against real processes in test_rollout.py."""

from __future__ import annotations

import pytest

from common.errors import QuiverError
from loadtests.calls import POST, TTFT, CallOutcome, Sample
from loadtests.slo import Slo
from loadtests.sse import Usage
from quiver.promote import parse_steps, run_metrics, step_slo_checks


def test_steps_must_rise_within_0_and_100():
    assert parse_steps("10,50,100") == [10.0, 50.0, 100.0]
    assert parse_steps("25") == [25.0]
    for bad in ("50,10", "0,100", "10,150", "10,10", "ten", ""):
        with pytest.raises(QuiverError):
            parse_steps(bad)


def outcome(latency_ms: float, *, error: str | None = None,
            ttft_ms: float | None = None) -> CallOutcome:
    samples = [Sample(POST, "chat", latency_ms, error=error)]
    if ttft_ms is not None:
        samples.append(Sample(TTFT, "chat", ttft_ms))
    usage = None if error else Usage(prompt_tokens=5, completion_tokens=4)
    return CallOutcome(samples, "text", usage)


def test_a_steps_metrics_come_from_the_variants_own_calls():
    outcomes = [outcome(100.0 * i, ttft_ms=10.0 * i) for i in range(1, 20)]
    outcomes.append(outcome(50.0, error="HTTP 500: boom"))
    metrics = run_metrics(outcomes, duration_s=2.0)
    assert metrics.num_requests == 20 and metrics.num_failures == 1
    assert metrics.error_ratio == 0.05
    assert metrics.p95_ttft_ms == 190.0  # nearest rank of 19 and metrics.p99_latency_ms == 1900.0
    assert metrics.output_tokens_per_s == 19 * 4 / 2.0


def test_without_an_slo_file_any_error_fails_a_step():
    clean = run_metrics([outcome(100.0)], 1.0)
    failing = run_metrics([outcome(100.0), outcome(5.0, error="HTTP 502: x")], 1.0)
    assert all(check.passed for check in step_slo_checks(None, clean))
    assert not all(check.passed for check in step_slo_checks(None, failing))


def test_an_slo_files_latency_limits_judge_a_step_and_run_wide_keys_are_left_out():
    slo = Slo(p99_latency_ms=500.0, max_error_ratio=0.5, min_follow_up_cache_hit_share=0.9)
    checks = {c.key: c for c in step_slo_checks(slo, run_metrics([outcome(900.0)], 1.0))}
    assert set(checks) == {"p99_latency_ms", "max_error_ratio"}
    assert not checks["p99_latency_ms"].passed and checks["max_error_ratio"].passed
