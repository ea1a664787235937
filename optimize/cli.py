"""`quiver optimize {int8,awq,onnx,tensorrt,distill,eval} --model SRC --out DIR ...`.

Every method measures the source and the artifact on held-out text (perplexity, size,
decode speed, and a task score: exact match on deterministic question sets and greedy
agreement with the source) and writes `manifest.json`; a quality gate
(`--max-ppl-increase`, a default per method; `--max-task-score-drop` and
`--min-greedy-agreement`, off by default) refuses an artifact that fails it unless
`--force`. `eval` prints the same measurements as JSON (against `--reference` if given).
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

from optimize.methods import METHODS

EXIT_GATE = 4


def _method(name: str):
    return importlib.import_module(METHODS[name]).METHOD


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True,
                        help="source: an HF safetensors dir, a .gguf file, or an artifact")
    parser.add_argument("--eval-data", type=Path, default=None,
                        help="evaluation text (.txt: passages split by blank lines; .jsonl: "
                             "`text` fields); default: held-out pydoc_data.topics passages")
    parser.add_argument("--eval-samples", type=int, default=40,
                        help="evaluation passages used (default 40)")
    parser.add_argument("--eval-max-tokens", type=int, default=512,
                        help="tokens scored per passage (default 512)")
    parser.add_argument("--decode-tokens", type=int, default=64,
                        help="tokens decoded to measure speed; 0 skips it (default 64)")
    parser.add_argument("--no-tasks", dest="tasks", action="store_false",
                        help="skip the task score (exact match on held-out question sets "
                             "and greedy agreement with the source)")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    summary = "quantize, export or distill a checkpoint into a servable artifact"
    parser = subparsers.add_parser("optimize", help=summary, description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    methods = parser.add_subparsers(dest="method", metavar="METHOD", required=True)
    for name in METHODS:
        method = _method(name)
        sub = methods.add_parser(name, help=method.summary, description=method.summary)
        add_common(sub)
        sub.add_argument("--out", type=Path, required=True, help="artifact dir to write")
        sub.add_argument("--calib-data", type=Path, default=None,
                         help="calibration text (.txt or .jsonl); default: the calibration "
                              "part of pydoc_data.topics")
        sub.add_argument("--calib-samples", type=int, default=128,
                         help="calibration passages used (default 128)")
        default = method.default_max_ppl_increase
        sub.add_argument("--max-ppl-increase", type=float, default=None,
                         help="quality gate: largest perplexity increase allowed, percent "
                              f"(default {default if default is not None else 'none'})")
        sub.add_argument("--max-task-score-drop", type=float, default=None, metavar="POINTS",
                         help="quality gate: largest drop of the exact-match task score "
                              "below the source's, points out of 100 (default none)")
        sub.add_argument("--min-greedy-agreement", type=float, default=None,
                         metavar="POINTS",
                         help="quality gate: least share of the source's greedy tokens the "
                              "artifact reproduces, points out of 100 (default none)")
        sub.add_argument("--force", action="store_true",
                         help="write the artifact even when it fails the quality gate")
        sub.add_argument("--overwrite", action="store_true", help="replace an existing --out")
        method.add_arguments(sub)
        sub.set_defaults(func=run_method, method_name=name)
    evaluate = methods.add_parser(
        "eval", help="perplexity, decode tokens/s, size and task score as JSON")
    add_common(evaluate)
    evaluate.add_argument("--reference", type=Path, default=None,
                          help="the model the measured one came from: its perplexity and "
                               "task score are measured too, and the greedy agreement "
                               "between them")
    evaluate.set_defaults(func=run_eval)


def run_method(args: argparse.Namespace) -> int:
    from optimize.pipeline import run

    manifest = run(_method(args.method_name), args)
    print(manifest.model_dump_json(indent=2))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    import tempfile

    from optimize.data import load_texts
    from optimize.evaluate import evaluate
    from optimize.pipeline import compare_tasks, measure, resolve_source, task_suite

    with tempfile.TemporaryDirectory(prefix="quiver-eval-") as work:
        model = resolve_source(args.model, Path(work) / "model")
        reference = (None if args.reference is None
                     else resolve_source(args.reference, Path(work) / "reference"))
        texts = load_texts(args.eval_data, "evaluation", limit=args.eval_samples)
        suite = task_suite(reference or model, args)
        result = measure(model, texts, args, suite)
        report = {**result.to_dict(), "model": str(args.model), "eval_data": texts.name}
        baseline = None
        if reference is not None:  # its speed is not compared: not measured
            baseline = evaluate(reference, texts, max_tokens=args.eval_max_tokens,
                                decode_tokens=None, suite=suite)
            report.update(reference=str(args.reference),
                          baseline_perplexity=baseline.perplexity)
    tasks = compare_tasks(suite, result, baseline)
    if tasks is not None:
        report.update(tasks.metrics())
    print(json.dumps(report, indent=2))
    return 0
