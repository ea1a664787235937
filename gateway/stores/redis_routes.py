"""`RedisRouteState`: one route state for every gateway replica (`routing.backend: redis`).

Layout, all under `quiver:routes:`:

| key                              | type   | holds                                           |
|----------------------------------|--------|-------------------------------------------------|
| `quiver:routes:doc:<model>`      | string | the model's `RouteDoc` as JSON                  |
| `quiver:routes:version`          | string | bumped by every doc write (one GET says "re-read") |
| `quiver:routes:samples:<model>`  | stream | every replica's judging samples, ~`MAX_STREAM_LEN` |

**Writes** (an operator's weight, a rollback, the first replica's config) are
compare-and-set on the doc's `version` in one Lua script, retried on a conflict against
the doc that won: two replicas rolling one canary back write it once (the second finds it
rolled back and counts nothing), and an operator's change made meanwhile wins over a
verdict reached before it (the verdict's epoch is stale).

**Sync.** Every `routing.sync_seconds` each replica makes one pipelined round trip: it
appends the samples it took since the last one, reads the version counter and every new
sample of the other replicas (XREAD from the last id it saw), and re-reads the docs when
the counter moved. So an admin change on one replica is obeyed by all within about one
interval, and every replica judges each canary on the pooled traffic of all of them (their
verdicts agree; the write decides who counts it). Samples carry wall-clock times: replicas'
clocks are assumed to agree to well under the judging window.

**Start.** A replica adopts the stored doc of each model whose config (stable variant and
configured weights, `fingerprint`) matches its own; a missing doc, or one stored from
another config (a new release with new weights), is replaced by the config's, one version
and epoch up. It then reads the model's sample stream, so a restart loses neither the
weights nor the judging window.

**Redis unreachable.** The replica keeps routing by the last state it read, its own
rollbacks take effect locally at once and are written when Redis is back (remote docs are
not applied over a rollback still being written), its samples are dropped (bounded), an
admin change is a 503, and `quiver_gateway_route_state_up` is 0. The scripts address keys
under one prefix, so this layout targets a single Redis (or a primary with replicas), not
Redis Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Mapping
from typing import Any

from redis.exceptions import RedisError

from gateway.metrics import GatewayMetrics
from gateway.routing.rollback import RollbackVerdict
from gateway.routing.state import (
    Change,
    RouteDoc,
    RouteSink,
    RouteStateUnavailableError,
    Sample,
    fingerprint,
)
from gateway.settings import ModelRouteSettings
from gateway.stores.redis_client import open_redis

logger = logging.getLogger(__name__)

PREFIX = "quiver:routes:"
VERSION = PREFIX + "version"
MAX_STREAM_LEN = 20_000      # per model, approximate (XADD MAXLEN ~)
MAX_OUTBOX = 10_000          # samples waiting for the next sync; older ones are dropped
READ_COUNT = 5_000           # samples per stream per sync
MAX_CAS_ATTEMPTS = 8

# KEYS: doc, version counter; ARGV: expected version ('' = absent), new doc
_COMPARE_AND_SET = """
local current = redis.call('GET', KEYS[1])
local version = ''
if current then version = tostring(cjson.decode(current)['version']) end
if version ~= ARGV[1] then return {0, current or ''} end
redis.call('SET', KEYS[1], ARGV[2])
return {1, redis.call('INCR', KEYS[2])}
"""


def doc_key(model: str) -> str:
    return f"{PREFIX}doc:{model}"


def stream_key(model: str) -> str:
    return f"{PREFIX}samples:{model}"


class RedisRouteState:
    is_shared = True

    def __init__(self, url: str, routes: list[ModelRouteSettings], *, sync_seconds: float,
                 timeout_s: float, metrics: GatewayMetrics) -> None:
        self._redis = open_redis(url, timeout_s=timeout_s, max_connections=4)
        self._cas = self._redis.register_script(_COMPARE_AND_SET)
        self._routes = {route.name: route for route in routes}
        self._sync_seconds = sync_seconds
        self._metrics = metrics
        self._origin = uuid.uuid4().hex[:12]
        self._sink: RouteSink | None = None
        self._docs: dict[str, RouteDoc] = {}          # as last applied from (or to) Redis
        self._outbox: deque[tuple[str, Sample]] = deque(maxlen=MAX_OUTBOX)
        self._stream_ids = {name: "0-0" for name in self._routes}
        self._counter: bytes | None = None            # the version counter last read
        self._pending: dict[str, list[tuple[Change, RollbackVerdict]]] = {}
        self._pending_locks = {name: asyncio.Lock() for name in self._routes}
        self._is_started = False                      # stored state adopted or written
        self._is_up = False                           # the last sync succeeded
        self._last_sync = float("-inf")
        self._task: asyncio.Task[None] | None = None
        self._is_closed = False
        self._stop = asyncio.Event()
        self._writes: set[asyncio.Task[None]] = set()
        metrics.route_state_up.set(0)
        metrics.route_state_age.set_function(self.age_seconds)

    # -- RouteState ----------------------------------------------------------------------

    def bind(self, sink: RouteSink, docs: Mapping[str, RouteDoc]) -> None:
        self._sink, self._docs = sink, dict(docs)

    async def start(self) -> None:
        await self._sync_quietly()
        self._task = asyncio.create_task(self._run(), name="route-state-sync")

    async def close(self) -> None:
        if self._is_closed:
            return
        self._is_closed = True
        self._stop.set()
        if self._task is not None:  # its sync ends within Redis timeouts
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._task, timeout=5.0)
        for task in list(self._writes):
            task.cancel()
        await asyncio.gather(*self._writes, return_exceptions=True)
        with contextlib.suppress(*_FAILURES):  # best effort: hand the samples over
            await self._flush_samples()
        await self._redis.aclose()

    async def update(self, model: str, change: Change) -> RouteDoc:
        try:
            return await self._write(model, change)
        except _FAILURES as exc:
            raise RouteStateUnavailableError(
                f"the shared route state (Redis) is unreachable: {type(exc).__name__}: "
                f"{exc}") from exc

    def roll_back(self, model: str, change: Change, verdict: RollbackVerdict) -> None:
        self._pending.setdefault(model, []).append((change, verdict))
        task = asyncio.get_running_loop().create_task(self._write_pending(model))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    def publish(self, model: str, sample: Sample) -> None:
        self._outbox.append((model, sample))

    def status(self) -> dict[str, Any]:
        age = self.age_seconds()
        return {"backend": "redis", "up": self._is_up,
                "synced_seconds_ago": None if age == float("inf") else round(age, 3)}

    def age_seconds(self) -> float:
        return time.monotonic() - self._last_sync

    # -- internals -----------------------------------------------------------------------

    async def _run(self) -> None:
        # stopped by an event, not by cancelling: redis-py can swallow a cancellation
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._sync_seconds)
            if not self._stop.is_set():
                await self._sync_quietly()

    async def _sync_quietly(self) -> None:
        was_up = self._is_up
        try:
            await self._sync()
        except _FAILURES as exc:
            self._is_up = False
            self._metrics.route_state_up.set(0)
            if was_up or not self._is_started:
                logger.warning("shared route state (Redis) unreachable, routing by the last "
                               "state read: %s: %s", type(exc).__name__, exc)
            return
        if not was_up:
            logger.info("shared route state (Redis) in sync")
        self._is_up = True
        self._metrics.route_state_up.set(1)
        self._last_sync = time.monotonic()

    async def _sync(self) -> None:
        if not self._is_started:
            await self._adopt_or_write_config()
            self._is_started = True
        for model in list(self._pending):
            await self._write_pending(model)
        counter, streams = await self._flush_samples(read=True)
        if counter != self._counter or counter is None:
            await self._reread_docs()
            self._counter = counter
        self._ingest(streams)

    async def _adopt_or_write_config(self) -> None:
        for name, route in self._routes.items():
            for _ in range(MAX_CAS_ATTEMPTS):
                stored = await self._read(name)
                if (stored is not None and stored.fingerprint == fingerprint(route)
                        and set(stored.weights) == {v.name for v in route.variants}):
                    self._apply(name, stored)
                    break
                if stored is not None:
                    logger.warning("route state of %s was stored from another config: the "
                                   "config's weights replace it", name)
                fresh = RouteDoc.initial(route, after=stored)
                if await self._compare_and_set(name, stored, fresh):
                    self._apply(name, fresh)
                    break
        await self._read_history()

    async def _read_history(self) -> None:
        for name in self._routes:
            entries = await self._redis.xrange(stream_key(name))
            if entries:
                self._stream_ids[name] = entries[-1][0].decode()
            self._ingest_entries(name, entries, skip_own=False)

    async def _flush_samples(self, *, read: bool = False) -> tuple[bytes | None, list[Any]]:
        drained = list(self._outbox)
        self._outbox.clear()
        pipe = self._redis.pipeline(transaction=False)
        for model, sample in drained:
            pipe.xadd(stream_key(model), {"s": json.dumps(sample.to_list(self._origin))},
                      maxlen=MAX_STREAM_LEN, approximate=True)
        if read:
            pipe.get(VERSION)
            pipe.xread({stream_key(name): sid for name, sid in self._stream_ids.items()},
                       count=READ_COUNT)
        results = await pipe.execute() if drained or read else []
        return (results[-2], results[-1] or []) if read else (None, [])

    def _ingest(self, streams: list[Any]) -> None:
        for key, entries in streams:
            name = key.decode().removeprefix(PREFIX + "samples:")
            if name in self._routes and entries:
                self._stream_ids[name] = entries[-1][0].decode()
                self._ingest_entries(name, entries, skip_own=True)

    def _ingest_entries(self, model: str, entries: list[Any], *, skip_own: bool) -> None:
        samples = []
        for _, fields in entries:
            try:
                origin, sample = Sample.from_list(json.loads(fields[b"s"]))
            except (KeyError, ValueError, TypeError, IndexError):
                continue  # not ours to read; never fatal
            if not (skip_own and origin == self._origin):
                samples.append(sample)
        if samples and self._sink is not None:
            self._sink.ingest(model, samples)

    async def _reread_docs(self) -> None:
        names = list(self._routes)
        raw = await self._redis.mget([doc_key(name) for name in names])
        for name, text in zip(names, raw, strict=True):
            if name in self._pending:
                continue  # a rollback of ours is being written; its answer decides
            if text is None:  # Redis lost it (flushed, restarted empty): put ours back
                await self._compare_and_set(name, None, self._docs[name])
                continue
            doc = RouteDoc.from_json(name, text)
            if doc.version != self._docs[name].version or doc != self._docs[name]:
                self._apply(name, doc)

    async def _write_pending(self, model: str) -> None:
        """Write this replica's rollbacks of `model` in order; kept for the next sync if
        Redis fails."""
        async with self._pending_locks[model]:
            await self._write_pending_locked(model)

    async def _write_pending_locked(self, model: str) -> None:
        queue = self._pending.get(model, [])
        while queue:
            change, verdict = queue[0]
            try:
                doc = await self._write(model, change)
            except _FAILURES:
                return
            queue.pop(0)
            if doc.rolled_back.get(verdict.variant) is verdict:  # ours, not a stored one
                assert self._sink is not None
                self._sink.rollback_won(verdict)
        self._pending.pop(model, None)

    async def _write(self, model: str, change: Change) -> RouteDoc:
        """`change` applied to the stored doc by compare-and-set; the doc that results."""
        for _ in range(MAX_CAS_ATTEMPTS):
            stored = await self._read(model)
            current = stored or self._docs[model]
            doc = change(current)
            if doc is None:  # declined against what is stored: that stands
                self._apply(model, current)
                return current
            if await self._compare_and_set(model, stored, doc):
                self._apply(model, doc)
                return doc
        raise RouteStateUnavailableError(f"route state of {model} kept changing under "
                                         f"{MAX_CAS_ATTEMPTS} writes; try again")

    async def _read(self, model: str) -> RouteDoc | None:
        text = await self._redis.get(doc_key(model))
        return RouteDoc.from_json(model, text) if text is not None else None

    async def _compare_and_set(self, model: str, expected: RouteDoc | None,
                               doc: RouteDoc) -> bool:
        is_set, _ = await self._cas(keys=[doc_key(model), VERSION],
                                    args=["" if expected is None else str(expected.version),
                                          doc.to_json()])
        return bool(is_set)

    def _apply(self, model: str, doc: RouteDoc) -> None:
        self._docs[model] = doc
        if self._sink is not None:
            self._sink.apply(model, doc)


_FAILURES = (RedisError, OSError, RouteStateUnavailableError)
