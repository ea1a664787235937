"""The native engine: requests, scheduler and paged KV block manager (model-free core)."""

from serving.engine.block_manager import Block, BlockManager, hash_block_tokens
from serving.engine.config import CacheConfig, SchedulerConfig, num_blocks_for_budget
from serving.engine.errors import (
    EngineDeadError,
    EngineError,
    InvalidRequestError,
    PromptTooLongError,
    QueueFullError,
)
from serving.engine.outputs import (
    EngineCoreOutput,
    Logprobs,
    ModelRunnerOutput,
    ScheduledRequest,
    SchedulerOutput,
    SchedulerStats,
)
from serving.engine.request import FinishReason, Request, RequestStatus
from serving.engine.sampling_params import SamplingParams
from serving.engine.scheduler import Scheduler

__all__ = [
    "Block",
    "BlockManager",
    "CacheConfig",
    "EngineCoreOutput",
    "EngineDeadError",
    "EngineError",
    "FinishReason",
    "InvalidRequestError",
    "Logprobs",
    "ModelRunnerOutput",
    "PromptTooLongError",
    "QueueFullError",
    "Request",
    "RequestStatus",
    "SamplingParams",
    "ScheduledRequest",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "SchedulerStats",
    "hash_block_tokens",
    "num_blocks_for_budget",
]
