"""`quiver gateway --config FILE [--host H] [--port 8000]`: the API gateway.

The YAML file is validated at start (a bad key is named in the error); `QUIVER_GATEWAY_*`
environment variables override it, and `--host` / `--port` override both. SIGTERM drains:
in-flight requests get `shutdown_grace_seconds` to finish.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from common.errors import QuiverError

logger = logging.getLogger(__name__)
CONFIG_ENV = "QUIVER_GATEWAY_CONFIG"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    summary = "run the API gateway in front of model servers"
    parser = subparsers.add_parser("gateway", help=summary, description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=os.environ.get(CONFIG_ENV),
                        help=f"gateway YAML file (env {CONFIG_ENV}); see "
                             "gateway/examples/gateway.yaml")
    parser.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default 8000)")
    parser.set_defaults(func=run)


def load(config: Path | None, **overrides: object):
    from gateway.settings import ConfigError, load_settings

    try:
        return load_settings(Path(config) if config else None, **overrides)
    except ConfigError as exc:
        raise QuiverError(str(exc)) from exc


def run(args: argparse.Namespace) -> int:
    if args.config is None:
        raise QuiverError(f"--config FILE is required (or set {CONFIG_ENV}); "
                          "see gateway/examples/gateway.yaml")
    settings = load(args.config, host=args.host, port=args.port)
    serve(settings)
    return 0


def serve(settings, *, banner: str | None = None) -> None:
    from common.http_limits import HttpLimits
    from common.logging_setup import configure_logging
    from common.server import SideListener, make_draining_server, server_config
    from common.telemetry import configure_tracing, shutdown_tracing
    from gateway.app import create_app
    from gateway.metrics import metrics_endpoint

    configure_logging(json_lines=settings.log_json)
    tracer_provider = configure_tracing("quiver-gateway")
    app = create_app(settings)
    config = server_config(app, host=settings.host, port=settings.port,
                           limits=HttpLimits.of(settings),
                           grace_s=settings.shutdown_grace_seconds)
    side: tuple[SideListener, ...] = ()
    if settings.metrics_port is not None:
        registry = app.state.gateway.metrics.registry
        side = (SideListener(settings.metrics_port, metrics_endpoint(registry),
                             "metrics for Prometheus"),)
    logger.info("gateway on http://%s:%d for %s", settings.host, settings.port,
                ", ".join(m.name for m in settings.models))
    if banner:
        print(banner, flush=True)
    try:
        make_draining_server(config, state=app.state.gateway, side_listeners=side).run()
    finally:
        shutdown_tracing(tracer_provider)
