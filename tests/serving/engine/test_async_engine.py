"""AsyncEngine over a real Scheduler and the fake runner: streaming, n>1, aborts, errors,
metrics. No model: these run in milliseconds."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest
from prometheus_client import CollectorRegistry

from serving.engine import SamplingParams
from serving.engine.async_engine import AsyncEngine
from serving.engine.core import EngineCore
from serving.engine.errors import EngineDeadError, PromptTooLongError, QueueFullError
from serving.engine.metrics import EngineMetrics
from tests.serving.engine.factories import (
    EOS_TOKEN_ID,
    DropRecorder,
    FakeModelRunner,
    create_scheduler,
    expected_output,
    make_prompt,
)

MODEL = "fake"


class SlowRunner(FakeModelRunner):
    """The fake runner, but each step takes a little while (like a real forward pass)."""

    step_seconds = 0.005

    def execute_model(self, scheduler_output):
        time.sleep(self.step_seconds)
        return super().execute_model(scheduler_output)


class SteppedRunner(FakeModelRunner):
    """The fake runner, one step per permit the test gives: the test and the engine loop
    take turns, so what happens between two steps is exact."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        super().__init__(num_blocks, block_size)
        self.permits = threading.Semaphore(0)

    def execute_model(self, scheduler_output):
        self.permits.acquire()
        return super().execute_model(scheduler_output)


class BrokenRunner(FakeModelRunner):
    def execute_model(self, scheduler_output):
        raise RuntimeError("CUDA error: device-side assert triggered")


def make_engine(runner_cls=FakeModelRunner, *, start=True, eos_token_ids=(EOS_TOKEN_ID,),
                **scheduler_kwargs):
    scheduler = create_scheduler(**scheduler_kwargs)
    runner = runner_cls.for_scheduler(scheduler)
    metrics = EngineMetrics(CollectorRegistry(), MODEL)
    engine = AsyncEngine(EngineCore(scheduler, runner, DropRecorder()),
                         eos_token_ids=eos_token_ids, metrics=metrics)
    if start:
        engine.start()
    return engine, runner


def sample(engine: AsyncEngine, name: str, labels: dict[str, str] | None = None) -> float:
    value = engine.metrics.registry.get_sample_value(name, {"model_name": MODEL, **(labels or {})})
    return 0.0 if value is None else value


async def collect(engine, prompt, params, request_id):
    tokens: dict[int, list[int]] = {}
    reasons: dict[int, str] = {}
    outputs = []
    async for output in engine.generate(prompt, params, request_id):
        outputs.append(output)
        for delta in output.deltas:
            tokens.setdefault(delta.index, []).extend(delta.new_token_ids)
            if delta.finish_reason is not None:
                reasons[delta.index] = delta.finish_reason
    return tokens, reasons, outputs


@pytest.fixture
def engine():
    engine, _ = make_engine()
    yield engine
    engine.shutdown()


async def test_generate_streams_every_token_then_finishes(engine):
    prompt = make_prompt("a", 40)
    tokens, reasons, outputs = await collect(engine, prompt, SamplingParams(max_tokens=12), "r1")
    assert tokens == {0: expected_output(prompt, 12)}
    assert reasons == {0: "length"}
    assert [o.finished for o in outputs] == [False] * (len(outputs) - 1) + [True]
    assert all(o.num_prompt_tokens == 40 for o in outputs)
    assert sample(engine, "vllm:generation_tokens_total") == 12
    assert sample(engine, "vllm:prompt_tokens_total") == 40
    assert sample(engine, "vllm:request_success_total", {"finished_reason": "length"}) == 1
    assert sample(engine, "vllm:time_to_first_token_seconds_count") == 1
    assert sample(engine, "vllm:inter_token_latency_seconds_count") == 11
    assert sample(engine, "vllm:e2e_request_latency_seconds_count") == 1
    assert sample(engine, "vllm:request_queue_time_seconds_count") == 1
    assert sample(engine, "vllm:num_requests_running") == 0
    assert sample(engine, "vllm:kv_cache_usage_perc") == 0


async def test_concurrent_requests_each_get_their_own_tokens(engine):
    prompts = {f"r{i}": make_prompt(f"c{i}", 5 + 7 * i) for i in range(20)}
    results = await asyncio.gather(*(
        collect(engine, prompt, SamplingParams(max_tokens=3 + i), rid)
        for i, (rid, prompt) in enumerate(prompts.items())
    ))
    for i, ((rid, prompt), (tokens, _, _)) in enumerate(zip(prompts.items(), results, strict=True)):
        assert tokens == {0: expected_output(prompt, 3 + i)}, rid
    assert engine.num_unfinished_requests == 0
    assert engine.stats().kv_cache_usage == 0


async def test_n_choices_share_the_prompt_blocks(engine):
    prompt = make_prompt("shared", 48)  # three full blocks of 16
    tokens, reasons, outputs = await collect(engine, prompt, SamplingParams(n=3, max_tokens=5),
                                             "multi")
    assert sorted(tokens) == [0, 1, 2]
    assert all(tokens[i] == expected_output(prompt, 5) for i in range(3))
    assert reasons == {0: "length", 1: "length", 2: "length"}
    assert outputs[-1].finished
    # Choices 1 and 2 took the prompt's full blocks from the cache (2 blocks each: the last
    # prompt token is always computed).
    assert sample(engine, "vllm:prefix_cache_hits_total") == 2 * 32


async def test_seeded_choices_get_distinct_seeds():
    engine, _ = make_engine(start=False)
    children = engine._make_children([1, 2, 3], SamplingParams(n=3, seed=7), "x")
    assert [c.sampling_params.seed for c in children] == [7, 8, 9]
    assert [c.request_id for c in children] == ["0_x", "1_x", "2_x"]
    assert {c.group_id for c in children} == {"x"}


async def test_leaving_early_aborts_and_frees_blocks():
    engine, _ = make_engine(SlowRunner)
    try:
        generator = engine.generate(make_prompt("p", 30), SamplingParams(max_tokens=200), "early")
        async with contextlib.aclosing(generator) as outputs:
            async for _ in outputs:
                break
        assert engine.num_unfinished_requests == 0
        assert engine.stats().kv_cache_usage == 0
        assert sample(engine, "vllm:request_success_total", {"finished_reason": "abort"}) == 1
    finally:
        engine.shutdown()


async def test_cancelled_consumer_aborts_its_request():
    engine, _ = make_engine(SlowRunner, max_model_len=1024, num_blocks=128)
    first_output = asyncio.Event()

    async def consume():
        async for _ in engine.generate(make_prompt("q", 30), SamplingParams(max_tokens=500), "c"):
            first_output.set()

    try:
        task = asyncio.create_task(consume())
        await asyncio.wait_for(first_output.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert engine.num_unfinished_requests == 0
        assert engine.stats().kv_cache_usage == 0
    finally:
        engine.shutdown()


async def test_full_queue_raises_at_once_and_admits_nothing():
    engine, _ = make_engine(start=False, max_waiting_requests=1)
    first = engine.generate([1, 2, 3], SamplingParams(max_tokens=2), "first")
    first_task = asyncio.create_task(first.__anext__())
    await asyncio.sleep(0)
    with pytest.raises(QueueFullError) as excinfo:
        await anext(engine.generate([4, 5, 6], SamplingParams(max_tokens=2), "second"))
    assert excinfo.value.retry_after_s > 0
    assert engine.num_unfinished_requests == 1
    engine.start()
    output = await asyncio.wait_for(first_task, 5)
    assert output.request_id == "first"
    await first.aclose()
    engine.shutdown()


async def test_too_long_prompt_is_refused_with_counts(engine):
    with pytest.raises(PromptTooLongError, match="maximum context length is 256 tokens"):
        await anext(engine.generate(list(range(250)), SamplingParams(max_tokens=10), "long"))
    assert engine.num_unfinished_requests == 0


async def test_a_failing_n_request_admits_no_choice():
    engine, _ = make_engine(start=False, max_waiting_requests=2)
    with pytest.raises(QueueFullError):
        await anext(engine.generate([1, 2], SamplingParams(n=3, max_tokens=2), "n3"))
    assert engine.num_unfinished_requests == 0
    assert engine.stats().kv_cache_usage == 0


async def test_extra_eos_ids_stop_unless_ignore_eos():
    engine, runner = make_engine(eos_token_ids=(EOS_TOKEN_ID, 7))
    try:
        prompt = make_prompt("eos", 10)
        runner.forced_tokens["stops"] = {12: 7}
        runner.forced_tokens["ignores"] = {12: 7}
        tokens, reasons, _ = await collect(engine, prompt, SamplingParams(max_tokens=8), "stops")
        assert reasons == {0: "stop"} and tokens[0][-1] == 7 and len(tokens[0]) == 3
        tokens, reasons, _ = await collect(
            engine, prompt, SamplingParams(max_tokens=8, ignore_eos=True), "ignores")
        assert reasons == {0: "length"} and len(tokens[0]) == 8
    finally:
        engine.shutdown()


async def test_a_dying_loop_fails_every_stream_and_later_calls():
    engine, _ = make_engine(BrokenRunner)
    try:
        with pytest.raises(EngineDeadError, match="device-side assert"):
            await collect(engine, [1, 2, 3], SamplingParams(max_tokens=4), "doomed")
        assert not engine.is_running
        with pytest.raises(EngineDeadError):
            await anext(engine.generate([1, 2, 3], SamplingParams(), "after"))
    finally:
        engine.shutdown()


async def test_shutdown_ends_in_flight_requests_with_an_error():
    engine, _ = make_engine(SlowRunner, max_model_len=1024, num_blocks=128)
    started = asyncio.Event()

    async def consume():
        async for _ in engine.generate([1, 2, 3], SamplingParams(max_tokens=1000), "long-run"):
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 5)
    await asyncio.to_thread(engine.shutdown)
    with pytest.raises(EngineDeadError, match="shutting down"):
        await asyncio.wait_for(task, 5)
    assert not engine.is_running
    assert not engine._thread.is_alive()  # other tests' engines may still run: check ours


async def test_aborting_one_choice_stops_it_while_its_siblings_go_on():
    """`abort_choice` ends one choice at once: it gets no token after the abort, its KV
    blocks are free (only the sibling's remain), and the sibling still runs to its end."""
    engine, runner = make_engine(SteppedRunner)
    try:
        prompt = make_prompt("siblings", 40)
        params = SamplingParams(n=2, max_tokens=30, ignore_eos=True)
        tokens: dict[int, list[int]] = {0: [], 1: []}
        reasons: dict[int, str] = {}
        async with contextlib.aclosing(engine.generate(prompt, params, "pair")) as outputs:
            runner.permits.release()  # prefill step: both choices' first tokens
            async for output in outputs:
                for delta in output.deltas:
                    tokens[delta.index].extend(delta.new_token_ids)
                    if delta.finish_reason is not None:
                        reasons[delta.index] = delta.finish_reason
                if len(tokens[0]) == 3 and 0 not in reasons:
                    usage_both = engine.stats().kv_cache_usage
                    engine.abort_choice("pair", 0)
                    assert engine.stats().kv_cache_usage < usage_both
                    assert sample(engine, "vllm:request_success_total",
                                  {"finished_reason": "abort"}) == 1
                runner.permits.release()
        assert reasons == {0: "abort", 1: "length"}
        assert tokens[0] == expected_output(prompt, 3)
        assert tokens[1] == expected_output(prompt, 30)
        assert sample(engine, "vllm:generation_tokens_total") == 3 + 30
        assert engine.num_unfinished_requests == 0
        assert engine.stats().kv_cache_usage == 0
    finally:
        runner.permits.release(1000)
        engine.shutdown()


async def test_aborting_the_last_choice_ends_the_stream():
    engine, runner = make_engine(SteppedRunner)
    try:
        outputs = []
        generator = engine.generate(make_prompt("last", 8), SamplingParams(max_tokens=50), "one")
        async with contextlib.aclosing(generator) as stream:
            runner.permits.release()
            async for output in stream:
                outputs.append(output)
                engine.abort_choice("one", 0)
                engine.abort_choice("one", 0)  # finished already: ignored
                engine.abort_choice("one", 5)  # no such choice: ignored
        assert [o.finished for o in outputs] == [False, True]
        assert outputs[-1].deltas[0].finish_reason == "abort"
        assert outputs[-1].deltas[0].new_token_ids == []
        assert outputs[-1].times is not None
        assert engine.num_unfinished_requests == 0
    finally:
        runner.permits.release(1000)
        engine.shutdown()
