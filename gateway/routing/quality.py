"""Canaries judged by their answers (`rollback.quality`): replaying stable's calls on them.

A share (`sample_share`) of the deterministic calls stable answers (temperature 0, or a
`seed`; one choice; chat or completions, streamed or not) is replayed on every canary of
the model (`Router.canaries`: weight above 0) once stable's answer has gone to the client,
and the two answers are compared (`gateway.routing.agreement`); each agreement goes to
`Router.record_agreement`, which rolls a canary back with reason `quality` when its window
agrees too little.

Off the client's path and bounded:
- `ProxyEndpoint` copies the answer as it is sent (`AnswerCapture`, at most
  `MAX_CAPTURE_BYTES`) and hands it over with `Replayer.offer`, which never waits: a full
  queue (`max_queue`) drops the replay (outcome `dropped`). Parsing, replaying and comparing
  happen in `max_concurrency` worker tasks.
- A replay goes straight to the canary's replicas through the `UpstreamPool`: no key,
  rate limit, budget, usage, response cache or canary error/latency window sees it. It is
  never streamed and asks for at most `max_tokens` completion tokens (nor more than stable
  generated).

Outcomes counted in `quiver_gateway_quality_replays_total`: `compared` (an agreement was
recorded), `invalid` (the canary broke the JSON or tool-call form stable kept: recorded as
0), `skipped` (nothing to compare), `error` (the canary's call failed), `dropped`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from dataclasses import dataclass
from typing import Any

from starlette.types import Message, Send

from gateway.errors import GatewayError
from gateway.estimate import EMBEDDINGS_PATH
from gateway.metrics import GatewayMetrics
from gateway.routing import RouteDecision
from gateway.routing.agreement import Answer, answer_from_events, answer_from_json, compare
from gateway.routing.router import Router
from gateway.settings import ModelRouteSettings, QualitySettings
from gateway.upstream.pool import UpstreamPool

logger = logging.getLogger(__name__)
MAX_CAPTURE_BYTES = 1024 * 1024
OUTCOMES = ("compared", "invalid", "skipped", "error", "dropped")
REPLAY_HEADERS = {"content-type": "application/json", "x-quiver-replay": "quality"}


def is_deterministic(body: dict[str, Any]) -> bool:
    """Temperature 0, or a seed; and a single choice."""
    temperature, seed, n = body.get("temperature"), body.get("seed"), body.get("n")
    if n not in (None, 1) or body.get("best_of") not in (None, 1):
        return False
    is_greedy = isinstance(temperature, int | float) and temperature == 0
    return is_greedy or (isinstance(seed, int) and not isinstance(seed, bool))


class AnswerCapture:
    """An ASGI `send` that passes every message on and keeps a copy of the answer."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.status: int | None = None
        self._chunks: list[bytes] = []
        self._num_bytes = 0

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message["type"] == "http.response.body" and self._num_bytes <= MAX_CAPTURE_BYTES:
            body = message.get("body", b"")
            self._chunks.append(body)
            self._num_bytes += len(body)
        await self._send(message)

    @property
    def body(self) -> bytes | None:
        """The whole answer; None when it was larger than `MAX_CAPTURE_BYTES`."""
        return b"".join(self._chunks) if self._num_bytes <= MAX_CAPTURE_BYTES else None


@dataclass(frozen=True)
class ReplayJob:
    model: str
    path: str
    request: dict[str, Any]   # the client's body
    answer: bytes             # stable's answer as the client got it
    is_stream: bool


class ReplayQueue:
    """A bounded FIFO that refuses rather than grows: `offer` is False when it is full."""

    def __init__(self, max_size: int) -> None:
        self._queue: asyncio.Queue[ReplayJob] = asyncio.Queue(max_size)

    def offer(self, job: ReplayJob) -> bool:
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            return False
        return True

    async def take(self) -> ReplayJob:
        return await self._queue.get()

    def done(self) -> None:
        self._queue.task_done()

    async def join(self) -> None:
        await self._queue.join()

    def __len__(self) -> int:
        return self._queue.qsize()


class Replayer:
    def __init__(self, settings: QualitySettings, routes: list[ModelRouteSettings], *,
                 router: Router, pool: UpstreamPool, metrics: GatewayMetrics,
                 rng: random.Random | None = None) -> None:
        self.settings = settings
        self.router = router
        self.pool = pool
        self.metrics = metrics
        self.queue = ReplayQueue(settings.max_queue)
        self._rng = rng or random.Random()
        self._workers: list[asyncio.Task[None]] = []
        for route in routes:  # zeros, so rates exist before the first replay
            for variant in route.variants:
                if variant.name != route.stable:
                    for outcome in OUTCOMES:
                        metrics.quality_replays.labels(route.name, variant.name, outcome)

    def wants(self, decision: RouteDecision, path: str, body: dict[str, Any]) -> bool:
        """Sample this call for a replay? Decided before it is relayed."""
        return (self.settings.enabled and path != EMBEDDINGS_PATH
                and self.router.is_stable(decision.model, decision.variant)
                and is_deterministic(body) and bool(self.router.canaries(decision.model))
                and self._rng.random() < self.settings.sample_share)

    def offer(self, decision: RouteDecision, path: str, body: dict[str, Any],
              capture: AnswerCapture) -> None:
        """Queue a replay of a call stable answered 200; never waits."""
        answer = capture.body
        if capture.status != 200 or answer is None:
            return
        self._start_workers()
        job = ReplayJob(decision.model, path, body, answer, body.get("stream") is True)
        if not self.queue.offer(job):
            for variant in self.router.canaries(decision.model):
                self.metrics.quality_replays.labels(decision.model, variant, "dropped").inc()

    async def close(self) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()

    def _start_workers(self) -> None:
        if not self._workers:
            self._workers = [asyncio.create_task(self._work(), name=f"quality-replay-{i}")
                             for i in range(self.settings.max_concurrency)]

    async def _work(self) -> None:
        while True:
            job = await self.queue.take()
            try:
                await self.replay(job)
            except Exception:  # a bug here must not stop the worker
                logger.exception("quality replay of a %s call failed", job.model)
            finally:
                self.queue.done()

    async def replay(self, job: ReplayJob) -> None:
        """Replay `job` on every canary of its model and record the agreements."""
        stable = _parse_answer(job)
        for variant in self.router.canaries(job.model):
            outcome = "skipped"
            if stable is not None:
                outcome = await self._judge(job, stable, variant)
            self.metrics.quality_replays.labels(job.model, variant, outcome).inc()

    async def _judge(self, job: ReplayJob, stable: Answer, variant: str) -> str:
        max_tokens = min(self.settings.max_tokens, stable.completion_tokens or
                         self.settings.max_tokens)
        body = replay_body(job.request, self.router.upstream_model(job.model, variant),
                           max_tokens)
        try:
            result = await self.pool.fetch(job.model, variant, job.path, body,
                                           dict(REPLAY_HEADERS))
        except GatewayError as exc:
            logger.info("quality replay on %s/%s failed: %s", job.model, variant, exc)
            return "error"
        payload = _json_object(result.body) if result.status == 200 else None
        canary = answer_from_json(payload) if payload is not None else None
        if canary is None:
            return "error"
        is_cut = (canary.finish_reason == "length"
                  and (stable.completion_tokens or max_tokens + 1) > max_tokens)
        agreement, is_invalid = compare(stable, canary, job.request, is_cut=is_cut)
        if agreement is None:
            return "skipped"
        self.router.record_agreement(job.model, variant, agreement)
        return "invalid" if is_invalid else "compared"


def replay_body(request: dict[str, Any], upstream_model: str, max_tokens: int) -> bytes:
    """The client's body for a canary: unary, its upstream model name, tokens capped."""
    body = {k: v for k, v in request.items() if k not in ("stream", "stream_options")}
    body["model"] = upstream_model
    field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    given = body.get(field)
    body[field] = min(given, max_tokens) if isinstance(given, int) else max_tokens
    return json.dumps(body, separators=(",", ":")).encode()


def _json_object(body: bytes) -> dict[str, Any] | None:
    with contextlib.suppress(ValueError, UnicodeDecodeError):
        payload = json.loads(body)
        return payload if isinstance(payload, dict) else None
    return None


def _parse_answer(job: ReplayJob) -> Answer | None:
    if job.is_stream:
        return answer_from_events(job.answer)
    payload = _json_object(job.answer)
    return answer_from_json(payload) if payload is not None else None
