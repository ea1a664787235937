"""The upstream pool against fake replicas (in-process and subprocesses) and real ones."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.errors import NoUpstreamError, UpstreamError, UpstreamTimeoutError
from gateway.metrics import GatewayMetrics
from gateway.settings import CircuitBreakerSettings, GatewaySettings
from gateway.upstream.pool import UpstreamPool, UpstreamStreamError
from gateway.upstream.replica import CircuitBreaker
from tests.gateway.conftest import ModelServer, free_port, wait_until
from tests.gateway.fake_upstream import Behaviour, FakeUpstream

FAKE_SCRIPT = Path(__file__).with_name("fake_upstream.py")
CHAT = "/v1/chat/completions"
BODY = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}).encode()
STREAM_BODY = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                          "stream": True, "stream_options": {"include_usage": True}}).encode()
HEADERS = {"content-type": "application/json", "x-request-id": "req-1"}


def make_settings(urls: list[str], **overrides: Any) -> GatewaySettings:
    sections: dict[str, Any] = {
        "health_checks": {"enabled": False},
        "retries": {"max_attempts": 3, "backoff_base_seconds": 0.01,
                    "backoff_max_seconds": 0.05},
        "timeouts": {"connect_seconds": 1, "first_byte_seconds": 5, "idle_seconds": 5,
                     "total_seconds": 20},
    }
    for name, values in overrides.items():
        sections[name] = {**sections.get(name, {}), **values}
    return GatewaySettings(models=[{"name": "tiny", "variants": [
        {"name": "stable", "weight": 100, "replicas": urls, "api_key": "sk-upstream"}]}],
        **sections)


@asynccontextmanager
async def running_pool(urls: list[str], **overrides: Any,
                       ) -> AsyncIterator[tuple[UpstreamPool, GatewayMetrics]]:
    metrics = GatewayMetrics()
    pool = UpstreamPool(make_settings(urls, **overrides), metrics)
    await pool.start()
    try:
        yield pool, metrics
    finally:
        await pool.close()
    assert total_outstanding(metrics) == 0


def total_outstanding(metrics: GatewayMetrics) -> float:
    return sum(sample.value for family in metrics.registry.collect()
               if family.name == "quiver_gateway_upstream_outstanding_requests"
               for sample in family.samples)


def metric(metrics: GatewayMetrics, name: str, **labels: str) -> float:
    return sum(sample.value for family in metrics.registry.collect()
               for sample in family.samples if sample.name == name
               and all(sample.labels.get(k) == v for k, v in labels.items()))


async def until(predicate: Any, timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@pytest.fixture
async def fakes() -> AsyncIterator[list[FakeUpstream]]:
    servers = [FakeUpstream(Behaviour(), name=name) for name in ("a", "b")]
    for server in servers:
        await server.start()
    yield servers
    for server in servers:
        await server.stop()


def state(pool: UpstreamPool, url: str) -> dict[str, Any]:
    return next(s for s in pool.replica_states() if s["url"] == url)


# -- plain requests and retries ----------------------------------------------------------


async def test_fetch_forwards_allowed_headers_and_the_variant_key(fakes) -> None:
    async with running_pool([fakes[0].url]) as (pool, metrics):
        result = await pool.fetch("tiny", "stable", CHAT, BODY, {
            **HEADERS, "Authorization": "Bearer client-key", "Cookie": "c=1",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
    assert result.status == 200 and result.attempts == 1 and result.replica == fakes[0].url
    assert json.loads(result.body)["usage"]["total_tokens"] == 10
    assert result.headers["content-type"].startswith("application/json")
    assert "content-length" not in result.headers and "connection" not in result.headers
    seen = {k.lower(): v for k, v in fakes[0].seen[0].headers.items()}
    assert seen["authorization"] == "Bearer sk-upstream"
    assert seen["x-request-id"] == "req-1" and seen["traceparent"].startswith("00-0af7")
    assert "cookie" not in seen
    assert metric(metrics, "quiver_gateway_upstream_requests_total", outcome="ok") == 1


async def test_retry_on_503_goes_to_the_other_replica(fakes) -> None:
    fakes[0].behaviour.mode = "fail503"
    async with running_pool([f.url for f in fakes]) as (pool, metrics):
        results = [await pool.fetch("tiny", "stable", CHAT, BODY, HEADERS) for _ in range(20)]
        assert all(r.status == 200 and r.replica == fakes[1].url for r in results)
        assert {r.attempts for r in results} <= {1, 2} and fakes[0].seen
        assert metric(metrics, "quiver_gateway_upstream_retries_total") >= 1
        assert metric(metrics, "quiver_gateway_upstream_requests_total",
                      replica=fakes[0].url, outcome="http_error") >= 1


async def test_retry_on_connect_refused(fakes) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    async with running_pool([dead, fakes[1].url]) as (pool, metrics):
        results = [await pool.fetch("tiny", "stable", CHAT, BODY, HEADERS) for _ in range(10)]
        assert all(r.status == 200 and r.replica == fakes[1].url for r in results)
        assert metric(metrics, "quiver_gateway_upstream_requests_total", replica=dead,
                      outcome="connect_error") >= 1


@pytest.mark.parametrize("mode", ["garbage", "die_mid_stream"])
async def test_malformed_or_cut_answers_are_retried(fakes, mode: str) -> None:
    fakes[0].behaviour.mode = mode
    async with running_pool([f.url for f in fakes]) as (pool, metrics):
        results = [await pool.fetch("tiny", "stable", CHAT, BODY, HEADERS) for _ in range(10)]
        assert all(r.status == 200 and r.replica == fakes[1].url for r in results)
        assert metric(metrics, "quiver_gateway_upstream_requests_total",
                      outcome="protocol_error") >= 1


async def test_final_failures(fakes) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    async with running_pool([dead]) as (pool, _):
        with pytest.raises(NoUpstreamError) as no_upstream:
            await pool.fetch("tiny", "stable", CHAT, BODY, HEADERS)
    assert "'stable'" in no_upstream.value.message and "sk-upstream" not in str(no_upstream.value)
    assert "retry-after" in no_upstream.value.headers()
    fakes[0].behaviour.mode = "garbage"
    async with running_pool([fakes[0].url]) as (pool, _):
        with pytest.raises(UpstreamError) as bad_gateway:
            await pool.fetch("tiny", "stable", CHAT, BODY, HEADERS)
    assert bad_gateway.value.status_code == 502 and "malformed HTTP" in str(bad_gateway.value)
    for mode, status, attempts in (("fail503", 503, 3), ("fail500", 500, 1)):
        fakes[0].behaviour.mode = mode
        num_seen = len(fakes[0].seen)
        async with running_pool([fakes[0].url]) as (pool, _):
            result = await pool.fetch("tiny", "stable", CHAT, BODY, HEADERS)
        assert (result.status, result.attempts) == (status, attempts)  # answered as it is
        assert len(fakes[0].seen) - num_seen == attempts


async def test_first_byte_timeout(fakes) -> None:
    fakes[0].behaviour.mode = "hang"
    async with running_pool([fakes[0].url], timeouts={"first_byte_seconds": 0.3}) as (pool, _):
        started = time.monotonic()
        with pytest.raises(UpstreamTimeoutError):
            await pool.fetch("tiny", "stable", CHAT, BODY, HEADERS)
        with pytest.raises(UpstreamTimeoutError):
            await pool.open_stream("tiny", "stable", CHAT, STREAM_BODY, HEADERS)
        assert time.monotonic() - started < 2.0 and len(fakes[0].seen) == 2  # not retried
        await until(lambda: fakes[0].num_client_disconnects == 2)


async def test_kill_a_replica_during_concurrent_requests() -> None:
    ports = [free_port(), free_port()]
    processes = [subprocess.Popen(
        [sys.executable, str(FAKE_SCRIPT), "--port", str(port), "--response-delay", "0.2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT) for port in ports]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        for url in urls:
            wait_until(lambda url=url: _ready(url), 15, url)
        async with running_pool(urls, health_checks={"enabled": True,
                                                     "interval_seconds": 0.2}) as (pool, m):
            tasks = [asyncio.create_task(pool.fetch("tiny", "stable", CHAT, BODY, HEADERS))
                     for _ in range(100)]
            await asyncio.sleep(0.1)  # both replicas are busy with the first requests
            processes[0].kill()
            later = [pool.fetch("tiny", "stable", CHAT, BODY, HEADERS) for _ in range(20)]
            results = await asyncio.gather(*tasks, *later)
        assert all(r.status == 200 for r in results)
        assert metric(m, "quiver_gateway_upstream_retries_total") >= 1
        assert {r.replica for r in results if r.attempts > 1} == {urls[1]}
        assert metric(m, "quiver_gateway_upstream_requests_total", replica=urls[0],
                      outcome="protocol_error") >= 1  # some were cut off mid-request
    finally:
        for process in processes:
            process.kill()
            process.wait(10)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


# -- balancing, breaker, health -----------------------------------------------------------


async def test_least_outstanding_prefers_the_idle_replica(fakes) -> None:
    for fake in fakes:
        fake.behaviour.response_delay_s = 0.3
    async with running_pool([f.url for f in fakes]) as (pool, _):
        for _ in range(3):
            busy = asyncio.create_task(pool.fetch("tiny", "stable", CHAT, BODY, HEADERS))
            await until(lambda: sum(s["num_outstanding"] for s in pool.replica_states()) == 1)
            idle = await pool.fetch("tiny", "stable", CHAT, BODY, HEADERS)
            assert idle.replica != (await busy).replica


async def test_circuit_opens_then_lets_one_trial_through(fakes) -> None:
    fake = fakes[0]
    fake.behaviour.mode = "fail503"
    overrides = {"retries": {"max_attempts": 1},
                 "circuit_breaker": {"failure_threshold": 2, "reset_seconds": 0.3}}
    async with running_pool([fake.url], **overrides) as (pool, metrics):
        for _ in range(2):
            assert (await pool.fetch("tiny", "stable", CHAT, BODY, HEADERS)).status == 503
        with pytest.raises(NoUpstreamError) as open_circuit:
            await pool.fetch("tiny", "stable", CHAT, BODY, HEADERS)
        assert 0 < open_circuit.value.retry_after_s <= 0.3 and len(fake.seen) == 2
        assert state(pool, fake.url)["circuit"] == "open"
        assert metric(metrics, "quiver_gateway_circuit_open") == 1
        await asyncio.sleep(0.35)
        fake.behaviour.mode, fake.behaviour.response_delay_s = "normal", 0.2
        trial = asyncio.create_task(pool.fetch("tiny", "stable", CHAT, BODY, HEADERS))
        await until(lambda: len(fake.seen) == 3)
        with pytest.raises(NoUpstreamError):  # only one trial while half-open
            await pool.fetch("tiny", "stable", CHAT, BODY, HEADERS)
        assert (await trial).status == 200
        assert state(pool, fake.url)["circuit"] == "closed"
        assert metric(metrics, "quiver_gateway_circuit_open") == 0
        fake.behaviour.mode, fake.behaviour.response_delay_s = "fail503", 0.0
        for _ in range(2):
            await pool.fetch("tiny", "stable", CHAT, BODY, HEADERS)
        await asyncio.sleep(0.35)
        assert (await pool.fetch("tiny", "stable", CHAT, BODY, HEADERS)).status == 503
        assert state(pool, fake.url)["circuit"] == "open"  # a failed trial re-opens it


def test_breaker_trial_slot_is_freed_when_a_trial_is_abandoned() -> None:
    now = [0.0]
    breaker = CircuitBreaker(CircuitBreakerSettings(failure_threshold=1, reset_seconds=5),
                             clock=lambda: now[0])
    breaker.on_failure()
    assert breaker.state == "open" and not breaker.can_acquire()
    assert breaker.seconds_until_trial() == 5
    now[0] = 5.0
    assert breaker.acquire() and breaker.state == "half_open" and not breaker.can_acquire()
    breaker.on_abandon(was_trial=True)
    assert breaker.can_acquire()


async def test_health_checks_mark_unhealthy_and_balancing_avoids_it(fakes) -> None:
    health = {"enabled": True, "interval_seconds": 0.05, "timeout_seconds": 0.5,
              "unhealthy_threshold": 2, "healthy_threshold": 1}
    async with running_pool([f.url for f in fakes], health_checks=health) as (pool, m):
        fakes[0].behaviour.ready = False
        await until(lambda: not state(pool, fakes[0].url)["is_healthy"])
        assert metric(m, "quiver_gateway_upstream_healthy", replica=fakes[0].url) == 0
        assert pool.can_serve("tiny", "stable")
        num_seen = len(fakes[0].seen)
        results = [await pool.fetch("tiny", "stable", CHAT, BODY, HEADERS) for _ in range(10)]
        assert {r.replica for r in results} == {fakes[1].url}
        assert len(fakes[0].seen) == num_seen
        fakes[1].behaviour.ready = False
        await until(lambda: not pool.can_serve("tiny", "stable"))
        with pytest.raises(NoUpstreamError):
            await pool.fetch("tiny", "stable", CHAT, BODY, HEADERS)
        fakes[0].behaviour.ready = True
        await until(lambda: state(pool, fakes[0].url)["is_healthy"])
        assert (await pool.fetch("tiny", "stable", CHAT, BODY, HEADERS)).replica == fakes[0].url
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("health-check")]


# -- streams ------------------------------------------------------------------------------


async def test_stream_yields_every_chunk(fakes) -> None:
    fakes[0].behaviour.num_chunks = 4
    async with running_pool([fakes[0].url]) as (pool, metrics):
        async with await pool.open_stream("tiny", "stable", CHAT, STREAM_BODY, HEADERS) as s:
            assert s.status == 200 and s.headers["content-type"] == "text/event-stream"
            assert "transfer-encoding" not in s.headers
            data = b"".join([chunk async for chunk in s])
        assert total_outstanding(metrics) == 0
    events = [e for e in data.decode().split("\n\n") if e]
    assert len(events) == 6 and events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["usage"]["completion_tokens"] == 4


async def test_error_answer_of_a_stream_is_readable(fakes) -> None:
    fakes[0].behaviour.mode = "fail500"
    async with running_pool([fakes[0].url]) as (pool, _):
        stream = await pool.open_stream("tiny", "stable", CHAT, STREAM_BODY, HEADERS)
        body = await stream.read()
        await stream.aclose()
    assert stream.status == 500 and json.loads(body)["error"]["message"] == "fake 500"


async def test_mid_stream_death_raises_after_the_received_chunks(fakes) -> None:
    fakes[0].behaviour.mode, fakes[0].behaviour.die_after_chunks = "die_mid_stream", 3
    fakes[0].behaviour.num_chunks, fakes[0].behaviour.chunk_delay_s = 10, 0.01
    async with running_pool([fakes[0].url]) as (pool, metrics):
        received = b""
        async with await pool.open_stream("tiny", "stable", CHAT, STREAM_BODY,
                                          HEADERS) as stream:
            with pytest.raises(UpstreamStreamError, match="tiny/stable"):
                async for chunk in stream:
                    received += chunk
        assert received.count(b"data: ") == 3 and b"[DONE]" not in received
        assert metric(metrics, "quiver_gateway_upstream_requests_total",
                      outcome="protocol_error") == 1


async def test_idle_timeout_ends_the_stream_and_the_upstream_sees_it(fakes) -> None:
    fakes[0].behaviour.num_chunks, fakes[0].behaviour.chunk_delay_s = 5, 2.0
    async with running_pool([fakes[0].url], timeouts={"idle_seconds": 0.2}) as (pool, m):
        started = time.monotonic()
        stream = await pool.open_stream("tiny", "stable", CHAT, STREAM_BODY, HEADERS)
        assert (await stream.__anext__()).startswith(b"data: ")
        with pytest.raises(UpstreamStreamError, match="sent nothing"):
            await stream.__anext__()
        await stream.aclose()
        assert time.monotonic() - started < 1.5
        assert metric(m, "quiver_gateway_upstream_requests_total", outcome="timeout") == 1
        await until(lambda: fakes[0].streams[0].outcome == "client_disconnected")


async def test_closing_a_stream_early_disconnects_the_upstream(fakes) -> None:
    fakes[0].behaviour.num_chunks, fakes[0].behaviour.chunk_delay_s = 100, 0.02
    async with running_pool([fakes[0].url]) as (pool, _):
        stream = await pool.open_stream("tiny", "stable", CHAT, STREAM_BODY, HEADERS)
        await stream.__anext__()
        await stream.__anext__()
        await stream.aclose()
        await until(lambda: fakes[0].streams[0].outcome == "client_disconnected")
        assert fakes[0].streams[0].num_chunks_sent < 100


async def test_cancellation_leaves_no_outstanding_requests(fakes) -> None:
    fakes[0].behaviour.mode = "hang"
    fakes[1].behaviour.num_chunks, fakes[1].behaviour.chunk_delay_s = 100, 0.02

    async def consume(pool: UpstreamPool) -> None:
        async with await pool.open_stream("tiny", "stable", CHAT, STREAM_BODY, HEADERS) as s:
            async for _ in s:
                pass

    async with running_pool([fakes[0].url]) as (pool, metrics):
        for call in (pool.fetch, pool.open_stream):
            task = asyncio.create_task(call("tiny", "stable", CHAT, BODY, HEADERS))
            await until(lambda: total_outstanding(metrics) == 1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert total_outstanding(metrics) == 0
            assert state(pool, fakes[0].url)["num_consecutive_failures"] == 0
        await until(lambda: fakes[0].num_client_disconnects == 2)
    async with running_pool([fakes[1].url]) as (pool, metrics):
        task = asyncio.create_task(consume(pool))
        await until(lambda: bool(fakes[1].streams) and fakes[1].streams[0].num_chunks_sent > 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert total_outstanding(metrics) == 0
        await until(lambda: fakes[1].streams[0].outcome == "client_disconnected")


# -- real model servers ------------------------------------------------------------------


async def test_pool_against_real_tiny_servers(tiny_servers: list[ModelServer]) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 4}
    async with running_pool([s.url for s in tiny_servers]) as (pool, _):
        result = await pool.fetch("tiny", "stable", CHAT, json.dumps(body).encode(), HEADERS)
        assert result.status == 200, result.body
        assert json.loads(result.body)["usage"]["completion_tokens"] >= 1
        stream_body = json.dumps({**body, "stream": True}).encode()
        async with await pool.open_stream("tiny", "stable", CHAT, stream_body, HEADERS) as s:
            assert s.status == 200
            data = b"".join([chunk async for chunk in s])
    assert data.rstrip().endswith(b"data: [DONE]") and data.count(b"data: ") >= 2


async def test_connections_of_a_burst_return_to_idle_while_health_checks_run(fakes) -> None:
    """aiohttp reuses the oldest idle connection first: health checks sharing the request
    pool would touch every connection of a burst in turn and keep them open for ever."""
    fake = fakes[0]
    fake.behaviour.response_delay_s = 0.2
    health = {"enabled": True, "interval_seconds": 0.05}
    async with running_pool([fake.url], health_checks=health,
                            timeouts={"keep_alive_seconds": 0.5}) as (pool, _):
        await asyncio.gather(*(pool.fetch("tiny", "stable", CHAT, BODY, HEADERS)
                               for _ in range(8)))
        assert len(fake._runner.server.connections) >= 8
        await until(lambda: len(fake._runner.server.connections) <= 1, timeout_s=5)
