"""Hand-offs between the scheduler, the model runner and the engine front end.

Kept apart from `scheduler.py` so the model runner can import them without importing the
layer above it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from serving.engine.request import FinishReason
from serving.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's work in a step: compute `token_ids_to_compute` at positions
    `start_position`, `start_position + 1`, ..., writing KV through `block_table`.
    When `is_last_chunk`, every known token is computed and the runner samples one token.
    `prompt_token_ids` and `output_token_ids` are read-only views of the request's tokens
    (not copies) for the sampler's penalties; they are valid for this step only.
    """

    request_id: str
    token_ids_to_compute: list[int]
    start_position: int
    block_table: list[int]
    is_last_chunk: bool
    sampling_params: SamplingParams
    prompt_token_ids: Sequence[int] = ()
    output_token_ids: Sequence[int] = ()

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids_to_compute)


@dataclass(frozen=True)
class SchedulerOutput:
    """What one engine step runs, plus requests the runner may drop state for."""

    scheduled_requests: list[ScheduledRequest]
    num_batched_tokens: int
    preempted_request_ids: list[str] = field(default_factory=list)
    # Finished (including aborted) since the previous step.
    finished_request_ids: set[str] = field(default_factory=set)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled_requests


@dataclass(frozen=True)
class Logprobs:
    """Log-probabilities of one sampled token and of the top alternatives."""

    sampled_logprob: float
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


@dataclass(frozen=True)
class ModelRunnerOutput:
    """Sampled tokens of the requests whose step had `is_last_chunk`."""

    sampled_token_ids: dict[str, int]
    logprobs: dict[str, Logprobs] | None = None
    # Embedding requests whose prompt is complete: their pooled, normalised vector.
    pooled: dict[str, list[float]] | None = None


@dataclass(frozen=True)
class EngineCoreOutput:
    """New tokens (and the finish reason, once finished) of one request after a step.

    `logprobs`, when requested, has one entry per new token. A stop or EOS token that
    ended the request is included in `new_token_ids`; the detokenizer decides whether
    to show it.
    """

    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    logprobs: list[Logprobs] | None = None
    num_cached_tokens: int = 0
    embedding: list[float] | None = None

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class SchedulerStats:
    """Gauges and cumulative counters, in vLLM's metric semantics."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int


@dataclass(frozen=True)
class CompletionDelta:
    """New tokens of one choice (`index` < n) since the previous `RequestOutput`."""

    index: int
    new_token_ids: list[int]
    logprobs: list[Logprobs] | None = None
    finish_reason: FinishReason | None = None
    embedding: list[float] | None = None  # an embedding request's result, when finished


@dataclass(frozen=True)
class RequestTimes:
    """Wall-clock (`time.time()`) milestones of a request: queue, prefill and decode are
    the spans between them. `None` where the request never got that far."""

    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finished_time: float


@dataclass(frozen=True)
class RequestOutput:
    """What `AsyncEngine.generate` yields: the choices that moved in one engine step.

    `finished` is True on the last output, once every choice has finished; that output
    also carries the request's `times` (engines that cannot tell leave them None).
    """

    request_id: str
    deltas: list[CompletionDelta]
    num_prompt_tokens: int
    num_cached_tokens: int
    finished: bool
    times: RequestTimes | None = None
