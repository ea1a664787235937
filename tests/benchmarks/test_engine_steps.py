"""benchmarks/engine_steps.py: the in-process A/B drives real engine cores, packs only its
onednn-linear variant's weights for oneDNN, and switches the one-or-two-row linear kernel
(and, for dynamo-guards, the compiled graphs' dispatch) only around that variant's runs."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest
import torch

from serving.engine.config import default_cache_dir
from serving.kernels.build import compiler
from serving.kernels.ops import lowbit_kernels_run
from serving.models.linear import onednn_supports


def test_variants_run_and_the_kernel_switch_is_scoped(tiny_model_dir, monkeypatch):
    # the serving tests' cache (tests/serving/conftest.py): kernels built once a run
    quiver_cache_dir = Path(os.environ.get("QUIVER_TEST_CACHE_DIR") or default_cache_dir())
    if shutil.which(compiler()) is None:
        pytest.skip(f"no C++ compiler ({compiler()}): the onednn-linear variant needs it")
    from benchmarks.engine_steps import make_variants, run

    # bf16 (the tiny model is float32): tiles where the CPU has them, as before dtype choice
    default, onednn, eager, guarded = make_variants(
        tiny_model_dir, ["default", "onednn-linear", "eager", "dynamo-guards"],
        quiver_cache_dir, dtype="bfloat16")
    assert len({id(default.core), id(onednn.core), id(eager.core)}) == 3
    assert guarded.core is default.core  # the same engine, its guards checked differently

    def layout(variant) -> str:
        return torch.ops.quiver.packed_linear_layout(
            variant.core._runner.model.layers[0].mlp.down_proj.weight)

    assert default.core._runner.model.dtype == torch.bfloat16
    onednn_bf16 = onednn_supports(torch.device("cpu"), torch.bfloat16)
    assert layout(onednn) == ("onednn" if onednn_bf16 else "none")  # no bf16 oneDNN: no twin
    assert layout(default) == ("tiles" if lowbit_kernels_run() and onednn_bf16
                               else layout(onednn))
    (auto,) = make_variants(tiny_model_dir, ["default"], quiver_cache_dir)
    assert auto.core._runner.model.dtype == torch.float32  # auto: the checkpoint's float32
    assert torch.ops.quiver.set_linear_tiles(True) is True, "tiles came back after its load"
    with onednn.active():
        assert torch.ops.quiver.set_skinny_max_rows(0) == 0  # off while its runs go
    assert torch.ops.quiver.set_skinny_max_rows(2) == 2, "the limit came back after the run"
    with pytest.raises(RuntimeError), onednn.active():
        raise RuntimeError("a run that fails")
    assert torch.ops.quiver.set_skinny_max_rows(2) == 2, "the limit came back after a failure"
    rng = random.Random(0)
    forward = default.core._runner.forward
    with guarded.active():
        assert not forward.dispatches_directly, "dynamo guards every call during its runs"
    assert forward.dispatches_directly, "the dispatch came back after its runs"
    for variant in (default, onednn, eager, guarded):
        step_ms, tokens_per_s = run(variant, 3, 6, rng, f"test-{variant.name}")
        assert step_ms > 0 and tokens_per_s > 0
        assert not variant.core.has_unfinished_requests()
    prompt_lengths = []  # --prompt: every request's prompt that long
    add_request = default.core.add_request
    monkeypatch.setattr(default.core, "add_request", lambda request: (
        prompt_lengths.append(len(request.prompt_token_ids)), add_request(request))[1])
    run(default, 2, 3, rng, "test-prompt", prompt_tokens=40)
    assert prompt_lengths == [40, 40] and not default.core.has_unfinished_requests()
    with pytest.raises(SystemExit, match="unknown variant 'fast'"):
        make_variants(tiny_model_dir, ["fast"], quiver_cache_dir)
    with pytest.raises(SystemExit, match="needs --other-model"):
        make_variants(tiny_model_dir, ["other-model"], quiver_cache_dir)
