"""One optimization run, end to end, leaving either a complete artifact or nothing.

source (HF dir, or a GGUF file converted first) -> baseline measured on held-out text ->
the method builds into a staging dir next to `--out` -> the artifact is measured the same
way -> the quality gate (`--max-ppl-increase`, default per method) -> `manifest.json` ->
the staging dir is renamed to `--out`. Any failure (or Ctrl-C) removes the staging dir.

Both measurements include the task score (`optimize.tasks`, unless `--no-tasks`) on one
suite built from the source's tokenizer; it is recorded, logged next to the perplexity,
and gated when `--max-task-score-drop` or `--min-greedy-agreement` is given
(`optimize.gate`).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import uuid
from pathlib import Path

from common.errors import QuiverError
from optimize.data import TextSet, load_texts
from optimize.evaluate import EvalResult, evaluate
from optimize.gate import GateLimits, check_gate
from optimize.manifest import Gate, Manifest, Metrics, Source, sha256_of
from optimize.methods.base import BuildContext, BuildResult, Method
from optimize.tasks import TaskComparison, TaskSuite, build_suite

logger = logging.getLogger(__name__)


def resolve_source(model: Path, work_dir: Path) -> Path:
    """An HF (or ONNX artifact) dir as it is; a `.gguf` file converted to HF in `work_dir`."""
    model = Path(model)
    if model.is_file() and model.suffix == ".gguf":
        from optimize.gguf import convert_gguf

        logger.info("converting %s to safetensors", model)
        target = work_dir / "source"
        convert_gguf(model, target)
        return target
    if not model.is_dir() or not ((model / "config.json").is_file()
                                  or (model / "genai_config.json").is_file()):
        raise QuiverError(f"--model {model} is neither a model dir (config.json) nor a "
                          ".gguf file")
    return model


def measure(model_dir: Path, texts: TextSet, args: argparse.Namespace,
            suite: TaskSuite | None = None) -> EvalResult:
    return evaluate(model_dir, texts, max_tokens=args.eval_max_tokens,
                    decode_tokens=args.decode_tokens or None, suite=suite)


def task_suite(tokenizer_dir: Path, args: argparse.Namespace) -> TaskSuite | None:
    """The suite over every held-out passage (not only `--eval-samples` of them), or None
    under `--no-tasks`."""
    if not args.tasks:
        return None
    return build_suite(tokenizer_dir, load_texts(args.eval_data, "evaluation").texts)


def compare_tasks(suite: TaskSuite | None, measured: EvalResult,
                  baseline: EvalResult | None = None) -> TaskComparison | None:
    """`measured`'s task score, against `baseline`'s (its source) when there is one."""
    if suite is None or measured.tasks is None:
        return None
    return TaskComparison.of(suite, measured.tasks,
                             baseline.tasks if baseline is not None else None)


def manifest_for(method: Method, args: argparse.Namespace, result: BuildResult,
                 baseline: EvalResult, measured: EvalResult, eval_name: str,
                 gate: Gate, tasks: TaskComparison | None = None) -> Manifest:
    metrics = Metrics(
        perplexity=measured.perplexity, baseline_perplexity=baseline.perplexity,
        size_bytes=measured.size_bytes, baseline_size_bytes=baseline.size_bytes,
        decode_tokens_per_s=measured.decode_tokens_per_s,
        baseline_decode_tokens_per_s=baseline.decode_tokens_per_s,
        eval_data=eval_name, eval_tokens=measured.eval_tokens,
        **(tasks.metrics() if tasks is not None else {}), **(result.metrics or {}))
    return Manifest(format=result.format, method=method.name, params=result.params,
                    source=Source(path=str(args.model), sha256=sha256_of(args.model)),
                    metrics=metrics, gate=gate)


def run(method: Method, args: argparse.Namespace) -> Manifest:
    check_host = getattr(method, "check_host", None)  # optional: see methods/base.py
    if check_host is not None:
        check_host(args)
    limits = GateLimits.from_args(args, method.default_max_ppl_increase)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise QuiverError(f"--out {out} exists; remove it or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        with tempfile.TemporaryDirectory(prefix="quiver-optimize-") as work:
            manifest = build_and_measure(method, args, limits, staging, Path(work))
        manifest.write(staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    metrics = manifest.metrics
    logger.info("wrote %s (%s, %s): perplexity %.4f vs %.4f%s", out, manifest.format,
                manifest.method, metrics.perplexity or 0, metrics.baseline_perplexity or 0,
                "" if metrics.task_score is None or metrics.baseline_task_score is None else
                f"; task score {metrics.task_score:.1f} vs {metrics.baseline_task_score:.1f}")
    return manifest


def build_and_measure(method: Method, args: argparse.Namespace, limits: GateLimits,
                      staging: Path, work: Path) -> Manifest:
    source = resolve_source(args.model, work)
    evaluation = load_texts(args.eval_data, "evaluation", limit=args.eval_samples)
    calibration = load_texts(args.calib_data, "calibration", limit=args.calib_samples)
    suite = task_suite(source, args)
    logger.info("measuring the baseline %s on %s", source, evaluation.name)
    baseline = measure(source, evaluation, args, suite)
    result = method.build(BuildContext(source=source, out=staging, calibration=calibration,
                                       args=args, work_dir=work))
    logger.info("measuring the %s artifact", method.name)
    measured = measure(result.eval_dir or staging, evaluation, args, suite)
    tasks = compare_tasks(suite, measured, baseline)
    log_quality(limits, baseline, measured, tasks)
    gate = check_gate(limits, baseline, measured, tasks, force=args.force)
    return manifest_for(method, args, result, baseline, measured, evaluation.name, gate,
                        tasks)


def log_quality(limits: GateLimits, baseline: EvalResult, measured: EvalResult,
                tasks: TaskComparison | None) -> None:
    """The gate's inputs, each with its limit."""
    increase = (measured.perplexity / baseline.perplexity - 1.0) * 100.0
    limit = limits.max_ppl_increase
    logger.info("quality: perplexity %.4f vs %.4f (%+.2f %%, limit %s)%s",
                measured.perplexity, baseline.perplexity, increase,
                "none" if limit is None else f"{limit:+.2f} %",
                "" if tasks is None else "; " + tasks.describe())
    if limits.needs_tasks:
        logger.info("task limits: score drop at most %s points, greedy agreement at least "
                    "%s %%", limits.max_task_score_drop, limits.min_greedy_agreement)
