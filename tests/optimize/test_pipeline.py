"""The optimize pipeline with a stand-in method: manifests, the quality gate, atomic output,
text sources, and `quiver optimize eval`. Real methods are tested in their own files."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from common.errors import QuiverError
from optimize.data import load_texts
from optimize.evaluate import EvalResult
from optimize.manifest import Manifest, sha256_of, size_bytes
from optimize.methods.base import BuildContext, BuildResult
from optimize.pipeline import QualityGateError, check_gate, resolve_source, run
from quiver.cli import main


class CopyMethod:
    """Copies the source; `noise` perturbs the embeddings to make the artifact worse."""

    name = "copy"
    summary = "copy"
    default_max_ppl_increase = 1.0

    def __init__(self, noise: float = 0.0, fail: bool = False) -> None:
        self.noise, self.fail = noise, fail

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        pass

    def build(self, context: BuildContext) -> BuildResult:
        for path in context.source.iterdir():
            shutil.copy(path, context.out / path.name)
        if self.fail:
            raise RuntimeError("the method broke half-way")
        if self.noise:
            import torch
            from safetensors.torch import load_file, save_file

            weights = load_file(context.out / "model.safetensors")
            generator = torch.Generator().manual_seed(0)
            for tensor in weights.values():
                if tensor.is_floating_point() and tensor.dim() == 2:
                    tensor += self.noise * torch.randn(tensor.shape, generator=generator)
            save_file(weights, context.out / "model.safetensors", metadata={"format": "pt"})
        return BuildResult(format="safetensors", params={"noise": self.noise})


def args_for(model: Path, out: Path, **overrides) -> argparse.Namespace:
    values = dict(model=model, out=out, eval_data=None, eval_samples=4, eval_max_tokens=128,
                  decode_tokens=4, calib_data=None, calib_samples=4, max_ppl_increase=None,
                  force=False, overwrite=False)
    return argparse.Namespace(**{**values, **overrides})


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".staging-" in p.name]


def test_a_run_writes_a_complete_manifest(tiny_model_dir, tmp_path):
    out = tmp_path / "artifact"
    manifest = run(CopyMethod(), args_for(tiny_model_dir, out))
    written = Manifest.read(out)
    assert written == manifest
    assert written.format == "safetensors" and written.method == "copy"
    assert written.source.path == str(tiny_model_dir)
    assert written.source.sha256 == sha256_of(tiny_model_dir) and len(written.source.sha256) == 64
    metrics = written.metrics
    assert metrics.perplexity == pytest.approx(metrics.baseline_perplexity, rel=1e-6)
    assert metrics.size_bytes == size_bytes(out) > 0
    assert metrics.decode_tokens_per_s > 0 and metrics.eval_tokens > 100
    assert metrics.eval_data == "pydoc_data.topics:evaluation"
    raw = json.loads((out / "manifest.json").read_text())
    assert {"format", "method", "params", "source", "metrics", "created_at",
            "quiver_version"} <= raw.keys()
    assert not leftovers(tmp_path)


def test_the_gate_refuses_a_worse_artifact_and_leaves_nothing(tiny_model_dir, tmp_path):
    out = tmp_path / "bad"
    with pytest.raises(QualityGateError) as exc:
        run(CopyMethod(noise=0.5), args_for(tiny_model_dir, out))
    assert "quality gate failed" in str(exc.value) and "by " in str(exc.value)
    assert not out.exists() and not leftovers(tmp_path)
    forced = run(CopyMethod(noise=0.5), args_for(tiny_model_dir, out, force=True))
    assert forced.metrics.ppl_increase_percent > 1.0 and out.is_dir()


def test_a_failing_method_leaves_nothing(tiny_model_dir, tmp_path):
    out = tmp_path / "broken"
    with pytest.raises(RuntimeError):
        run(CopyMethod(fail=True), args_for(tiny_model_dir, out))
    assert not out.exists() and not leftovers(tmp_path)


def test_existing_output_needs_overwrite(tiny_model_dir, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    with pytest.raises(QuiverError, match="--overwrite"):
        run(CopyMethod(), args_for(tiny_model_dir, out))
    run(CopyMethod(), args_for(tiny_model_dir, out, overwrite=True))
    assert Manifest.read(out) is not None


@pytest.mark.parametrize(("limit", "passes"), [(5.0, True), (1.0, False), (None, True)])
def test_gate_arithmetic(limit, passes):
    base = EvalResult(10.0, 100, 1, None, "native")
    worse = EvalResult(10.3, 100, 1, None, "native")     # +3 %
    if passes:
        check_gate(limit, base, worse, force=False)
    else:
        with pytest.raises(QualityGateError, match=r"\+3\.00 %.*by 2\.00 points"):
            check_gate(limit, base, worse, force=False)


def test_user_text_files(tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text("first passage\nstill first\n\nsecond passage\n")
    assert load_texts(text, "evaluation").texts == ["first passage\nstill first",
                                                    "second passage"]
    jsonl = tmp_path / "calib.jsonl"
    jsonl.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert load_texts(jsonl, "calibration").texts == ["a", "b"]
    jsonl.write_text('{"txt": "a"}\n')
    with pytest.raises(QuiverError, match="no string field `text`"):
        load_texts(jsonl, "calibration")
    assert load_texts(None, "calibration", limit=3).name == "pydoc_data.topics:calibration"


def test_source_must_be_a_model_dir_or_gguf(tmp_path):
    with pytest.raises(QuiverError, match="neither a model dir"):
        resolve_source(tmp_path, tmp_path)


def test_eval_prints_json(tiny_model_dir, capsys):
    assert main(["optimize", "eval", "--model", str(tiny_model_dir), "--eval-samples", "3",
                 "--decode-tokens", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["runtime"] == "native" and result["perplexity"] > 1
    assert result["size_bytes"] == size_bytes(tiny_model_dir)
    assert result["decode_tokens_per_s"] > 0 and result["eval_data"].endswith("evaluation")


def test_unknown_method_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["optimize", "fp2", "--model", "x", "--out", "y"])
    assert exc.value.code == 2
