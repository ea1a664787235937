"""One trace through the gateway: its server span joins the caller's `traceparent`, a client
span per upstream call is the parent the model server sees, and no span carries the key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PROBE = Path(__file__).with_name("trace_probe.py")
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"


def test_gateway_spans_join_the_trace_and_never_carry_the_key(tmp_path, repo_root):
    result = subprocess.run([sys.executable, str(PROBE), str(tmp_path)], capture_output=True,
                            text=True, timeout=120, cwd=repo_root, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    spans = [line for line in lines if line["kind"] == "span"]
    upstream = [line["headers"] for line in lines if line["kind"] == "upstream"]
    secret = next(line["value"] for line in lines if line["kind"] == "secret")
    servers = [s for s in spans if s["name"] == "POST /v1/chat/completions"]
    assert len(servers) == 2
    for server in servers:
        assert server["trace_id"] == TRACE_ID and server["parent_id"] == CALLER_SPAN_ID
        assert server["attributes"]["quiver.key_name"] == "traced"
    clients = [s for s in spans if s["name"] == "upstream tiny/stable"]
    assert {c["parent_id"] for c in clients} == {s["span_id"] for s in servers}
    assert {c["attributes"]["quiver.stream"] for c in clients} == {"True", "False"}
    # the model server continues the trace under the gateway's client span
    sent_parents = {h["traceparent"].split("-")[2] for h in upstream}
    assert sent_parents == {c["span_id"] for c in clients}
    assert all(h["traceparent"].split("-")[1] == TRACE_ID for h in upstream)
    assert all("authorization" not in {k.lower() for k in h} for h in upstream)
    assert secret not in result.stdout.replace(secret, "", 1)  # only the probe's own line
