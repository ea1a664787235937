"""Real services for gateway tests: a `redis-server` and tiny-model `quiver serve` replicas.

Each is started for real and skipped only when its binary is absent (Redis: `make
system-deps` installs it).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
# Subprocesses import this checkout's code whatever their working directory (an editable
# install elsewhere would otherwise win outside the repository root).
CHILD_ENV = {"PYTHONUNBUFFERED": "1",
             "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                         os.environ.get("PYTHONPATH")]))}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not come up within {timeout_s} s")


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class RedisServer:
    url: str
    process: subprocess.Popen

    def flush(self) -> None:
        import redis

        client = redis.Redis.from_url(self.url)
        client.flushall()
        client.close()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (make system-deps installs it)")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
         "no", "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def ping() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    try:
        wait_until(ping, 10, "redis-server")
        yield RedisServer(url=f"redis://127.0.0.1:{port}/0", process=process)
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A flushed Redis for one test."""
    redis_server.flush()
    return redis_server.url


@dataclass
class ModelServer:
    url: str
    name: str
    process: subprocess.Popen

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)


def start_model_server(model_dir: Path, name: str, port: int | None = None,
                       *extra_args: str) -> ModelServer:
    """`quiver serve` on the given model, in a subprocess, once /ready answers 200."""
    port = port or free_port()
    env = {**os.environ, **CHILD_ENV}
    process = subprocess.Popen(
        [sys.executable, "-m", "quiver", "serve", "--model", str(model_dir), "--port",
         str(port), "--served-model-name", name, "--max-num-seqs", "16", *extra_args],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    server = ModelServer(url=f"http://127.0.0.1:{port}", name=name, process=process)
    try:
        wait_until(lambda: process.poll() is None and _http_ok(f"{server.url}/ready"), 120,
                   f"quiver serve on :{port}")
    except TimeoutError:
        server.kill()
        raise
    return server


@pytest.fixture(scope="session")
def tiny_servers(tiny_model_dir: Path) -> Iterator[list[ModelServer]]:
    """Two tiny-model replicas serving the name `tiny`, shared by the session."""
    servers = [start_model_server(tiny_model_dir, "tiny") for _ in range(2)]
    try:
        yield servers
    finally:
        for server in servers:
            if server.process.poll() is None:
                server.process.terminate()
                try:
                    server.process.wait(20)
                except subprocess.TimeoutExpired:
                    server.kill()


@dataclass
class GatewayProcess:
    url: str
    process: subprocess.Popen
    log_path: Path

    @property
    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def start_gateway(config: dict, workdir: Path, *, name: str = "gateway",
                  env: dict[str, str] | None = None) -> GatewayProcess:
    """`quiver gateway --config` in a subprocess, with `config` written as YAML."""
    import yaml

    port = free_port()
    config_path = workdir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump({**config, "port": port}), encoding="utf-8")
    log_path = workdir / f"{name}.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "quiver", "gateway", "--config", str(config_path)],
            env={**os.environ, **CHILD_ENV, **(env or {})}, cwd=workdir,
            stdout=log, stderr=subprocess.STDOUT)
    gateway = GatewayProcess(url=f"http://127.0.0.1:{port}", process=process,
                             log_path=log_path)
    try:
        wait_until(lambda: process.poll() is None and _http_ok(f"{gateway.url}/health"), 60,
                   f"quiver gateway on :{port}")
    except TimeoutError:
        gateway.stop()
        raise AssertionError(f"gateway did not start:\n{gateway.log}") from None
    return gateway


def create_key(store: str, name: str, **fields) -> str:
    """A new key in `store` via the real store API; returns the secret."""
    import asyncio
    import time as _time

    from gateway.keys import ApiKey, generate_key, hash_key
    from gateway.stores import open_key_store

    secret = generate_key()

    async def add() -> None:
        key_store = open_key_store(store)
        try:
            await key_store.create(ApiKey(name=name, key_hash=hash_key(secret),
                                          created_at=_time.time(), **fields))
        finally:
            await key_store.close()

    asyncio.run(add())
    return secret


FAKE_UPSTREAM = Path(__file__).with_name("fake_upstream.py")


@dataclass
class FakeProcess:
    url: str
    process: subprocess.Popen

    def set(self, **behaviour) -> None:
        httpx.post(f"{self.url}/_fake/behaviour", json=behaviour, timeout=10).raise_for_status()

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/_fake/stats", timeout=10).json()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def _fake_starter() -> Iterator:
    """`start(**flags)` runs `fake_upstream.py` in a subprocess; all are killed afterwards."""
    started: list[FakeProcess] = []

    def start(name: str = "fake", **flags) -> FakeProcess:
        port = free_port()
        args = [sys.executable, str(FAKE_UPSTREAM), "--port", str(port), "--name", name]
        for flag, value in flags.items():
            args += [f"--{flag.replace('_', '-')}", str(value)]
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        fake = FakeProcess(url=f"http://127.0.0.1:{port}", process=process)
        started.append(fake)
        wait_until(lambda: _http_ok(f"{fake.url}/health"), 30, f"fake upstream {name}")
        return fake

    yield start
    for fake in started:
        fake.kill()


@pytest.fixture
def fake_upstreams() -> Iterator:
    """`start(**flags)` runs `fake_upstream.py` in a subprocess; all are killed afterwards."""
    yield from _fake_starter()


@pytest.fixture(scope="module")
def fake_upstreams_module() -> Iterator:
    """As `fake_upstreams`, for a module's shared stack."""
    yield from _fake_starter()
