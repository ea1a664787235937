"""`quiver bench NAME [ARGS...]`: run a benchmark from the checkout's `benchmarks/` dir.

Benchmarks live beside the packages, not inside them (they compare against engines that are
not Quiver dependencies, such as vLLM in its own venv), so this needs a source checkout.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from common.errors import QuiverError

BENCHMARKS_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
BENCHMARKS = {"engine": "native engine vs vLLM vs Hugging Face generate (tokens/s, TTFT, ITL)",
              "gateway": "gateway added latency (p50/p99, TTFT), cache hits, requests/s",
              "prefix_balance": "prefix-aware vs least-outstanding balancing over 2 replicas: "
                                "follow-up turns' prefix-cache hit share, load share, TTFT",
              "route_state": "two gateways sharing route state in Redis: how soon one obeys "
                             "the other's weight change and rollback",
              "fairness": "a quiet tenant's TTFT alone and next to a tenant at 10x its rate, "
                          "admission off vs fair, over 2 SmolLM2 replicas",
              "optimize": "quiver optimize methods vs fp32/bf16: perplexity, size, decode "
                          "tokens/s at batch 1 and 32"}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench", help="run a benchmark (ratios against baselines in the same run)",
        description="Run a benchmark from benchmarks/. Extra arguments go to the benchmark "
        "(`quiver bench engine --help`).",
    )
    parser.add_argument("name", choices=sorted(BENCHMARKS),
                        help="; ".join(f"{k}: {v}" for k, v in BENCHMARKS.items()))
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, metavar="ARGS",
                        help="arguments for the benchmark itself")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    script = BENCHMARKS_DIR / f"{args.name}.py"
    if not script.is_file():
        raise QuiverError(f"{script} not found: benchmarks run from a source checkout of Quiver")
    return subprocess.call([sys.executable, str(script), *args.bench_args])
