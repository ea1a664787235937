"""Run in its own process by test_tracing.py: the global OpenTelemetry tracer provider can
be set only once per process, and the rest of the suite runs with tracing off.

Serves one chat request with a `traceparent` through the real app on the native engine and
prints the finished spans as JSON lines."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import httpx
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from transformers import AutoTokenizer

from serving.api.app import create_app
from serving.backends.native import create
from serving.settings import ServerSettings

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def main(model_dir: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    settings = ServerSettings(model=model_dir, served_model_name="tiny", dtype="float32")
    registry = CollectorRegistry()
    engine = create(settings, registry)
    app = create_app(settings, engine, AutoTokenizer.from_pretrained(model_dir), registry)
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://quiver") as client:
            for stream in (False, True):
                response = await client.post(
                    "/v1/chat/completions", headers={"traceparent": TRACEPARENT},
                    json={"model": "tiny", "max_tokens": 5, "stream": stream,
                          "messages": [{"role": "user", "content": "hi"}]})
                assert response.status_code == 200, response.text
    finally:
        await engine.shutdown()
    for span in exporter.get_finished_spans():
        print(json.dumps({
            "name": span.name, "trace_id": f"{span.context.trace_id:032x}",
            "span_id": f"{span.context.span_id:016x}",
            "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
            "start": span.start_time, "end": span.end_time,
        }))


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
