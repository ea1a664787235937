"""GraphDispatch: a compiled module's code runs without dynamo's per-call guards, the guards
checked once per (module, token count) on that call's own inputs; a call no compiled graph
takes is refused, never run on a graph whose guards fail. The runner's compiled forward
answers through it exactly as through dynamo, and runs a refused step eagerly."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from serving.models import graph_dispatch
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


def test_compiled_code_runs_with_guards_checked_once_per_module_and_size(guard_checks):
    torch._dynamo.reset()
    small, other = Scaled(8), Scaled(8)
    small.compile(backend="eager", dynamic=False)
    other.compile(backend="eager", dynamic=False)
    x4, x6 = torch.randn(4, 8), torch.randn(6, 8)
    with torch.inference_mode():
        small(x4, 2.0)  # compiles a graph for 4 rows only (static shapes)
        dispatch = GraphDispatch(Scaled.forward)
        for _ in range(3):
            torch.testing.assert_close(dispatch(small, x4, 2.0),
                                       torch.relu(x4 @ small.weight.T) * 2.0)
        assert guard_checks == [4]
        # the same code for another module of the same structure: its own guard check
        torch.testing.assert_close(dispatch(other, x4, 2.0), torch.relu(x4 @ other.weight.T) * 2)
        assert guard_checks == [4, 4]
        with pytest.raises(NoCompiledGraph, match="6-token call"):  # only 4 rows compiled
            dispatch(small, x6, 2.0)
        with pytest.raises(NoCompiledGraph):  # the scale is a constant of the graph, and
            GraphDispatch(Scaled.forward)(small, x4, 3.0)  # a new dispatch checks again
    with torch.enable_grad(), pytest.raises(NoCompiledGraph):  # compiled in inference mode
        GraphDispatch(Scaled.forward)(small, x4, 2.0)


def test_runner_answers_through_the_dispatch_as_through_dynamo(tiny_model_dir: Path,
                                                               compiled_config, guard_checks):
    from serving.engine.model_runner import ModelRunner
    from serving.engine.sampler import Sampler

    runner = ModelRunner(tiny_model_dir, device="cpu", dtype=torch.float32, num_blocks=64,
                         block_size=16, sampler=Sampler("cpu"), compilation=compiled_config)
    assert runner.is_compiled
    num_blocks = len(runner.model.blocks)
    sizes = (1, 2, 3, 17, 200)  # decodes, prefill chunks; 1 token has its own graph
    with torch.inference_mode():
        for num_tokens in sizes:
            step = runner._check_step(num_tokens, runner.kv_caches[0].shape[1])
            assert step is not None
            checks_before = len(guard_checks)
            served = runner.forward(*step[:2], runner.kv_caches, step[2])
            served_again = runner.forward(*step[:2], runner.kv_caches, step[2])
            with runner.forward.guarded_by_dynamo():
                guarded = runner.forward(*step[:2], runner.kv_caches, step[2])
            torch.testing.assert_close(served, guarded, atol=0, rtol=0)
            torch.testing.assert_close(served_again, served, atol=0, rtol=0)
            # the warm-up's start check saw some sizes already; a new one: once per block
            assert len(guard_checks) - checks_before in (0, num_blocks)
        assert set(guard_checks) >= set(sizes)


def test_a_step_no_graph_takes_runs_eagerly(tiny_model_dir: Path, compiled_config, caplog):
    from serving.engine.model_runner import ModelRunner
    from serving.engine.sampler import Sampler

    runner = ModelRunner(tiny_model_dir, device="cpu", dtype=torch.float32, num_blocks=16,
                         block_size=16, sampler=Sampler("cpu"), compilation=compiled_config)
    step = runner._check_step(5, runner.kv_caches[0].shape[1])
    assert step is not None
    with torch.inference_mode(), caplog.at_level(logging.WARNING):
        with torch.enable_grad():  # the graphs were compiled without grad mode
            served = runner.forward(*step[:2], runner.kv_caches, step[2])
        with torch.compiler.set_stance("force_eager"):
            eager = runner.model(*step[:2], runner.kv_caches, step[2])
    assert "a 5-token step needed a new compiled graph; steps like it run eagerly" in caplog.text
    torch.testing.assert_close(served, eager, atol=0, rtol=0)
