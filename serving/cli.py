"""`quiver serve --model DIR ...`: the model server (OpenAI + KServe v2 + /metrics).

Every flag is one `ServerSettings` field (`--max-num-seqs` is `max_num_seqs`); a flag left
out falls back to its `QUIVER_SERVER_*` environment variable, then to the default.
Shutdown (SIGTERM / Ctrl-C) is graceful: `/ready` turns 503 at once, the listening socket
closes, in-flight requests get `shutdown_grace_seconds` to finish, then the engine stops.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
import types
from typing import Any, Literal, Union, get_args, get_origin

from common.errors import QuiverError

logger = logging.getLogger(__name__)


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object ({...})")
    return value


def _flag_kwargs(annotation: Any, description: str | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"default": None, "help": description}
    if get_origin(annotation) in (Union, types.UnionType):
        annotation = next(arg for arg in get_args(annotation) if arg is not type(None))
    if annotation is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif get_origin(annotation) is Literal:
        kwargs["choices"] = list(get_args(annotation))
    elif annotation in (int, float):
        kwargs["type"] = annotation
    elif get_origin(annotation) is dict:
        kwargs["type"] = _json_object
    return kwargs


def add_settings_flags(parser: argparse.ArgumentParser, *, skip: tuple[str, ...] = ()) -> None:
    """One `--flag` per `ServerSettings` field, defaulting to None (= env, then default)."""
    from serving.settings import ServerSettings

    for name, field in ServerSettings.model_fields.items():
        if name in skip:
            continue
        kwargs = _flag_kwargs(field.annotation, field.description)
        if kwargs["help"] is None:
            kwargs["help"] = f"(env QUIVER_SERVER_{name.upper()})"
        else:
            kwargs["help"] += f" (env QUIVER_SERVER_{name.upper()})"
        parser.add_argument("--" + name.replace("_", "-"), dest=name, **kwargs)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    summary = "run the OpenAI-compatible model server"
    parser = subparsers.add_parser("serve", help=summary, description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings_flags(parser)
    parser.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace, **overrides: Any):
    from pydantic import ValidationError

    from serving.settings import ServerSettings

    values = {name: getattr(args, name) for name in ServerSettings.model_fields
              if getattr(args, name, None) is not None}
    values.update(overrides)
    try:
        return ServerSettings(**values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}"
                             for e in exc.errors())
        raise QuiverError(f"invalid server settings: {problems}") from exc


def run(args: argparse.Namespace) -> int:
    serve(settings_from_args(args))
    return 0


def serve(settings, *, banner: str | None = None) -> None:
    """Build the engine and the app, serve until a signal, drain, stop the engine."""
    asyncio.run(_serve(settings, banner))


def load_tokenizer(settings):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(settings.model)
    except (OSError, ValueError) as exc:
        raise QuiverError(f"cannot load the tokenizer of {settings.model}: {exc}") from exc


async def _serve(settings, banner: str | None) -> None:
    from common.logging_setup import configure_logging
    from common.telemetry import configure_tracing, shutdown_tracing

    configure_logging(json_lines=settings.log_json)
    tracer_provider = configure_tracing("quiver-server")
    try:
        await _serve_engine(settings, banner)
    finally:
        shutdown_tracing(tracer_provider)


async def _serve_engine(settings, banner: str | None) -> None:
    from prometheus_client import CollectorRegistry

    from common.build_info import register_build_info
    from common.http_limits import HttpLimits
    from common.server import make_draining_server, server_config
    from serving.api.app import create_app
    from serving.api.info_metrics import register_model_load_time
    from serving.artifact import ArtifactSummary
    from serving.backends.factory import create_engine_client

    ArtifactSummary.read(settings.model).check_gate(
        settings.model, allow_failed=settings.allow_failed_gate)
    registry = CollectorRegistry()
    started = time.perf_counter()
    tokenizer = load_tokenizer(settings)
    try:
        engine = create_engine_client(settings, registry)
    except (RuntimeError, ValueError) as exc:
        raise QuiverError(f"cannot start the {settings.resolved_engine()} engine: {exc}") from exc
    register_model_load_time(registry, model=settings.name,
                             seconds=time.perf_counter() - started)
    register_build_info(registry, component="server", engine=engine.info.engine,
                        model=settings.name)
    try:
        app = create_app(settings, engine, tokenizer, registry)
        config = server_config(app, host=settings.host, port=settings.port,
                               limits=HttpLimits.of(settings), lifespan="off",
                               log_level="info", grace_s=settings.shutdown_grace_seconds)
        server = make_draining_server(config, state=app.state.server)
        logger.info("serving %s (%s engine) on http://%s:%d: OpenAI API at /v1",
                    settings.name, engine.info.engine, settings.host, settings.port)
        if banner:
            print(banner, flush=True)
        await server.serve()
    finally:
        logger.info("stopping the engine")
        await engine.shutdown()
