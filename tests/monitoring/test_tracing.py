"""One trace per request from the gateway to the engine, exported the way operators set it
up: `quiver up` (gateway + tiny-model server, separate processes) with nothing but the
standard `OTEL_*` variables pointing at an OTLP/HTTP receiver this test runs. The spans
must form one tree under the caller's `traceparent`: gateway server span -> auth, rate
limit, cache, route and the upstream client span -> the model server's span -> queue,
prefill, decode."""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from common.telemetry import TelemetryConfigError, configure_tracing, wanted_exporters
from tests.gateway.conftest import wait_until
from tests.quiver.test_up import read_log, start_up, stop

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"
UP_KEY = "qk-tracing-test-key-for-quiver-up"


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str


class OtlpReceiver(ThreadingHTTPServer):
    """POST /v1/traces with protobuf bodies, as OTLP/HTTP collectors take them."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def add(self, request: ExportTraceServiceRequest) -> None:
        for resource_spans in request.resource_spans:
            attributes = {a.key: a.value.string_value
                          for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    with self.lock:
                        self.spans.append(ReceivedSpan(
                            attributes.get("service.name", ""), span.name, span.kind,
                            span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex()))


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["content-length"]))
        if self.path == "/v1/traces":
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            self.server.add(request)
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.slow
def test_one_trace_spans_gateway_and_engine(tiny_model_dir, tmp_path, receiver):
    env = {"QUIVER_API_KEY": UP_KEY, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
           "OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_TRACES_SAMPLER": "parentbased_always_on",
           # a default limit, so the rate-limit phase runs (and shows) for this key
           "QUIVER_GATEWAY_RATE_LIMIT__DEFAULT_RPM": "1000"}
    process, log, port = start_up(tmp_path, "--model", str(tiny_model_dir), env=env)
    try:
        wait_until(lambda: "API key:" in read_log(log) or process.poll() is not None, 180,
                   "quiver up")
        wait_until(lambda: _ready(f"http://127.0.0.1:{port}/ready"), 30, "the gateway")
        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
            headers={"authorization": f"Bearer {UP_KEY}",
                     "traceparent": f"00-{TRACE_ID}-{CALLER_SPAN_ID}-01"},
            json={"model": tiny_model_dir.name, "stream": True, "max_tokens": 5,
                  "temperature": 0, "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 200 and "data: [DONE]" in response.text
        expected = {"POST /v1/chat/completions", f"upstream {tiny_model_dir.name}/stable",
                    "gateway.auth", "gateway.ratelimit", "gateway.cache", "gateway.route",
                    "queue", "prefill", "decode"}
        wait_until(lambda: expected <= {s.name for s in _traced(receiver)}
                   and sum(s.kind == 2 for s in _traced(receiver)) == 2,
                   30, "the spans of both processes")
    finally:
        output = read_log(log)
        stop(process, log)
    assert process.returncode == 0, output[-3000:]

    spans = _traced(receiver)
    by_name = {span.name: span for span in spans}
    # both processes name their server span after the route: tell them apart by service
    root, = [s for s in spans if s.service == "quiver-gateway" and s.kind == 2]
    assert root.name == "POST /v1/chat/completions"
    assert (root.service, root.parent_id, root.kind) == ("quiver-gateway", CALLER_SPAN_ID, 2)
    upstream = by_name[f"upstream {tiny_model_dir.name}/stable"]
    gateway_children = {s.name for s in spans if s.parent_id == root.span_id}
    assert gateway_children == {"gateway.auth", "gateway.ratelimit", "gateway.cache",
                                "gateway.route", upstream.name}
    assert upstream.kind == 3  # CLIENT
    server = [s for s in spans if s.service == "quiver-server" and s.kind == 2]
    assert len(server) == 1 and server[0].parent_id == upstream.span_id
    engine = {s.name for s in spans if s.parent_id == server[0].span_id}
    assert engine == {"queue", "prefill", "decode"}
    assert {s.service for s in spans} == {"quiver-gateway", "quiver-server"}


def _traced(receiver: OtlpReceiver) -> list[ReceivedSpan]:
    with receiver.lock:
        return [span for span in receiver.spans if span.trace_id == TRACE_ID]


def _ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_tracing_is_off_unless_the_environment_asks():
    assert wanted_exporters({}) == []
    assert configure_tracing("x", env={}) is None
    assert wanted_exporters({"OTEL_TRACES_EXPORTER": "none"}) == []
    assert wanted_exporters({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) == ["otlp"]
    assert wanted_exporters({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}
                            ) == ["otlp"]
    assert wanted_exporters({"OTEL_TRACES_EXPORTER": "otlp,console"}) == ["otlp", "console"]
    assert wanted_exporters({"OTEL_SDK_DISABLED": "true",
                             "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) == []


def test_unusable_tracing_settings_are_refused_with_the_variable_named():
    with pytest.raises(TelemetryConfigError, match="OTEL_TRACES_EXPORTER='zipkin'"):
        wanted_exporters({"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(TelemetryConfigError, match="protocol 'http/json'"):
        configure_tracing("x", env={"OTEL_TRACES_EXPORTER": "otlp",
                                    "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})
    if importlib.util.find_spec("opentelemetry.exporter.otlp.proto.grpc") is None:
        with pytest.raises(TelemetryConfigError, match="exporter-otlp-proto-grpc"):
            configure_tracing("x", env={"OTEL_TRACES_EXPORTER": "otlp",
                                        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
