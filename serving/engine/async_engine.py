"""The native engine for asyncio callers: the step loop runs in its own thread.

`generate()` admits a request (errors such as a full queue or a too-long prompt raise at
once, in the caller's task) and yields `RequestOutput` deltas as the loop produces them.
Leaving the iterator early — a client disconnect cancels the task — aborts the request and
frees its KV blocks; `abort_choice()` ends one choice of an `n > 1` request while its
siblings go on. The loop is `EngineCore.step()` under this engine's lock, which it holds only
around the scheduler's bookkeeping, never around the model's forward pass, so admitting and
aborting never wait for a step to finish.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from serving.engine.core import EngineCore
from serving.engine.errors import EngineDeadError
from serving.engine.metrics import EngineMetrics, RequestTiming
from serving.engine.outputs import (
    CompletionDelta,
    EngineCoreOutput,
    RequestOutput,
    RequestTimes,
    SchedulerStats,
)
from serving.engine.request import FinishReason, Request
from serving.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _Stream:
    """One `generate()` call: its children (one per choice) and where outputs go."""

    request_id: str
    children: list[Request]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException] = field(default_factory=asyncio.Queue)
    timings: dict[str, RequestTiming] = field(default_factory=dict)
    num_unfinished: int = 0
    first_token_time: float | None = None

    def __post_init__(self) -> None:
        self.index_of = {child.request_id: i for i, child in enumerate(self.children)}

    @property
    def num_prompt_tokens(self) -> int:
        return self.children[0].num_prompt_tokens

    def push(self, item: RequestOutput | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            logger.debug("dropped output of %s: its event loop is closed", self.request_id)


class AsyncEngine:
    def __init__(
        self,
        core: EngineCore,
        *,
        eos_token_ids: Sequence[int] = (),
        metrics: EngineMetrics | None = None,
    ) -> None:
        self.core = core
        self.metrics = metrics
        self.eos_token_ids = tuple(eos_token_ids)
        self._cond = threading.Condition()
        self._streams: dict[str, _Stream] = {}
        self._child_to_stream: dict[str, _Stream] = {}
        self._stopping = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="quiver-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still in flight end with EngineDeadError."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._fail_all(EngineDeadError("the engine is shutting down"))

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._error is None

    @property
    def num_unfinished_requests(self) -> int:
        with self._cond:
            return self.core.num_unfinished_requests

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    def stats(self) -> SchedulerStats:
        """The scheduler's gauges and counters now (what the metrics export)."""
        with self._cond:
            return self.core.stats()

    # -- requests --------------------------------------------------------------------------

    async def generate(
        self, prompt_token_ids: Sequence[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Admit the request, then yield its outputs until every choice has finished."""
        stream = self._add(list(prompt_token_ids), params, request_id)
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if stream.num_unfinished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort every choice of a request; its KV blocks are free when this returns."""
        with self._cond:
            stream = self._streams.pop(request_id, None)
            if stream is None:
                return
            self._abort_children(stream, stream.children, time.time())
            self._record_stats()
        logger.debug("aborted request %s", request_id)

    def abort_choice(self, request_id: str, index: int) -> None:
        """End choice `index` of a request now (its KV blocks are free when this returns)
        while its siblings go on. The stream gets that choice's last delta, finish reason
        `abort`, and ends there if no other choice is left."""
        with self._cond:
            stream = self._streams.get(request_id)
            if stream is None or not 0 <= index < len(stream.children):
                return
            now = time.time()
            if not self._abort_children(stream, [stream.children[index]], now):
                return  # it had finished already
            finished = stream.num_unfinished == 0
            if finished:
                del self._streams[request_id]
            output = RequestOutput(
                request_id, [CompletionDelta(index, [], None, FinishReason.ABORT)],
                stream.num_prompt_tokens, stream.children[0].num_cached_tokens, finished,
                times=_times(stream, now) if finished else None)
            self._record_stats()
            stream.push(output)
        logger.debug("aborted choice %d of request %s", index, request_id)

    def _abort_children(self, stream: _Stream, children: Sequence[Request], now: float) -> int:
        """Abort the children still running; returns how many were."""
        running = [child.request_id for child in children
                   if self._child_to_stream.pop(child.request_id, None) is not None]
        self.core.abort_requests(running)
        for child_id in running:
            timing = stream.timings.pop(child_id)
            if self.metrics is not None:
                self.metrics.record_finished(timing, FinishReason.ABORT, now)
        stream.num_unfinished -= len(running)
        return len(running)

    def _add(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str):
        if self._error is not None or self._stopping:
            raise EngineDeadError()
        children = self._make_children(prompt_token_ids, params, request_id)
        stream = _Stream(request_id, children, asyncio.get_running_loop())
        with self._cond:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in flight")
            added: list[Request] = []
            try:
                for child in children:
                    self.core.add_request(child)
                    added.append(child)
            except Exception:
                self.core.abort_requests(child.request_id for child in added)
                raise
            self._register(stream)
            self._cond.notify()
        return stream

    def _make_children(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str) -> list[Request]:
        """One engine request per choice. Extra EOS ids become stop ids (unless ignore_eos);
        a seed is offset per choice (as vLLM does) so the n choices differ reproducibly."""
        extra_eos = () if params.ignore_eos else self.eos_token_ids[1:]
        eos = self.eos_token_ids[0] if self.eos_token_ids else None
        arrival = time.time()
        children = []
        for index in range(params.n):
            child_params = dataclasses.replace(
                params, n=1, stop_token_ids=(*params.stop_token_ids, *extra_eos),
                seed=None if params.seed is None else params.seed + index,
            )
            child_id = request_id if params.n == 1 else f"{index}_{request_id}"
            children.append(Request(child_id, prompt_token_ids, child_params, eos_token_id=eos,
                                    arrival_time=arrival,
                                    group_id=request_id if params.n > 1 else None))
        return children

    def _register(self, stream: _Stream) -> None:
        self._streams[stream.request_id] = stream
        stream.num_unfinished = len(stream.children)
        for child in stream.children:
            self._child_to_stream[child.request_id] = stream
            stream.timings[child.request_id] = RequestTiming(child.arrival_time,
                                                             child.num_prompt_tokens)

    # -- the loop (engine thread) ----------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._step_once():
                pass
        except BaseException as exc:  # the loop must never die silently
            logger.exception("engine loop died")
            self._error = exc
            self._fail_all(EngineDeadError(f"the engine loop died: {exc!r}"))

    def _step_once(self) -> bool:
        with self._cond:
            while not self._stopping and not self.core.has_unfinished_requests():
                self._cond.wait()
            if self._stopping:
                return False
        self.core.step(self._cond, self._publish)
        return True

    def _publish(self, outputs: list[EngineCoreOutput]) -> None:
        """Under the lock: hand a step's outputs to their streams."""
        ready = self._collect(outputs, time.time())
        self._record_stats()  # before anyone can see the outputs, so metrics agree
        for stream, request_output in ready:
            stream.push(request_output)

    def _collect(self, outputs: list[EngineCoreOutput],
                 now: float) -> list[tuple[_Stream, RequestOutput]]:
        """Group the step's outputs by stream: one RequestOutput per stream that moved."""
        grouped: dict[str, list[EngineCoreOutput]] = {}
        for output in outputs:
            stream = self._child_to_stream.get(output.request_id)
            if stream is not None:  # None: aborted while the step ran
                grouped.setdefault(stream.request_id, []).append(output)
        ready = []
        for request_id, group in grouped.items():
            stream = self._streams[request_id]
            deltas = [self._delta(stream, output, now) for output in group]
            if stream.first_token_time is None:
                stream.first_token_time = now
            finished = stream.num_unfinished == 0
            # Choices after the first hit the prompt blocks the first one computed: report
            # the prompt's cached tokens once, from the first choice, as OpenAI counts them.
            ready.append((stream, RequestOutput(
                request_id, deltas, stream.num_prompt_tokens,
                stream.children[0].num_cached_tokens, finished,
                times=_times(stream, now) if finished else None)))
            if finished:
                del self._streams[request_id]
        return ready

    def _delta(self, stream: _Stream, output: EngineCoreOutput, now: float) -> CompletionDelta:
        index = stream.index_of[output.request_id]
        timing = stream.timings[output.request_id]
        if self.metrics is not None:
            timing.first_scheduled_time = stream.children[index].first_scheduled_time
            self.metrics.record_tokens(timing, len(output.new_token_ids), now)
        if output.finish_reason is not None:
            stream.num_unfinished -= 1
            del self._child_to_stream[output.request_id]
            del stream.timings[output.request_id]
            if self.metrics is not None:
                self.metrics.record_finished(timing, output.finish_reason, now)
        return CompletionDelta(index, output.new_token_ids, output.logprobs,
                               output.finish_reason, output.embedding)

    def _record_stats(self) -> None:
        if self.metrics is not None:
            self.metrics.record_stats(self.core.stats())

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            streams = list(self._streams.values())
            self.core.abort_requests(list(self._child_to_stream))
            self._streams.clear()
            self._child_to_stream.clear()
        for stream in streams:
            stream.num_unfinished = 0
            stream.push(error)


def _times(stream: _Stream, now: float) -> RequestTimes:
    scheduled = [c.first_scheduled_time for c in stream.children if c.first_scheduled_time]
    return RequestTimes(stream.children[0].arrival_time, min(scheduled, default=None),
                        stream.first_token_time, now)
