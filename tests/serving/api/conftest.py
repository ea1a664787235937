"""A live model server on a free 127.0.0.1 port (uvicorn in a background thread) with the
tiny model, shared by the API tests, and helpers to serve any app the same way."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from prometheus_client import CollectorRegistry

from serving.api.app import create_app
from serving.backends.base import GenerationRequest, ModelInfo
from serving.engine.errors import EngineDeadError, QueueFullError
from serving.engine.outputs import CompletionDelta, RequestOutput
from serving.settings import ServerSettings

MODEL_NAME = "tiny"


@contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """Run `app` with uvicorn on a free port until the block ends; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, loop="asyncio", http="h11", ws="none", lifespan="off",
                            log_level="warning", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                              name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@dataclass
class LiveServer:
    url: str
    engine: Any  # NativeEngineClient
    tokenizer: Any
    model: str = MODEL_NAME

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def metric(self, name: str, **labels: str) -> float:
        """The sum of /metrics samples called `name` whose labels include `labels`."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        values = [sample.value for family in text_string_to_metric_families(text)
                  for sample in family.samples
                  if sample.name == name and labels.items() <= sample.labels.items()]
        assert values, f"{name}{labels} not in /metrics"
        return sum(values)

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until the engine has no request and every KV block is free again (as its
        `vllm:kv_cache_usage_perc` says: the share of blocks some request holds)."""
        deadline = time.monotonic() + timeout
        while True:
            num_requests = self.engine.num_unfinished_requests
            kv_usage = self.metric("vllm:kv_cache_usage_perc")
            if num_requests == 0 and kv_usage == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"engine not idle: {num_requests} requests, "
                                     f"{kv_usage:.1%} of the KV cache in use")
            time.sleep(0.02)


def tiny_settings(model_dir, **overrides) -> ServerSettings:
    values = dict(model=model_dir, engine="native", device="cpu", dtype="float32",
                  kv_cache_memory=0.02, served_model_name=MODEL_NAME, max_num_seqs=16)
    values.update(overrides)
    return ServerSettings(**values)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def live_server(tiny_model_dir, tiny_tokenizer) -> Iterator[LiveServer]:
    from serving.backends.factory import create_engine_client

    settings = tiny_settings(tiny_model_dir)
    registry = CollectorRegistry()
    engine = create_engine_client(settings, registry)
    try:
        app = create_app(settings, engine, tiny_tokenizer, registry)
        with serve_in_thread(app) as url:
            yield LiveServer(url, engine, tiny_tokenizer)
    finally:
        asyncio.run(engine.shutdown())


@contextmanager
def fake_server(mode: str, model_dir, tokenizer, **settings) -> Iterator[str]:
    """A live server whose engine is a scripted `FakeEngine`."""
    app = create_app(tiny_settings(model_dir, **settings), FakeEngine(mode, model_dir),
                     tokenizer, CollectorRegistry())
    with serve_in_thread(app) as url:
        yield url


class EngineStub:
    """What every test engine answers the same way: always ready, nothing to abort or
    export; subclasses script `generate` (and may record aborts)."""

    def __init__(self, model_dir: Path, name: str = "tiny", engine: str = "fake") -> None:
        self._info = ModelInfo(served_model_name=name, model_dir=model_dir,
                               max_model_len=2048, engine=engine)

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def is_ready(self) -> bool:
        return True

    @property
    def num_unfinished_requests(self) -> int:
        return 0

    async def abort(self, request_id: str) -> None:
        return None

    async def abort_choice(self, request_id: str, index: int) -> None:
        return None

    async def shutdown(self) -> None:
        return None

    def metrics_text(self) -> bytes:
        return b""


class FakeEngine(EngineStub):
    """`mode`: "queue_full" (admission fails), "crash" (an unexpected error), or
    "dies_mid_stream" (one token, then the engine dies)."""

    def __init__(self, mode: str, model_dir: Path, name: str = "tiny") -> None:
        super().__init__(model_dir, name)
        self.mode = mode

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        if self.mode == "queue_full":
            raise QueueFullError(queue_size=7, retry_after_s=2.5)
        if self.mode == "crash":
            raise RuntimeError("kaboom in the engine")
        yield RequestOutput(request.request_id, [CompletionDelta(0, [300])],
                            len(request.prompt_token_ids), 0, False)
        raise EngineDeadError("the engine loop died: simulated")
