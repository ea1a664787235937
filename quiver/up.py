"""`quiver up`: the local stack on 127.0.0.1, in this process.

For now that is the model server on :8001 (the gateway on :8000 lands with issue #5);
`up` prints how to call it with curl and the OpenAI SDK, then serves until Ctrl-C.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from quiver.errors import NotYetAvailableError

DEFAULT_MODEL = Path("models/smollm2-135m-instruct")
DEFAULT_PORT = 8001


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    summary = "start model server(s) and gateway locally"
    parser = subparsers.add_parser("up", help=summary, description=__doc__)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help=f"model dir (default {DEFAULT_MODEL})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"model server port (default {DEFAULT_PORT})")
    parser.add_argument("--canary-model", type=Path, default=None,
                        help="a second model served as canary (needs the gateway, issue #5)")
    parser.add_argument("--canary-weight", type=float, default=None,
                        help="percent of traffic to the canary (needs the gateway, issue #5)")
    parser.set_defaults(func=run)


def banner(name: str, port: int) -> str:
    base = f"http://127.0.0.1:{port}"
    return "\n".join([
        f"quiver up: model server for {name!r} on {base} (OpenAI API at {base}/v1).",
        "The gateway on :8000 lands with issue #5; until then call the model server itself:",
        f"  curl {base}/v1/chat/completions -H 'content-type: application/json' \\",
        f"    -d '{{\"model\": \"{name}\", \"messages\": [{{\"role\": \"user\", "
        "\"content\": \"What is the capital of France?\"}]}'",
        f"  python -c \"from openai import OpenAI; c = OpenAI(base_url='{base}/v1', "
        f"api_key='unused'); print(c.chat.completions.create(model='{name}', "
        "messages=[{'role': 'user', 'content': 'Hi'}]).choices[0].message.content)\"",
        "Ctrl-C stops it.",
    ])


def run(args: argparse.Namespace) -> int:
    from serving.cli import serve, settings_from_args

    if args.canary_model is not None or args.canary_weight is not None:
        raise NotYetAvailableError("`quiver up --canary-model` is not yet available: it lands "
                                   "with the gateway issue (#5).")
    settings = settings_from_args(argparse.Namespace(), model=args.model, port=args.port,
                                  host="127.0.0.1")
    serve(settings, banner=banner(settings.name, settings.port))
    return 0
