"""One trace per request: the server span joins the caller's `traceparent`, and the engine's
queue, prefill and decode spans are its children, in order, for streamed and plain calls."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PROBE = Path(__file__).with_name("trace_probe.py")
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"


def test_engine_spans_join_the_callers_trace(tiny_model_dir, repo_root):
    result = subprocess.run([sys.executable, str(PROBE), str(tiny_model_dir)],
                            capture_output=True, text=True, timeout=300, cwd=repo_root,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    spans = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    servers = [s for s in spans if s["name"] == "POST /v1/chat/completions"]
    assert len(servers) == 2  # one per request, streamed and not
    for server in servers:
        assert server["trace_id"] == TRACE_ID
        assert server["parent_id"] == CALLER_SPAN_ID
        children = {s["name"]: s for s in spans if s["parent_id"] == server["span_id"]}
        assert {"queue", "prefill", "decode"} <= children.keys()
        queue, prefill, decode = (children[n] for n in ("queue", "prefill", "decode"))
        assert all(s["trace_id"] == TRACE_ID for s in (queue, prefill, decode))
        assert queue["start"] <= queue["end"] <= prefill["start"] + 1
        assert prefill["end"] <= decode["start"] + 1 <= decode["end"] + 1
        assert server["start"] <= queue["start"] and decode["end"] <= server["end"]
