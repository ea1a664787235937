"""Chaos, bounded in time: a replica killed with SIGKILL mid-stream, Redis killed and
restarted under load, the gateway sent SIGTERM with calls in flight. Every admitted
request ends with its answer or a clear OpenAI-shaped error, and no usage is lost: what a
key is charged is at least every token its calls received."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import signal
import threading
import time
from dataclasses import dataclass

import httpx
import pytest

from gateway.stores import open_key_store
from tests.hardening.conftest import (
    gateway_config,
    new_key,
    start_gateway,
    start_model_server,
    stop_process,
    wait_for,
)

pytestmark = pytest.mark.slow
MESSAGES = [{"role": "user", "content": "Write a long story about rivers."}]
PROMPT_ESTIMATE = len(json.dumps(MESSAGES)) // 4 + 1  # what a cut stream's prompt costs


@dataclass
class Outcome:
    """One call as its client saw it."""

    status: int | None = None      # None: no HTTP answer at all (connect refused or dropped)
    is_complete: bool = False      # a 200 that ended normally ([DONE] for streams)
    error_code: str | None = None  # OpenAI-shaped error (body or final event)
    tokens_seen: int = 0           # usage it was told of, or prompt + text events received
    admitted: bool = False         # the gateway accepted the connection
    failure: str = ""


def stream_call(url: str, key: str, body: dict) -> Outcome:
    outcome = Outcome()
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                          json={**body, "stream": True, "stream_options": {
                              "include_usage": True}},
                          headers={"authorization": f"Bearer {key}"}) as response:
            outcome.admitted, outcome.status = True, response.status_code
            if response.status_code != 200:
                outcome.error_code = json.loads(response.read())["error"]["code"]
                return outcome
            read_events(response.iter_lines(), outcome)
    except httpx.ConnectError as exc:
        outcome.failure = repr(exc)
    except httpx.HTTPError as exc:
        outcome.admitted, outcome.failure = True, repr(exc)
    return outcome


def read_events(lines, outcome: Outcome) -> None:
    text_events, usage = 0, None
    for line in lines:
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            outcome.is_complete = True
        elif data.startswith("{"):
            event = json.loads(data)
            if "error" in event:
                outcome.error_code = event["error"]["code"]
            usage = event.get("usage") or usage
            text_events += sum(1 for c in event.get("choices") or []
                               if c.get("delta", {}).get("content"))
    outcome.tokens_seen = (usage["total_tokens"] if usage
                           else (PROMPT_ESTIMATE + text_events if text_events else 0))


def unary_call(url: str, key: str, body: dict) -> Outcome:
    outcome = Outcome()
    try:
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60,
                              headers={"authorization": f"Bearer {key}"})
    except httpx.ConnectError as exc:
        outcome.failure = repr(exc)
        return outcome
    except httpx.HTTPError as exc:
        outcome.admitted, outcome.failure = True, repr(exc)
        return outcome
    outcome.admitted, outcome.status = True, response.status_code
    payload = response.json()
    if response.status_code == 200:
        outcome.is_complete, outcome.tokens_seen = True, payload["usage"]["total_tokens"]
    else:
        outcome.error_code = payload["error"]["code"]
    return outcome


def answered(outcome: Outcome) -> bool:
    """Its answer, or a clear OpenAI-shaped error: never a silent cut."""
    return outcome.is_complete or outcome.error_code is not None


async def used_tokens(store: str, name: str) -> int:
    key_store = open_key_store(store)
    try:
        return next(k.used_tokens for k in await key_store.list_keys() if k.name == name)
    finally:
        await key_store.close()


def test_a_replica_killed_mid_stream(tiny_model_dir, tmp_path):
    replicas = [start_model_server(tiny_model_dir, "tiny") for _ in range(2)]
    store = str(tmp_path / "keys.db")
    gateway = start_gateway(gateway_config(store, [r.url for r in replicas]), tmp_path)
    try:
        key = new_key(gateway, store, "chaos")
        body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 1000, "ignore_eos": True}
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(stream_call if i % 2 else unary_call, gateway.url, key,
                                   body) for i in range(12)]
            time.sleep(0.6)  # every call is running: streams are mid-way
            replicas[0].kill()
            outcomes = [f.result(timeout=90) for f in futures]
        assert all(o.admitted and answered(o) for o in outcomes), outcomes
        assert any(o.is_complete for o in outcomes)
        cut = [o for o in outcomes if not o.is_complete]
        assert cut, "the kill came after every call had finished: nothing was tested"
        assert all(o.error_code in ("upstream_stream_error", "no_healthy_upstream",
                                    "bad_gateway") for o in cut), cut
        seen = sum(o.tokens_seen for o in outcomes)
        gateway.stop()  # flushes usage
        assert asyncio.run(used_tokens(store, "chaos")) == seen, outcomes
    finally:
        gateway.stop()
        for replica in replicas:
            stop_process(replica.process)


def test_redis_killed_and_restarted_under_load(tiny_server, own_redis, tmp_path):
    own_redis.kill()
    own_redis.start_persistent()  # keys and usage must outlive the restart
    gateway = start_gateway(gateway_config(
        own_redis.url, [tiny_server.url], redis_url=own_redis.url,
        rate_limit={"backend": "redis"}, cache={"backend": "redis"}), tmp_path)
    try:
        key = new_key(gateway, own_redis.url, "steady", rpm=100_000)
        cached = new_key(gateway, own_redis.url, "cached")  # its hits are free: not summed
        outcomes: list[Outcome] = []
        hits: list[Outcome] = []
        stop = threading.Event()
        body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 8}

        def load(worker: int) -> None:
            while not stop.is_set():
                call = stream_call if worker % 2 else unary_call
                outcomes.append(call(gateway.url, key, {**body, "temperature": 1.0}))
                hits.append(call(gateway.url, cached, {**body, "temperature": 0}))

        threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(1.5)
        own_redis.kill()
        time.sleep(2)
        own_redis.start_persistent()
        time.sleep(2)
        stop.set()
        for thread in threads:
            thread.join(60)
        assert len(outcomes) > 10
        assert all(o.status == 200 and o.is_complete for o in outcomes + hits), [
            o for o in outcomes + hits if not o.is_complete][:3]
        seen = sum(o.tokens_seen for o in outcomes)
        wait_for(lambda: asyncio.run(used_tokens(own_redis.url, "steady")) >= seen, 10,
                 "usage of the outage written to Redis")
        assert asyncio.run(used_tokens(own_redis.url, "steady")) <= 2 * seen
    finally:
        gateway.stop()


def test_sigterm_with_calls_in_flight(tiny_server, tmp_path):
    store = str(tmp_path / "keys.db")
    gateway = start_gateway(gateway_config(store, [tiny_server.url],
                                           shutdown_grace_seconds=1.0), tmp_path)
    key = new_key(gateway, store, "late")
    long_body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 1500, "ignore_eos": True}
    short_body = {**long_body, "max_tokens": 5}
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(call, gateway.url, key, body)
                   for call in (stream_call, unary_call)
                   for body in (long_body, short_body) for _ in range(3)]
        time.sleep(0.5)
        gateway.process.send_signal(signal.SIGTERM)
        outcomes = [f.result(timeout=60) for f in futures]
    assert gateway.process.wait(30) == 0
    admitted = [o for o in outcomes if o.admitted]
    assert admitted and all(answered(o) for o in admitted), admitted
    assert {o.error_code for o in admitted if not o.is_complete} <= {
        "stream_cancelled", "server_shutting_down"}
    assert "Traceback" not in gateway.log
    seen = sum(o.tokens_seen for o in admitted)
    assert asyncio.run(used_tokens(store, "late")) == seen
