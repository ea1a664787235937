import pytest

from serving.engine import (
    FinishReason,
    InvalidRequestError,
    PromptTooLongError,
    QueueFullError,
    RequestStatus,
)
from tests.serving.engine.factories import (
    EOS_TOKEN_ID,
    VOCAB_SIZE,
    FakeModelRunner,
    create_requests,
    create_scheduler,
    expected_output,
    run_to_completion,
    step,
)


def add_all(scheduler, requests):
    for request in requests:
        scheduler.add_request(request)


def scheduled_ids(scheduler_output):
    return [s.request_id for s in scheduler_output.scheduled_requests]


def test_empty_step():
    output = create_scheduler().schedule()
    assert output.is_empty
    assert output.num_batched_tokens == 0


def test_admission_is_limited_by_seats():
    scheduler = create_scheduler(max_num_seqs=4, max_num_batched_tokens=1024)
    add_all(scheduler, create_requests(6, prompt_len=10))
    output = scheduler.schedule()
    assert scheduled_ids(output) == ["req-0", "req-1", "req-2", "req-3"]
    assert all(s.is_last_chunk for s in output.scheduled_requests)
    assert output.num_batched_tokens == 40
    stats = scheduler.stats()
    assert (stats.num_running, stats.num_waiting) == (4, 2)
    assert stats.kv_cache_usage == pytest.approx(4 / 64)


def test_admission_is_limited_by_token_budget_and_chunks_the_last_prompt():
    scheduler = create_scheduler(max_num_batched_tokens=64)
    runner = FakeModelRunner.for_scheduler(scheduler)
    requests = create_requests(3, prompt_len=40)
    add_all(scheduler, requests)
    first = scheduler.schedule()
    assert [(s.request_id, s.num_tokens, s.is_last_chunk) for s in first.scheduled_requests] == [
        ("req-0", 40, True),
        ("req-1", 24, False),
    ]
    assert first.num_batched_tokens == 64
    outputs = scheduler.update_from_output(first, runner.execute_model(first))
    assert [o.request_id for o in outputs] == ["req-0"]  # req-1 has not sampled yet
    second = scheduler.schedule()
    assert [(s.request_id, s.start_position, s.num_tokens) for s in second.scheduled_requests] == [
        ("req-0", 40, 1),
        ("req-1", 24, 16),
        ("req-2", 0, 40),
    ]
    assert second.scheduled_requests[1].token_ids_to_compute == requests[1].prompt_token_ids[24:]


def test_chunked_prefill_runs_alongside_decodes():
    scheduler = create_scheduler(max_num_batched_tokens=16)
    runner = FakeModelRunner.for_scheduler(scheduler)
    (short,) = create_requests(1, prompt_len=4, max_tokens=20)
    (long,) = create_requests(1, prompt_len=50, prefix="long")
    scheduler.add_request(short)
    step(scheduler, runner)
    scheduler.add_request(long)
    chunks = []
    for _ in range(4):
        output = scheduler.schedule()
        decode, chunk = output.scheduled_requests
        assert (decode.request_id, decode.num_tokens, decode.is_last_chunk) == ("req-0", 1, True)
        chunks.append((chunk.start_position, chunk.num_tokens, chunk.is_last_chunk))
        assert output.num_batched_tokens <= 16
        scheduler.update_from_output(output, runner.execute_model(output))
    assert chunks == [(0, 15, False), (15, 15, False), (30, 15, False), (45, 5, True)]
    assert long.output_token_ids == expected_output(long.prompt_token_ids, 1)
    assert short.output_token_ids == expected_output(short.prompt_token_ids, 5)


def test_waiting_requests_are_admitted_in_fifo_order():
    scheduler = create_scheduler(max_num_seqs=1)
    add_all(scheduler, create_requests(3, prompt_len=8, max_tokens=2))
    result = run_to_completion(scheduler, FakeModelRunner.for_scheduler(scheduler))
    first_seen = []
    for output in result.scheduler_outputs:
        first_seen += [i for i in scheduled_ids(output) if i not in first_seen]
    assert first_seen == ["req-0", "req-1", "req-2"]


@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_preempted_requests_produce_the_same_tokens(enable_prefix_caching):
    scheduler = create_scheduler(
        num_blocks=16, block_size=4, max_model_len=64, enable_prefix_caching=enable_prefix_caching
    )
    requests = create_requests(6, prompt_len=20, max_tokens=30)
    add_all(scheduler, requests)
    result = run_to_completion(scheduler, FakeModelRunner.for_scheduler(scheduler))
    assert scheduler.stats().num_preemptions > 0
    assert any(request.num_preemptions > 0 for request in requests)
    for request in requests:
        assert result.output_token_ids[request.request_id] == expected_output(
            request.prompt_token_ids, 30
        )
        assert result.finish_reasons[request.request_id] == FinishReason.LENGTH
    assert scheduler.block_manager.num_free_blocks == 16


def test_preemption_takes_the_newest_and_requeues_it_at_the_front():
    scheduler = create_scheduler(
        max_num_seqs=2, max_num_batched_tokens=16, num_blocks=4, block_size=4, max_model_len=16
    )
    runner = FakeModelRunner.for_scheduler(scheduler)
    old, new, queued = create_requests(3, prompt_len=4, max_tokens=8)
    add_all(scheduler, [old, new, queued])
    while not (output := scheduler.schedule()).preempted_request_ids:
        scheduler.update_from_output(output, runner.execute_model(output))
    assert output.preempted_request_ids == ["req-1"]
    assert scheduled_ids(output) == ["req-0"]  # a step that preempts admits nobody
    assert list(scheduler.waiting) == [new, queued]
    assert (new.status, new.num_computed_tokens, new.num_preemptions) == (
        RequestStatus.PREEMPTED,
        0,
        1,
    )
    assert scheduler.block_manager.get_block_table("req-1") == []
    scheduler.update_from_output(output, runner.execute_model(output))
    result = run_to_completion(scheduler, runner)
    assert new.output_token_ids == expected_output(new.prompt_token_ids, 8)
    assert result.finish_reasons == {"req-0": "length", "req-1": "length", "req-2": "length"}


def test_prefix_hit_skips_cached_prompt_tokens():
    scheduler = create_scheduler()
    runner = FakeModelRunner.for_scheduler(scheduler)
    first, second = create_requests(2, prompt_len=40, max_tokens=3, same_prompt=True)
    scheduler.add_request(first)
    run_to_completion(scheduler, runner)
    scheduler.add_request(second)
    output = scheduler.schedule()
    (scheduled,) = output.scheduled_requests
    assert (scheduled.start_position, scheduled.num_tokens) == (32, 8)
    scheduler.update_from_output(output, runner.execute_model(output))
    result = run_to_completion(scheduler, runner)
    assert second.num_cached_tokens == 32
    assert result.num_cached_tokens["req-1"] == 32
    assert second.output_token_ids == first.output_token_ids
    stats = scheduler.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (80, 32)


def test_n_siblings_wait_one_step_then_share_the_prompt_blocks():
    scheduler = create_scheduler()
    runner = FakeModelRunner.for_scheduler(scheduler)
    siblings = create_requests(3, prompt_len=40, max_tokens=4, same_prompt=True, group_id="g")
    (other,) = create_requests(1, prompt_len=8, prefix="other")
    add_all(scheduler, [*siblings, other])
    first = scheduler.schedule()
    assert scheduled_ids(first) == ["req-0", "other-0"]  # siblings skipped, FIFO kept
    assert [r.request_id for r in scheduler.waiting] == ["req-1", "req-2"]
    scheduler.update_from_output(first, runner.execute_model(first))
    second = scheduler.schedule()
    late = [s for s in second.scheduled_requests if s.request_id in ("req-1", "req-2")]
    assert [(s.start_position, s.num_tokens) for s in late] == [(32, 8), (32, 8)]
    shared = scheduler.block_manager.get_block_table("req-0")[:2]
    assert all(s.block_table[:2] == shared for s in late)
    assert [scheduler.block_manager.blocks[i].ref_count for i in shared] == [3, 3]
    scheduler.update_from_output(second, runner.execute_model(second))
    run_to_completion(scheduler, runner)
    assert all(r.output_token_ids == siblings[0].output_token_ids for r in siblings)
    assert [r.num_cached_tokens for r in siblings] == [0, 32, 32]


def test_abort_frees_blocks_at_once_from_waiting_and_running():
    scheduler = create_scheduler(max_num_seqs=1)
    runner = FakeModelRunner.for_scheduler(scheduler)
    running, waiting = create_requests(2, prompt_len=20)
    add_all(scheduler, [running, waiting])
    step(scheduler, runner)
    assert scheduler.block_manager.num_free_blocks == 62
    scheduler.finish_requests(["req-1"], RequestStatus.FINISHED_ABORTED)
    assert not scheduler.waiting
    scheduler.finish_requests(["req-0", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert not scheduler.running
    assert scheduler.block_manager.num_free_blocks == 64
    assert running.status.finish_reason == FinishReason.ABORT
    assert not scheduler.has_unfinished_requests()
    assert scheduler.schedule().finished_request_ids == {"req-0", "req-1"}
    assert scheduler.schedule().finished_request_ids == set()
    scheduler.block_manager.check_invariants()


def test_abort_while_the_step_runs_drops_its_output():
    scheduler = create_scheduler()
    runner = FakeModelRunner.for_scheduler(scheduler)
    add_all(scheduler, create_requests(2, prompt_len=8))
    output = scheduler.schedule()
    scheduler.finish_requests(["req-0"], RequestStatus.FINISHED_ABORTED)
    outputs = scheduler.update_from_output(output, runner.execute_model(output))
    assert [o.request_id for o in outputs] == ["req-1"]
    assert scheduler.get_num_unfinished_requests() == 1
    scheduler.block_manager.check_invariants()


def test_queue_full():
    scheduler = create_scheduler(max_waiting_requests=2)
    first, second, third = create_requests(3, prompt_len=8)
    add_all(scheduler, [first, second])
    with pytest.raises(QueueFullError, match=r"waiting queue is full \(2 requests") as excinfo:
        scheduler.add_request(third)
    assert excinfo.value.retry_after_s > 0
    assert "req-2" not in scheduler.requests
    scheduler.schedule()  # admits both
    scheduler.add_request(third)
    assert scheduler.get_num_unfinished_requests() == 3


@pytest.mark.parametrize(
    ("prompt_len", "max_tokens", "fits"),
    [(60, 4, True), (60, 5, False), (63, None, True), (64, None, False), (70, 1, False)],
)
def test_prompt_too_long(prompt_len, max_tokens, fits):
    scheduler = create_scheduler(max_model_len=64)
    (request,) = create_requests(1, prompt_len=prompt_len, max_tokens=max_tokens)
    if fits:
        scheduler.add_request(request)
        return
    with pytest.raises(PromptTooLongError, match="maximum context length is 64") as excinfo:
        scheduler.add_request(request)
    assert excinfo.value.num_prompt_tokens == prompt_len
    assert not scheduler.has_unfinished_requests()


def test_invalid_requests():
    scheduler = create_scheduler()
    first, second = create_requests(2, prompt_len=8)
    scheduler.add_request(first)
    second.request_id = "req-0"
    with pytest.raises(InvalidRequestError, match="already in use") as excinfo:
        scheduler.add_request(second)
    assert excinfo.value.param == "request_id"
    (empty,) = create_requests(1, prompt_len=0, prefix="empty")
    with pytest.raises(InvalidRequestError) as excinfo:
        scheduler.add_request(empty)
    assert excinfo.value.param == "prompt"


def run_one(forced, max_model_len=256, prompt_len=8, **sampling_kwargs):
    scheduler = create_scheduler(max_model_len=max_model_len)
    runner = FakeModelRunner.for_scheduler(scheduler)
    (request,) = create_requests(1, prompt_len=prompt_len, **sampling_kwargs)
    runner.forced_tokens["req-0"] = {prompt_len + i: token_id for i, token_id in forced.items()}
    scheduler.add_request(request)
    result = run_to_completion(scheduler, runner)
    assert scheduler.block_manager.num_free_blocks == 64
    return result.output_token_ids["req-0"], result.finish_reasons["req-0"]


@pytest.mark.parametrize(
    ("forced", "kwargs", "num_tokens", "reason"),
    [
        ({2: 7}, {"stop_token_ids": (7,)}, 3, "stop"),
        ({1: EOS_TOKEN_ID}, {}, 2, "stop"),
        ({1: EOS_TOKEN_ID}, {"ignore_eos": True}, 5, "length"),
        (
            {0: EOS_TOKEN_ID, 1: 7, 2: EOS_TOKEN_ID},
            {"min_tokens": 3, "stop_token_ids": (7,)},
            3,
            "stop",
        ),
        ({4: 7}, {"stop_token_ids": (7,)}, 5, "stop"),  # stop wins over length
        ({}, {}, 5, "length"),
    ],
)
def test_stop_conditions(forced, kwargs, num_tokens, reason):
    token_ids, finish_reason = run_one(forced, max_tokens=5, **kwargs)
    assert (len(token_ids), finish_reason) == (num_tokens, reason)
    for index, token_id in forced.items():
        if index < num_tokens:
            assert token_ids[index] == token_id


def test_max_model_len_ends_an_unbounded_request():
    token_ids, finish_reason = run_one({}, max_model_len=32, prompt_len=20, max_tokens=None)
    assert (len(token_ids), finish_reason) == (12, "length")


def test_logprobs_are_passed_through():
    scheduler = create_scheduler()
    runner = FakeModelRunner.for_scheduler(scheduler)
    with_logprobs = create_requests(1, prompt_len=8, max_tokens=3, logprobs=2)
    without = create_requests(1, prompt_len=8, max_tokens=3, prefix="plain")
    add_all(scheduler, [*with_logprobs, *without])
    outputs = step(scheduler, runner)
    by_id = {output.request_id: output for output in outputs}
    (logprobs,) = by_id["req-0"].logprobs
    assert logprobs.sampled_logprob == -0.5
    (token_id,) = by_id["req-0"].new_token_ids
    assert logprobs.top_logprobs == [(token_id, -0.5), ((token_id + 1) % VOCAB_SIZE, -1.5)]
    assert by_id["plain-0"].logprobs is None
