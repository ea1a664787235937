"""benchmarks/linear_kernels.py times every kernel that can take each of a model's shapes,
each against oneDNN's time in the same run."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from serving.engine.config import default_cache_dir
from serving.kernels.build import builds_panel_kernel, compiler
from serving.kernels.ops import lowbit_kernels_run
from serving.models.linear import onednn_supports


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_every_shape_and_row_count_is_timed_against_onednn(tiny_model_dir, tmp_path, dtype):
    if shutil.which(compiler()) is None:
        pytest.skip(f"no C++ compiler ({compiler()}): Quiver's kernels cannot build")
    if dtype == "bfloat16" and not onednn_supports(torch.device("cpu"), torch.bfloat16):
        pytest.skip("oneDNN has no bf16 GEMM on this CPU (AVX2 only): nothing to time against")
    from benchmarks.linear_kernels import main

    cache_dir = Path(os.environ.get("QUIVER_TEST_CACHE_DIR") or default_cache_dir())
    assert main([str(tiny_model_dir), "--rows", "1,3", "--dtype", dtype, "--kernel-cache",
                 str(cache_dir), "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "linear_kernels.json").read_text())
    assert report["dtype"] == dtype
    assert report["lowbit_kernels"] == lowbit_kernels_run(getattr(torch, dtype))
    config = json.loads((tiny_model_dir / "config.json").read_text())
    hidden = config["hidden_size"]
    shapes = {tuple(row["shape"]) for row in report["results"]}
    assert (hidden, config["intermediate_size"]) in shapes  # down_proj
    assert (config["vocab_size"], hidden) in shapes  # LM head
    for row in report["results"]:
        assert row["vs_onednn"]["onednn"] == 1.0 and all(t > 0 for t in row["us"].values())
        n, k = row["shape"]
        if dtype == "float32":  # a bf16 checkpoint upcast: oneDNN, F.linear and the panels
            expected = {"onednn", "f.linear"}
            if builds_panel_kernel() and n % 16 == 0:
                expected.add("panels")
            if report["lowbit_kernels"]:  # Quiver's on float32 rows, torch's up to 2 rows
                torch_too = row["rows"] <= 2
                if n % 16 == 0 and k % 2 == 0:
                    expected |= {"int8", "int8-torch"} if torch_too else {"int8"}
                if k % 64 == 0 and n % 64 == 0:
                    expected |= {"int4", "int4-torch"} if torch_too else {"int4"}
            assert set(row["us"]) == expected
            continue
        assert ("skinny" in row["us"]) == (row["rows"] <= 2)
        if report["lowbit_kernels"] and n % 16 == 0:
            assert {"int8", "int8-torch"} <= row["us"].keys()
