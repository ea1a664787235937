"""Locust users and the load-shape wrapper. Importing this imports Locust (gevent patching).

Closed-loop users, each one workload (see workloads.py), weighted into a mix when run
together (Locust's default): `StreamingChatUser` (weight 4), `ChatUser` (2), `CompletionUser`
(2), `CachedPromptUser` (1) and `ConversationUser` (1, multi-turn conversations with long
shared system prompts). Each waits for its answer, then 0.1-1 s, then sends again.

`OpenLoopUser` is the open loop: one instance sends Poisson arrivals at `QUIVER_RATE`
requests/s whatever is in flight (up to `QUIVER_MAX_IN_FLIGHT`), split over the tenants by
weight, each arrival one job of the workloads in `QUIVER_WORKLOAD` (comma list, default the
mix), drawn by weight. Every arrival is
a Locust `ARRIVAL` entry whose time is how late it was sent (the generator's own lag); an
arrival that finds the in-flight cap reached is a failed `ARRIVAL` and sends nothing.

Environment: `QUIVER_API_KEY` (one tenant) or `QUIVER_API_KEYS` (`[NAME=]KEY[:WEIGHT],...`: calls
and conversations go to tenants drawn by weight), `QUIVER_MODEL` (default: the first of
`/v1/models`), `QUIVER_PROMPTS` (a prompts.jsonl), `QUIVER_MAX_TOKENS` (caps each prompt's
max_tokens), `QUIVER_REQUEST_TIMEOUT_S` (default 120), `QUIVER_CACHED_PROMPTS` (default 8),
`QUIVER_CALL_LOG` (a file to append one JSON line per call to: tenant, turn, TTFT, usage),
`QUIVER_SEED` (the open loop: each tenant's arrival times repeat, and its workloads and
prompts as far as they do not depend on the answers),
`QUIVER_CONVERSATION_TURNS` (4), `QUIVER_SYSTEM_PROMPTS` (4), `QUIVER_SYSTEM_PROMPT_WORDS`
(400), `QUIVER_OPEN_CONVERSATIONS` (idle conversations kept per tenant in the open loop, 8).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import gevent
from gevent.pool import Pool
from locust import LoadTestShape, User, between, constant, task

from loadtests.arrivals import (
    ARRIVAL,
    ARRIVAL_NAME,
    DEFAULT_MAX_IN_FLIGHT,
    MergedArrivals,
    stream_rng,
)
from loadtests.calllog import CALL_LOG_ENV, CallLog, CallRecord
from loadtests.calls import POST, OpenAICaller, Sample, new_session
from loadtests.conversations import ConversationSettings
from loadtests.prompts import DEFAULT_PROMPTS, PromptSet, load_prompts
from loadtests.shapes import ShapeParams, Tick, shape_tick
from loadtests.tenants import Tenant, rate_shares, tenants_from_env
from loadtests.workloads import KIND_WEIGHTS, MIX, Job, Workload, WorkloadContext, make_workload

logger = logging.getLogger(__name__)

DEFAULT_SHAPE_USERS = 10
DEFAULT_SHAPE_SPAWN_RATE = 2.0
DEFAULT_SHAPE_DURATION_S = 600.0


def env_number(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


@dataclass(frozen=True)
class ScenarioSettings:
    tenants: tuple[Tenant, ...]
    model: str | None
    prompts_path: Path
    max_tokens_cap: int | None
    timeout_s: float
    num_cached_prompts: int
    call_log_path: Path | None
    conversation: ConversationSettings
    num_open_conversations: int
    rate: float | None                 # open loop: arrivals/s
    max_in_flight: int
    workload_kinds: tuple[str, ...]    # open loop: what an arrival sends
    seed: int | None                   # open loop: each tenant's arrivals and choices repeat

    @classmethod
    def from_env(cls) -> ScenarioSettings:
        cap, rate = os.environ.get("QUIVER_MAX_TOKENS"), os.environ.get("QUIVER_RATE")
        kinds = [k.strip() for k in os.environ.get("QUIVER_WORKLOAD", "").split(",") if k.strip()]
        return cls(tenants=tuple(tenants_from_env(os.environ.get("QUIVER_API_KEY") or None)),
                   model=os.environ.get("QUIVER_MODEL") or None,
                   prompts_path=Path(os.environ.get("QUIVER_PROMPTS") or DEFAULT_PROMPTS),
                   max_tokens_cap=int(cap) if cap else None,
                   timeout_s=env_number("QUIVER_REQUEST_TIMEOUT_S", 120),
                   num_cached_prompts=int(env_number("QUIVER_CACHED_PROMPTS", 8)),
                   call_log_path=Path(os.environ[CALL_LOG_ENV])
                   if os.environ.get(CALL_LOG_ENV) else None,
                   conversation=conversation_settings(),
                   num_open_conversations=int(env_number("QUIVER_OPEN_CONVERSATIONS", 8)),
                   rate=float(rate) if rate else None,
                   max_in_flight=int(env_number("QUIVER_MAX_IN_FLIGHT", DEFAULT_MAX_IN_FLIGHT)),
                   workload_kinds=tuple(kinds) or MIX,
                   seed=int(seed) if (seed := os.environ.get("QUIVER_SEED")) else None)


def conversation_settings() -> ConversationSettings:
    defaults = ConversationSettings()
    return ConversationSettings(
        num_turns=int(env_number("QUIVER_CONVERSATION_TURNS", defaults.num_turns)),
        num_system_prompts=int(env_number("QUIVER_SYSTEM_PROMPTS",
                                          defaults.num_system_prompts)),
        system_prompt_words=int(env_number("QUIVER_SYSTEM_PROMPT_WORDS",
                                           defaults.system_prompt_words)))


@functools.cache
def scenario_settings() -> ScenarioSettings:
    return ScenarioSettings.from_env()


@functools.cache
def prompt_set(path: Path, max_tokens_cap: int | None) -> PromptSet:
    return load_prompts(path, max_tokens_cap)


@functools.cache
def call_log(path: Path | None) -> CallLog:
    """One writer per Locust process, shared by its users."""
    return CallLog(path)


class OpenAIUser(User):
    """Base: one `requests` session per user, a caller per tenant; each job's samples become
    Locust events and its record a line of the call log."""

    abstract = True
    wait_time = between(0.1, 1.0)
    pool_size = 10

    def on_start(self) -> None:
        settings = self.settings = scenario_settings()
        self.session = new_session(self.pool_size)
        self.callers = {t.name: OpenAICaller(self.session, self.host or "", t.api_key,
                                             settings.timeout_s) for t in settings.tenants}
        self.rng = random.Random()
        model = settings.model or self.callers[settings.tenants[0].name].first_model()
        self.context = WorkloadContext(
            model=model, prompts=prompt_set(settings.prompts_path, settings.max_tokens_cap),
            tenants=list(settings.tenants), max_tokens_cap=settings.max_tokens_cap,
            num_cached_prompts=settings.num_cached_prompts,
            conversation=settings.conversation,
            num_open_conversations=settings.num_open_conversations)
        self.call_log = call_log(settings.call_log_path)

    def on_stop(self) -> None:
        self.session.close()

    def run_job(self, workload: Workload, job: Job) -> None:
        started_at = time.time()
        outcome = self.callers[job.tenant.name].exchange(job.spec)
        for sample in outcome.samples:
            self.record(sample)
        workload.finish(job, outcome)
        self.call_log.write(CallRecord.of(outcome, started_at=started_at, tenant=job.tenant.name,
                                          kind=job.kind, turn=job.turn_number,
                                          reusable_tokens=job.num_reusable_tokens))

    def record(self, sample: Sample) -> None:
        self.environment.events.request.fire(
            request_type=sample.request_type, name=sample.name,
            response_time=sample.response_time_ms, response_length=sample.response_length,
            exception=sample.error, context={})


class ClosedLoopUser(OpenAIUser):
    """Sends one job of its workload, waits for the answer and `wait_time`, again."""

    abstract = True
    kind = ""

    def on_start(self) -> None:
        super().on_start()
        self.workload = make_workload(self.kind, self.context, is_open_loop=False)

    @task
    def send(self) -> None:
        self.run_job(self.workload, self.workload.next_job(self.rng))


class StreamingChatUser(ClosedLoopUser):
    kind, weight = "stream", KIND_WEIGHTS["stream"]


class ChatUser(ClosedLoopUser):
    kind, weight = "chat", KIND_WEIGHTS["chat"]


class CompletionUser(ClosedLoopUser):
    kind, weight = "completion", KIND_WEIGHTS["completion"]


class CachedPromptUser(ClosedLoopUser):
    kind, weight = "cached", KIND_WEIGHTS["cached"]


class ConversationUser(ClosedLoopUser):
    kind, weight = "conversation", KIND_WEIGHTS["conversation"]


USER_CLASSES: dict[str, type[ClosedLoopUser]] = {
    cls.kind: cls for cls in (StreamingChatUser, ChatUser, CompletionUser, CachedPromptUser,
                              ConversationUser)
}


class OpenLoopUser(OpenAIUser):
    """The open-loop generator (one instance; see the module docstring): per tenant, its own
    Poisson arrivals, random stream and workloads (conversation pools included)."""

    fixed_count = 1
    wait_time = constant(0)

    def on_start(self) -> None:
        settings = scenario_settings()
        self.pool_size = settings.max_in_flight
        super().on_start()
        if settings.rate is None:
            raise ValueError("OpenLoopUser needs QUIVER_RATE (arrivals per second)")
        tenants = list(settings.tenants)
        self.kinds = list(settings.workload_kinds)
        self.weights = [KIND_WEIGHTS[kind] for kind in self.kinds]
        # what each arrival sends; the arrival times draw from streams of their own
        self.rngs = {t.name: stream_rng(settings.seed, t.name) for t in tenants}
        self.workloads = {t.name: self.tenant_workloads(t) for t in tenants}
        self.in_flight = Pool(settings.max_in_flight)
        self.arrivals = MergedArrivals(rate_shares(tenants, settings.rate), settings.seed,
                                       time.perf_counter())

    def tenant_workloads(self, tenant: Tenant) -> dict[str, Workload]:
        context = dataclasses.replace(self.context, tenants=[tenant])
        return {kind: make_workload(kind, context, is_open_loop=True) for kind in self.kinds}

    def on_stop(self) -> None:
        self.in_flight.kill(block=True, timeout=5)
        super().on_stop()

    @task
    def arrive(self) -> None:
        tenant, due = self.arrivals.advance()
        if (delay := due - time.perf_counter()) > 0:
            gevent.sleep(delay)
        lateness_ms = max(0.0, time.perf_counter() - due) * 1000
        if self.in_flight.full():
            self.record(Sample(ARRIVAL, ARRIVAL_NAME, lateness_ms,
                               error=f"dropped: {self.in_flight.size} calls in flight "
                                     f"(QUIVER_MAX_IN_FLIGHT)"))
            return
        self.record(Sample(ARRIVAL, ARRIVAL_NAME, lateness_ms))
        rng = self.rngs[tenant]
        workload = self.workloads[tenant][rng.choices(self.kinds, self.weights)[0]]
        self.in_flight.spawn(self.run_guarded, workload, workload.next_job(rng))

    def run_guarded(self, workload: Workload, job: Job) -> None:
        """`run_job` in its own greenlet: a bug is a failed call, not a silent loss."""
        try:
            self.run_job(workload, job)
        except Exception as exc:
            logger.exception("open-loop call failed in the load test itself")
            self.record(Sample(POST, job.spec.name, 0.0, error=f"load test error: {exc!r}"))


class QuiverShape(LoadTestShape):
    """A shape from `shapes.py`; peak users, spawn rate and duration come from Locust's own
    `--users`, `--spawn-rate`, `--run-time` (else QUIVER_SHAPE_USERS / _SPAWN_RATE /
    _DURATION_S, else 10 users, 2/s, 600 s)."""

    abstract = True
    use_common_options = True
    shape_name = ""

    def shape_params(self) -> ShapeParams:
        options = getattr(getattr(self.runner, "environment", None), "parsed_options", None)

        def pick(option: str, env: str, default: float) -> float:
            value = getattr(options, option, None)
            return float(value or os.environ.get(env) or default)

        return ShapeParams(
            users=int(pick("num_users", "QUIVER_SHAPE_USERS", DEFAULT_SHAPE_USERS)),
            spawn_rate=pick("spawn_rate", "QUIVER_SHAPE_SPAWN_RATE", DEFAULT_SHAPE_SPAWN_RATE),
            duration_s=pick("run_time", "QUIVER_SHAPE_DURATION_S", DEFAULT_SHAPE_DURATION_S))

    def tick(self) -> Tick:
        return shape_tick(self.shape_name, self.shape_params(), self.get_run_time())


def concrete_shape(name: str) -> type[QuiverShape]:
    """A runnable (non-abstract) shape class for `name`, for a locustfile to bind."""
    shape_tick(name, ShapeParams(1, 1.0, 1.0), 0.0)  # raises on an unknown name

    class LoadShape(QuiverShape):
        shape_name = name

    LoadShape.__name__ = LoadShape.__qualname__ = f"{name.title()}Shape"
    return LoadShape
