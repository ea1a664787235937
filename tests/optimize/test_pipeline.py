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
from optimize.gate import GateLimits, QualityGateError, check_gate
from optimize.manifest import Manifest, sha256_of, size_bytes
from optimize.methods.base import BuildContext, BuildResult
from optimize.pipeline import resolve_source, run
from optimize.tasks import TaskComparison
from quiver.cli import main
from tests.optimize.test_tasks import add_noise, noisy_copy


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
            add_noise(context.out / "model.safetensors", self.noise)
        return BuildResult(format="safetensors", params={"noise": self.noise})


def args_for(model: Path, out: Path, **overrides) -> argparse.Namespace:
    values = dict(model=model, out=out, eval_data=None, eval_samples=4, eval_max_tokens=128,
                  decode_tokens=4, calib_data=None, calib_samples=4, max_ppl_increase=None,
                  force=False, overwrite=False, tasks=True, max_task_score_drop=None,
                  min_greedy_agreement=None)
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
    # a copy answers as its source: every greedy token, every item
    assert metrics.greedy_agreement == 100.0
    assert metrics.task_score == metrics.baseline_task_score is not None
    assert metrics.task_scores == metrics.baseline_task_scores
    assert set(metrics.task_scores) == {"cloze", "arithmetic", "sequence"}
    assert metrics.task_items == 64 and metrics.task_suite == "quiver-tasks-1"
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
    assert forced.metrics.greedy_agreement < 50.0     # recorded; no task limit was given
    assert forced.gate.greedy_agreement == forced.metrics.greedy_agreement
    assert forced.gate.min_greedy_agreement is None
    assert forced.gate.passed is False and forced.gate.forced is True


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
    run(CopyMethod(), args_for(tiny_model_dir, out, overwrite=True, tasks=False))
    metrics = Manifest.read(out).metrics          # --no-tasks: the fields say "not measured"
    assert metrics.perplexity > 1 and metrics.task_score is None
    assert metrics.greedy_agreement is None and metrics.task_items is None


@pytest.mark.parametrize(("limit", "passes"), [(5.0, True), (1.0, False), (None, True)])
def test_gate_arithmetic(limit, passes):
    base = EvalResult(10.0, 100, 1, None, "native")
    worse = EvalResult(10.3, 100, 1, None, "native")     # +3 %
    limits = GateLimits(max_ppl_increase=limit)
    if passes:
        assert check_gate(limits, base, worse, force=False).passed
    else:
        with pytest.raises(QualityGateError, match=r"\+3\.00 %.*by 2\.00 points"):
            check_gate(limits, base, worse, force=False)


def compared(score: float, baseline: float, agreement: float) -> TaskComparison:
    return TaskComparison("quiver-tasks-1", 64, score, {}, baseline, {}, agreement)


@pytest.mark.parametrize(("drop_limit", "floor", "missed"), [
    (10.0, 80.0, None),
    (None, None, None),                 # recorded, not gated
    (5.0, None, r"task score 50\.00 is 9\.38 points below the baseline 59\.38, beyond "
                r"the allowed 5\.00 points \(by 4\.38 points\)"),
    (None, 90.0, r"greedy agreement 87\.50 % is below the required 90\.00 % "
                 r"\(by 2\.50 points\)"),
])
def test_task_gate_arithmetic(drop_limit, floor, missed):
    same = EvalResult(10.0, 100, 1, None, "native")
    tasks = compared(50.0, 59.38, 87.5)
    limits = GateLimits(max_ppl_increase=1.0, max_task_score_drop=drop_limit,
                        min_greedy_agreement=floor)
    if missed is None:
        gate = check_gate(limits, same, same, tasks, force=False)
        assert gate.passed and not gate.forced
    else:
        with pytest.raises(QualityGateError, match=missed) as exc:
            check_gate(limits, same, same, tasks, force=False)
        assert "perplexity" not in str(exc.value)      # that limit held
        gate = check_gate(limits, same, same, tasks, force=True)
        assert (gate.passed, gate.forced) == (False, True)
    assert (gate.task_score_drop, gate.greedy_agreement) == (9.38, 87.5)
    assert (gate.max_task_score_drop, gate.min_greedy_agreement) == (drop_limit, floor)
    assert gate.ppl_increase == 0.0


def test_a_better_task_score_is_a_negative_drop():
    same = EvalResult(10.0, 100, 1, None, "native")
    gate = check_gate(GateLimits(max_task_score_drop=0.0), same, same,
                      compared(62.5, 60.94, 100.0), force=False)
    assert gate.passed and gate.task_score_drop == -1.56


def test_task_limits_need_the_task_score(tiny_model_dir, tmp_path):
    args = args_for(tiny_model_dir, tmp_path / "x", tasks=False, max_task_score_drop=1.0)
    with pytest.raises(QuiverError, match="--no-tasks"):
        run(CopyMethod(), args)
    assert not leftovers(tmp_path) and not (tmp_path / "x").exists()
    same = EvalResult(10.0, 100, 1, None, "native")
    with pytest.raises(QuiverError, match="not measured"):
        check_gate(GateLimits(min_greedy_agreement=50.0), same, same, None, force=False)


def test_cli_refuses_task_limits_without_the_task_score(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "x"
    assert main(["optimize", "int8", "--model", str(tiny_model_dir), "--out", str(out),
                 "--no-tasks", "--min-greedy-agreement", "95"]) == 1
    assert "--no-tasks" in capsys.readouterr().err and not out.exists()


def test_the_task_gate_refuses_an_artifact_that_answers_differently(tiny_model_dir,
                                                                    tmp_path):
    """Perplexity allowed anything here: the greedy agreement alone refuses the copy with
    noise, and a plain copy passes the strictest task limits."""
    out = tmp_path / "noisy"
    strict = dict(max_ppl_increase=1000.0, min_greedy_agreement=90.0,
                  max_task_score_drop=0.0)
    with pytest.raises(QualityGateError, match="greedy agreement") as exc:
        run(CopyMethod(noise=0.05), args_for(tiny_model_dir, out, **strict))
    assert "perplexity" not in str(exc.value)
    assert not out.exists() and not leftovers(tmp_path)
    strict["min_greedy_agreement"] = 100.0
    copy = run(CopyMethod(), args_for(tiny_model_dir, out, **strict))
    assert copy.gate.passed and copy.gate.greedy_agreement == 100.0
    assert copy.gate.task_score_drop == 0.0 and copy.gate.max_task_score_drop == 0.0


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
    assert result["task_items"] == 64 and 0 <= result["task_score"] <= 100
    assert result["greedy_agreement"] is None and result["baseline_task_score"] is None


def test_eval_against_a_reference_compares_answers(tiny_model_dir, tmp_path, capsys):
    noisy = noisy_copy(tiny_model_dir, tmp_path / "noisy", 0.05)
    for model, agreement in ((tiny_model_dir, 100.0), (noisy, None)):
        assert main(["optimize", "eval", "--model", str(model), "--reference",
                     str(tiny_model_dir), "--eval-samples", "2", "--decode-tokens", "0"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["reference"] == str(tiny_model_dir)
        assert result["baseline_perplexity"] > 1 and result["decode_tokens_per_s"] is None
        assert result["task_items"] == 64 and result["baseline_task_score"] is not None
        if agreement is not None:
            assert result["greedy_agreement"] == agreement
            assert result["perplexity"] == pytest.approx(result["baseline_perplexity"])
        else:
            assert result["greedy_agreement"] < 50.0
            assert result["perplexity"] > result["baseline_perplexity"]


def test_unknown_method_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["optimize", "fp2", "--model", "x", "--out", "y"])
    assert exc.value.code == 2
