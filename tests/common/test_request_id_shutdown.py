"""The shared outermost middleware when the server's shutdown cancels a request (its grace
period ran out): an OpenAI-shaped 503 instead of uvicorn's plain-text 500, a finished
answer left alone, a half-sent one cut (uvicorn closes the connection)."""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.types import Message, Receive, Scope, Send

from common.asgi import RequestIdMiddleware

SCOPE = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}


async def run_cancelled(app) -> tuple[list[Message], BaseException | None]:
    """Run `app` under the middleware, cancel it once it waits, as uvicorn does."""
    sent: list[Message] = []
    waiting = asyncio.Event()

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        await app(scope, receive, send, waiting)

    task = asyncio.create_task(RequestIdMiddleware(wrapped)(dict(SCOPE), receive, send))
    await asyncio.wait_for(waiting.wait(), 5)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError as exc:
        return sent, exc
    return sent, None


async def test_a_call_cut_off_before_its_answer_gets_an_openai_503():
    async def slow(scope, receive, send, waiting):
        waiting.set()
        await asyncio.sleep(3600)

    sent, raised = await run_cancelled(slow)
    assert raised is None
    start, body = sent
    assert start["status"] == 503
    headers = dict(start["headers"])
    assert headers[b"retry-after"] == b"1" and headers[b"connection"] == b"close"
    assert b"x-request-id" in headers
    error = json.loads(body["body"])["error"]
    assert error["code"] == "server_shutting_down" and error["type"] == "service_unavailable"


async def test_a_stream_that_ended_its_answer_is_left_alone():
    async def stream(scope, receive, send, waiting):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            waiting.set()
            await asyncio.sleep(3600)
        finally:  # as the gateway's relay does: a closing error event, then re-raise
            await send({"type": "http.response.body", "body": b"data: {}\n\n"})

    sent, raised = await run_cancelled(stream)
    assert raised is None and [m["type"] for m in sent] == [
        "http.response.start", "http.response.body"]


async def test_a_half_sent_answer_is_cut():
    async def half(scope, receive, send, waiting):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        waiting.set()
        await asyncio.sleep(3600)

    sent, raised = await run_cancelled(half)
    assert isinstance(raised, asyncio.CancelledError)
    assert len(sent) == 2


@pytest.mark.parametrize("status", [200, 404])
async def test_answers_pass_through_unchanged(status):
    sent: list[Message] = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def send(message: Message) -> None:
        sent.append(message)

    await RequestIdMiddleware(app)(dict(SCOPE), None, send)
    assert sent[0]["status"] == status and sent[1]["body"] == b"{}"
