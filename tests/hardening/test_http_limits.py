"""HTTP-level limits on both servers, against real sockets: an oversized header, a
slowloris, an idle socket, an idle keep-alive connection, and too many connections.

The gateway and a tiny-model `quiver serve` run with small limits (8 KiB of headers, 1 s
to send them, 2 s keep-alive, 4 connections); every wait is bounded.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import time
from collections.abc import Iterator

import pytest

from tests.hardening.conftest import (
    gateway_config,
    start_gateway,
    start_model_server,
    stop_process,
)

LIMITS = {"max_header_bytes": 8192, "header_timeout_seconds": 1.0,
          "keep_alive_timeout_seconds": 2.0, "max_connections": 4}
BOUND_S = 10.0  # the longest any wait below may take


@pytest.fixture(scope="module")
def targets(tiny_model_dir, tmp_path_factory) -> Iterator[dict[str, tuple[str, int]]]:
    """`gateway` and `server`, each (host, port), both with LIMITS."""
    workdir = tmp_path_factory.mktemp("http-limits")
    flags = [arg for name, value in LIMITS.items()
             for arg in (f"--{name.replace('_', '-')}", str(value))]
    server = start_model_server(tiny_model_dir, "tiny", None, *flags)
    # the gateway routes nowhere: the server's connections are the tests' alone
    gateway = start_gateway(gateway_config(str(workdir / "keys.db"), ["http://127.0.0.1:9"],
                                           **LIMITS), workdir)
    try:
        yield {"gateway": address(gateway.url), "server": address(server.url)}
    finally:
        gateway.stop()
        stop_process(server.process)


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


@contextlib.contextmanager
def connect(target: tuple[str, int]) -> Iterator[socket.socket]:
    sock = socket.create_connection(target, timeout=BOUND_S)
    try:
        yield sock
    finally:
        sock.close()


def get(sock: socket.socket, path: str = "/health", headers: str = "") -> http.client.HTTPResponse:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n{headers}\r\n".encode("latin-1"))
    response = http.client.HTTPResponse(sock)
    response.begin()
    response.body = response.read()  # type: ignore[attr-defined]
    return response


def closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """(True, what came before the close) once the peer closes; False if still open."""
    received = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            return True, received
        if not chunk:
            return True, received
        received += chunk
    return False, received


def openai_error(body: bytes) -> dict:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize("which", ["gateway", "server"])
def test_an_oversized_header_is_refused_with_431(targets, which):
    with connect(targets[which]) as sock:
        response = get(sock, headers=f"x-padding: {'a' * 20_000}\r\n")
        assert response.status == 431
        assert openai_error(response.body)["code"] == "request_header_fields_too_large"
        assert closed_within(sock, BOUND_S)[0]
    with connect(targets[which]) as sock:  # headers under the cap still pass
        assert get(sock, headers=f"x-padding: {'a' * 4_000}\r\n").status == 200


@pytest.mark.parametrize("which", ["gateway", "server"])
def test_a_slowloris_is_cut_off_after_the_header_timeout(targets, which):
    with connect(targets[which]) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n")
        is_closed = False
        deadline = time.monotonic() + BOUND_S
        while not is_closed and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                sock.sendall(b"x-a: b\r\n")  # one header now and then, never the end
            is_closed, received = closed_within(sock, 0.3)
        assert is_closed, "the server kept a slowloris connection open"
        if received:
            assert received.startswith(b"HTTP/1.1 408")


@pytest.mark.parametrize("which", ["gateway", "server"])
def test_a_silent_socket_is_closed(targets, which):
    with connect(targets[which]) as sock:
        assert closed_within(sock, BOUND_S) == (True, b"")


@pytest.mark.parametrize("which", ["gateway", "server"])
def test_an_idle_keep_alive_connection_is_closed(targets, which):
    with connect(targets[which]) as sock:
        assert get(sock).status == 200
        assert get(sock).status == 200  # still open for a second request
        assert closed_within(sock, BOUND_S)[0]


@pytest.mark.parametrize("which", ["gateway", "server"])
def test_connections_beyond_the_limit_get_503(targets, which):
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(connect(targets[which]))
                for _ in range(LIMITS["max_connections"])]
        for sock in held:  # each accepted and served, then idle in keep-alive
            assert get(sock).status == 200
        with connect(targets[which]) as extra:
            response = get(extra)
            assert response.status == 503
            assert openai_error(response.body)["code"] == "too_many_connections"
            assert response.getheader("retry-after") == "1"
    wait_for_capacity(targets[which])


def wait_for_capacity(target: tuple[str, int]) -> None:
    """The limit is per open connection: once they close, requests pass again."""
    deadline = time.monotonic() + BOUND_S
    while time.monotonic() < deadline:
        with connect(target) as sock:
            if get(sock).status == 200:
                return
        time.sleep(0.1)
    raise AssertionError("the server did not take requests again after connections closed")
