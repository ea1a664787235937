"""Every token a client received is charged to its key, also when it leaves mid-stream or
the gateway shuts down under it; a shutdown answers every admitted request in OpenAI's
shape, keep-alive requests included."""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import socket
import threading
from pathlib import Path

import httpx
import pytest

from gateway.stores import open_key_store
from tests.hardening.conftest import (
    admin_keys,
    create_key,
    gateway_config,
    new_key,
    start_gateway,
    wait_for,
)

MESSAGES = [{"role": "user", "content": "Tell me a long story."}]


@pytest.fixture(scope="module")
def gateway(tiny_server, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("usage")
    store = str(workdir / "keys.db")
    process = start_gateway(gateway_config(store, [tiny_server.url]), workdir)
    process.store = store  # type: ignore[attr-defined]
    yield process
    process.stop()


def text_events(lines) -> int:
    """Reads SSE lines until 5 events carrying generated text came; returns 5."""
    seen = 0
    for line in lines:
        if not line.startswith("data: {"):
            continue
        choices = json.loads(line.removeprefix("data: ")).get("choices") or []
        if any(c.get("delta", {}).get("content") for c in choices):
            seen += 1
            if seen == 5:
                return seen
    raise AssertionError("the stream ended before 5 text events")


def test_a_client_leaving_a_stream_early_is_charged_what_it_received(gateway):
    key = new_key(gateway, gateway.store, "leaver")
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 1500, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=60,
                      headers={"authorization": f"Bearer {key}"}) as response:
        assert response.status_code == 200
        received = text_events(response.iter_lines())  # then walk away mid-stream
    wait_for(lambda: admin_keys(gateway)["leaver"]["used_tokens"] > 0, 10,
             "usage of the abandoned stream")
    used = admin_keys(gateway)["leaver"]["used_tokens"]
    prompt_estimate = len(json.dumps(MESSAGES)) // 4 + 1
    assert prompt_estimate + received <= used <= prompt_estimate + 1500


def test_a_completed_stream_is_charged_its_real_usage(gateway):
    key = new_key(gateway, gateway.store, "finisher")
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 7, "stream": True,
            "ignore_eos": True}
    reply = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=60,
                       headers={"authorization": f"Bearer {key}"})
    assert reply.text.rstrip().endswith("data: [DONE]")
    wait_for(lambda: admin_keys(gateway)["finisher"]["used_tokens"] > 0, 10, "usage")
    used = admin_keys(gateway)["finisher"]["used_tokens"]
    unary = httpx.post(f"{gateway.url}/v1/chat/completions", timeout=60,
                       json={**body, "stream": False},
                       headers={"authorization": f"Bearer {key}"}).json()["usage"]
    assert used == unary["total_tokens"]  # the server's own count, not an estimate


def refuses_connections(url: str) -> bool:
    """True once nothing listens on the gateway's port (its shutdown has begun)."""
    try:
        socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=1).close()
    except OSError:
        return True
    return False


def raw_get(sock: socket.socket, path: str = "/health") -> http.client.HTTPResponse:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    response = http.client.HTTPResponse(sock)
    response.begin()
    response.read()
    return response


def test_sigterm_answers_every_admitted_request(fake_upstreams, tmp_path: Path):
    slow = fake_upstreams("slow", response_delay=30)            # a unary call that outlives
    streamer = fake_upstreams("streamer", num_chunks=400, chunk_delay=0.05)  # the grace
    store = str(tmp_path / "keys.db")
    key = create_key(store, "caught")
    config = gateway_config(store, [streamer.url], shutdown_grace_seconds=1.5)
    config["models"].append({"name": "slow", "variants": [
        {"name": "stable", "weight": 100, "replicas": [slow.url]}]})
    gateway = start_gateway(config, tmp_path)
    headers = {"authorization": f"Bearer {key}"}
    results: dict[str, object] = {}

    def unary() -> None:
        results["unary"] = httpx.post(
            f"{gateway.url}/v1/chat/completions", headers=headers, timeout=60,
            json={"model": "slow", "messages": MESSAGES, "max_tokens": 5})

    def stream() -> None:
        body = {"model": "tiny", "messages": MESSAGES, "stream": True}
        with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body,
                          headers=headers, timeout=60) as response:
            results["events"] = [line for line in response.iter_lines() if line]

    keep_alive = socket.create_connection(("127.0.0.1", int(gateway.url.rsplit(":", 1)[1])),
                                          timeout=10)
    try:
        assert raw_get(keep_alive).status == 200    # a keep-alive connection, now idle
        threads = [threading.Thread(target=unary), threading.Thread(target=stream)]
        for thread in threads:
            thread.start()
        wait_for(lambda: slow.stats()["num_in_flight"] == 1
                 and sum(s["num_chunks_sent"] for s in streamer.stats()["streams"]) >= 5,
                 20, "both calls in flight")
        gateway.process.send_signal(signal.SIGTERM)
        wait_for(lambda: refuses_connections(gateway.url), 10, "the listener to close")
        late = raw_get(keep_alive)                 # sent on the idle connection meanwhile
        assert late.status in (200, 503) and late.getheader("connection") == "close"
    finally:
        keep_alive.close()
    for thread in threads:
        thread.join(30)
    unary_reply = results["unary"]
    assert isinstance(unary_reply, httpx.Response) and unary_reply.status_code == 503
    assert unary_reply.json()["error"]["code"] == "server_shutting_down"
    events = results["events"]
    assert json.loads(events[-1].removeprefix("data: "))["error"]["code"] == "stream_cancelled"
    assert gateway.process.wait(20) == 0
    assert "Traceback" not in gateway.log
    used = asyncio.run(stored_usage(store, "caught"))
    assert used >= len(events) - 1   # every delivered chunk carried one token


async def stored_usage(store: str, name: str) -> int:
    key_store = open_key_store(store)
    try:
        (key,) = [k for k in await key_store.list_keys() if k.name == name]
        return key.used_tokens
    finally:
        await key_store.close()
