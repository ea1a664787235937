"""Workloads: what one user (closed loop) or one arrival (open loop) sends. No Locust here.

A workload hands out `Job`s (one call each: its tenant, its spec, and for a conversation its
turn) and hears back how each call went. Kinds, with their weights in a mix:
- `stream` (4): streamed chat over the bundled prompts; `chat` (2): the same, not streamed;
  `completion` (2): non-streamed completions;
- `cached` (1): streamed chat at temperature 0 over a few short prompts, so the gateway's
  response cache answers most of them;
- `conversation` (1): multi-turn conversations with long shared system prompts (see
  conversations.py); not in the default mix, run it by name.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from loadtests.calls import CallOutcome, CallSpec, chat_spec, completion_spec
from loadtests.conversations import (
    Conversation,
    ConversationMaker,
    ConversationPool,
    ConversationSettings,
    Turn,
)
from loadtests.prompts import Prompt, PromptSet
from loadtests.tenants import Tenant, pick_tenant

KIND_WEIGHTS = {"stream": 4, "chat": 2, "completion": 2, "cached": 1, "conversation": 1}
MIX = ("stream", "chat", "completion", "cached")
CONVERSATION = "conversation"


@dataclass(frozen=True)
class Job:
    kind: str
    tenant: Tenant
    spec: CallSpec
    turn: Turn | None = None

    @property
    def turn_number(self) -> int | None:
        return None if self.turn is None else self.turn.number

    @property
    def num_reusable_tokens(self) -> int | None:
        return None if self.turn is None else self.turn.num_reusable_tokens


class Workload(Protocol):
    def next_job(self, rng: random.Random) -> Job: ...

    def finish(self, job: Job, outcome: CallOutcome) -> None: ...


@dataclass(frozen=True)
class WorkloadContext:
    """What every workload of one Locust process shares."""

    model: str
    prompts: PromptSet
    tenants: list[Tenant]
    max_tokens_cap: int | None
    num_cached_prompts: int
    conversation: ConversationSettings
    num_open_conversations: int   # open loop: idle conversations kept per tenant


def context_tokens(outcome: CallOutcome) -> int | None:
    """The tokens a turn leaves in the history: its prompt and its reply, per usage."""
    usage = outcome.usage
    return None if usage is None else usage.prompt_tokens + usage.completion_tokens


class SingleCalls:
    """One independent call per job, over a prompt set, each to a tenant drawn by weight."""

    def __init__(self, kind: str, tenants: list[Tenant], prompts: PromptSet,
                 make_spec: Callable[[Prompt], CallSpec]):
        self.kind, self.tenants, self.prompts, self.make_spec = kind, tenants, prompts, make_spec

    def next_job(self, rng: random.Random) -> Job:
        tenant = pick_tenant(self.tenants, rng)
        return Job(self.kind, tenant, self.make_spec(self.prompts.pick(rng)))

    def finish(self, job: Job, outcome: CallOutcome) -> None:
        pass


class ConversationSeries:
    """Closed loop: one conversation at a time, turn after turn, then a new one (its tenant
    drawn by weight); a failed turn abandons the conversation."""

    def __init__(self, tenants: list[Tenant], maker: ConversationMaker):
        self.tenants, self.maker = tenants, maker
        self.current: Conversation | None = None

    def next_job(self, rng: random.Random) -> Job:
        if self.current is None or self.current.is_finished:
            self.current = self.maker.start(pick_tenant(self.tenants, rng), rng)
        turn = self.maker.turn(self.current, rng)
        return Job(CONVERSATION, self.current.tenant, turn.spec, turn)

    def finish(self, job: Job, outcome: CallOutcome) -> None:
        assert job.turn is not None
        if outcome.is_ok:
            job.turn.conversation.answered(job.turn.user_text, outcome.text,
                                           context_tokens(outcome))
        elif self.current is job.turn.conversation:
            self.current = None


class OpenConversations:
    """Open loop: each arrival is the next turn of one of its tenant's idle conversations,
    or a new conversation's first turn (see `ConversationPool`)."""

    def __init__(self, tenants: list[Tenant], pool: ConversationPool):
        self.tenants, self.pool = tenants, pool

    def next_job(self, rng: random.Random) -> Job:
        turn = self.pool.take(pick_tenant(self.tenants, rng), rng)
        return Job(CONVERSATION, turn.conversation.tenant, turn.spec, turn)

    def finish(self, job: Job, outcome: CallOutcome) -> None:
        assert job.turn is not None
        self.pool.finish(job.turn, outcome.text if outcome.is_ok else None,
                         context_tokens(outcome))


def single_calls(kind: str, context: WorkloadContext) -> SingleCalls:
    model, tenants = context.model, context.tenants
    makers: dict[str, Callable[[Prompt], CallSpec]] = {
        "stream": lambda p: chat_spec(model, p.text, p.max_tokens, stream=True, tag="stream"),
        "chat": lambda p: chat_spec(model, p.text, p.max_tokens, stream=False),
        "completion": lambda p: completion_spec(model, p.text, p.max_tokens),
        "cached": lambda p: chat_spec(model, p.text, p.max_tokens, stream=True, tag="cached",
                                      temperature=0.0),
    }
    prompts = context.prompts
    if kind == "cached":
        prompts = prompts.shortest(context.num_cached_prompts)
    return SingleCalls(kind, tenants, prompts, makers[kind])


def make_workload(kind: str, context: WorkloadContext, *, is_open_loop: bool) -> Workload:
    if kind not in KIND_WEIGHTS:
        raise ValueError(f"unknown workload {kind!r}: choose from {', '.join(KIND_WEIGHTS)}")
    if kind != CONVERSATION:
        return single_calls(kind, context)
    maker = ConversationMaker(context.prompts, context.model, context.conversation,
                              context.max_tokens_cap)
    if is_open_loop:
        return OpenConversations(context.tenants,
                                 ConversationPool(maker, context.num_open_conversations))
    return ConversationSeries(context.tenants, maker)
