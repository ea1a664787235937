"""Run in its own process by test_tracing.py (the global tracer provider can be set only
once per process). A gateway app in front of an in-process fake upstream serves one plain
and one streamed call with a `traceparent`; prints the finished spans and what the upstream
received as JSON lines."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import httpx
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gateway.app import create_app  # noqa: E402
from gateway.keys import ApiKey, generate_key, hash_key  # noqa: E402
from gateway.settings import load_settings  # noqa: E402
from gateway.stores import open_key_store  # noqa: E402
from tests.gateway.fake_upstream import FakeUpstream  # noqa: E402

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def main(workdir: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    fake = FakeUpstream()
    url = await fake.start()
    store_path = str(workdir / "keys.db")
    secret = generate_key()
    store = open_key_store(store_path)
    await store.create(ApiKey(name="traced", key_hash=hash_key(secret), created_at=time.time()))
    await store.close()
    settings = load_settings(None, key_store=store_path, models=[
        {"name": "tiny", "variants": [{"name": "stable", "weight": 100, "replicas": [url]}]}])
    app = create_app(settings)
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
                for stream in (False, True):
                    response = await client.post(
                        "/v1/chat/completions", json={
                            "model": "tiny", "stream": stream,
                            "messages": [{"role": "user", "content": "hi"}]},
                        headers={"traceparent": TRACEPARENT,
                                 "authorization": f"Bearer {secret}"})
                    assert response.status_code == 200, response.text
    finally:
        await fake.stop()
    for span in exporter.get_finished_spans():
        print(json.dumps({
            "kind": "span", "name": span.name, "trace_id": f"{span.context.trace_id:032x}",
            "span_id": f"{span.context.span_id:016x}",
            "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
            "attributes": {k: str(v) for k, v in (span.attributes or {}).items()}}))
    for seen in fake.seen:
        print(json.dumps({"kind": "upstream", "headers": seen.headers}))
    print(json.dumps({"kind": "secret", "value": secret}))


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
