"""Canary answer judging: the agreement function, answers read back from JSON and SSE, the
agreement window's verdict, and the bounded replay queue and workers (a fake pool)."""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway.errors import UpstreamError
from gateway.metrics import GatewayMetrics
from gateway.routing import RouteDecision
from gateway.routing.agreement import (
    AgreementWindow,
    answer_from_events,
    answer_from_json,
    compare,
    text_tokens,
    token_agreement,
)
from gateway.routing.quality import (
    AnswerCapture,
    Replayer,
    ReplayJob,
    ReplayQueue,
    is_deterministic,
    replay_body,
)
from gateway.routing.router import Router
from gateway.settings import ModelRouteSettings, QualitySettings, RollbackSettings
from gateway.upstream.pool import UpstreamResult
from tests.gateway.test_rollback import FakeClock

ROUTE = ModelRouteSettings(name="tiny", variants=[
    {"name": "stable", "weight": 90, "replicas": ["http://s:1"]},
    {"name": "canary", "weight": 10, "replicas": ["http://c:1"]},
])


# -- agreement -------------------------------------------------------------------------

def test_text_tokens_are_words_single_symbols_and_whitespace_runs():
    assert text_tokens("Paris,  the capital!") == ["Paris", ",", "  ", "the", " ",
                                                   "capital", "!"]


@pytest.mark.parametrize(("stable", "canary", "expected"), [
    ("the cat sat", "the cat sat", 1.0),
    ("the cat sat", "the dog sat", 2 / 5),        # "the", " " of 5 tokens
    ("the cat sat", "a cat sat", 0.0),
    ("the cat sat", "the cat sat on the mat", 1.0),  # stable's answer is all reproduced
    ("the cat sat", "the cat", 3 / 5),            # stopped early: the rest is missing
    ("", "", 1.0),
    ("", "anything", 0.0),
    ("anything", "", 0.0),
])
def test_token_agreement_is_the_reproduced_share_of_stables_leading_tokens(
        stable, canary, expected):
    assert token_agreement(stable, canary) == pytest.approx(expected)


def test_a_canary_cut_by_the_replay_cap_is_judged_on_the_span_it_reached():
    # cut after "the cat s": its last token may be half a word, so 4 of 5 are compared
    assert token_agreement("the cat sat on the mat", "the cat s", is_cut=True) == 1.0
    assert token_agreement("the cat sat on the mat", "the dog s", is_cut=True) == 2 / 4
    assert token_agreement("the cat sat", "t", is_cut=True) is None  # nothing to judge


def test_answers_read_back_from_json_and_from_a_stream_agree():
    message = {"role": "assistant", "content": "Hi",
               "tool_calls": [{"id": "1", "type": "function",
                               "function": {"name": "f", "arguments": '{"a": 1}'}}]}
    unary = answer_from_json({"choices": [{"index": 0, "message": message,
                                           "finish_reason": "tool_calls"}],
                              "usage": {"completion_tokens": 7}})
    events = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": "H"}}]},
              {"choices": [{"index": 0, "delta": {"content": "i"}}]},
              {"choices": [{"index": 0, "delta": {"tool_calls": [
                  {"index": 0, "function": {"name": "f", "arguments": '{"a"'}}]}}]},
              {"choices": [{"index": 0, "delta": {"tool_calls": [
                  {"index": 0, "function": {"arguments": ": 1}"}}]},
                  "finish_reason": "tool_calls"}]},
              {"choices": [], "usage": {"completion_tokens": 7}}]
    stream = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    streamed = answer_from_events(stream + b"data: [DONE]\n\n")
    assert unary == streamed
    assert unary.text == 'Hif({"a": 1})' and unary.completion_tokens == 7
    completion = answer_from_json({"choices": [{"text": "once", "finish_reason": "stop"}]})
    assert completion.text == "once" and completion.completion_tokens is None


def test_a_canary_breaking_the_json_stable_kept_agrees_zero():
    request = {"response_format": {"type": "json_object"}}
    stable = answer_from_json({"choices": [{"message": {"content": '{"a": 1}'}}]})
    broken = answer_from_json({"choices": [{"message": {"content": '{"a": 1'}}]})
    assert compare(stable, broken, request, is_cut=False) == (0.0, True)
    assert compare(stable, stable, request, is_cut=False) == (1.0, False)
    assert compare(stable, broken, {}, is_cut=False)[1] is False  # JSON was not asked for
    tools = {"tools": [{"type": "function", "function": {"name": "f"}}]}
    bad_args = answer_from_json({"choices": [{"message": {"content": "", "tool_calls": [
        {"function": {"name": "f", "arguments": "{oops"}}]}}]})
    assert compare(stable, bad_args, tools, is_cut=False) == (0.0, True)


def test_the_agreement_window_forgets_old_samples():
    window = AgreementWindow(10.0)
    window.add(0.0, 0.0)
    window.add(5.0, 1.0)
    assert window.stats(5.0).mean == 0.5 and window.stats(5.0).num_samples == 2
    assert window.stats(10.5).mean == 1.0  # the first one expired
    assert window.stats(20.0).mean is None


def test_deterministic_means_greedy_or_seeded_and_one_choice():
    assert is_deterministic({"temperature": 0})
    assert is_deterministic({"temperature": 0.8, "seed": 3})
    assert not is_deterministic({})  # the default temperature samples
    assert not is_deterministic({"temperature": 0, "n": 2})


def test_a_replay_body_is_unary_renamed_and_capped():
    body = json.loads(replay_body({"model": "m", "stream": True, "stream_options": {},
                                   "max_tokens": 500, "temperature": 0}, "canary-m", 64))
    assert body == {"model": "canary-m", "max_tokens": 64, "temperature": 0}
    body = json.loads(replay_body({"model": "m", "max_completion_tokens": 8}, "m", 64))
    assert body == {"model": "m", "max_completion_tokens": 8}


# -- the bounded queue and the replayer -------------------------------------------------

def job(text: str = "x") -> ReplayJob:
    return ReplayJob("tiny", "/v1/completions", {"model": "tiny", "prompt": text,
                                                 "temperature": 0}, b"{}", False)


def test_the_replay_queue_drops_rather_than_grows():
    async def run() -> None:
        queue = ReplayQueue(2)
        assert queue.offer(job("a")) and queue.offer(job("b"))
        assert not queue.offer(job("c"))
        assert len(queue) == 2
        assert (await queue.take()).request["prompt"] == "a"

    asyncio.run(run())


class FakePool:
    """Answers every replay with `text` (an error when None), after `delay_s`."""

    def __init__(self, text: str | None, delay_s: float = 0.0) -> None:
        self.text, self.delay_s = text, delay_s
        self.bodies: list[dict] = []
        self.in_flight = self.max_in_flight = 0

    async def fetch(self, model, variant, path, body, headers) -> UpstreamResult:
        self.bodies.append(json.loads(body))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.in_flight -= 1
        if self.text is None:
            raise UpstreamError("no replica")
        answer = {"choices": [{"text": self.text, "finish_reason": "stop"}],
                  "usage": {"completion_tokens": 3}}
        return UpstreamResult(200, {}, json.dumps(answer).encode(), "http://c:1", 1)


def make_replayer(pool: FakePool, **quality) -> tuple[Replayer, Router, GatewayMetrics]:
    settings = QualitySettings(**{"enabled": True, "sample_share": 1.0, "min_samples": 5,
                                  "min_agreement": 0.9, **quality})
    metrics = GatewayMetrics()
    router = Router([ROUTE], RollbackSettings(quality=settings), metrics, clock=FakeClock())
    return (Replayer(settings, [ROUTE], router=router, pool=pool, metrics=metrics),
            router, metrics)


def replays(metrics: GatewayMetrics, outcome: str) -> float:
    return metrics.registry.get_sample_value("quiver_gateway_quality_replays_total", {
        "model": "tiny", "variant": "canary", "outcome": outcome}) or 0.0


async def offer_answers(replayer: Replayer, num: int, text: str) -> None:
    decision = RouteDecision("tiny", "stable", "tiny")
    answer = json.dumps({"choices": [{"text": text, "finish_reason": "stop"}],
                         "usage": {"completion_tokens": 3}}).encode()
    for i in range(num):
        body = {"model": "tiny", "prompt": f"p{i}", "temperature": 0}
        assert replayer.wants(decision, "/v1/completions", body)
        capture = AnswerCapture(_discard)
        await capture({"type": "http.response.start", "status": 200, "headers": []})
        await capture({"type": "http.response.body", "body": answer})
        replayer.offer(decision, "/v1/completions", body, capture)


async def _discard(message) -> None:
    return None


@pytest.mark.parametrize(("canary_text", "rolled_back"), [("the same answer", False),
                                                          ("a different answer", True)])
def test_replays_roll_a_disagreeing_canary_back_for_quality(canary_text, rolled_back):
    async def run() -> None:
        pool = FakePool(canary_text)
        replayer, router, metrics = make_replayer(pool)
        await offer_answers(replayer, 6, "the same answer")
        await replayer.queue.join()
        await replayer.close()
        variant = router.snapshot()["tiny"]["variants"]["canary"]
        assert variant["rolled_back"] is rolled_back
        assert variant["rollback_reason"] == ("quality" if rolled_back else None)
        assert pool.bodies[0]["max_tokens"] == 3  # no more than stable generated
        assert metrics.registry.get_sample_value("quiver_gateway_rollbacks_total", {
            "model": "tiny", "variant": "canary", "reason": "quality"}) == float(rolled_back)
        agreement = metrics.registry.get_sample_value(
            "quiver_gateway_canary_agreement_ratio", {"model": "tiny", "variant": "canary"})
        assert agreement == (0.0 if rolled_back else 1.0)
        # a rolled-back canary has weight 0: nothing more is sampled for it
        assert replayer.wants(RouteDecision("tiny", "stable", "tiny"), "/v1/completions",
                              {"temperature": 0}) is not rolled_back

    asyncio.run(run())


def test_replays_are_bounded_in_flight_and_in_the_queue_and_failures_count_as_errors():
    async def run() -> None:
        pool = FakePool(None, delay_s=0.05)
        replayer, router, metrics = make_replayer(pool, max_concurrency=2, max_queue=3)
        await offer_answers(replayer, 10, "stable")
        await replayer.queue.join()
        await replayer.close()
        assert pool.max_in_flight == 2
        # offered before any worker ran: three queued, the other seven dropped
        assert replays(metrics, "dropped") == 7 and replays(metrics, "error") == 3
        assert router.snapshot()["tiny"]["variants"]["canary"]["quality"]["samples"] == 0

    asyncio.run(run())


def test_only_stables_deterministic_calls_are_sampled():
    replayer, _, _ = make_replayer(FakePool("x"))
    stable, canary = RouteDecision("tiny", "stable", "tiny"), RouteDecision("tiny", "canary",
                                                                            "tiny")
    assert replayer.wants(stable, "/v1/chat/completions", {"temperature": 0})
    assert not replayer.wants(canary, "/v1/chat/completions", {"temperature": 0})
    assert not replayer.wants(stable, "/v1/chat/completions", {"temperature": 1})
    assert not replayer.wants(stable, "/v1/embeddings", {"temperature": 0})
    off, _, _ = make_replayer(FakePool("x"), sample_share=0.0)
    assert not off.wants(stable, "/v1/chat/completions", {"temperature": 0})
