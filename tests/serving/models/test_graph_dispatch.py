"""GraphDispatch: a compiled module's code runs without dynamo's per-call guards, the guards
checked once per (module, token count, grad and inference mode) on that call's own inputs;
a call no compiled graph takes is refused, never run on a graph whose guards fail. The
runner's compiled forward answers through it exactly as through dynamo, and runs a refused
step eagerly."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from serving.models import graph_dispatch
from serving.models.compiled import relative_error
from serving.models.graph_dispatch import GraphDispatch, NoCompiledGraph

pytestmark = pytest.mark.skipif(not graph_dispatch.available(),
                                reason="this torch cannot list dynamo's compiled graphs")


class Scaled(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(features, features), requires_grad=False)

    def forward(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        return torch.relu(x @ self.weight.T) * scale


@pytest.fixture
def guard_checks(monkeypatch) -> list[int]:
    """The token counts whose guards `GraphDispatch` checked, one entry per check."""
    checks: list[int] = []
    resolve = GraphDispatch._resolve

    def counting(self, *args):
        checks.append(args[1].shape[0])
        return resolve(self, *args)

    monkeypatch.setattr(GraphDispatch, "_resolve", counting)
    return checks


def counting_backend(graph_calls: list[int]):
    """A dynamo backend that runs the captured graph as it is, counting its calls."""
    def backend(graph_module, example_inputs):
        def run(*inputs):
            graph_calls.append(1)
            return graph_module(*inputs)
        return run
    return backend


def test_compiled_code_runs_with_guards_checked_once_per_module_and_size(guard_checks):
    graph_calls: list[int] = []
    small, other = Scaled(8), Scaled(8)
    small.compile(backend=counting_backend(graph_calls), dynamic=False)
    other.compile(backend=counting_backend(graph_calls), dynamic=False)
    x4, x6 = torch.randn(4, 8), torch.randn(6, 8)
    with torch.inference_mode():
        small(x4, 2.0)  # compiles a graph for 4 rows only (static shapes)
        assert len(graph_calls) == 1
        dispatch = GraphDispatch(Scaled.forward)
        for _ in range(3):
            torch.testing.assert_close(dispatch(small, x4, 2.0),
                                       torch.relu(x4 @ small.weight.T) * 2.0)
        assert guard_checks == [4] and len(graph_calls) == 4  # the graph ran, not forward
        # the same code for another module of the same structure: its own guard check
        torch.testing.assert_close(dispatch(other, x4, 2.0), torch.relu(x4 @ other.weight.T) * 2)
        assert guard_checks == [4, 4]
        for _ in range(2):  # only 4 rows compiled; refused again without a second check
            with pytest.raises(NoCompiledGraph, match="6-token call"):
                dispatch(small, x6, 2.0)
        assert guard_checks == [4, 4, 6]
        with pytest.raises(NoCompiledGraph):  # the scale is a constant of the graph, and
            GraphDispatch(Scaled.forward)(small, x4, 3.0)  # a new dispatch checks again
    with torch.enable_grad(), pytest.raises(NoCompiledGraph):  # compiled in inference mode
        dispatch(small, x4, 2.0)  # the same size, another mode: checked again
    assert guard_checks[-1] == 4 and len(guard_checks) == 5


def test_runner_answers_through_the_dispatch_as_through_dynamo(tiny_model_dir: Path,
                                                               compiled_config, guard_checks,
                                                               caplog):
    from serving.engine.model_runner import ModelRunner
    from serving.engine.sampler import Sampler
    from serving.models.attention import AttentionMetadata

    runner = ModelRunner(tiny_model_dir, device="cpu", dtype=torch.float32, num_blocks=64,
                         block_size=16, sampler=Sampler("cpu"), compilation=compiled_config)
    assert runner.is_compiled and runner.forward.dispatches_directly
    num_blocks = len(runner.model.blocks)

    def decodes(num_tokens: int):  # one token each of num_tokens requests, 40 tokens in
        metadata = AttentionMetadata.build(
            query_lens=[1] * num_tokens, seq_lens=[41] * num_tokens,
            block_tables=[[3 * i, 3 * i + 1, 3 * i + 2] for i in range(num_tokens)],
            block_size=16)
        return (torch.arange(5, 5 + num_tokens), torch.full((num_tokens,), 40), metadata)

    # decodes and prefill chunks (8 of each: one size, other step indexes); 1 token has
    # its own graph
    with torch.inference_mode(), caplog.at_level(logging.WARNING):  # as the runner steps
        steps = [decodes(1), decodes(8), runner._check_step(8, 1024),
                 runner._check_step(2, 1024), runner._check_step(17, 1024),
                 runner._check_step(200, 1024)]
        for input_ids, positions, metadata in steps:
            checks_before = len(guard_checks)
            served = runner.forward(input_ids, positions, runner.kv_caches, metadata)
            served_again = runner.forward(input_ids, positions, runner.kv_caches, metadata)
            with runner.forward.guarded_by_dynamo():
                guarded = runner.forward(input_ids, positions, runner.kv_caches, metadata)
            torch.testing.assert_close(served, guarded, atol=0, rtol=0)
            torch.testing.assert_close(served_again, served, atol=0, rtol=0)
            # the warm-up's start check saw some sizes already; a new one: once per block
            assert len(guard_checks) - checks_before in (0, num_blocks)
    assert "needed a new compiled graph" not in caplog.text  # compiled, not eager
    assert set(guard_checks) >= {1, 2, 8, 17, 200}


def test_a_step_no_graph_takes_runs_eagerly(tiny_model_dir: Path, compiled_config, caplog):
    from serving.engine.model_runner import ModelRunner
    from serving.engine.sampler import Sampler

    runner = ModelRunner(tiny_model_dir, device="cpu", dtype=torch.float32, num_blocks=16,
                         block_size=16, sampler=Sampler("cpu"), compilation=compiled_config)
    with torch.inference_mode(), caplog.at_level(logging.WARNING):
        step = runner._check_step(5, runner.kv_caches[0].shape[1])
        assert step is not None
        with torch.enable_grad():  # the graphs were compiled without grad mode
            served = runner.forward(*step[:2], runner.kv_caches, step[2])
        with torch.compiler.set_stance("force_eager"):
            eager = runner.model(*step[:2], runner.kv_caches, step[2])
    assert "a 5-token step needed a new compiled graph; steps like it run eagerly" in caplog.text
    torch.testing.assert_close(served, eager, atol=0, rtol=0)


def test_a_torch_whose_graph_entries_look_different_keeps_dynamo_guarding(
        tiny_model_dir: Path, compiled_config, monkeypatch, caplog):
    """The entries come from a debugging hook of dynamo's: where they lack what the dispatch
    reads, the runner stays compiled and lets dynamo check every call, rather than fall back
    to eager or fail."""
    from serving.engine.model_runner import ModelRunner
    from serving.engine.sampler import Sampler

    class Entry:  # what a future torch might hand back
        code = None

    monkeypatch.setattr(graph_dispatch, "_debug_get_cache_entry_list", lambda code: [Entry()])
    with caplog.at_level(logging.WARNING):
        runner = ModelRunner(tiny_model_dir, device="cpu", dtype=torch.float32, num_blocks=16,
                             block_size=16, sampler=Sampler("cpu"), compilation=compiled_config)
    assert "dynamo checks the compiled graphs' guards on every call: this torch's" in caplog.text
    assert runner.is_compiled and not runner.forward.dispatches_directly
    with torch.inference_mode():
        step = runner._check_step(3, runner.kv_caches[0].shape[1])
        assert step is not None
        served = runner.forward(*step[:2], runner.kv_caches, step[2])
        with torch.compiler.set_stance("force_eager"):
            eager = runner.model(*step[:2], runner.kv_caches, step[2])
    assert "needed a new compiled graph" not in caplog.text  # dynamo's graph, not eager
    assert relative_error(served, eager) < 1e-3  # float32: fused code rounds a little apart
