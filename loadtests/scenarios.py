"""Locust users and the load-shape wrapper. Importing this imports Locust (gevent patching).

Users, each one kind of traffic, weighted into a mix when run together (Locust's default):
- `StreamingChatUser` (weight 4): streamed chat; records TTFT, ITL and TOKENS/s entries.
- `ChatUser` (2): non-streamed chat.   - `CompletionUser` (2): non-streamed completions.
- `CachedPromptUser` (1): streamed chat at temperature 0 over a few short prompts, so the
  gateway's response cache answers most of them.
Prompts come from the bundled set (`data/prompts.jsonl`): a realistic spread of lengths.

Environment: `QUIVER_API_KEY`, `QUIVER_MODEL` (default: the first of `/v1/models`),
`QUIVER_PROMPTS` (a prompts.jsonl), `QUIVER_MAX_TOKENS` (caps each prompt's max_tokens),
`QUIVER_REQUEST_TIMEOUT_S` (default 120), `QUIVER_CACHED_PROMPTS` (default 8).
"""

from __future__ import annotations

import functools
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

from locust import LoadTestShape, User, between, task

from loadtests.calls import (
    CallSpec,
    OpenAICaller,
    Sample,
    chat_spec,
    completion_spec,
    new_session,
)
from loadtests.prompts import DEFAULT_PROMPTS, PromptSet, load_prompts
from loadtests.shapes import ShapeParams, Tick, shape_tick

logger = logging.getLogger(__name__)

DEFAULT_SHAPE_USERS = 10
DEFAULT_SHAPE_SPAWN_RATE = 2.0
DEFAULT_SHAPE_DURATION_S = 600.0


@dataclass(frozen=True)
class ScenarioSettings:
    api_key: str | None
    model: str | None
    prompts_path: Path
    max_tokens_cap: int | None
    timeout_s: float
    num_cached_prompts: int

    @classmethod
    def from_env(cls) -> ScenarioSettings:
        cap = os.environ.get("QUIVER_MAX_TOKENS")
        return cls(api_key=os.environ.get("QUIVER_API_KEY") or None,
                   model=os.environ.get("QUIVER_MODEL") or None,
                   prompts_path=Path(os.environ.get("QUIVER_PROMPTS") or DEFAULT_PROMPTS),
                   max_tokens_cap=int(cap) if cap else None,
                   timeout_s=float(os.environ.get("QUIVER_REQUEST_TIMEOUT_S") or 120),
                   num_cached_prompts=int(os.environ.get("QUIVER_CACHED_PROMPTS") or 8))


@functools.cache
def scenario_settings() -> ScenarioSettings:
    return ScenarioSettings.from_env()


@functools.cache
def prompt_set(path: Path, max_tokens_cap: int | None) -> PromptSet:
    return load_prompts(path, max_tokens_cap)


class OpenAIUser(User):
    """Base: one `requests` session per user; each call's samples become Locust events."""

    abstract = True
    wait_time = between(0.1, 1.0)

    def on_start(self) -> None:
        self.settings = scenario_settings()
        self.session = new_session()
        self.caller = OpenAICaller(self.session, self.host or "", self.settings.api_key,
                                   self.settings.timeout_s)
        self.prompts = prompt_set(self.settings.prompts_path, self.settings.max_tokens_cap)
        self.rng = random.Random()
        self.model = self.settings.model or self.caller.first_model()

    def on_stop(self) -> None:
        self.session.close()

    def run_call(self, spec: CallSpec) -> None:
        for sample in self.caller.call(spec):
            self.record(sample)

    def record(self, sample: Sample) -> None:
        self.environment.events.request.fire(
            request_type=sample.request_type, name=sample.name,
            response_time=sample.response_time_ms, response_length=sample.response_length,
            exception=sample.error, context={})


class StreamingChatUser(OpenAIUser):
    weight = 4

    @task
    def stream_chat(self) -> None:
        prompt = self.prompts.pick(self.rng)
        self.run_call(chat_spec(self.model, prompt.text, prompt.max_tokens, stream=True,
                                tag="stream"))


class ChatUser(OpenAIUser):
    weight = 2

    @task
    def chat(self) -> None:
        prompt = self.prompts.pick(self.rng)
        self.run_call(chat_spec(self.model, prompt.text, prompt.max_tokens, stream=False))


class CompletionUser(OpenAIUser):
    weight = 2

    @task
    def complete(self) -> None:
        prompt = self.prompts.pick(self.rng)
        self.run_call(completion_spec(self.model, prompt.text, prompt.max_tokens))


class CachedPromptUser(OpenAIUser):
    weight = 1

    def on_start(self) -> None:
        super().on_start()
        self.prompts = self.prompts.shortest(self.settings.num_cached_prompts)

    @task
    def cached_chat(self) -> None:
        prompt = self.prompts.pick(self.rng)
        self.run_call(chat_spec(self.model, prompt.text, prompt.max_tokens, stream=True,
                                tag="cached", temperature=0.0))


USER_CLASSES: dict[str, type[OpenAIUser]] = {
    "stream": StreamingChatUser, "chat": ChatUser, "completion": CompletionUser,
    "cached": CachedPromptUser,
}


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
