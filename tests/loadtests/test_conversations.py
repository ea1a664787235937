"""Multi-turn conversations: long shared system prompts; each turn resends the whole history
plus one new user message, streamed with usage; a failed turn ends the conversation; the open
loop keeps a pool of idle conversations per tenant."""

from __future__ import annotations

import random

import pytest

from loadtests.calls import POST, CallOutcome, Sample
from loadtests.conversations import (
    ConversationMaker,
    ConversationPool,
    ConversationSettings,
    system_prompts,
    user_messages,
)
from loadtests.prompts import load_prompts
from loadtests.sse import Usage
from loadtests.tenants import Tenant
from loadtests.workloads import WorkloadContext, make_workload

PROMPTS = load_prompts()
QUIET, NOISY = Tenant("quiet", "qk-q", 1.0), Tenant("noisy", "qk-n", 3.0)


def answer(text: str, prompt_tokens: int = 100, completion_tokens: int = 20) -> CallOutcome:
    return CallOutcome([Sample(POST, "x", 5.0)], text, Usage(prompt_tokens, completion_tokens, 0))


FAILED = CallOutcome([Sample(POST, "x", 5.0, error="HTTP 500: boom")])


def context(num_turns: int = 3, num_open: int = 2) -> WorkloadContext:
    return WorkloadContext(model="m", prompts=PROMPTS, tenants=[QUIET, NOISY],
                           max_tokens_cap=None, num_cached_prompts=8,
                           conversation=ConversationSettings(num_turns=num_turns),
                           num_open_conversations=num_open)


def test_system_prompts_are_long_distinct_and_the_same_every_run():
    prompts = system_prompts(PROMPTS, 4, 400)
    assert len(set(prompts)) == 4
    assert all(len(p.split()) == 400 for p in prompts)
    assert prompts == system_prompts(load_prompts(), 4, 400)
    assert all(len(m.text.split()) <= 40 for m in user_messages(PROMPTS))


def test_each_turn_resends_the_history_and_a_new_message():
    workload = make_workload("conversation", context(num_turns=3), is_open_loop=False)
    rng = random.Random(1)
    jobs = []
    for number in range(3):
        job = workload.next_job(rng)
        jobs.append(job)
        workload.finish(job, answer(f"reply {number}", prompt_tokens=100 * (number + 1)))
    assert [job.turn_number for job in jobs] == [1, 2, 3]
    assert len({job.turn.conversation.conversation_id for job in jobs}) == 1
    last = jobs[-1].spec.body
    roles = [m["role"] for m in last["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user"]
    assert [m["content"] for m in last["messages"] if m["role"] == "assistant"] == [
        "reply 0", "reply 1"]
    first = jobs[0].spec.body["messages"]
    assert last["messages"][:2] == first   # the history is resent as it was
    assert last["stream"] and last["stream_options"] == {"include_usage": True}
    assert jobs[-1].spec.name == "/v1/chat/completions [conversation]"
    assert [job.num_reusable_tokens for job in jobs] == [None, 120, 220]
    assert workload.next_job(rng).turn_number == 1   # finished: a new conversation


def test_a_failed_turn_abandons_the_conversation():
    workload = make_workload("conversation", context(num_turns=4), is_open_loop=False)
    rng = random.Random(2)
    first = workload.next_job(rng)
    workload.finish(first, answer("ok"))
    second = workload.next_job(rng)
    workload.finish(second, FAILED)
    third = workload.next_job(rng)
    assert third.turn_number == 1
    assert third.turn.conversation is not first.turn.conversation


def test_replies_are_capped_so_histories_stay_short():
    maker = ConversationMaker(PROMPTS, "m", ConversationSettings(reply_max_tokens=64), 16)
    rng = random.Random(3)
    turn = maker.turn(maker.start(QUIET, rng), rng)
    assert turn.spec.body["max_tokens"] <= 16


def test_the_open_pool_starts_conversations_until_enough_are_idle_then_continues_them():
    maker = ConversationMaker(PROMPTS, "m", ConversationSettings(num_turns=2))
    pool = ConversationPool(maker, num_open=2)
    rng = random.Random(4)
    in_flight = [pool.take(QUIET, rng) for _ in range(3)]   # nothing idle: three new ones
    assert [t.number for t in in_flight] == [1, 1, 1]
    for turn in in_flight[:2]:
        pool.finish(turn, "answer", 150)
    follow_up = pool.take(QUIET, rng)                       # two idle: one continues
    assert follow_up.number == 2 and follow_up.num_reusable_tokens == 150
    assert pool.take(QUIET, rng).number == 1                # one idle left: a new one
    assert pool.take(NOISY, rng).number == 1                # pools are per tenant
    pool.finish(follow_up, "done", 300)                      # its last turn: leaves the pool
    pool.finish(in_flight[2], None, None)                    # failed: dropped
    assert [c.num_answered for c in pool.idle["quiet"]] == [1]


@pytest.mark.parametrize("kind", ["stream", "chat", "completion", "cached"])
def test_single_call_workloads_spread_over_tenants(kind):
    workload = make_workload(kind, context(), is_open_loop=True)
    rng = random.Random(5)
    jobs = [workload.next_job(rng) for _ in range(400)]
    names = [job.tenant.name for job in jobs]
    assert names.count("noisy") > 2 * names.count("quiet") > 0
    assert all(job.turn is None for job in jobs)
