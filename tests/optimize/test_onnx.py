"""`quiver optimize onnx` end to end on the tiny model (fp32, int8, int4): manifest, logit
parity, perplexity, the precision-specific quality gate, refusals, and that each artifact
answers a chat completion through our server's onnx engine. SmolLM2 figures (parity,
perplexity per precision) come from benchmarks/optimize.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from common.errors import QuiverError
from optimize.cli import EXIT_GATE
from optimize.manifest import Manifest
from optimize.methods.onnx import PRECISION_GATES, run_builder
from quiver.cli import build_parser, main
from serving.settings import ServerSettings

pytest.importorskip("onnxruntime_genai", reason="quiver optimize onnx needs onnxruntime-genai")

FAST = ["--eval-samples", "5", "--eval-max-tokens", "256"]


def optimize(model: Path, out: Path, *extra: str) -> int:
    return main(["optimize", "onnx", "--model", str(model), "--out", str(out), *FAST, *extra])


@pytest.fixture(scope="module")
def artifacts(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx")
    built = {}
    for precision, decode in (("fp32", "8"), ("int8", "0"), ("int4", "0")):
        out = root / precision
        assert optimize(tiny_model_dir, out, "--precision", precision,
                        "--decode-tokens", decode) == 0
        built[precision] = out
    return built


def graph_ops(model_dir: Path) -> set[str]:
    import onnx

    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    return {node.op_type for node in model.graph.node}


def test_fp32_export_matches_torch_and_is_served_by_the_onnx_engine(artifacts):
    out = artifacts["fp32"]
    manifest = Manifest.read(out)
    assert manifest.format == "onnx" and manifest.method == "onnx"
    assert manifest.params["precision"] == "fp32"
    assert manifest.params["execution_provider"] == "cpu"
    assert manifest.params["max_ppl_increase"] == PRECISION_GATES["fp32"]
    metrics = manifest.metrics
    assert metrics.max_abs_logit_diff <= 1e-3
    assert metrics.parity_texts >= 1 and metrics.parity_tokens > metrics.parity_texts
    assert abs(metrics.ppl_increase_percent) < 0.1
    assert metrics.eval_tokens > 100 and metrics.decode_tokens_per_s > 0
    assert {"GroupQueryAttention", "MatMul"} <= graph_ops(out)  # KV cache, fp32 weights
    assert (out / "genai_config.json").is_file() and (out / "tokenizer.json").is_file()
    assert ServerSettings(model=out).resolved_engine() == "onnx"
    # the task score ran in ONNX Runtime, the source's in the native engine: same answers
    assert metrics.task_items == 64 and metrics.greedy_agreement >= 90.0, metrics
    assert abs(metrics.task_score - metrics.baseline_task_score) <= 3.2, metrics


def test_quantized_artifacts_have_their_ops_gates_and_smaller_weights(artifacts):
    fp32 = Manifest.read(artifacts["fp32"]).metrics.size_bytes
    for precision in ("int8", "int4"):
        manifest = Manifest.read(artifacts[precision])
        assert manifest.format == "onnx" and manifest.params["precision"] == precision
        assert manifest.params["max_ppl_increase"] == PRECISION_GATES[precision]
        assert manifest.params["quantization"]["block_size"] == 32
        assert "MatMulNBits" in graph_ops(artifacts[precision])
        assert "MatMulNBits" not in graph_ops(artifacts["fp32"])
        assert manifest.metrics.size_bytes < fp32
        assert manifest.metrics.max_abs_logit_diff > 0
        assert manifest.metrics.ppl_increase_percent <= PRECISION_GATES[precision]
        assert 0 <= manifest.metrics.greedy_agreement <= 100
        assert manifest.gate.greedy_agreement == manifest.metrics.greedy_agreement


@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
async def test_artifact_answers_a_chat_completion(artifacts, precision):
    from transformers import AutoTokenizer

    from serving.api.app import create_app
    from serving.backends.factory import create_engine_client

    settings = ServerSettings(model=artifacts[precision], served_model_name="tiny",
                              device="cpu", max_num_seqs=2)
    registry = CollectorRegistry()
    engine = create_engine_client(settings, registry)
    app = create_app(settings, engine, AutoTokenizer.from_pretrained(settings.model), registry)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://quiver") as client:
            response = await client.post("/v1/chat/completions", json={
                "model": "tiny", "max_tokens": 6, "temperature": 0,
                "messages": [{"role": "user", "content": "What is Python?"}]})
    finally:
        await engine.shutdown()
    assert response.status_code == 200, response.text
    body = response.json()
    assert engine.info.engine == "onnx"
    assert body["usage"]["completion_tokens"] >= 1
    assert body["choices"][0]["finish_reason"] in ("length", "stop")


def test_the_gate_refuses_a_forced_bad_limit_and_leaves_nothing(tiny_model_dir, tmp_path,
                                                               capsys):
    out = tmp_path / "refused"
    code = optimize(tiny_model_dir, out, "--precision", "int4", "--decode-tokens", "0",
                    "--max-ppl-increase", "-50")
    assert code == EXIT_GATE
    assert "quality gate failed" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither --out nor a staging dir


@pytest.mark.parametrize(("argv", "gate"), [
    ([], None),  # the pipeline falls back to default_max_ppl_increase (fp32's)
    (["--precision", "int4"], PRECISION_GATES["int4"]),
    (["--precision", "int8"], PRECISION_GATES["int8"]),
    (["--max-ppl-increase", "2", "--precision", "int4"], 2.0),
    (["--precision", "int4", "--max-ppl-increase", "2"], 2.0),
])
def test_the_gate_default_follows_the_precision(argv, gate):
    args = build_parser().parse_args(["optimize", "onnx", "--model", "m", "--out", "o", *argv])
    assert args.max_ppl_increase == gate


def test_fp16_on_cpu_is_refused_before_any_work(tiny_model_dir, tmp_path, capsys):
    assert optimize(tiny_model_dir, tmp_path / "fp16", "--precision", "fp16") == 1
    assert "fp16 needs a GPU execution provider" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_an_onnx_artifact_as_source_is_refused(artifacts, tmp_path, capsys):
    assert optimize(artifacts["fp32"], tmp_path / "again", "--decode-tokens", "0") == 1
    assert "already an ONNX artifact" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_builder_failure_reports_its_last_lines(tiny_model_dir, tmp_path):
    source = tmp_path / "unsupported"
    shutil.copytree(tiny_model_dir, source)
    config = json.loads((source / "config.json").read_text())
    config["architectures"] = ["FrobnicatorForCausalLM"]
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuiverError, match="model builder failed") as info:
        run_builder(source, tmp_path / "out", precision="fp32", provider="cpu",
                    cache=tmp_path / "cache")
    assert "architectures: FrobnicatorForCausalLM" in str(info.value)
    assert "is not currently supported" in str(info.value)  # the builder's own words
