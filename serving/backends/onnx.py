"""The ONNX Runtime engine behind `EngineClient`: onnxruntime-genai's `Engine` over an
artifact dir from its model builder (`genai_config.json`, `model.onnx`, tokenizer files).

Batching: one og `Engine` batches concurrent requests itself, statically on a CPU (a batch
of up to `max_num_seqs` rows runs to its end before the next one forms), continuously with a
paged-attention artifact on CUDA. Raw og on the tiny model, 8 concurrent x 64 tokens, 2 cores:
Engine 26.8k tokens/s, one og `Generator` per request on 8 threads 12.2k. og binds an Engine
to the thread that made it: one loop thread makes and runs it; `generate` / `abort` hand it
commands.

Stop conditions are the native engine's: og is told no EOS id, and the loop ends a choice on
a stop token or EOS (unless `ignore_eos`) once `min_tokens` are out, including that token.
og stops at `max_tokens` and the context length itself. Rejected with InvalidRequestError
naming the param (og cannot do them): logprobs, presence / frequency penalties, min_p, and
a seed when sampling. Guides (JSON schemas, regexes, choices) go through og's guidance (llguidance).
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from prometheus_client import CollectorRegistry

from serving.backends.base import GenerationRequest, ModelInfo
from serving.backends.onnx_config import (
    OnnxModelConfig,
    check_request,
    guidance,
    import_og,
    og_config_view,
    turn_options,
)
from serving.engine.errors import (
    EngineDeadError,
    InvalidRequestError,
    QueueFullError,
)
from serving.engine.metrics import EngineMetrics, RequestTiming
from serving.engine.outputs import CompletionDelta, RequestOutput, SchedulerStats
from serving.engine.request import FinishReason

logger = logging.getLogger(__name__)

QUEUE_FULL_RETRY_AFTER_S = 1.0
LENGTH_REASONS = ("MAX_GENERATED_TOKENS", "MAX_SESSION_TOKENS")
RETRYABLE_ERRORS = ("CAPACITY_DEFERRED", "EXECUTION_CAPACITY_EXCEEDED", "RETRYABLE_EXECUTION")


@dataclass(eq=False)
class _Choice:
    index: int
    timing: RequestTiming
    og_request: Any = None
    turn_id: int = 0
    num_output_tokens: int = 0
    is_running: bool = False
    is_finished: bool = False


@dataclass(eq=False)
class _Stream:
    request: GenerationRequest
    max_tokens: int
    guide: tuple[str, str] | None
    loop: asyncio.AbstractEventLoop
    choices: list[_Choice]
    queue: asyncio.Queue[RequestOutput | BaseException] = field(default_factory=asyncio.Queue)
    num_cached_tokens: int = 0

    @property
    def num_unfinished(self) -> int:
        return sum(not choice.is_finished for choice in self.choices)

    def push(self, item: RequestOutput | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            logger.debug("dropped output of %s", self.request.request_id)


# What the loop thread (the only one that calls og) is asked to do between steps.
_Command = tuple[Literal["add", "close"], _Stream, list[_Choice]]


class OnnxEngineClient:
    def __init__(self, model_dir: Path, *, served_model_name: str, registry: CollectorRegistry,
                 device: str = "auto", max_num_seqs: int = 64, max_waiting_requests: int = 1024,
                 max_model_len: int | None = None) -> None:
        self._og = import_og()
        model_dir = Path(model_dir)
        self._config = OnnxModelConfig.from_model_dir(model_dir)
        self._max_num_seqs = max_num_seqs
        self._max_waiting_requests = max_waiting_requests
        max_len = min(max_model_len or self._config.context_length, self._config.context_length)
        self._info = ModelInfo(served_model_name=served_model_name, model_dir=model_dir,
                               max_model_len=max_len, engine="onnx",
                               supports_structured_output=True)
        self.metrics = EngineMetrics(registry, served_model_name)
        self._cond = threading.Condition()
        self._streams: dict[str, _Stream] = {}
        self._by_og_request: dict[int, tuple[_Stream, _Choice]] = {}
        self._commands: list[_Command] = []
        self._has_og_work = False
        self._is_stopping = False
        self._error: BaseException | None = None
        self._view = tempfile.TemporaryDirectory(prefix="quiver-onnx-")
        self._og_model_config = og_config_view(
            self._og, model_dir, self._config, Path(self._view.name), device=device,
            max_len=max_len, max_batch_size=max_num_seqs)
        self._engine: Any = None
        self._is_started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="quiver-onnx", daemon=True)
        self._thread.start()
        self._is_started.wait()
        if self._error is not None:
            self._view.cleanup()
            raise self._error

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def is_ready(self) -> bool:
        return self._thread.is_alive() and self._error is None and not self._is_stopping

    @property
    def num_unfinished_requests(self) -> int:
        with self._cond:
            return len(self._streams)

    @property
    def num_og_requests(self) -> int:
        """og requests not yet closed (tests check that aborts release them)."""
        with self._cond:
            return len(self._by_og_request)

    # -- requests (the caller's event loop) -----------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        stream = self._add(request)
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            await self.abort(request.request_id)

    def _add(self, request: GenerationRequest) -> _Stream:
        if self._error is not None or self._is_stopping:
            raise EngineDeadError()
        params, max_len = request.params, self._info.max_model_len
        check_request(request, max_len)
        num_prompt_tokens, now = len(request.prompt_token_ids), time.time()
        stream = _Stream(request, params.max_tokens or max_len - num_prompt_tokens,
                         guidance(params), asyncio.get_running_loop(),
                         [_Choice(i, RequestTiming(now, num_prompt_tokens))
                          for i in range(params.n)])
        with self._cond:
            if request.request_id in self._streams:
                raise InvalidRequestError(f"request id {request.request_id!r} is already in use",
                                          param="request_id")
            num_waiting = self._num_waiting()
            if num_waiting >= self._max_waiting_requests:
                raise QueueFullError(num_waiting, QUEUE_FULL_RETRY_AFTER_S)
            self._streams[request.request_id] = stream
            self._commands.append(("add", stream, stream.choices))
            self._cond.notify()
        return stream

    async def abort(self, request_id: str) -> None:
        """Forget the request at once; its og turns are cancelled before the next step."""
        with self._cond:
            stream = self._streams.pop(request_id, None)
            if stream is None:
                return
            self._abort_choices(stream, time.time())
            self._commands.append(("close", stream, stream.choices))
            self._record_stats()
            self._cond.notify()

    async def abort_choice(self, request_id: str, index: int) -> None:
        """End one choice now: its og request is cancelled before the next step, its
        siblings go on; the stream gets its last delta (abort)."""
        with self._cond:
            stream = self._streams.get(request_id)
            if stream is None or not 0 <= index < len(stream.choices):
                return
            choice = stream.choices[index]
            if choice.is_finished:
                return
            choice.is_finished = True
            self.metrics.record_finished(choice.timing, FinishReason.ABORT, time.time())
            self._commands.append(("close", stream, [choice]))
            is_finished = stream.num_unfinished == 0
            if is_finished:
                del self._streams[request_id]
            self._record_stats()
            self._cond.notify()
        delta = CompletionDelta(index, [], None, FinishReason.ABORT)
        stream.push(RequestOutput(request_id, [delta], len(stream.request.prompt_token_ids),
                                  stream.num_cached_tokens, is_finished))

    async def shutdown(self) -> None:
        with self._cond:
            self._is_stopping = True
            self._cond.notify_all()
        await asyncio.to_thread(self._thread.join, 10.0)
        self._fail_all(EngineDeadError("the engine is shutting down"))
        self._view.cleanup()

    def metrics_text(self) -> bytes:
        return b""

    # -- the loop (its own thread; the only one that calls og) ----------------------------------

    def _run(self) -> None:
        try:
            self._engine = self._og.Engine(self._og.Model(self._og_model_config))
            self._buffer = self._engine.create_event_buffer(max(64, 2 * self._max_num_seqs))
        except BaseException as exc:
            self._error = exc
            return
        finally:
            self._is_started.set()
        try:
            while self._step_once():
                pass
        except BaseException as exc:  # the loop must never die silently
            logger.exception("onnx engine loop died")
            self._error = exc
            self._fail_all(EngineDeadError(f"the onnx engine loop died: {exc!r}"))

    def _step_once(self) -> bool:
        with self._cond:
            while not self._is_stopping and not self._commands and not self._has_og_work:
                self._cond.wait()
            if self._is_stopping:
                return False
            commands, self._commands = self._commands, []
        for verb, stream, choices in commands:
            self._start(stream) if verb == "add" else self._close(choices)
        self._has_og_work = self._engine.has_pending_requests()
        if not self._has_og_work:
            return True
        events = self._engine.run(self._buffer)
        with self._cond:
            ready = self._collect(events, time.time())
            self._record_stats()
        for stream, output in ready:
            stream.push(output)
        return True

    def _start(self, stream: _Stream) -> None:
        """Begin one og turn per choice (n > 1 fans out into n og requests)."""
        with self._cond:
            if self._streams.get(stream.request.request_id) is not stream:
                return  # aborted before it started
        prompt = np.asarray(stream.request.prompt_token_ids, dtype=np.int32)
        try:
            for choice in stream.choices:
                choice.og_request = self._engine.create_request()
                options = turn_options(self._og, choice.og_request, stream.request.params,
                                       stream.max_tokens, stream.guide)
                choice.turn_id = choice.og_request.begin_turn(prompt, options)
        except Exception as exc:  # og refuses what it cannot serve with RuntimeError
            self._close(stream.choices)
            guide = stream.request.params.guide
            param = guide.param if guide is not None else "prompt"
            with self._cond:
                self._streams.pop(stream.request.request_id, None)
            stream.push(InvalidRequestError(f"the onnx engine refused the request: {exc}",
                                            param=param))
            return
        with self._cond:
            for choice in stream.choices:
                self._by_og_request[id(choice.og_request)] = (stream, choice)

    def _close(self, choices: list[_Choice]) -> None:
        """Cancel and close og requests (the lock is re-entrant: the loop may hold it)."""
        for choice in choices:
            og_request, choice.og_request = choice.og_request, None
            if og_request is not None:
                with self._cond:
                    self._by_og_request.pop(id(og_request), None)
                og_request.cancel_turn(choice.turn_id)  # False once the turn has finished
                og_request.close()

    def _collect(self, events: Any, now: float) -> list[tuple[_Stream, RequestOutput]]:
        """Turn one step's events into one RequestOutput per stream that moved."""
        deltas: dict[str, list[CompletionDelta]] = {}
        for event in events:
            stream, choice = self._by_og_request.get(id(event.request), (None, None))
            if (stream is None or choice.is_finished
                    or self._streams.get(stream.request.request_id) is not stream):
                continue  # finished by us, or aborted: its og turn is being cancelled
            delta = self._event_delta(stream, choice, event, now)
            if delta is not None:
                deltas.setdefault(stream.request.request_id, []).append(delta)
        ready = []
        for request_id, stream_deltas in deltas.items():
            stream = self._streams.get(request_id)
            if stream is None:  # failed in this step
                continue
            is_finished = stream.num_unfinished == 0
            ready.append((stream, RequestOutput(request_id, stream_deltas,
                                                len(stream.request.prompt_token_ids),
                                                stream.num_cached_tokens, is_finished)))
            if is_finished:
                del self._streams[request_id]
        return ready

    def _event_delta(self, stream: _Stream, choice: _Choice, event: Any,
                     now: float) -> CompletionDelta | None:
        if int(event.flags.value) & int(self._og.EngineEventFlags.FAILED.value):
            self._fail(stream, event.error_code.name, now)
            return None
        new_token_ids = [] if event.token is None else [int(event.token)]
        reason = self._stop_reason(stream, choice, new_token_ids, event)
        if not new_token_ids and reason is None:
            return None  # e.g. CAPACITY_BLOCKED: nothing happened to this choice
        if not choice.is_running:
            choice.is_running = True
            choice.timing.first_scheduled_time = now
        choice.num_output_tokens += len(new_token_ids)
        self.metrics.record_tokens(choice.timing, len(new_token_ids), now)
        if event.usage is not None and choice.index == 0:
            stream.num_cached_tokens = max(stream.num_cached_tokens,
                                           int(event.usage.cached_prompt_tokens))
        if reason is not None:
            choice.is_finished = True
            self.metrics.record_finished(choice.timing, reason, now)
            self._close([choice])
        return CompletionDelta(choice.index, new_token_ids, None, reason)

    def _fail(self, stream: _Stream, error_code: str, now: float) -> None:
        """og failed a choice: the whole request ends with an error."""
        self._streams.pop(stream.request.request_id, None)
        self._abort_choices(stream, now)
        self._close(stream.choices)
        message = f"the onnx engine failed the request ({error_code})"
        if error_code in RETRYABLE_ERRORS:
            error: Exception = QueueFullError(self._num_waiting(), QUEUE_FULL_RETRY_AFTER_S)
        elif error_code == "REQUEST_UNSERVICEABLE":
            error = InvalidRequestError(message, param="prompt")
        else:
            error = EngineDeadError(message)
        stream.push(error)

    def _stop_reason(self, stream: _Stream, choice: _Choice, new_token_ids: list[int],
                     event: Any) -> FinishReason | None:
        """Our stop conditions first (as the native engine's), then og's own finish."""
        params = stream.request.params
        if new_token_ids and choice.num_output_tokens + 1 >= params.min_tokens:
            token_id = new_token_ids[0]
            is_eos = not params.ignore_eos and token_id in self._config.eos_token_ids
            if is_eos or token_id in params.stop_token_ids:
                return FinishReason.STOP
        og_reason = event.finish_reason.name
        if og_reason == "NONE":
            return None
        if og_reason == "EOS":  # only guidance ends a turn at EOS: og names no token then
            new_token_ids.extend(self._config.eos_token_ids[:1])
            return FinishReason.STOP
        return FinishReason.LENGTH if og_reason in LENGTH_REASONS else FinishReason.ABORT

    def _abort_choices(self, stream: _Stream, now: float) -> None:
        for choice in stream.choices:
            if not choice.is_finished:
                choice.is_finished = True
                self.metrics.record_finished(choice.timing, FinishReason.ABORT, now)

    def _num_waiting(self) -> int:
        return sum(not c.is_running and not c.is_finished
                   for s in self._streams.values() for c in s.choices)

    def _record_stats(self) -> None:
        num_running = sum(c.is_running and not c.is_finished
                          for s in self._streams.values() for c in s.choices)
        # KV usage: the share of the static engine's cache rows in use.
        self.metrics.record_stats(SchedulerStats(
            num_running=num_running, num_waiting=self._num_waiting(),
            kv_cache_usage=min(1.0, num_running / self._max_num_seqs),
            prefix_cache_queries=0, prefix_cache_hits=0, num_preemptions=0))

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            streams = list(self._streams.values())
            self._streams.clear()
            self._by_og_request.clear()
        for stream in streams:
            stream.push(error)


def create(settings, registry: CollectorRegistry) -> OnnxEngineClient:
    """`ServerSettings` -> a started onnx engine over an onnxruntime-genai artifact dir."""
    return OnnxEngineClient(settings.model, served_model_name=settings.name, registry=registry,
                            device=settings.device, max_num_seqs=settings.max_num_seqs,
                            max_waiting_requests=settings.max_waiting_requests,
                            max_model_len=settings.max_model_len)
