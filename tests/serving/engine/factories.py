"""A real Scheduler with no model: factories and a fake runner that simulates the KV cache.

`FakeModelRunner` writes every computed token into its block's slot, like a real runner
writes K and V, and samples the next token as a hash of the sequence it *reads back* from
the block table. A wrong block table, a wrongly shared block or a stale prefix hit
therefore changes the output, and a preempted, recomputed request yields exactly the
tokens of one that never was.
"""

from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from serving.engine import (
    CacheConfig,
    EngineCoreOutput,
    FinishReason,
    Logprobs,
    ModelRunnerOutput,
    Request,
    SamplingParams,
    ScheduledRequest,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)
from serving.engine.core import EngineCore

VOCAB_SIZE = 1000
# Outside the vocabulary the fake runner samples from, so it is only produced on demand.
EOS_TOKEN_ID = VOCAB_SIZE


def create_scheduler(
    *,
    max_num_seqs: int = 16,
    max_num_batched_tokens: int = 64,
    max_model_len: int = 256,
    max_waiting_requests: int = 1024,
    num_blocks: int = 64,
    block_size: int = 16,
    enable_prefix_caching: bool = True,
) -> Scheduler:
    scheduler_config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        max_waiting_requests=max_waiting_requests,
    )
    cache_config = CacheConfig(
        block_size=block_size,
        num_blocks=num_blocks,
        enable_prefix_caching=enable_prefix_caching,
    )
    return Scheduler(scheduler_config, cache_config)


def make_prompt(seed: str, prompt_len: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB_SIZE) for _ in range(prompt_len)]


def create_requests(
    num: int,
    prompt_len: int,
    *,
    max_tokens: int | None = 16,
    prefix: str = "req",
    same_prompt: bool = False,
    group_id: str | None = None,
    **sampling_kwargs: object,
) -> list[Request]:
    """`num` requests `{prefix}-{i}` with distinct random prompts (or one shared prompt)."""
    params = SamplingParams(max_tokens=max_tokens, **sampling_kwargs)
    return [
        Request(
            request_id=f"{prefix}-{i}",
            prompt_token_ids=make_prompt(prefix if same_prompt else f"{prefix}-{i}", prompt_len),
            sampling_params=params,
            eos_token_id=EOS_TOKEN_ID,
            group_id=group_id,
        )
        for i in range(num)
    ]


def next_token_id(token_ids: Sequence[int]) -> int:
    """The fake model: a deterministic function of the whole sequence, never EOS."""
    packed = struct.pack(f"<{len(token_ids)}q", *token_ids)
    digest = hashlib.blake2b(packed, digest_size=8).digest()
    return int.from_bytes(digest, "little") % VOCAB_SIZE


class FakeModelRunner:
    """Simulated paged KV cache plus a hash "model".

    `forced_tokens[request_id][position]` overrides the token sampled at that sequence
    position (e.g. to produce EOS or a stop token on demand).
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.slots: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.forced_tokens: dict[str, dict[int, int]] = {}
        self.num_steps = 0
        self.scheduler_outputs: list[SchedulerOutput] = []

    @classmethod
    def for_scheduler(cls, scheduler: Scheduler) -> FakeModelRunner:
        config = scheduler.cache_config
        return cls(config.num_blocks, config.block_size)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        self.num_steps += 1
        self.scheduler_outputs.append(scheduler_output)
        sampled: dict[str, int] = {}
        logprobs: dict[str, Logprobs] = {}
        for scheduled in scheduler_output.scheduled_requests:
            self._write_kv(scheduled)
            if not scheduled.is_last_chunk:
                continue
            end = scheduled.start_position + scheduled.num_tokens
            token_ids = self._read_kv(scheduled.block_table, end)
            token_id = self.forced_tokens.get(scheduled.request_id, {}).get(end)
            if token_id is None:
                token_id = next_token_id(token_ids)
            sampled[scheduled.request_id] = token_id
            num_top = scheduled.sampling_params.logprobs
            if num_top is not None:
                logprobs[scheduled.request_id] = fake_logprobs(token_id, num_top)
        return ModelRunnerOutput(sampled_token_ids=sampled, logprobs=logprobs or None)

    def _write_kv(self, scheduled: ScheduledRequest) -> None:
        for offset, token_id in enumerate(scheduled.token_ids_to_compute):
            position = scheduled.start_position + offset
            block_index, slot = divmod(position, self.block_size)
            assert block_index < len(scheduled.block_table), "block table too short"
            self.slots[scheduled.block_table[block_index]][slot] = token_id

    def _read_kv(self, block_table: list[int], num_tokens: int) -> list[int]:
        token_ids = []
        for position in range(num_tokens):
            block_index, slot = divmod(position, self.block_size)
            token_id = self.slots[block_table[block_index]][slot]
            assert token_id is not None, f"position {position} read before it was written"
            token_ids.append(token_id)
        return token_ids


def fake_logprobs(token_id: int, num_top: int) -> Logprobs:
    top = [((token_id + rank) % VOCAB_SIZE, -0.5 - rank) for rank in range(num_top)]
    return Logprobs(sampled_logprob=-0.5, top_logprobs=top)


def expected_output(prompt_token_ids: Sequence[int], num_tokens: int) -> list[int]:
    """What the fake model generates for a prompt with no stop condition."""
    token_ids = list(prompt_token_ids)
    for _ in range(num_tokens):
        token_ids.append(next_token_id(token_ids))
    return token_ids[len(prompt_token_ids) :]


@dataclass
class RunResult:
    output_token_ids: dict[str, list[int]] = field(default_factory=dict)
    finish_reasons: dict[str, FinishReason] = field(default_factory=dict)
    num_cached_tokens: dict[str, int] = field(default_factory=dict)
    scheduler_outputs: list[SchedulerOutput] = field(default_factory=list)


class DropRecorder:
    """Stands in for the sampler: records whose per-request state the core dropped."""

    def __init__(self) -> None:
        self.dropped: set[str] = set()

    def drop(self, request_ids: Iterable[str]) -> None:
        self.dropped.update(request_ids)


def create_core(scheduler: Scheduler, runner: FakeModelRunner) -> EngineCore:
    return EngineCore(scheduler, runner, DropRecorder())


def step(scheduler: Scheduler, runner: FakeModelRunner) -> list[EngineCoreOutput]:
    """One `EngineCore.step()` over this scheduler and runner."""
    return create_core(scheduler, runner).step()


def run_to_completion(
    scheduler: Scheduler, runner: FakeModelRunner, max_steps: int = 10_000
) -> RunResult:
    """`EngineCore.step()` until no request is left, collecting outputs and the steps the
    runner ran; checks the block manager's invariants after every step."""
    core = create_core(scheduler, runner)
    result = RunResult()
    first_step = len(runner.scheduler_outputs)
    for _ in range(max_steps):
        if not core.has_unfinished_requests():
            result.scheduler_outputs = runner.scheduler_outputs[first_step:]
            return result
        for output in core.step():
            record_output(result, output)
        scheduler.block_manager.check_invariants()
    raise AssertionError(f"requests still unfinished after {max_steps} steps")


def record_output(result: RunResult, output: EngineCoreOutput) -> None:
    result.output_token_ids.setdefault(output.request_id, []).extend(output.new_token_ids)
    result.num_cached_tokens[output.request_id] = output.num_cached_tokens
    if output.finish_reason is not None:
        result.finish_reasons[output.request_id] = output.finish_reason
