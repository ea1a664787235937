"""Real processes for the hardening tests: a tiny-model `quiver serve`, gateways, fake
upstreams, a `redis-server` each test may kill and restart, and a TCP proxy that can turn
into a black hole (a network partition: bytes vanish, no reset ever comes)."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.gateway.conftest import (
    GatewayProcess,
    ModelServer,
    create_key,
    fake_upstreams,  # noqa: F401  (fixtures, re-exported)
    fake_upstreams_module,  # noqa: F401
    free_port,
    start_gateway,
    start_model_server,
    wait_until,
)

__all__ = ["GatewayProcess", "create_key", "free_port", "start_gateway", "wait_until"]

ADMIN = "admin-key-for-hardening-tests"


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir: Path) -> Iterator[ModelServer]:
    """One tiny-model replica serving `tiny`, shared by the hardening tests that only
    talk to it (the chaos tests start their own, to kill)."""
    server = start_model_server(tiny_model_dir, "tiny")
    try:
        yield server
    finally:
        stop_process(server.process)


def stop_process(process: subprocess.Popen, timeout_s: float = 20) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def gateway_config(store: str, replicas: list[str], **extra) -> dict:
    """One model `tiny` with a stable variant on `replicas` (override `models` for more)."""
    return {"key_store": store, "admin_key": ADMIN, "key_refresh_seconds": 0.2,
            "models": [{"name": "tiny", "variants": [
                {"name": "stable", "weight": 100, "replicas": replicas}]}],
            "health_checks": {"interval_seconds": 0.5},
            "retries": {"max_attempts": 3, "backoff_base_seconds": 0.01}, **extra}


def admin_keys(gateway: GatewayProcess) -> dict[str, dict]:
    """Every key's public record (with `used_tokens`) through the admin API."""
    reply = httpx.get(f"{gateway.url}/admin/keys", timeout=10,
                      headers={"authorization": f"Bearer {ADMIN}"})
    reply.raise_for_status()
    return {record["name"]: record for record in reply.json()["data"]}


@dataclass
class RedisProcess:
    """A `redis-server` on a fixed port that a test may kill, restart, stop and continue."""

    binary: str
    port: int
    workdir: Path
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *, persistent: bool = False) -> None:
        """Start (again); `persistent` keeps every write in an append-only file, synced
        before each reply, so a SIGKILL loses nothing that was acknowledged."""
        durability = (["--appendonly", "yes", "--appendfsync", "always"] if persistent
                      else ["--appendonly", "no"])
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             *durability, "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_until(self.answers, 10, "redis-server")

    def start_persistent(self) -> None:
        self.start(persistent=True)

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(10)

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (make system-deps installs it)")
    redis = RedisProcess(binary, free_port(), tmp_path)
    redis.start()
    try:
        yield redis
    finally:
        redis.kill()


@dataclass
class Blackhole:
    """A TCP proxy to `target_port`. `swallow()` makes every open connection a black hole
    (what clients send is read and dropped, nothing comes back, nothing is closed) and new
    connections the same; `heal()` lets new connections through again while the
    swallowed ones stay dead, as after a network partition."""

    target_port: int
    port: int = 0
    is_swallowing: bool = False
    _server: socket.socket | None = None
    _sockets: list[socket.socket] = field(default_factory=list)

    def start(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def swallow(self) -> None:
        self.is_swallowing = True

    def heal(self) -> None:
        self.is_swallowing = False

    def close(self) -> None:
        for sock in [self._server, *self._sockets]:
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()

    def _accept(self) -> None:
        assert self._server is not None
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            self._sockets.append(client)
            if self.is_swallowing:
                threading.Thread(target=self._drain, args=(client,), daemon=True).start()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._sockets.append(upstream)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if self.is_swallowing:
                    return self._drain(source)  # the partition began: stay silent
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)

    @staticmethod
    def _drain(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while sock.recv(65536):
                pass


@pytest.fixture
def blackhole() -> Iterator[callable]:
    started: list[Blackhole] = []

    def start(target_port: int) -> Blackhole:
        hole = Blackhole(target_port)
        hole.start()
        started.append(hole)
        return hole

    yield start
    for hole in started:
        hole.close()


def wait_for(predicate, timeout_s: float, what: str) -> None:
    """`wait_until` that tolerates HTTP errors while waiting."""
    def safe() -> bool:
        try:
            return bool(predicate())
        except httpx.HTTPError:
            return False
    wait_until(safe, timeout_s, what)


def new_key(gateway: GatewayProcess, store: str, name: str, **fields) -> str:
    """A key created in `store`, once the gateway accepts it (it reloads keys each 0.2 s)."""
    secret = create_key(store, name, **fields)
    wait_for(lambda: httpx.get(f"{gateway.url}/v1/models", timeout=5, headers={
        "authorization": f"Bearer {secret}"}).status_code == 200, 10, f"key {name}")
    return secret
