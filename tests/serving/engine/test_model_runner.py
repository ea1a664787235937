"""A real Scheduler + ModelRunner + Sampler, greedy, against transformers' `generate`.

Mixed prompt lengths, shared prefixes (prefix-cache hits), staggered arrivals, chunked
prefill and preemption all change how each request's tokens are batched and cached; none
may change a single greedy token.
"""

from __future__ import annotations

import os
import pydoc_data.topics
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from serving.engine import (
    CacheConfig,
    ModelRunnerOutput,
    Request,
    SamplingParams,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)
from serving.engine.config import CompilationConfig
from serving.engine.core import EngineCore
from serving.engine.model_runner import ModelRunner
from serving.engine.sampler import Sampler
from serving.models.cuda_graphs import DecodeGraphs, graph_batch_sizes

pytestmark = pytest.mark.isa  # kernels and rounding: run under lower ISAs by `make test-isa`

GREEDY = {"temperature": 0.0}


@dataclass(frozen=True)
class Arrival:
    step: int
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int


@dataclass(frozen=True)
class EngineRun:
    outputs: dict[str, list[int]]
    num_preemptions: int
    num_prefix_cache_hits: int
    max_batch_size: int


class BatchSizeRecorder:
    """The runner, noting the largest batch it was given."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.max_batch_size = 0

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        num_requests = len(scheduler_output.scheduled_requests)
        self.max_batch_size = max(self.max_batch_size, num_requests)
        return self.runner.execute_model(scheduler_output)


def run_engine(
    runner: ModelRunner, scheduler: Scheduler, arrivals: list[Arrival], eos_token_id: int
) -> EngineRun:
    """Arrivals join at their step; the engine's own `step()` runs until all finished."""
    recorder = BatchSizeRecorder(runner)
    core = EngineCore(scheduler, recorder, runner.sampler)
    pending = sorted(arrivals, key=lambda arrival: arrival.step)
    outputs: dict[str, list[int]] = {}
    step = 0
    while pending or core.has_unfinished_requests():
        while pending and pending[0].step <= step:
            arrival = pending.pop(0)
            params = SamplingParams(max_tokens=arrival.max_tokens, **GREEDY)
            request = Request(arrival.request_id, arrival.prompt_token_ids, params, eos_token_id)
            core.add_request(request)
        for output in core.step():
            outputs.setdefault(output.request_id, []).extend(output.new_token_ids)
        scheduler.block_manager.check_invariants()
        step += 1
    stats = core.stats()
    return EngineRun(outputs, stats.num_preemptions, stats.prefix_cache_hits,
                     recorder.max_batch_size)


def reference_outputs(model_dir: Path, arrivals: list[Arrival], dtype: torch.dtype) -> dict:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    expected = {}
    with torch.inference_mode():
        for arrival in arrivals:
            input_ids = torch.tensor([arrival.prompt_token_ids])
            generated = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=arrival.max_tokens,
            )
            expected[arrival.request_id] = generated[0, input_ids.shape[1] :].tolist()
    return expected


def make_runner(model_dir: Path, dtype: torch.dtype, num_blocks: int, block_size: int,
                compilation: CompilationConfig, *, device: str = "cpu",
                max_num_seqs: int | None = None, max_model_len: int | None = None,
                ) -> ModelRunner:
    return ModelRunner(
        model_dir,
        device=torch.device(device),
        dtype=dtype,
        num_blocks=num_blocks,
        block_size=block_size,
        sampler=Sampler(device),
        compilation=compilation,
        max_num_seqs=max_num_seqs,
        max_model_len=max_model_len,
    )


@pytest.fixture(params=["compiled", "eager"])
def compilation(request) -> CompilationConfig:
    """Both ways a runner runs: compiled layers + C++ kernels (the default), and the
    fallback (eager, pure torch)."""
    return request.getfixturevalue(f"{request.param}_config")


def make_scheduler(
    num_blocks: int, block_size: int, max_num_batched_tokens: int, max_model_len: int
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(
            max_num_seqs=16,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len,
        ),
        CacheConfig(block_size=block_size, num_blocks=num_blocks),
    )


def mixed_arrivals(vocab_size: int, num_requests: int = 18) -> list[Arrival]:
    """Prompts of 1..300 tokens, a third sharing a 40-token prefix, two arrivals a step."""
    rng = random.Random(7)
    shared_prefix = rng.choices(range(3, vocab_size), k=40)
    lengths = [1, 300, 2, 17, 64, 129, 5, 250, 33, 48, 3, 96, 200, 11, 70, 160, 8, 41]
    arrivals = []
    for index, length in enumerate(lengths[:num_requests]):
        prompt = rng.choices(range(3, vocab_size), k=length)
        if index % 3 == 1:
            prompt = shared_prefix + prompt[: max(length - 40, 1)]
        arrivals.append(Arrival(index // 2, f"req-{index}", prompt, rng.randint(4, 24)))
    return arrivals


@pytest.fixture(scope="module")
def tiny_arrivals_and_reference(tiny_model_dir: Path) -> tuple[list[Arrival], dict]:
    arrivals = mixed_arrivals(vocab_size=2048)
    return arrivals, reference_outputs(tiny_model_dir, arrivals, torch.float32)


def test_mixed_batch_greedy_matches_transformers(
    tiny_model_dir: Path, tiny_arrivals_and_reference, compilation: CompilationConfig
) -> None:
    arrivals, expected = tiny_arrivals_and_reference
    runner = make_runner(tiny_model_dir, torch.float32, 256, 16, compilation)
    if not os.environ.get("ATEN_CPU_CAPABILITY"):
        # Under an emulated lower ISA (make test-isa) inductor's AVX2 code around the packed
        # linear op answers wrongly; the start-up check catches it and the runner runs eagerly
        # (test_compile_fallback.py), so only the host's own ISA must compile.
        assert runner.is_compiled == (not compilation.enforce_eager)
    scheduler = make_scheduler(256, 16, max_num_batched_tokens=64, max_model_len=512)
    run = run_engine(runner, scheduler, arrivals, eos_token_id=2)
    assert run.num_prefix_cache_hits > 0
    assert run.max_batch_size > 4
    assert run.num_preemptions == 0
    assert run.outputs == expected


def test_greedy_matches_transformers_under_preemption(
    tiny_model_dir: Path, tiny_arrivals_and_reference, compilation: CompilationConfig
) -> None:
    arrivals, expected = tiny_arrivals_and_reference
    runner = make_runner(tiny_model_dir, torch.float32, 24, 16, compilation)
    scheduler = make_scheduler(24, 16, max_num_batched_tokens=96, max_model_len=384)
    run = run_engine(runner, scheduler, arrivals, eos_token_id=2)
    assert run.num_preemptions > 0
    assert run.outputs == expected


def test_runner_exposes_arch_and_kv_caches(tiny_model_dir: Path, eager_config) -> None:
    runner = make_runner(tiny_model_dir, torch.float32, 8, 16, eager_config)
    assert runner.arch.num_hidden_layers == len(runner.kv_caches) == 2
    assert runner.kv_caches[0].shape == (2, 8 * 16, 2, 16)


def text_prompts(model_dir: Path, num: int) -> list[list[int]]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    topics = sorted(pydoc_data.topics.topics.items())
    rng = random.Random(3)
    prompts = []
    for index in range(num):
        _, text = topics[(index * 7) % len(topics)]
        token_ids = tokenizer.encode(text).ids
        prompts.append(token_ids[: rng.randint(4, 200)])
    return prompts


@pytest.fixture(scope="module")
def smollm2_arrivals_and_reference(smollm2_dir: Path) -> tuple[list[Arrival], dict]:
    prompts = text_prompts(smollm2_dir, 16)
    arrivals = [
        Arrival(index // 4, f"req-{index}", prompt, 12) for index, prompt in enumerate(prompts)
    ]
    return arrivals, reference_outputs(smollm2_dir, arrivals, torch.float32)


@pytest.mark.slow
def test_smollm2_float32_greedy_matches_transformers(
    smollm2_dir: Path, smollm2_arrivals_and_reference, compilation: CompilationConfig
) -> None:
    arrivals, expected = smollm2_arrivals_and_reference
    runner = make_runner(smollm2_dir, torch.float32, 128, 16, compilation)
    scheduler = make_scheduler(128, 16, max_num_batched_tokens=256, max_model_len=1024)
    run = run_engine(runner, scheduler, arrivals, eos_token_id=2)
    assert run.outputs == expected


class GraphStepCounter:
    """Notes the steps a runner's `DecodeGraphs` ran: (rows, rows padded to)."""

    def __init__(self, graphs: DecodeGraphs) -> None:
        self.steps: list[tuple[int, int]] = []
        run = graphs.run

        def counted(token_ids, positions, block_tables):
            self.steps.append((len(token_ids), graphs.padded_size(len(token_ids))))
            return run(token_ids, positions, block_tables)

        graphs.run = counted


def test_padded_decode_steps_match_transformers(
    tiny_model_dir: Path, tiny_arrivals_and_reference, eager_config: CompilationConfig
) -> None:
    """The CUDA graphs' steps without the graphs (CPU): decodes padded to 1, 2, 4, 8, ...
    rows, the padding in a scratch block past the scheduler's, attention through
    `quiver::paged_attention_decode`; every greedy token as transformers', also when
    preemption hands blocks around."""
    arrivals, expected = tiny_arrivals_and_reference
    for num_blocks, max_tokens, max_model_len in ((256, 64, 512), (24, 96, 384)):
        runner = make_runner(tiny_model_dir, torch.float32, num_blocks + 1, 16, eager_config)
        runner.decode_graphs = DecodeGraphs(
            runner.model, runner.kv_caches, block_size=16, max_model_len=max_model_len,
            scratch_block=num_blocks, batch_sizes=graph_batch_sizes(16))
        counter = GraphStepCounter(runner.decode_graphs)
        # the scratch block holds garbage no request may ever read
        runner.kv_caches[0][:, num_blocks * 16:] = float("nan")
        scheduler = make_scheduler(num_blocks, 16, max_num_batched_tokens=max_tokens,
                                   max_model_len=max_model_len)
        run = run_engine(runner, scheduler, arrivals, eos_token_id=2)
        assert run.outputs == expected
        assert {padded for _, padded in counter.steps} >= {1, 2, 4}
        assert any(rows < padded for rows, padded in counter.steps)
        assert (run.num_preemptions > 0) == (num_blocks == 24)


def test_graph_batch_sizes() -> None:
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(3) == [1, 2, 4]
    assert graph_batch_sizes(16) == [1, 2, 4, 8, 16]
    assert graph_batch_sizes(50) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56]


def test_graph_tables_hold_no_stale_block_ids(tiny_model_dir: Path, eager_config) -> None:
    """A wide step, then a narrow one: the step index is laid out for each padded size, so
    the narrow step's tables sit where the wide one's slots and lengths were; past its
    blocks every row must hold the scratch block, and the answer must not change."""
    runner = make_runner(tiny_model_dir, torch.float32, 33, 16, eager_config)
    graphs = DecodeGraphs(runner.model, runner.kv_caches, block_size=16, max_model_len=128,
                          scratch_block=32, batch_sizes=[1, 2, 4, 8])
    narrow = graphs.run([5], [20], [[3, 4]]).clone()
    graphs.run(list(range(8)), [17 * i for i in range(8)], [[i + 8] * 8 for i in range(8)])
    again = graphs.run([5], [20], [[3, 4]])
    index = graphs._buffer[16:16 + 4 + 3 + 1 + 8].tolist()  # padded to 1 row, 8 blocks wide
    assert index[4:] == [4 * 16 + 4, 0, 1, 21, 3, 4, 32, 32, 32, 32, 32, 32]
    torch.testing.assert_close(again, narrow)


def test_graphs_refuse_more_decodes_than_recorded(tiny_model_dir: Path, eager_config) -> None:
    runner = make_runner(tiny_model_dir, torch.float32, 9, 16, eager_config)
    graphs = DecodeGraphs(runner.model, runner.kv_caches, block_size=16, max_model_len=128,
                          scratch_block=8, batch_sizes=[1, 2])
    with pytest.raises(ValueError, match="3 decodes for graphs of 1 to 2"):
        graphs.run([5, 6, 7], [0, 0, 0], [[0], [1], [2]])


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize(("num_blocks", "max_tokens", "max_model_len"),
                         [(256, 64, 512), (24, 96, 384)], ids=["roomy", "preempting"])
def test_cuda_graphs_greedy_match_transformers(
    tiny_model_dir: Path, tiny_arrivals_and_reference, quiver_cache_dir: Path, num_blocks: int,
    max_tokens: int, max_model_len: int,
) -> None:
    """On a GPU: decode steps replayed from CUDA graphs, prefill eager; float32 greedy
    tokens as transformers' (on CPU), under preemption too."""
    arrivals, expected = tiny_arrivals_and_reference
    runner = make_runner(tiny_model_dir, torch.float32, num_blocks, 16,
                         CompilationConfig(cache_dir=quiver_cache_dir), device="cuda",
                         max_num_seqs=16, max_model_len=max_model_len)
    assert runner.decode_graphs is not None and runner.decode_graphs.is_captured
    counter = GraphStepCounter(runner.decode_graphs)
    scheduler = make_scheduler(num_blocks, 16, max_num_batched_tokens=max_tokens,
                               max_model_len=max_model_len)
    run = run_engine(runner, scheduler, arrivals, eos_token_id=2)
    assert run.outputs == expected
    assert len(counter.steps) >= 10  # 20 on an H100 (the roomy case)
    assert any(rows < padded for rows, padded in counter.steps)
    assert (run.num_preemptions > 0) == (num_blocks == 24)
