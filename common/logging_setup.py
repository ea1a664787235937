"""Log format for the model server: plain text for people, JSON lines for collectors.

Both carry the request id of the request being served (`request_id_var`, set by the
request-id middleware) and, while tracing is on, the trace id (JSON lines add the span id),
so a log line leads to its trace; JSON lines add the logger, level and exception text as
fields.
"""

from __future__ import annotations

import json
import logging
import time

from common.asgi import RequestIdLogFilter

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(log_ids)s]: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        if getattr(record, "trace_id", ""):
            entry["trace_id"], entry["span_id"] = record.trace_id, record.span_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(*, json_lines: bool) -> None:
    """Give every root handler the request id, and the chosen format."""
    formatter = JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT)
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdLogFilter())
        handler.setFormatter(formatter)
