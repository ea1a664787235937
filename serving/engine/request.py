"""One generation request as the engine tracks it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from serving.engine.sampling_params import SamplingParams

# A block's identity in the prefix cache; see `block_manager.hash_block_tokens`.
BlockHash = bytes


class FinishReason(enum.StrEnum):
    """OpenAI `finish_reason` values."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> FinishReason | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
}


@dataclass(eq=False)
class Request:
    """Prompt, sampling parameters and generation state of one sequence.

    Siblings of an `n > 1` fan-out are separate requests sharing `group_id`.
    `num_cached_tokens` counts the prompt tokens the prefix cache served at first admission.
    `block_hashes` is the hash chain of the request's full blocks; the block manager extends
    it lazily, and it stays valid across preemption because tokens are only ever appended.
    Times are `time.time()` seconds.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None = None
    arrival_time: float = field(default_factory=time.time)
    group_id: str | None = None
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None
    num_preemptions: int = 0
    block_hashes: list[BlockHash] = field(default_factory=list)
    _all_token_ids: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._all_token_ids = [*self.prompt_token_ids, *self.output_token_ids]

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt then output tokens. Read-only: append through `append_output_token_id`."""
        return self._all_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output_token_id(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)
