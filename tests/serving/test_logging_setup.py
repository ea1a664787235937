import io
import json
import logging

from serving.api.middleware import request_id_var
from serving.logging_setup import configure_logging


def _capture(json_lines: bool) -> str:
    root = logging.getLogger()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root.addHandler(handler)
    try:
        configure_logging(json_lines=json_lines)
        token = request_id_var.set("req-42")
        try:
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
