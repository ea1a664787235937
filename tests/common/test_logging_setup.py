import io
import json
import logging

from opentelemetry import trace

from common.asgi import request_id_var
from common.logging_setup import configure_logging

SPAN_CONTEXT = trace.SpanContext(trace_id=0x4BF92F3577B34DA6A3CE929D0E0E4736,
                                 span_id=0x00F067AA0BA902B7, is_remote=False)


def _capture(json_lines: bool, *, traced: bool = False) -> str:
    root = logging.getLogger()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root.addHandler(handler)
    try:
        configure_logging(json_lines=json_lines)
        token = request_id_var.set("req-42")
        try:
            with trace.use_span(trace.NonRecordingSpan(SPAN_CONTEXT) if traced
                                else trace.INVALID_SPAN):
                logging.getLogger("quiver.test").warning("served %d tokens", 7)
        finally:
            request_id_var.reset(token)
    finally:
        root.removeHandler(handler)
    return stream.getvalue()


def test_json_lines_carry_the_request_id():
    entry = json.loads(_capture(json_lines=True))
    assert entry["message"] == "served 7 tokens"
    assert (entry["level"], entry["logger"], entry["request_id"]) == (
        "WARNING", "quiver.test", "req-42")


def test_text_lines_carry_the_request_id():
    assert "[req-42]: served 7 tokens" in _capture(json_lines=False)


def test_json_lines_carry_the_trace_while_a_span_is_active():
    entry = json.loads(_capture(json_lines=True, traced=True))
    assert (entry["trace_id"], entry["span_id"]) == (
        "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")
    assert "trace_id" not in json.loads(_capture(json_lines=True))


def test_text_lines_carry_the_trace_id_while_a_span_is_active():
    line = _capture(json_lines=False, traced=True)
    assert "[req-42 trace=4bf92f3577b34da6a3ce929d0e0e4736]: served 7 tokens" in line
