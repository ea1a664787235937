"""The open loop for real (Locust in a subprocess, through `quiver loadtest`) against a server
in the test that takes a whole second per answer: arrivals keep their rate however slow the
answers are, so calls pile up in flight, up to the cap, past which arrivals are dropped and
counted. A closed-loop user would have sent one call a second."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

ANSWER_S = 1.0
RATE = 10.0
MAX_IN_FLIGHT = 6


class SlowOpenAI(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802  (http.server's name)
        self.rfile.read(int(self.headers["content-length"]))
        time.sleep(ANSWER_S)
        usage = {"prompt_tokens": 12, "completion_tokens": 2,
                 "prompt_tokens_details": {"cached_tokens": 0}}
        events = [{"choices": [{"index": 0, "delta": {"content": "hi"}}]},
                  {"choices": [{"index": 0, "delta": {"content": "!"}}]},
                  {"choices": [], "usage": usage}]
        body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        data = body.encode()
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def slow_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowOpenAI)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def max_concurrency(calls: list[dict]) -> int:
    events = sorted([(c["started_at"], 1) for c in calls]
                    + [(c["started_at"] + c["latency_ms"] / 1000, -1) for c in calls])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


@pytest.mark.slow
def test_arrivals_keep_their_rate_while_slow_answers_pile_up(repo_root, slow_server, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUIVER_")}
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "quiver", "loadtest", "--host", slow_server, "--model-name", "m",
         "--api-key", "qk-test", "--rate", str(RATE), "--duration", "6s", "--seed", "7",
         "--max-in-flight", str(MAX_IN_FLIGHT), "--user-class", "stream", "--no-slo",
         "--out", str(out)],
        cwd=repo_root, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    loop = results["open_loop"]
    assert results["run"]["rate"] == RATE and results["run"]["users"] == 0   # no users at all
    # ~60 Poisson arrivals: the rate is the target's, not one per answer (bounds ~3 sigma)
    assert 0.65 * RATE <= loop["arrival_rate"] <= 1.35 * RATE, loop
    assert loop["p99_lateness_ms"] < 200
    calls = [json.loads(line) for line in (out / "calls.jsonl").read_text().splitlines()]
    assert calls and all(c["status"] == "ok" and c["tenant"] == "default" for c in calls)
    assert max_concurrency(calls) == MAX_IN_FLIGHT     # many in flight, never past the cap
    # arrivals finding the cap reached were dropped and counted, not queued
    assert loop["num_dropped"] > 0
    assert loop["num_arrivals"] - loop["num_dropped"] >= len(calls)
    assert re.search(r"open loop: target 10 arrivals/s, achieved [\d.]+ \(\d+ arrivals, "
                     r"[1-9]\d* dropped", result.stdout), result.stdout
