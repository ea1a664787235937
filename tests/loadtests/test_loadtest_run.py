"""`quiver loadtest` for real: it starts the local stack on the tiny model, runs Locust
headless, writes Locust's files and the report, checks the SLO and stops the stack."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

GATEWAY_URL = re.compile(r"gateway on http://127\.0\.0\.1:(\d+)")


@dataclass
class Run:
    result: subprocess.CompletedProcess
    out: Path


def loadtest(repo_root: Path, out: Path, *args: str, **extra_env: str) -> Run:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUIVER_")} | extra_env
    result = subprocess.run(
        [sys.executable, "-m", "quiver", "loadtest", "--out", str(out), *args],
        cwd=repo_root, env=env, capture_output=True, text=True, timeout=240, check=False)
    return Run(result, out)


def is_listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def passing_run(repo_root, tiny_model_dir, tmp_path_factory) -> Run:
    return loadtest(repo_root, tmp_path_factory.mktemp("loadtest") / "run",
                    "--model", str(tiny_model_dir), "--duration", "20s", "--users", "5",
                    "--spawn-rate", "5")


@pytest.mark.slow
def test_a_20s_run_passes_with_ttft_entries_and_no_failures(passing_run):
    result, out = passing_run.result, passing_run.out
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    entries = json.loads((out / "locust.json").read_text())
    by_type: dict[str, int] = {}
    for entry in entries:
        by_type[entry["method"]] = by_type.get(entry["method"], 0) + entry["num_requests"]
        assert entry["num_failures"] == 0, entry["name"]
    assert by_type["TTFT"] > 0 and by_type["ITL"] > by_type["TTFT"]
    assert by_type["POST"] >= by_type["TTFT"] and by_type["TOKENS/s"] > 0
    assert re.search(r"quiver loadtest: \d+ calls, 0 failed", result.stdout)
    for key in ("p95_ttft_ms", "p99_latency_ms", "max_error_ratio", "min_output_tokens_per_s"):
        assert re.search(rf"SLO {key}: .* ok$", result.stdout, re.MULTILINE), key


@pytest.mark.slow
def test_the_run_writes_locust_files_and_a_report_with_plots(passing_run):
    out = passing_run.out
    for name in ("locust_stats.csv", "locust_stats_history.csv", "locust_failures.csv",
                 "locust.html", "report.html"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.html").read_text()
    assert report.count("src='data:image/png;base64,") == 6
    assert "TTFT" in report and ">pass<" in report and "BREACH" not in report


@pytest.mark.slow
def test_the_local_stack_is_stopped_after_the_run(passing_run):
    stack_log = (passing_run.out / "stack.log").read_text()
    match = GATEWAY_URL.search(stack_log)
    assert match, stack_log[-2000:]
    assert not is_listening(int(match[1]))
    assert "Finished server process" in stack_log


@pytest.mark.slow
def test_the_report_renders_in_a_browser(passing_run, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (make system-deps installs it)")
    shot = tmp_path / "report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                    "--window-size=1150,1900", f"--screenshot={shot}",
                    (passing_run.out / "report.html").as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 50_000   # plots drawn, not a blank page


@pytest.mark.slow
def test_an_impossible_slo_fails_the_run_naming_it(repo_root, tiny_model_dir, tmp_path):
    slo = tmp_path / "impossible.yaml"
    slo.write_text("p95_ttft_ms: 0.001\nmax_error_ratio: 0.5\n")
    run = loadtest(repo_root, tmp_path / "run", "--model", str(tiny_model_dir),
                   "--duration", "5s", "--users", "2", "--spawn-rate", "2",
                   "--user-class", "stream", "--slo", str(slo))
    err = run.result.stderr
    assert run.result.returncode == 1, run.result.stdout[-2000:] + err[-2000:]
    assert "quiver loadtest: error: SLO breached: p95_ttft_ms:" in err
    assert "(limit <= 0.001ms) BREACHED by" in err
    assert "max_error_ratio" not in err.split("SLO breached:")[1]
    assert (run.out / "report.html").is_file()


@pytest.fixture(scope="module")
def conversation_run(repo_root, tiny_model_dir, tmp_path_factory) -> Run:
    base = tmp_path_factory.mktemp("conversations")
    tenants = base / "tenants.yaml"
    tenants.write_text("quiet: {weight: 1}\nnoisy: {weight: 3}\n")
    return loadtest(repo_root, base / "run", "--model", str(tiny_model_dir), "--rate", "4",
                    "--seed", "3", "--duration", "15s", "--user-class", "conversation",
                    "--tenants", str(tenants),
                    # continue a conversation once 2 are idle (default 8): the quiet tenant's
                    # ~15 arrivals reach follow-ups even when a busy CI host answers slowly
                    QUIVER_OPEN_CONVERSATIONS="2")


@pytest.mark.slow
def test_an_open_loop_of_conversations_reports_tenants_and_prefix_hits(conversation_run):
    result, out = conversation_run.result, conversation_run.out
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    loop = results["open_loop"]
    assert 0.65 * 4 <= loop["arrival_rate"] <= 1.35 * 4 and loop["num_dropped"] == 0, loop
    tenants = {t["tenant"]: t for t in results["tenants"]}
    assert list(tenants) == ["quiet", "noisy"]   # each with its own key, made for the run
    for tenant in tenants.values():
        assert tenant["num_calls"] > 0 and tenant["num_failures"] == 0, tenant
        assert tenant["ttft"]["p50_ms"] <= tenant["ttft"]["p95_ms"], tenant
    assert tenants["noisy"]["num_calls"] > tenants["quiet"]["num_calls"]
    turns = {t["label"]: t for t in results["turns"]}
    first, follow = turns["first turns"]["cache"], turns["follow-ups"]["cache"]
    assert turns["turn 2"]["num_calls"] > 0 and follow["num_calls"] > 0
    # the native engine's prefix cache: first turns find their shared system prompt (but not
    # the first conversation of each), follow-ups their whole history
    assert follow["hit_share"] >= 0.7 and follow["hit_share"] > first["hit_share"] + 0.03
    assert follow["hit_share"] <= follow["ceiling"] <= 1
    assert 0.5 < results["server_prefix_cache"]["hit_share"] < 1
    assert results["metrics"]["follow_up_cache_hit_share"] == follow["hit_share"]
    assert re.search(r"prefix cache: first turns [\d.]+%, follow-ups [\d.]+%", result.stdout)
    report = (out / "report.html").read_text()
    assert "<h2>Tenants</h2>" in report and "<td>noisy</td>" in report
    assert "<td>follow-ups</td>" in report and "achieved arrivals/s" in report
