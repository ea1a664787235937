"""A programmable fake OpenAI-compatible model server for gateway tests.

In-process::

    fake = FakeUpstream(Behaviour(mode="normal"))
    url = await fake.start()          # a free port on 127.0.0.1
    fake.behaviour.mode = "fail503"   # change it at any time
    await fake.stop()

As a subprocess (for tests that kill a replica)::

    python tests/gateway/fake_upstream.py --port P [--mode M] [--response-delay S] ...

Modes, for `POST /v1/chat/completions` and `/v1/completions`: `normal` (a JSON answer with
usage, or an SSE stream of `num_chunks` chunks `chunk_delay_s` apart, a usage chunk when
`stream_options.include_usage`, then `data: [DONE]`), `fail503`, `fail500`, `hang` (never
sends headers), `die_mid_stream` (closes the socket abruptly after `die_after_chunks` chunks,
or half-way through a JSON body), `garbage` (answers bytes that are not HTTP),
`bad_request` (400 in OpenAI's shape), `bad_request_text` (400 in plain text),
`stream_client_error` (streams `die_after_chunks` chunks, then an `invalid_request_error`
event and `[DONE]`, as a server that finds fault with the request mid-way). A body holding
`fail_marker` (when set) gets a 500 whatever the mode. `POST /v1/embeddings` answers in
OpenAI's embeddings format (float lists, or base64 with `encoding_format: base64`;
`dimensions` honoured). `/ready` and `/health` answer 503 when `ready` / `healthy` are off.
`POST /_fake/behaviour` changes the behaviour over HTTP and `GET /_fake/stats` reports what
was seen.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import socket
import struct
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from aiohttp import web

MODES = ("normal", "fail503", "fail500", "hang", "die_mid_stream", "garbage", "bad_request",
         "bad_request_text", "stream_client_error")
_WRITE_ERRORS = (ConnectionResetError, ConnectionError, RuntimeError)


@dataclass
class Behaviour:
    mode: str = "normal"
    response_delay_s: float = 0.0   # before the headers of every model answer
    num_chunks: int = 5
    chunk_delay_s: float = 0.0
    die_after_chunks: int = 2
    ready: bool = True
    healthy: bool = True
    fail_marker: str = ""           # a body holding it gets a 500


@dataclass
class SeenRequest:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class StreamRecord:
    """How one streamed answer ended: completed | client_disconnected | died."""

    path: str
    outcome: str = "running"
    num_chunks_sent: int = 0


@dataclass
class FakeUpstream:
    behaviour: Behaviour = field(default_factory=Behaviour)
    name: str = "fake"
    seen: list[SeenRequest] = field(default_factory=list)
    streams: list[StreamRecord] = field(default_factory=list)
    num_client_disconnects: int = 0
    num_in_flight: int = 0
    url: str = ""
    _runner: web.AppRunner | None = None

    # -- lifecycle -------------------------------------------------------------------

    async def start(self, port: int | None = None, host: str = "127.0.0.1") -> str:
        self._runner = web.AppRunner(self.app(), shutdown_timeout=0.2, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port or _free_port())
        await site.start()
        bound = self._runner.addresses[0]
        self.url = f"http://{host}:{bound[1]}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._model_answer)
        app.router.add_post("/v1/completions", self._model_answer)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/ready", self._ready)
        app.router.add_get("/health", self._health)
        app.router.add_post("/_fake/behaviour", self._set_behaviour)
        app.router.add_get("/_fake/stats", self._stats)
        return app

    # -- probes and control ----------------------------------------------------------

    async def _ready(self, request: web.Request) -> web.Response:
        return web.json_response({"ready": self.behaviour.ready},
                                 status=200 if self.behaviour.ready else 503)

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"healthy": self.behaviour.healthy},
                                 status=200 if self.behaviour.healthy else 503)

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": "tiny", "object": "model", "owned_by": self.name}]})

    async def _set_behaviour(self, request: web.Request) -> web.Response:
        changes = await request.json()
        known = {f.name for f in fields(Behaviour)}
        for key, value in changes.items():
            if key not in known:
                return web.json_response({"error": f"unknown field {key}"}, status=400)
            setattr(self.behaviour, key, value)
        return web.json_response(asdict(self.behaviour))

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response({
            "num_requests": len(self.seen), "num_in_flight": self.num_in_flight,
            "num_client_disconnects": self.num_client_disconnects,
            "streams": [asdict(s) for s in self.streams],
            "num_connections": (len(self._runner.server.connections)
                                if self._runner is not None and self._runner.server else 0),
            "last_body": self.seen[-1].body if self.seen else None})

    # -- model answers ---------------------------------------------------------------

    async def _model_answer(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw) if raw else {}
        self.seen.append(SeenRequest(request.path, dict(request.headers), body))
        self.num_in_flight += 1
        try:
            return await self._answer(request, body)
        finally:
            self.num_in_flight -= 1

    async def _embeddings(self, request: web.Request) -> web.Response:
        raw = await request.read()
        body = json.loads(raw) if raw else {}
        self.seen.append(SeenRequest(request.path, dict(request.headers), body))
        if self.behaviour.fail_marker and self.behaviour.fail_marker in raw.decode():
            return web.json_response({"error": {"message": "fake 500", "type": "server_error",
                                                "param": None, "code": None}}, status=500)
        return web.json_response(_embedding_answer(body, self.name),
                                 headers={"x-fake-upstream": self.name})

    async def _answer(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        mode = self.behaviour.mode
        marker = self.behaviour.fail_marker
        if marker and marker in json.dumps(body):
            mode = "fail500"
        if mode == "bad_request":
            return web.json_response({"error": {"message": "fake bad request", "type":
                                                "invalid_request_error", "param": None,
                                                "code": None}}, status=400)
        if mode == "bad_request_text":
            return web.Response(status=400, text="that text makes no sense to me")
        if mode == "hang":
            await self._sleep_watching(request, 3600)
            return web.Response(status=504)
        if not await self._sleep_watching(request, self.behaviour.response_delay_s):
            return web.Response(status=499)
        if mode in ("fail503", "fail500"):
            status = 503 if mode == "fail503" else 500
            return web.json_response({"error": {"message": f"fake {status}", "type":
                                                "server_error", "param": None, "code": None}},
                                     status=status, headers={"x-fake-upstream": self.name})
        if mode == "garbage":
            assert request.transport is not None
            request.transport.write(b"this is not http at all\r\n\r\n")
            request.transport.close()
            return web.Response()
        if body.get("stream"):
            return await self._stream(request, body)
        return await self._json(request, body)

    async def _json(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        payload = json.dumps(_completion(body, self.name)).encode()
        if self.behaviour.mode != "die_mid_stream":
            return web.Response(body=payload, content_type="application/json",
                                headers={"x-fake-upstream": self.name})
        response = web.StreamResponse(headers={"content-type": "application/json"})
        response.content_length = len(payload)
        await response.prepare(request)
        await response.write(payload[: len(payload) // 2])
        await asyncio.sleep(0.01)
        assert request.transport is not None
        request.transport.abort()
        return response

    async def _stream(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        record = StreamRecord(request.path)
        self.streams.append(record)
        response = web.StreamResponse(headers={"content-type": "text/event-stream",
                                               "cache-control": "no-cache",
                                               "x-fake-upstream": self.name})
        await response.prepare(request)
        for event in _stream_events(body, self.behaviour.num_chunks, self.name):
            if (self.behaviour.mode == "die_mid_stream"
                    and record.num_chunks_sent >= self.behaviour.die_after_chunks):
                record.outcome = "died"
                assert request.transport is not None
                request.transport.abort()
                return response
            if (self.behaviour.mode == "stream_client_error"
                    and record.num_chunks_sent >= self.behaviour.die_after_chunks):
                await response.write(CLIENT_ERROR_EVENT + b"data: [DONE]\n\n")
                record.outcome = "client_error"
                await response.write_eof()
                return response
            if record.num_chunks_sent and not await self._sleep_watching(
                    request, self.behaviour.chunk_delay_s):
                return self._client_left(record, response)
            try:
                await response.write(event)
            except _WRITE_ERRORS:
                return self._client_left(record, response)
            record.num_chunks_sent += 1
        record.outcome = "completed"
        await response.write_eof()
        return response

    def _client_left(self, record: StreamRecord,
                     response: web.StreamResponse) -> web.StreamResponse:
        record.outcome = "client_disconnected"
        self.num_client_disconnects += 1
        return response

    async def _sleep_watching(self, request: web.Request, seconds: float) -> bool:
        """Sleep; False (and a recorded disconnect) as soon as the client goes away."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if request.transport is None or request.transport.is_closing():
                self.num_client_disconnects += 1
                return False
            await asyncio.sleep(min(0.01, max(0.0, deadline - time.monotonic())))
        return True


def _completion(body: dict[str, Any], name: str) -> dict[str, Any]:
    model = body.get("model", "tiny")
    usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    if "messages" in body:
        choice = {"index": 0, "message": {"role": "assistant", "content": f"hi from {name}"},
                  "finish_reason": "stop"}
        return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0,
                "model": model, "choices": [choice], "usage": usage}
    return {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": model,
            "choices": [{"index": 0, "text": f"hi from {name}", "finish_reason": "stop"}],
            "usage": usage}


CLIENT_ERROR_EVENT = (b'data: {"error":{"message":"the prompt cannot be continued",'
                      b'"type":"invalid_request_error","param":null,"code":null}}\n\n')


def _embedding_answer(body: dict[str, Any], name: str) -> dict[str, Any]:
    inputs = body.get("input")
    items = [inputs] if isinstance(inputs, str) or (
        isinstance(inputs, list) and inputs and isinstance(inputs[0], int)) else inputs or []
    dimensions = body.get("dimensions")
    dimensions = dimensions if isinstance(dimensions, int) and 0 < dimensions <= 64 else 8
    data, num_tokens = [], 0
    for index, item in enumerate(items):
        num_tokens += len(item) if isinstance(item, list) else max(1, len(item) // 4)
        vector = [round(((index + 1) * (d + 1) % 7) / 7, 4) for d in range(dimensions)]
        embedding: Any = vector
        if body.get("encoding_format") == "base64":
            embedding = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    return {"object": "list", "data": data, "model": body.get("model", name),
            "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens}}


def _stream_events(body: dict[str, Any], num_chunks: int, name: str) -> list[bytes]:
    model = body.get("model", "tiny")
    base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0,
            "model": model}
    events = []
    for i in range(num_chunks):
        finish = "stop" if i == num_chunks - 1 else None
        choice = {"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": finish}
        events.append({**base, "choices": [choice]})
    if (body.get("stream_options") or {}).get("include_usage"):
        events.append({**base, "choices": [], "usage": {
            "prompt_tokens": 7, "completion_tokens": num_chunks,
            "total_tokens": 7 + num_chunks}})
    return [f"data: {json.dumps(e)}\n\n".encode() for e in events] + [b"data: [DONE]\n\n"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _serve_forever(fake: FakeUpstream, port: int) -> None:
    url = await fake.start(port)
    print(f"fake upstream {fake.name} on {url}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await fake.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="fake")
    parser.add_argument("--mode", choices=MODES, default="normal")
    parser.add_argument("--response-delay", type=float, default=0.0)
    parser.add_argument("--num-chunks", type=int, default=5)
    parser.add_argument("--chunk-delay", type=float, default=0.0)
    parser.add_argument("--die-after", type=int, default=2)
    args = parser.parse_args()
    behaviour = Behaviour(mode=args.mode, response_delay_s=args.response_delay,
                          num_chunks=args.num_chunks, chunk_delay_s=args.chunk_delay,
                          die_after_chunks=args.die_after)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_forever(FakeUpstream(behaviour, name=args.name), args.port))


if __name__ == "__main__":
    main()
