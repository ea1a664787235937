"""Continuous batching with chunked prefill, prefix caching and preemption by recompute.

One engine step is `schedule()` -> model runner -> `update_from_output()`. Each step has a
budget of `max_num_batched_tokens` tokens and `max_num_seqs` seats. Running requests go
first (a decode is one token, an unfinished prefill gets its next chunk), then waiting
requests in FIFO order. When KV blocks run out, the newest running request is preempted:
its blocks are freed and it is recomputed later from its prompt and outputs so far.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable

from serving.engine.block_manager import BlockManager
from serving.engine.config import CacheConfig, SchedulerConfig
from serving.engine.errors import InvalidRequestError, PromptTooLongError, QueueFullError
from serving.engine.outputs import (
    EngineCoreOutput,
    ModelRunnerOutput,
    ScheduledRequest,
    SchedulerOutput,
    SchedulerStats,
)
from serving.engine.request import Request, RequestStatus

logger = logging.getLogger(__name__)

# Retry-After hint when the waiting queue is full.
QUEUE_FULL_RETRY_AFTER_S = 1.0


class Scheduler:
    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig) -> None:
        if scheduler_config.max_model_len > cache_config.num_token_slots:
            raise ValueError(
                f"max_model_len ({scheduler_config.max_model_len}) is larger than the KV "
                f"cache ({cache_config.num_blocks} blocks x {cache_config.block_size} tokens "
                f"= {cache_config.num_token_slots} tokens); lower max_model_len or give "
                "the KV cache more memory"
            )
        self.scheduler_config = scheduler_config
        self.cache_config = cache_config
        self.block_manager = BlockManager(
            cache_config.num_blocks, cache_config.block_size, cache_config.enable_prefix_caching
        )
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.finished_request_ids: set[str] = set()
        self.num_preemptions = 0

    def add_request(self, request: Request) -> None:
        """Queue a request; raise `InvalidRequestError` or `QueueFullError` if it can't be."""
        assert request.status == RequestStatus.WAITING, request.status
        self._check_request(request)
        if len(self.waiting) >= self.scheduler_config.max_waiting_requests:
            raise QueueFullError(len(self.waiting), QUEUE_FULL_RETRY_AFTER_S)
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> None:
        """Finish (typically abort) requests wherever they are; their blocks free at once.
        Unknown or already finished ids are ignored."""
        assert status.is_finished, status
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            self._free_request(request, status)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=self.block_manager.usage,
            prefix_cache_queries=self.block_manager.prefix_cache_queries,
            prefix_cache_hits=self.block_manager.prefix_cache_hits,
            num_preemptions=self.num_preemptions,
        )

    def schedule(self) -> SchedulerOutput:
        scheduled: list[ScheduledRequest] = []
        preempted_request_ids: list[str] = []
        token_budget = self.scheduler_config.max_num_batched_tokens
        token_budget = self._schedule_running(scheduled, preempted_request_ids, token_budget)
        # Like vLLM: a step that had to preempt admits nobody new.
        if not preempted_request_ids:
            token_budget = self._schedule_waiting(scheduled, token_budget)
        output = SchedulerOutput(
            scheduled_requests=scheduled,
            num_batched_tokens=self.scheduler_config.max_num_batched_tokens - token_budget,
            preempted_request_ids=preempted_request_ids,
            finished_request_ids=self.finished_request_ids,
        )
        self.finished_request_ids = set()
        return output

    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        """Advance the scheduled requests by what the runner computed and sampled."""
        outputs = []
        for scheduled in scheduler_output.scheduled_requests:
            request = self.requests.get(scheduled.request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # aborted while the step ran
            output = self._update_request(request, scheduled, runner_output)
            if output is not None:
                outputs.append(output)
        if any(output.is_finished for output in outputs):
            self.running = [request for request in self.running if not request.is_finished]
        return outputs

    def _check_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise InvalidRequestError(
                f"request id {request.request_id!r} is already in use", param="request_id"
            )
        if not request.prompt_token_ids:
            raise InvalidRequestError("the prompt must have at least one token", param="prompt")
        max_model_len = self.scheduler_config.max_model_len
        max_tokens = request.sampling_params.max_tokens
        num_prompt_tokens = request.num_prompt_tokens
        if num_prompt_tokens >= max_model_len or (
            max_tokens is not None and num_prompt_tokens + max_tokens > max_model_len
        ):
            raise PromptTooLongError(num_prompt_tokens, max_tokens, max_model_len)

    def _schedule_running(
        self, scheduled: list[ScheduledRequest], preempted_request_ids: list[str], budget: int
    ) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new_tokens = min(request.num_tokens - request.num_computed_tokens, budget)
            assert num_new_tokens > 0, request.request_id
            if not self._allocate_or_preempt(request, num_new_tokens, preempted_request_ids):
                break  # the request preempted itself: it was the last one running
            scheduled.append(self._make_scheduled_request(request, num_new_tokens))
            budget -= num_new_tokens
            index += 1
        return budget

    def _allocate_or_preempt(
        self, request: Request, num_new_tokens: int, preempted_request_ids: list[str]
    ) -> bool:
        """Allocate slots, preempting the newest running requests until they fit.
        Returns False if `request` itself had to be preempted."""
        while self.block_manager.allocate_slots(request, num_new_tokens) is None:
            victim = self.running.pop()
            self._preempt(victim)
            preempted_request_ids.append(victim.request_id)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.block_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        logger.debug("preempted request %s (%d tokens)", request.request_id, request.num_tokens)

    def _schedule_waiting(self, scheduled: list[ScheduledRequest], budget: int) -> int:
        skipped: list[Request] = []
        while (
            self.waiting and budget > 0 and len(self.running) < self.scheduler_config.max_num_seqs
        ):
            request = self.waiting[0]
            if self._is_waiting_for_sibling(request):
                skipped.append(self.waiting.popleft())
                continue
            scheduled_request = self._admit(request, budget)
            if scheduled_request is None:
                break  # out of blocks: keep FIFO order, retry next step
            self.waiting.popleft()
            scheduled.append(scheduled_request)
            budget -= scheduled_request.num_tokens
        self.waiting.extendleft(reversed(skipped))
        return budget

    def _is_waiting_for_sibling(self, request: Request) -> bool:
        """True while every running sibling is still prefilling: next step the shared
        prompt's full blocks are cached and this request takes them instead of
        recomputing them."""
        if request.group_id is None or not self.cache_config.enable_prefix_caching:
            return False
        siblings = [r for r in self.running if r.group_id == request.group_id]
        return bool(siblings) and all(r.num_computed_tokens < r.num_prompt_tokens for r in siblings)

    def _admit(self, request: Request, budget: int) -> ScheduledRequest | None:
        if request.sampling_params.pooling == "mean":  # pools every token: compute them all
            computed_blocks, num_cached_tokens = [], 0
        else:
            computed_blocks, num_cached_tokens = self.block_manager.get_computed_blocks(request)
        num_new_tokens = min(request.num_tokens - num_cached_tokens, budget)
        if self.block_manager.allocate_slots(request, num_new_tokens, computed_blocks) is None:
            return None
        if request.first_scheduled_time is None:
            request.first_scheduled_time = time.time()
            request.num_cached_tokens = num_cached_tokens
        request.num_computed_tokens = num_cached_tokens
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        return self._make_scheduled_request(request, num_new_tokens)

    def _make_scheduled_request(self, request: Request, num_new_tokens: int) -> ScheduledRequest:
        start = request.num_computed_tokens
        end = start + num_new_tokens
        return ScheduledRequest(
            request_id=request.request_id,
            token_ids_to_compute=request.all_token_ids[start:end],
            start_position=start,
            block_table=self.block_manager.get_block_table(request.request_id),
            is_last_chunk=end == request.num_tokens,
            sampling_params=request.sampling_params,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=request.output_token_ids,
        )

    def _update_request(
        self, request: Request, scheduled: ScheduledRequest, runner_output: ModelRunnerOutput
    ) -> EngineCoreOutput | None:
        request.num_computed_tokens += scheduled.num_tokens
        if not scheduled.is_last_chunk:
            self.block_manager.cache_full_blocks(request)
            return None
        if request.sampling_params.pooling is not None:
            return self._finish_pooled(request, runner_output)
        token_id = runner_output.sampled_token_ids[request.request_id]
        request.append_output_token_id(token_id)
        self.block_manager.cache_full_blocks(request)
        status = self._check_stop(request)
        if status is not None:
            self._free_request(request, status)
        logprobs = (runner_output.logprobs or {}).get(request.request_id)
        return EngineCoreOutput(
            request_id=request.request_id,
            new_token_ids=[token_id],
            finish_reason=request.status.finish_reason,
            logprobs=None if logprobs is None else [logprobs],
            num_cached_tokens=request.num_cached_tokens,
        )

    def _finish_pooled(self, request: Request,
                       runner_output: ModelRunnerOutput) -> EngineCoreOutput:
        """An embedding request is done once its whole prompt has been computed."""
        self.block_manager.cache_full_blocks(request)
        self._free_request(request, RequestStatus.FINISHED_STOPPED)
        return EngineCoreOutput(
            request_id=request.request_id, new_token_ids=[],
            finish_reason=request.status.finish_reason,
            num_cached_tokens=request.num_cached_tokens,
            embedding=(runner_output.pooled or {})[request.request_id])

    def _check_stop(self, request: Request) -> RequestStatus | None:
        """Stop token / EOS (not before min_tokens), then max_tokens / max_model_len."""
        params = request.sampling_params
        last_token_id = request.output_token_ids[-1]
        if request.num_output_tokens >= params.min_tokens and (
            last_token_id in params.stop_token_ids
            or (not params.ignore_eos and last_token_id == request.eos_token_id)
        ):
            return RequestStatus.FINISHED_STOPPED
        if params.max_tokens is not None and request.num_output_tokens >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.scheduler_config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _free_request(self, request: Request, status: RequestStatus) -> None:
        """Mark finished and free its blocks; the caller removes it from its queue."""
        request.status = status
        self.block_manager.free(request)
        del self.requests[request.request_id]
        self.finished_request_ids.add(request.request_id)
