"""SLO file parsing (unknown keys, bad values) and breach messages that say by how much."""

from __future__ import annotations

import pytest

from loadtests.errors import SloFileError
from loadtests.results import RunMetrics
from loadtests.slo import DEFAULT_SLO, Slo, breach_message, check_slo, load_slo, parse_slo


def metrics(**overrides) -> RunMetrics:
    values = dict(num_requests=100, num_failures=2, num_rate_limited=3, duration_s=20.0,
                  requests_per_s=5.0, error_ratio=0.02, p95_ttft_ms=250.0,
                  p99_latency_ms=900.0, output_tokens_per_s=120.0)
    return RunMetrics(**{**values, **overrides})


def test_parses_every_key_and_allows_any_subset():
    slo = parse_slo("p95_ttft_ms: 500\np99_latency_ms: 2000.5\nmax_error_ratio: 0\n"
                    "min_output_tokens_per_s: 10\n")
    assert slo == Slo(500.0, 2000.5, 0.0, 10.0)
    assert parse_slo("p95_ttft_ms: 100\n") == Slo(p95_ttft_ms=100.0)
    assert parse_slo("") == Slo()


def test_unknown_key_is_an_error_naming_it_and_the_known_ones():
    with pytest.raises(SloFileError) as exc:
        parse_slo("p95_ttft_ms: 1\np95_tfft_ms: 2\n", "my.yaml")
    message = str(exc.value)
    assert "my.yaml" in message and "unknown SLO key(s) p95_tfft_ms" in message
    assert "min_output_tokens_per_s" in message


@pytest.mark.parametrize("text, fragment", [
    ("p95_ttft_ms: fast\n", "p95_ttft_ms must be a number, got 'fast'"),
    ("p95_ttft_ms: true\n", "must be a number, got True"),
    ("p99_latency_ms: -1\n", "must not be negative"),
    ("max_error_ratio: 5\n", "ratio in [0, 1]"),
    ("- p95_ttft_ms\n", "must be a mapping"),
    ("p95_ttft_ms: [\n", "not valid YAML"),
])
def test_bad_values_are_clear_errors(text, fragment):
    with pytest.raises(SloFileError, match=None) as exc:
        parse_slo(text)
    assert fragment in str(exc.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(SloFileError, match="cannot read SLO file .*absent.yaml"):
        load_slo(tmp_path / "absent.yaml")


def test_default_slo_file_sets_every_key():
    slo = load_slo(DEFAULT_SLO)
    assert None not in (slo.p95_ttft_ms, slo.p99_latency_ms, slo.max_error_ratio,
                        slo.min_output_tokens_per_s)


def test_all_within_limits_passes():
    checks = check_slo(Slo(300, 1000, 0.05, 100), metrics())
    assert [c.key for c in checks] == ["p95_ttft_ms", "p99_latency_ms", "max_error_ratio",
                                       "min_output_tokens_per_s"]
    assert all(c.passed for c in checks)
    assert breach_message(checks) is None


def test_breach_names_each_failed_slo_and_by_how_much():
    checks = check_slo(Slo(p95_ttft_ms=200, max_error_ratio=0.05,
                           min_output_tokens_per_s=150), metrics())
    message = breach_message(checks)
    assert message is not None
    assert "p95_ttft_ms: 250ms (limit <= 200ms) BREACHED by 50ms, 25%" in message
    assert "min_output_tokens_per_s: 120tokens/s (limit >= 150tokens/s) BREACHED by 30" \
        in message
    assert "max_error_ratio" not in message


def test_a_limit_on_data_the_run_lacks_is_a_breach():
    checks = check_slo(Slo(p95_ttft_ms=1000), metrics(p95_ttft_ms=None))
    assert not checks[0].passed
    assert "p95_ttft_ms: no data in this run" in breach_message(checks)


def test_zero_error_budget_is_breached_by_one_failure():
    assert check_slo(Slo(max_error_ratio=0), metrics(error_ratio=0.0))[0].passed
    assert not check_slo(Slo(max_error_ratio=0), metrics(error_ratio=0.01))[0].passed


def test_tenant_and_prefix_cache_slos_check_their_own_metrics():
    slo = parse_slo("max_tenant_p95_ttft_ms: 300\nmin_follow_up_cache_hit_share: 0.93\n")
    checks = check_slo(slo, metrics(max_tenant_p95_ttft_ms=280.0,
                                    follow_up_cache_hit_share=0.9))
    assert [(c.key, c.passed) for c in checks] == [("max_tenant_p95_ttft_ms", True),
                                                   ("min_follow_up_cache_hit_share", False)]
    assert "min_follow_up_cache_hit_share: 0.9 (limit >= 0.93) BREACHED" in breach_message(checks)
    # a run without conversations has no follow-ups: a breach, not a pass
    assert not check_slo(slo, metrics())[1].passed
    with pytest.raises(SloFileError, match="min_follow_up_cache_hit_share is a ratio"):
        parse_slo("min_follow_up_cache_hit_share: 93\n")
