"""One engine step, nano-vllm style: schedule, run the model, update from its output.

`EngineCore.step()` is the engine's only step loop: `AsyncEngine`'s thread calls it, and so
do the tests that drive a scheduler and a runner. The caller hands it the lock that guards
the scheduler's bookkeeping: `step()` holds it around `schedule()` and around
`update_from_output()` plus the caller's `on_outputs`, never around the model's forward
pass, so admitting and aborting never wait for a step.

The scheduler is the core's own: callers admit, abort and ask through the core
(`stats()`, `num_unfinished_requests`, `max_model_len`), never through `core.scheduler`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

from serving.engine.outputs import (
    EngineCoreOutput,
    ModelRunnerOutput,
    SchedulerOutput,
    SchedulerStats,
)
from serving.engine.request import Request, RequestStatus
from serving.engine.scheduler import Scheduler


class Runner(Protocol):
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput: ...


class RequestStateDropper(Protocol):
    def drop(self, request_ids: Iterable[str]) -> None: ...


class RequestStates:
    """Per-request state held outside the scheduler (the sampler's seeded generators and
    grammars, the runner's pooling sums), dropped together when requests finish."""

    def __init__(self, *holders: RequestStateDropper) -> None:
        self.holders = holders

    def drop(self, request_ids: Iterable[str]) -> None:
        request_ids = list(request_ids)
        for holder in self.holders:
            holder.drop(request_ids)


def _ignore(outputs: list[EngineCoreOutput]) -> None:
    del outputs


class EngineCore:
    def __init__(self, scheduler: Scheduler, runner: Runner, sampler: RequestStateDropper):
        self._scheduler = scheduler
        self._runner = runner
        self._sampler = sampler

    # -- requests ----------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        self._scheduler.add_request(request)

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        """Unknown or finished ids are ignored; the others' KV blocks are free at once."""
        self._scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    # -- queries -----------------------------------------------------------------------------

    @property
    def max_model_len(self) -> int:
        return self._scheduler.scheduler_config.max_model_len

    @property
    def num_unfinished_requests(self) -> int:
        return self._scheduler.get_num_unfinished_requests()

    def has_unfinished_requests(self) -> bool:
        return self._scheduler.has_unfinished_requests()

    def stats(self) -> SchedulerStats:
        return self._scheduler.stats()

    # -- the step ----------------------------------------------------------------------------

    def step(self, lock: AbstractContextManager[Any] | None = None,
             on_outputs: Callable[[list[EngineCoreOutput]], None] = _ignore,
             ) -> list[EngineCoreOutput]:
        """Schedule, run the model, update; `on_outputs` sees the outputs under `lock`."""
        guard = lock if lock is not None else nullcontext()
        with guard:
            scheduler_output = self._scheduler.schedule()
        runner_output = self._execute(scheduler_output)
        with guard:
            outputs = self._scheduler.update_from_output(scheduler_output, runner_output)
            on_outputs(outputs)
        return outputs

    def _execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        # Per-request state outside the scheduler (generators, grammars, pooling sums)
        # goes with the request.
        self._sampler.drop(scheduler_output.finished_request_ids)
        if scheduler_output.is_empty:
            return ModelRunnerOutput(sampled_token_ids={})
        return self._runner.execute_model(scheduler_output)
