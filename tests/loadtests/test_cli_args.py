"""`quiver loadtest` argument checks: clear one-line errors before anything starts."""

from __future__ import annotations

import pytest

from loadtests.cli import parse_duration, parse_user_classes
from loadtests.errors import LoadTestError
from quiver.cli import main


@pytest.mark.parametrize("text, seconds", [("60s", 60), ("90", 90), ("2m", 120),
                                           ("1h30m", 5400), ("1m5s", 65)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "0s", "5x", "m"])
def test_bad_durations(text):
    with pytest.raises(LoadTestError, match="--duration"):
        parse_duration(text)


def test_user_classes():
    assert parse_user_classes("mix") == ["stream", "chat", "completion", "cached"]
    assert parse_user_classes("stream, conversation,stream") == ["stream", "conversation"]
    with pytest.raises(LoadTestError, match="choose mix or a comma list of stream"):
        parse_user_classes("stream,video")


@pytest.mark.parametrize("args, message", [
    (["--users", "0"], "--users must be at least 1, got 0"),
    (["--spawn-rate", "0"], "--spawn-rate must be positive"),
    (["--host", "localhost:8000"], "is not an http(s) URL"),
    (["--duration", "forever"], "--duration 'forever' is not a duration"),
    (["--user-class", "bots"], "--user-class 'bots'"),
    (["--rate", "0"], "--rate must be positive"),
    (["--rate", "5", "--users", "3"], "--users and --shape drive closed-loop users"),
    (["--rate", "5", "--shape", "ramp"], "--rate runs an open loop"),
    (["--rate", "5", "--max-in-flight", "0"], "--max-in-flight must be at least 1"),
    (["--seed", "3"], "--seed and --max-in-flight shape the open loop's arrivals: they "
                      "need --rate"),
    (["--max-in-flight", "8"], "--seed and --max-in-flight shape the open loop's arrivals"),
    (["--turns", "0", "--user-class", "conversation"], "--turns must be at least 1"),
    (["--turns", "3"], "--turns sets the length of conversations: add conversation to "
                       "--user-class"),
    (["--server-metrics", "localhost:8001/metrics"], "is not an http(s) URL"),
])
def test_bad_arguments_fail_with_a_clear_message(args, message, capsys, tmp_path):
    assert main(["loadtest", "--model", str(tmp_path), "--out", str(tmp_path / "o"),
                 *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("quiver loadtest: error: ") and message in err
    assert "Traceback" not in err


def test_missing_model_dir_says_how_to_get_one(capsys, tmp_path):
    assert main(["loadtest", "--model", str(tmp_path / "absent")]) == 1
    assert "quiver models tiny" in capsys.readouterr().err


def test_a_bad_slo_file_fails_before_the_run_starts(capsys, tmp_path):
    slo = tmp_path / "slo.yaml"
    slo.write_text("p95_ttft: 100\n")
    out = tmp_path / "out"
    assert main(["loadtest", "--host", "http://127.0.0.1:9", "--slo", str(slo),
                 "--out", str(out)]) == 1
    assert "unknown SLO key(s) p95_ttft" in capsys.readouterr().err
    assert not out.exists()   # nothing ran


def test_a_local_stack_makes_tenant_keys_itself(capsys, tmp_path):
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text("quiet: {weight: 1, api_key: qk-given}\n")
    assert main(["loadtest", "--model", str(tmp_path), "--tenants", str(tenants)]) == 1
    err = capsys.readouterr().err
    assert "a local stack creates each tenant's key; leave api_key" in err and "quiet" in err


def test_an_endpoint_needs_a_key_per_tenant(capsys, tmp_path):
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text("quiet: {weight: 1, api_key: qk-q}\nnoisy: {weight: 10}\n")
    assert main(["loadtest", "--host", "http://127.0.0.1:9", "--tenants", str(tenants),
                 "--out", str(tmp_path / "o")]) == 1
    assert "--host needs a key per tenant" in capsys.readouterr().err


def test_api_keys_from_the_environment_need_an_endpoint(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("QUIVER_API_KEYS", "quiet=qk-q,noisy=qk-n:10")
    assert main(["loadtest", "--model", str(tmp_path)]) == 1
    assert "$QUIVER_API_KEYS names keys of a running endpoint" in capsys.readouterr().err
