"""Random arrivals, aborts and steps on a tiny KV cache: nothing leaks, nothing is lost."""

from dataclasses import dataclass

from hypothesis import event as note_event
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.engine import (
    FinishReason,
    QueueFullError,
    Request,
    RequestStatus,
    SamplingParams,
    Scheduler,
)
from tests.serving.engine.factories import (
    EOS_TOKEN_ID,
    FakeModelRunner,
    RunResult,
    create_core,
    create_scheduler,
    make_prompt,
    next_token_id,
    record_output,
)

MAX_MODEL_LEN = 40
MAX_NUM_BATCHED_TOKENS = 16
MAX_NUM_SEQS = 4
NUM_BLOCKS = 10  # x 4 tokens: room for one full-length request, so preemption is common
STOP_TOKEN_IDS = tuple(range(100))  # about one token in ten
PREFIXES = [make_prompt(f"prefix-{i}", 12) for i in range(3)]


@dataclass(frozen=True)
class Arrival:
    prefix_index: int
    suffix_len: int
    max_tokens: int
    min_tokens: int
    n: int
    uses_stop_tokens: bool


arrivals = st.builds(
    Arrival,
    prefix_index=st.integers(0, len(PREFIXES) - 1),
    suffix_len=st.integers(0, 14),
    max_tokens=st.integers(1, 12),
    min_tokens=st.integers(0, 3),
    n=st.integers(1, 3),
    uses_stop_tokens=st.booleans(),
)
events = st.lists(
    st.one_of(arrivals, st.tuples(st.just("abort"), st.integers(0, 30)), st.just("step")),
    max_size=60,
)


def expected_generation(request: Request) -> tuple[list[int], FinishReason]:
    """What the fake model must produce for a request, stop conditions included."""
    params = request.sampling_params
    token_ids = list(request.prompt_token_ids)
    output: list[int] = []
    while True:
        output.append(next_token_id(token_ids + output))
        if len(output) >= params.min_tokens and output[-1] in params.stop_token_ids:
            return output, FinishReason.STOP
        if len(output) == params.max_tokens or len(token_ids) + len(output) == MAX_MODEL_LEN:
            return output, FinishReason.LENGTH


def make_group(arrival: Arrival, group_index: int) -> list[Request]:
    suffix = make_prompt(f"suffix-{group_index}", arrival.suffix_len)
    prompt = PREFIXES[arrival.prefix_index] + suffix
    params = SamplingParams(
        max_tokens=arrival.max_tokens,
        min_tokens=min(arrival.min_tokens, arrival.max_tokens),
        stop_token_ids=STOP_TOKEN_IDS if arrival.uses_stop_tokens else (),
    )
    group_id = f"g{group_index}" if arrival.n > 1 else None
    return [
        Request(f"r{group_index}.{i}", list(prompt), params, EOS_TOKEN_ID, group_id=group_id)
        for i in range(arrival.n)
    ]


def check_scheduler(scheduler: Scheduler) -> None:
    scheduler.block_manager.check_invariants()
    queued = [*scheduler.running, *scheduler.waiting]
    assert {r.request_id for r in queued} == scheduler.requests.keys()
    assert len(queued) == len(scheduler.requests)
    assert len(scheduler.running) <= MAX_NUM_SEQS
    assert all(r.status == RequestStatus.RUNNING for r in scheduler.running)
    assert all(
        r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED) for r in scheduler.waiting
    )
    assert all(
        scheduler.block_manager.get_block_table(r.request_id) == [] for r in scheduler.waiting
    )


class Driver:
    def __init__(self) -> None:
        self.scheduler = create_scheduler(
            max_num_seqs=MAX_NUM_SEQS,
            max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
            max_model_len=MAX_MODEL_LEN,
            max_waiting_requests=8,
            num_blocks=NUM_BLOCKS,
            block_size=4,
        )
        self.runner = FakeModelRunner.for_scheduler(self.scheduler)
        self.core = create_core(self.scheduler, self.runner)
        self.num_checked_steps = 0
        self.result = RunResult()
        self.admitted: list[Request] = []
        self.aborted: set[str] = set()

    def add(self, arrival: Arrival) -> None:
        for request in make_group(arrival, len(self.admitted)):
            try:
                self.core.add_request(request)
            except QueueFullError:
                return
            self.admitted.append(request)

    def abort(self, index: int) -> None:
        if index < len(self.admitted):
            request_id = self.admitted[index].request_id
            if request_id in self.scheduler.requests:
                self.aborted.add(request_id)
            self.core.abort_requests([request_id])

    def step(self) -> None:
        for output in self.core.step():
            record_output(self.result, output)
        for scheduler_output in self.runner.scheduler_outputs[self.num_checked_steps:]:
            assert scheduler_output.num_batched_tokens <= MAX_NUM_BATCHED_TOKENS
        self.num_checked_steps = len(self.runner.scheduler_outputs)


@settings(max_examples=300, deadline=None)
@given(events)
def test_random_traffic_never_leaks_blocks_or_loses_tokens(event_list):
    driver = Driver()
    for item in event_list:
        if isinstance(item, Arrival):
            driver.add(item)
        elif item == "step":
            driver.step()
        else:
            driver.abort(item[1])
        check_scheduler(driver.scheduler)
    for _ in range(500):
        if not driver.scheduler.has_unfinished_requests():
            break
        driver.step()
        check_scheduler(driver.scheduler)
    assert not driver.scheduler.has_unfinished_requests()
    assert driver.scheduler.block_manager.num_free_blocks == NUM_BLOCKS
    stats = driver.scheduler.stats()
    note_event(f"preempted: {stats.num_preemptions > 0}")
    note_event(f"prefix hits: {stats.prefix_cache_hits > 0}")
    note_event(f"aborted: {bool(driver.aborted)}")
    for request in driver.admitted:
        expected, reason = expected_generation(request)
        produced = driver.result.output_token_ids.get(request.request_id, [])
        if request.request_id in driver.aborted:
            assert produced == expected[: len(produced)]
            assert request.status == RequestStatus.FINISHED_ABORTED
        else:
            assert produced == expected
            assert driver.result.finish_reasons[request.request_id] == reason
