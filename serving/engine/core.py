"""One engine step, nano-vllm style: schedule, run the model, update from its output.

The three verbs are separate so the async front end can hold its lock around the
scheduler's bookkeeping but not around the model's forward pass.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from serving.engine.outputs import EngineCoreOutput, ModelRunnerOutput, SchedulerOutput
from serving.engine.request import Request, RequestStatus
from serving.engine.scheduler import Scheduler


class Runner(Protocol):
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput: ...


class RequestStateDropper(Protocol):
    def drop(self, request_ids: Iterable[str]) -> None: ...


class EngineCore:
    def __init__(self, scheduler: Scheduler, runner: Runner, sampler: RequestStateDropper):
        self.scheduler = scheduler
        self.runner = runner
        self.sampler = sampler

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        scheduler_output = self.scheduler.schedule()
        runner_output = self.execute(scheduler_output)
        return self.scheduler.update_from_output(scheduler_output, runner_output)

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        if scheduler_output.is_empty:
            # Nothing to run, but finished requests' sampler state must still go.
            self.sampler.drop(scheduler_output.finished_request_ids)
            return ModelRunnerOutput(sampled_token_ids={})
        return self.runner.execute_model(scheduler_output)
