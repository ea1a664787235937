"""The fastest honest OpenAI-compatible fake model server, for the gateway benchmark.

    python benchmarks/fake_upstream.py --port P [--num-chunks 4] [--delay-ms 0]

A raw ASGI app under uvicorn (uvloop, httptools, no access log): no framework, no
validation, answers precomputed where it can. `POST /v1/chat/completions` (and
`/v1/completions`) answers a fixed, valid `chat.completion` with usage, or with
`"stream": true` an SSE stream of `num_chunks` `chat.completion.chunk` events (a role
delta, then content deltas), a usage chunk when `stream_options.include_usage`, then
`data: [DONE]`. `--delay-ms` sleeps before every model answer (an upstream that thinks
while the gateway idles). `GET /ready` and `/health` answer 200. It measures the gateway,
so it must cost as little as possible while staying a real HTTP/1.1 server (keep-alive,
chunked SSE).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]
WORDS = ["Hello", " from", " the", " fake", " upstream", "."]
PROMPT_TOKENS = 12


def completion_body(model: str, num_tokens: int) -> bytes:
    content = "".join(WORDS[i % len(WORDS)] for i in range(num_tokens))
    return json.dumps({
        "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "logprobs": None, "finish_reason": "length"}],
        "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": num_tokens,
                  "total_tokens": PROMPT_TOKENS + num_tokens},
    }, separators=(",", ":")).encode()


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def stream_events(model: str, num_chunks: int, include_usage: bool) -> list[bytes]:
    base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": model}
    events = [sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                               "content": ""},
                                        "logprobs": None, "finish_reason": None}]})]
    for i in range(num_chunks):
        finish = "length" if i == num_chunks - 1 else None
        events.append(sse({**base, "choices": [{
            "index": 0, "delta": {"content": WORDS[i % len(WORDS)]}, "logprobs": None,
            "finish_reason": finish}]}))
    if include_usage:
        events.append(sse({**base, "choices": [], "usage": {
            "prompt_tokens": PROMPT_TOKENS, "completion_tokens": num_chunks,
            "total_tokens": PROMPT_TOKENS + num_chunks}}))
    events.append(b"data: [DONE]\n\n")
    return events


class FakeUpstream:
    """The ASGI app. Bodies are cached per (model, size) so an answer is one dict lookup."""

    def __init__(self, num_chunks: int = 4, delay_s: float = 0.0) -> None:
        self.num_chunks = num_chunks
        self.delay_s = delay_s
        self.bodies: dict[tuple[str, int], bytes] = {}
        self.streams: dict[tuple[str, bool], list[bytes]] = {}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path, method = scope["path"], scope["method"]
        if method == "GET" and path in ("/ready", "/health"):
            await self.respond(send, 200, b'{"status":"ok"}')
        elif method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
            await self.complete(receive, send)
        else:
            await self.respond(send, 404, b'{"error":{"message":"not found","type":'
                                          b'"not_found_error","param":null,"code":null}}')

    async def respond(self, send: Any, status: int, body: bytes) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [*JSON_HEADERS, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def complete(self, receive: Any, send: Any) -> None:
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        try:
            request = json.loads(b"".join(chunks))
        except ValueError:
            await self.respond(send, 400, b'{"error":{"message":"invalid JSON","type":'
                                          b'"invalid_request_error","param":null,"code":null}}')
            return
        model = str(request.get("model", "fake"))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if request.get("stream"):
            options = request.get("stream_options") or {}
            await self.stream(send, model, bool(options.get("include_usage")))
            return
        num_tokens = int(request.get("max_tokens") or request.get("max_completion_tokens")
                         or 8)
        body = self.bodies.get((model, num_tokens))
        if body is None:
            body = self.bodies[(model, num_tokens)] = completion_body(model, num_tokens)
        await self.respond(send, 200, body)

    async def stream(self, send: Any, model: str, include_usage: bool) -> None:
        events = self.streams.get((model, include_usage))
        if events is None:
            events = self.streams[(model, include_usage)] = stream_events(
                model, self.num_chunks, include_usage)
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        for event in events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--num-chunks", type=int, default=4, help="content chunks per stream")
    parser.add_argument("--delay-ms", type=float, default=0.0,
                        help="sleep before every model answer")
    args = parser.parse_args()
    uvicorn.run(FakeUpstream(args.num_chunks, args.delay_ms / 1000), host=args.host, port=args.port,
                loop="uvloop", http="httptools", ws="none", lifespan="off",
                access_log=False, log_level="warning", backlog=4096)


if __name__ == "__main__":
    main()
