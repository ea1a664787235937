"""`quiver optimize int8`: W8A16 per-channel compressed-tensors artifacts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from common.errors import QuiverError

PROMPT = "The quick brown fox"


def greedy(model_dir: Path, prompt: str = PROMPT, tokens: int = 8) -> list[int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False,
                             min_new_tokens=tokens)
    return out[0, ids.shape[1]:].tolist()


def tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    with safe_open(model_dir / "model.safetensors", "pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118


@pytest.fixture(scope="module")
def tiny_int8(tiny_model_dir: Path, tmp_path_factory) -> tuple[Path, object]:
    from optimize.data import load_texts
    from optimize.methods.base import BuildContext
    from optimize.methods.int8 import METHOD

    out = tmp_path_factory.mktemp("int8") / "artifact"
    out.mkdir()
    context = BuildContext(source=tiny_model_dir, out=out, args=None, work_dir=out.parent,
                           calibration=load_texts(None, "calibration", limit=2))
    return out, METHOD.build(context)


def test_build_writes_channelwise_int8_compressed_tensors(tiny_int8) -> None:
    out, result = tiny_int8
    assert result.format == "compressed-tensors"
    assert result.params["bits"] == 8 and result.params["strategy"] == "channel"
    assert result.params["symmetric"] is True and result.params["ignore"] == ["lm_head"]
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert config["format"] == "pack-quantized" and config["ignore"] == ["lm_head"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["strategy"], weights["symmetric"]) == (8, "channel",
                                                                                True)
    saved = tensors(out)
    q_proj = "model.layers.0.self_attn.q_proj"
    assert saved[f"{q_proj}.weight_packed"].dtype == torch.int32
    assert saved[f"{q_proj}.weight_scale"].shape == (64, 1)
    assert f"{q_proj}.weight" not in saved
    assert saved["model.embed_tokens.weight"].dtype == torch.float32   # the source's dtype


def test_build_copies_tokenizer_and_chat_template(tiny_int8, tiny_model_dir: Path) -> None:
    out, _ = tiny_int8
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "generation_config.json"):
        assert (out / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name


def test_artifact_reloads_in_transformers_and_decodes_like_the_source(
        tiny_int8, tiny_model_dir: Path) -> None:
    from transformers import AutoConfig

    out, _ = tiny_int8
    assert AutoConfig.from_pretrained(out).quantization_config["quant_method"] == \
        "compressed-tensors"
    assert greedy(out) == greedy(tiny_model_dir)


def test_refuses_a_model_outside_the_llama_family(tmp_path: Path, build_method) -> None:
    source = tmp_path / "gpt2"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(QuiverError, match="'gpt2' model; int8 and awq quantize Llama"):
        build_method("int8", source, tmp_path / "out")


def test_refuses_a_model_without_linear_layers() -> None:
    from optimize.methods.compress import linear_input_sizes

    model = torch.nn.Sequential(torch.nn.Embedding(8, 4))
    with pytest.raises(QuiverError, match="no Linear layers to quantize"):
        linear_input_sizes(model)


# --- end to end: `quiver optimize int8` (baseline and artifact measured by the native engine)

TINY_RUN = ("--decode-tokens", "8", "--eval-samples", "5", "--calib-samples", "8")


def run_cli(method: str, model: Path, out: Path, *extra: str) -> int:
    from quiver.cli import main

    return main(["optimize", method, "--model", str(model), "--out", str(out), *extra])


def check_manifest(out: Path, method: str, source: Path) -> dict:
    """The manifest's contract (DESIGN.md), and that its numbers describe `out`."""
    from optimize.manifest import size_bytes

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "compressed-tensors" and manifest["method"] == method
    assert manifest["source"]["path"] == str(source)
    assert re.fullmatch(r"[0-9a-f]{64}", manifest["source"]["sha256"])
    metrics = manifest["metrics"]
    assert metrics["perplexity"] > 1.0 and metrics["baseline_perplexity"] > 1.0
    assert metrics["size_bytes"] == size_bytes(out) < size_bytes(source)
    assert metrics["decode_tokens_per_s"] > 0
    assert metrics["eval_data"] == "pydoc_data.topics:evaluation"
    check_task_metrics(metrics)
    assert manifest["created_at"] and manifest["quiver_version"]
    gate = manifest["gate"]
    increase = (metrics["perplexity"] / metrics["baseline_perplexity"] - 1) * 100
    assert gate["ppl_increase"] == pytest.approx(increase, abs=1e-3)
    assert gate["passed"] == (gate["max_ppl_increase"] is None
                              or gate["ppl_increase"] <= gate["max_ppl_increase"])
    assert gate["greedy_agreement"] == metrics["greedy_agreement"]          # what a task
    assert gate["task_score_drop"] == pytest.approx(                        # limit reads
        metrics["baseline_task_score"] - metrics["task_score"], abs=0.01)
    assert gate["max_task_score_drop"] is None and gate["min_greedy_agreement"] is None
    return manifest


def check_task_metrics(metrics: dict) -> None:
    """The task score fields (optimize/tasks.py): points out of 100 for both models, the
    same items, and the artifact's greedy agreement with its source."""
    assert metrics["task_suite"] == "quiver-tasks-1" and metrics["task_items"] == 64
    for prefix in ("", "baseline_"):
        assert 0 <= metrics[f"{prefix}task_score"] <= 100
        assert set(metrics[f"{prefix}task_scores"]) == {"cloze", "arithmetic", "sequence"}
    assert 0 <= metrics["greedy_agreement"] <= 100


def check_gate(method: str, model: Path, tmp_path: Path, capsys, *extra: str) -> None:
    """A gate no artifact can pass refuses (exit 4, nothing left); --force writes it."""
    out = tmp_path / "gated"
    assert run_cli(method, model, out, *extra, "--max-ppl-increase", "-50") == 4
    error = capsys.readouterr().err
    assert re.search(r"quality gate failed: .* beyond the allowed -50\.00 % "
                     r"\(by \d+\.\d\d points\); nothing written", error), error
    assert not out.exists()
    assert list(tmp_path.glob(".gated.staging-*")) == []
    assert run_cli(method, model, out, *extra, "--max-ppl-increase", "-50", "--force") == 0
    gate = check_manifest(out, method, model)["gate"]
    assert (gate["passed"], gate["forced"], gate["max_ppl_increase"]) == (False, True, -50)
    assert gate["ppl_increase"] > -50
    from quiver.cli import main

    capsys.readouterr()
    assert main(["serve", "--model", str(out)]) == 1  # refused before loading anything
    error = capsys.readouterr().err
    assert "quality gate failed" in error and "--allow-failed-gate" in error
    assert len(error.strip().splitlines()) == 1, error


def test_cli_writes_an_int8_artifact_with_its_manifest(tiny_model_dir: Path,
                                                       tmp_path: Path) -> None:
    out = tmp_path / "x"
    assert run_cli("int8", tiny_model_dir, out, *TINY_RUN) == 0
    manifest = check_manifest(out, "int8", tiny_model_dir)
    assert manifest["params"]["bits"] == 8 and manifest["params"]["strategy"] == "channel"
    assert manifest["metrics"]["perplexity"] <= manifest["metrics"]["baseline_perplexity"] * 1.01
    assert greedy(out) == greedy(tiny_model_dir)


def test_cli_gate_refuses_a_failing_int8_artifact_unless_forced(
        tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    check_gate("int8", tiny_model_dir, tmp_path, capsys, *TINY_RUN)
