"""The `quiver` console script: one entry point that dispatches to each stage's CLI.

Each subcommand module exposes `add_parser(subparsers)`, which registers its parser and sets
`func` on it. Heavy imports (torch, transformers, FastAPI) happen inside the handlers, so
`quiver --help` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from common.errors import QuiverError
from gateway import cli as gateway_cli
from gateway import keys_cli
from loadtests import cli as loadtest_cli
from optimize import cli as optimize_cli
from quiver import __version__, bench, promote, up
from quiver.models import cli as models_cli
from serving import cli as serve_cli

logger = logging.getLogger(__name__)

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quiver",
        description="Quiver: optimize a checkpoint, serve it, and front it with a gateway.",
    )
    parser.add_argument("--version", action="version", version=f"quiver {__version__}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("QUIVER_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level (env QUIVER_LOG_LEVEL; default INFO)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    models_cli.add_parser(subparsers)
    bench.add_parser(subparsers)
    serve_cli.add_parser(subparsers)
    up.add_parser(subparsers)
    promote.add_parser(subparsers)
    gateway_cli.add_parser(subparsers)
    keys_cli.add_parser(subparsers)
    optimize_cli.add_parser(subparsers)
    loadtest_cli.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except QuiverError as exc:
        print(f"quiver {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"quiver {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
