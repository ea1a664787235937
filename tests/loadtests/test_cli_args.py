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
    assert parse_user_classes("mix") == []
    assert parse_user_classes("stream, cached") == ["StreamingChatUser", "CachedPromptUser"]
    with pytest.raises(LoadTestError, match="choose mix or a comma list of stream"):
        parse_user_classes("stream,video")


@pytest.mark.parametrize("args, message", [
    (["--users", "0"], "--users must be at least 1, got 0"),
    (["--spawn-rate", "0"], "--spawn-rate must be positive"),
    (["--host", "localhost:8000"], "is not an http(s) URL"),
    (["--duration", "forever"], "--duration 'forever' is not a duration"),
    (["--user-class", "bots"], "--user-class 'bots'"),
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
