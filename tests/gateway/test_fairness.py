"""Fair sharing end to end: a real gateway over two real tiny-model replicas, each taking
one call at a time (`max_concurrency_per_replica: 1`, so two slots). A noisy key's backlog
does not delay a quiet key's call; a key's max_concurrency queues its calls and refuses
them (429) once its queue is full; a call that finds no slot in time gets a 503 that says
the upstreams are saturated; a client that leaves while queued frees its place."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway.conftest import create_key, start_gateway, wait_until

ADMIN = "admin-key-for-fairness-tests"
LONG = 1000    # completion tokens (EOS ignored) that keep a slot busy for a while
QUEUE = 6


def body(max_tokens: int = LONG, *, stream: bool = True) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a story."}],
            "max_tokens": max_tokens, "ignore_eos": True, "stream": stream}


def call(url: str, key: str, max_tokens: int = LONG) -> tuple[int, float, dict]:
    """A streamed call; its status, the time its first byte came, and the error if any."""
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body(max_tokens),
                      headers={"authorization": f"Bearer {key}"}, timeout=120) as response:
        first_byte = None
        chunks = []
        for chunk in response.iter_bytes():
            first_byte = first_byte or time.monotonic()
            chunks.append(chunk)
    error = json.loads(b"".join(chunks))["error"] if response.status_code != 200 else {}
    return response.status_code, first_byte or time.monotonic(), {**error, **(
        {"headers": dict(response.headers)} if error else {})}


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{url}/metrics", headers={"authorization": f"Bearer {ADMIN}"},
                     timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples if sample.name == name
               and all(sample.labels.get(k) == v for k, v in labels.items()))


def queued(url: str) -> float:
    return metric(url, "quiver_gateway_admission_queued_requests")


def in_flight(url: str) -> float:
    return metric(url, "quiver_gateway_admission_in_flight_requests")


class Stack:
    def __init__(self, patient: str, impatient: str, keys: dict[str, str]) -> None:
        self.patient, self.impatient, self.keys = patient, impatient, keys


@pytest.fixture(scope="module")
def stack(tiny_servers, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("fairness")
    store = str(tmp_path / "keys.db")
    keys = {name: create_key(store, name) for name in ("noisy", "quiet", "holder", "leaver")}
    keys["capped"] = create_key(store, "capped", max_concurrency=1)
    models = [{"name": "tiny", "variants": [{
        "name": "stable", "weight": 100, "replicas": [s.url for s in tiny_servers],
        "max_concurrency_per_replica": 1}]}]
    base = {"key_store": store, "admin_key": ADMIN, "models": models,
            "cache": {"enabled": False}}
    # no spare slots for recently active tenants here (unit-tested on their own): each test
    # then sees exactly two slots, whoever used them in the test before
    admission = {"spare_slots_per_tenant": 0}
    patient = start_gateway({**base, "admission": {**admission, "max_queue_per_tenant": QUEUE,
                                                   "queue_timeout_seconds": 60}},
                            tmp_path, name="patient")
    impatient = start_gateway({**base, "admission": {**admission, "queue_timeout_seconds": 0.5,
                                                     "retry_after_seconds": 2}},
                              tmp_path, name="impatient")
    try:
        for gateway in (patient, impatient):
            wait_until(lambda g=gateway: httpx.get(f"{g.url}/ready").status_code == 200, 30,
                       "gateway ready")
        yield Stack(patient.url, impatient.url, keys)
    finally:
        patient.stop()
        impatient.stop()


def test_a_noisy_keys_backlog_does_not_delay_a_quiet_keys_call(stack):
    url, keys = stack.patient, stack.keys
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        noisy = [pool.submit(call, url, keys["noisy"]) for _ in range(QUEUE + 2)]
        wait_until(lambda: queued(url) == QUEUE, 30, "the noisy backlog queued")
        quiet = pool.submit(call, url, keys["quiet"])
        status, quiet_first_byte, _ = quiet.result()
        results = [future.result() for future in noisy]
    assert status == 200 and all(result[0] == 200 for result in results)
    # FIFO would start all 8 noisy calls first; fair sharing starts the quiet call as soon
    # as one slot frees: only the two running then and the one next to it may come first.
    started_before = sum(1 for _, first_byte, _ in results if first_byte < quiet_first_byte)
    assert started_before <= 3, started_before
    assert metric(url, "quiver_gateway_admission_wait_seconds_count", priority="normal") >= 9
    wait_until(lambda: in_flight(url) == 0 and queued(url) == 0, 10, "every slot back")


def test_max_concurrency_queues_a_keys_calls_then_refuses_them(stack):
    url, key = stack.patient, stack.keys["capped"]
    with concurrent.futures.ThreadPoolExecutor(QUEUE + 2) as pool:
        first = pool.submit(call, url, key)
        wait_until(lambda: metric(url, "quiver_gateway_key_in_flight_requests",
                                  key="capped") == 1, 30, "the first call running")
        waiting = [pool.submit(call, url, key, 8) for _ in range(QUEUE)]
        wait_until(lambda: queued(url) == QUEUE, 30, "the capped key's calls queued")
        assert in_flight(url) == 1   # a free slot upstream, yet they wait for the key's
        status, _, error = call(url, key)
        assert status == 429
        assert error["code"] == "concurrency_limit_exceeded"
        assert "1 requests in flight (its max_concurrency)" in error["message"]
        assert "retry-after" in error["headers"]
        assert first.result()[0] == 200
        assert [future.result()[0] for future in waiting] == [200] * QUEUE
    assert metric(url, "quiver_gateway_admission_rejections_total", key="capped",
                  reason="concurrency_limit") == 1


def test_no_slot_in_time_is_a_503_that_says_the_upstreams_are_saturated(stack):
    url, keys = stack.impatient, stack.keys
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        holders = [pool.submit(call, url, keys["holder"]) for _ in range(2)]
        wait_until(lambda: in_flight(url) == 2, 30, "both slots taken")
        status, _, error = call(url, keys["quiet"], 8)
        assert [future.result()[0] for future in holders] == [200, 200]
    assert status == 503
    assert error["code"] == "upstreams_saturated" and "saturated" in error["message"]
    assert error["headers"]["retry-after"] == "2"
    assert metric(url, "quiver_gateway_admission_rejections_total", key="quiet",
                  reason="queue_timeout") == 1


def raw_request(url: str, key: str) -> socket.socket:
    """Sends a call over a bare socket (to hang up on it at will) and returns the socket."""
    parts = urlsplit(url)
    payload = httpx.Request("POST", f"{url}/v1/chat/completions", json=body(8),
                            headers={"authorization": f"Bearer {key}"})
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {parts.netloc}\r\n"
    for name, value in payload.headers.items():
        if name.lower() != "host":
            head += f"{name}: {value}\r\n"
    sock.sendall(head.encode() + b"\r\n" + payload.read())
    return sock


def test_a_client_that_leaves_while_queued_frees_its_place(stack):
    url, keys = stack.patient, stack.keys
    upstream_before = metric(url, "quiver_gateway_requests_total", key="leaver")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        holders = [pool.submit(call, url, keys["holder"]) for _ in range(2)]
        wait_until(lambda: in_flight(url) == 2, 30, "both slots taken")
        sock = raw_request(url, keys["leaver"])
        wait_until(lambda: queued(url) == 1, 30, "the leaver queued")
        sock.close()   # hangs up while queued
        wait_until(lambda: queued(url) == 0, 10, "the queue emptied")
        assert in_flight(url) == 2
        assert [future.result()[0] for future in holders] == [200, 200]
    wait_until(lambda: in_flight(url) == 0, 10, "every slot back")
    # it never went upstream, and the key holds nothing
    assert metric(url, "quiver_gateway_requests_total", key="leaver") == upstream_before
    assert metric(url, "quiver_gateway_key_in_flight_requests", key="leaver") == 0
    assert call(url, keys["leaver"], 8)[0] == 200


def test_streams_return_their_slots_however_they_end(stack):
    """A client cutting a running stream gives its slot back too."""
    url, key = stack.patient, stack.keys["holder"]
    done = threading.Event()

    def cut_short() -> None:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body(),
                          headers={"authorization": f"Bearer {key}"}, timeout=60) as response:
            next(response.iter_bytes())
        done.set()

    threads = [threading.Thread(target=cut_short) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert done.is_set()
    wait_until(lambda: in_flight(url) == 0, 10, "the cut streams' slots back")
    assert metric(url, "quiver_gateway_key_in_flight_requests", key="holder") == 0
