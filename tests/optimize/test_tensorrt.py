"""`quiver optimize tensorrt`: on a host without an NVIDIA GPU + TensorRT it stops at once with
a message naming what is missing and writes nothing; on a GPU host (gpu marker) it builds
engines into the artifact, and the artifact measures and maps onto the onnx engine."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from optimize.manifest import Manifest
from optimize.methods.tensorrt import missing_requirements
from serving.settings import ServerSettings

pytest.importorskip("onnxruntime_genai", reason="quiver optimize needs onnxruntime-genai")


def quiver(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quiver", *argv], capture_output=True,
                          text=True, timeout=900, check=False)


def test_without_a_gpu_it_stops_at_once_naming_what_is_needed(tmp_path):
    if not missing_requirements(0):
        pytest.skip("this host can build TensorRT engines")
    source = tmp_path / "source"
    source.mkdir()  # never read: the check comes first
    started = time.monotonic()
    done = quiver("optimize", "tensorrt", "--model", str(source), "--out",
                  str(tmp_path / "out" / "trt"))
    assert time.monotonic() - started < 60  # no baseline, no build
    assert done.returncode == 3, done.stderr
    message = done.stderr
    assert "usage:" not in message  # a host problem, not a usage error
    assert "cannot build a TensorRT engine on this host" in message
    for needed in ("NVIDIA GPU", "onnxruntime-gpu with the TensorRT execution provider",
                   "TensorRT 10 libraries", "Nothing was written"):
        assert needed in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]


def test_tensorrt_manifest_format_maps_to_the_onnx_engine(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "tensorrt"}))
    assert ServerSettings(model=tmp_path).resolved_engine() == "onnx"


@pytest.mark.gpu
def test_builds_engines_on_a_gpu_host(tiny_model_dir, tmp_path):
    missing = missing_requirements(0)
    if missing:
        pytest.skip("needs " + "; ".join(missing))
    onnx_artifact = tmp_path / "tiny-onnx"
    done = quiver("optimize", "onnx", "--model", str(tiny_model_dir), "--out",
                  str(onnx_artifact), "--eval-samples", "3", "--decode-tokens", "0")
    assert done.returncode == 0, done.stderr
    out = tmp_path / "trt"
    done = quiver("optimize", "tensorrt", "--model", str(onnx_artifact), "--out", str(out),
                  "--eval-samples", "3", "--decode-tokens", "16", "--max-prefill-tokens", "256")
    assert done.returncode == 0, done.stderr
    manifest = Manifest.read(out)
    assert manifest.format == "tensorrt" and manifest.params["num_engines"] >= 1
    assert any(p.suffix == ".engine" for p in (out / "trt_cache").rglob("*"))
    assert manifest.metrics.max_abs_logit_diff < 0.05  # fp16 engines vs fp32 on CPU
    assert abs(manifest.metrics.ppl_increase_percent) <= 1.0
    assert manifest.metrics.decode_tokens_per_s > 0
    assert ServerSettings(model=out).resolved_engine() == "onnx"


def test_a_tensorrt_artifact_asks_for_the_trt_provider_and_og_refuses_it_by_default(tmp_path):
    import onnxruntime_genai as og

    from optimize.onnx_eval import session_providers
    from serving.backends.onnx_config import check_servable, tensorrt_provider_options

    (tmp_path / "tensorrt.json").write_text(json.dumps(
        {"device_id": 1, "precision": "fp16", "engine_cache": "trt_cache"}))
    options = tensorrt_provider_options(tmp_path)
    assert options["trt_engine_cache_path"] == str((tmp_path / "trt_cache").resolve())
    assert options["trt_fp16_enable"] and options["device_id"] == 1
    assert [p if isinstance(p, str) else p[0] for p in session_providers(tmp_path)] == [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(ValueError, match="pass --device cuda"):
        check_servable(og, tmp_path, "auto")
    check_servable(og, tmp_path, "cuda")  # explicitly: its ONNX graph on the CUDA EP


def test_the_raw_decode_loop_matches_og_greedy(tiny_model_dir, tmp_path):
    """The TensorRT artifact's decode loop (raw ONNX Runtime, KV fed back), checked on CPU."""
    import numpy as np
    import onnxruntime_genai as og

    from optimize.methods.onnx import run_builder
    from optimize.onnx_eval import OnnxDecoder

    out = tmp_path / "onnx"
    run_builder(tiny_model_dir, out, precision="fp32", provider="cpu", cache=tmp_path / "c")
    prompt = [5, 17, 42, 99, 7, 300]
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + 12,
                              min_length=len(prompt) + 12)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray([prompt], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    expected = [int(t) for t in generator.get_sequence(0)[len(prompt):]]
    assert OnnxDecoder.load(out).greedy(prompt, 12) == expected
