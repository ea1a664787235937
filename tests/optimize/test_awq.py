"""`quiver optimize awq`: AWQ W4A16 (asymmetric, grouped) compressed-tensors artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.errors import QuiverError
from optimize.methods.awq import fit_group_size
from tests.optimize.test_int8 import TINY_RUN, check_gate, check_manifest, greedy, run_cli, tensors


@pytest.fixture(scope="module")
def tiny_awq(tiny_model_dir: Path, tmp_path_factory) -> tuple[Path, object]:
    from optimize.data import load_texts
    from optimize.methods.awq import METHOD
    from optimize.methods.base import BuildContext
    from quiver.cli import build_parser

    out = tmp_path_factory.mktemp("awq") / "artifact"
    out.mkdir()
    args = build_parser().parse_args(["optimize", "awq", "--model", str(tiny_model_dir),
                                      "--out", str(out), "--group-size", "16",
                                      "--calib-max-tokens", "128"])
    context = BuildContext(source=tiny_model_dir, out=out, args=args, work_dir=out.parent,
                           calibration=load_texts(None, "calibration", limit=8))
    return out, METHOD.build(context)


def test_build_writes_grouped_int4_compressed_tensors(tiny_awq) -> None:
    out, result = tiny_awq
    assert result.format == "compressed-tensors"
    params = result.params
    assert (params["bits"], params["group_size"], params["symmetric"]) == (4, 16, False)
    assert params["num_calibration_samples"] == 8
    assert 8 < params["num_calibration_tokens"] <= 8 * 128
    smooth_layers = {m["smooth_layer"]: m for m in params["mappings"]}
    assert smooth_layers["re:.*input_layernorm$"]["num_applied"] == 2     # both layers
    assert smooth_layers["re:.*v_proj$"]["num_applied"] == 0              # GQA: shapes differ
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["ignore"] == ["lm_head"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["strategy"], weights["group_size"],
            weights["symmetric"]) == (4, "group", 16, False)
    saved = tensors(out)
    down_proj = "model.layers.0.mlp.down_proj"                   # K = 176 = 11 groups of 16
    assert saved[f"{down_proj}.weight_packed"].shape == (64, 176 // 8)
    assert saved[f"{down_proj}.weight_scale"].shape == (64, 11)
    assert saved[f"{down_proj}.weight_zero_point"].shape == (64 // 8, 11)


def test_artifact_reloads_in_transformers_close_to_the_source(
        tiny_awq, tiny_model_dir: Path) -> None:
    # The tiny model is random (perplexity ~2,800, near-flat logits), so 4-bit noise flips
    # many argmaxes: compare next-token predictions over a passage, not one greedy path.
    from transformers import AutoConfig

    out, _ = tiny_awq
    assert AutoConfig.from_pretrained(out).quantization_config["quant_method"] == \
        "compressed-tensors"
    assert len(greedy(out, tokens=8)) == 8
    agreement, ppl_ratio = compare_logits(tiny_model_dir, out)
    assert agreement >= 0.45
    assert 0.95 <= ppl_ratio <= 1.10


def compare_logits(source: Path, artifact: Path) -> tuple[float, float]:
    """(top-1 agreement, perplexity ratio) of `artifact` against `source` on held-out text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimize.data import load_texts

    text = load_texts(None, "evaluation", limit=1).texts[0]
    ids = AutoTokenizer.from_pretrained(source)(text, return_tensors="pt")["input_ids"][:, :256]
    logits = []
    for model_dir in (source, artifact):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        with torch.inference_mode():
            logits.append(model(ids).logits[0, :-1])
    agreement = (logits[0].argmax(-1) == logits[1].argmax(-1)).float().mean().item()
    nll = [torch.nn.functional.cross_entropy(x, ids[0, 1:]) for x in logits]
    return agreement, torch.exp(nll[1] - nll[0]).item()


def test_group_size_falls_back_to_one_that_divides_every_input_size() -> None:
    smollm2 = {"q_proj": 576, "down_proj": 1536}
    assert fit_group_size(128, smollm2) == 64
    assert fit_group_size(32, smollm2) == 32
    assert fit_group_size(16, {"a": 64, "b": 176}) == 16


def test_group_size_that_cannot_fit_is_refused() -> None:
    with pytest.raises(QuiverError, match="does not divide every Linear input size"):
        fit_group_size(128, {"a": 64, "b": 176})
    with pytest.raises(QuiverError, match="must be positive"):
        fit_group_size(0, {"a": 64})


# --- end to end: `quiver optimize awq` (baseline and artifact measured by the native engine)

AWQ_TINY_RUN = ("--decode-tokens", "8", "--eval-samples", "5", "--calib-samples", "4",
                "--group-size", "16", "--calib-max-tokens", "64")


def test_cli_writes_an_awq_artifact_with_its_manifest(tiny_model_dir: Path,
                                                      tmp_path: Path) -> None:
    out = tmp_path / "x"
    assert run_cli("awq", tiny_model_dir, out, *AWQ_TINY_RUN) == 0
    manifest = check_manifest(out, "awq", tiny_model_dir)
    assert manifest["params"]["group_size"] == 16
    assert manifest["params"]["num_calibration_samples"] == 4
    assert manifest["metrics"]["perplexity"] <= manifest["metrics"]["baseline_perplexity"] * 1.08
    assert compare_logits(tiny_model_dir, out)[0] >= 0.45


def test_cli_gate_refuses_a_failing_awq_artifact_unless_forced(
        tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    check_gate("awq", tiny_model_dir, tmp_path, capsys, *AWQ_TINY_RUN)


def test_cli_refuses_a_group_size_that_fits_no_layer(tiny_model_dir: Path, tmp_path: Path,
                                                     capsys) -> None:
    # tiny-llama's K = 64 and 176: neither 128 nor a fallback (64, 32) divides 176.
    assert run_cli("awq", tiny_model_dir, tmp_path / "x", *TINY_RUN) == 1
    assert "--group-size 128 does not divide every Linear input size [64, 176]" in \
        capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
