"""One optimization run, end to end, leaving either a complete artifact or nothing.

source (HF dir, or a GGUF file converted first) -> baseline measured on held-out text ->
the method builds into a staging dir next to `--out` -> the artifact is measured the same
way -> the quality gate (`--max-ppl-increase`, default per method) -> `manifest.json` ->
the staging dir is renamed to `--out`. Any failure (or Ctrl-C) removes the staging dir.
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
from optimize.manifest import Gate, Manifest, Metrics, Source, sha256_of
from optimize.methods.base import BuildContext, BuildResult, Method

logger = logging.getLogger(__name__)


class QualityGateError(QuiverError):
    """The artifact is worse than the gate allows; nothing was written."""

    exit_code = 4


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


def check_gate(limit: float | None, baseline: EvalResult, measured: EvalResult,
               *, force: bool) -> Gate:
    """The gate's verdict; `QualityGateError` when it failed and `force` is off."""
    increase = (measured.perplexity / baseline.perplexity - 1.0) * 100.0
    if limit is None or increase <= limit:
        return Gate(max_ppl_increase=limit, ppl_increase=round(increase, 4), passed=True)
    message = (f"quality gate failed: perplexity {measured.perplexity:.4f} is "
               f"{increase:+.2f} % over the baseline {baseline.perplexity:.4f}, beyond the "
               f"allowed {limit:+.2f} % (by {increase - limit:.2f} points)")
    if force:
        logger.warning("%s; writing it anyway (--force): `quiver serve` will refuse it "
                       "without --allow-failed-gate", message)
        return Gate(max_ppl_increase=limit, ppl_increase=round(increase, 4), passed=False,
                    forced=True)
    raise QualityGateError(message + "; nothing written (--force writes it anyway, "
                           "--max-ppl-increase changes the limit)")


def measure(model_dir: Path, texts: TextSet, args: argparse.Namespace) -> EvalResult:
    return evaluate(model_dir, texts, max_tokens=args.eval_max_tokens,
                    decode_tokens=args.decode_tokens or None)


def manifest_for(method: Method, args: argparse.Namespace, result: BuildResult,
                 baseline: EvalResult, measured: EvalResult, eval_name: str,
                 gate: Gate) -> Manifest:
    metrics = Metrics(
        perplexity=measured.perplexity, baseline_perplexity=baseline.perplexity,
        size_bytes=measured.size_bytes, baseline_size_bytes=baseline.size_bytes,
        decode_tokens_per_s=measured.decode_tokens_per_s,
        baseline_decode_tokens_per_s=baseline.decode_tokens_per_s,
        eval_data=eval_name, eval_tokens=measured.eval_tokens, **(result.metrics or {}))
    return Manifest(format=result.format, method=method.name, params=result.params,
                    source=Source(path=str(args.model), sha256=sha256_of(args.model)),
                    metrics=metrics, gate=gate)


def run(method: Method, args: argparse.Namespace) -> Manifest:
    check_host = getattr(method, "check_host", None)  # optional: see methods/base.py
    if check_host is not None:
        check_host(args)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise QuiverError(f"--out {out} exists; remove it or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        with tempfile.TemporaryDirectory(prefix="quiver-optimize-") as work:
            manifest = build_and_measure(method, args, staging, Path(work))
        manifest.write(staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("wrote %s (%s, %s): perplexity %.4f vs %.4f", out, manifest.format,
                manifest.method, manifest.metrics.perplexity or 0,
                manifest.metrics.baseline_perplexity or 0)
    return manifest


def build_and_measure(method: Method, args: argparse.Namespace, staging: Path,
                      work: Path) -> Manifest:
    source = resolve_source(args.model, work)
    evaluation = load_texts(args.eval_data, "evaluation", limit=args.eval_samples)
    calibration = load_texts(args.calib_data, "calibration", limit=args.calib_samples)
    logger.info("measuring the baseline %s on %s", source, evaluation.name)
    baseline = measure(source, evaluation, args)
    result = method.build(BuildContext(source=source, out=staging, calibration=calibration,
                                       args=args, work_dir=work))
    logger.info("measuring the %s artifact", method.name)
    measured = measure(result.eval_dir or staging, evaluation, args)
    limit = (args.max_ppl_increase if args.max_ppl_increase is not None
             else method.default_max_ppl_increase)
    gate = check_gate(limit, baseline, measured, force=args.force)
    return manifest_for(method, args, result, baseline, measured, evaluation.name, gate)
