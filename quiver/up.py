"""`quiver up`: the local stack on 127.0.0.1 — model server(s) and the gateway in front.

The model is served by `quiver serve` on :8001 (a canary, when given, on :8002), both under
one public name; the gateway runs in this process on :8000 (its Prometheus metrics on
:8100, the gateway port + 100) with the key store shared with `quiver keys`
(`.quiver/keys.db`). The API key is `QUIVER_API_KEY` when set, else a new one
printed at start (named `quiver-up`, replacing the previous one). With a canary, its answers
are judged against stable's (`rollback.quality`, on by default here). The admin API (for
`quiver promote`) is on when `QUIVER_GATEWAY_ADMIN_KEY` is set; any gateway setting can be
overridden so (`QUIVER_GATEWAY_ROLLBACK__WINDOW_SECONDS=30`). With `--monitoring` a
local Prometheus (:9090) scrapes them all with Quiver's recording and alert rules loaded.
Ctrl-C stops everything.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from common.errors import QuiverError
from common.processes import wait_until_serving
from quiver.monitoring import (
    PROMETHEUS_PORT,
    SCRAPE_INTERVAL,
    ScrapeTargets,
    start_prometheus,
    stop_prometheus,
)

DEFAULT_MODEL = Path("models/smollm2-135m-instruct")
GATEWAY_PORT = 8000
SERVER_PORT = 8001
METRICS_PORT_OFFSET = 100
UP_KEY_NAME = "quiver-up"
API_KEY_ENV = "QUIVER_API_KEY"
READY_TIMEOUT_S = 300


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    summary = "start model server(s) and gateway locally"
    parser = subparsers.add_parser("up", help=summary, description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help=f"model dir (default {DEFAULT_MODEL})")
    parser.add_argument("--canary-model", type=Path, default=None,
                        help="a second model dir served as the canary variant")
    parser.add_argument("--canary-weight", type=float, default=None,
                        help="percent of traffic to the canary (default 10 with a canary)")
    parser.add_argument("--port", type=int, default=GATEWAY_PORT,
                        help=f"gateway port (default {GATEWAY_PORT})")
    parser.add_argument("--server-port", type=int, default=SERVER_PORT,
                        help=f"first model server port (default {SERVER_PORT})")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="the gateway's /metrics port, for Prometheus (default: the "
                             f"gateway port + {METRICS_PORT_OFFSET})")
    parser.add_argument("--store", default=None,
                        help="key store (default .quiver/keys.db, env QUIVER_GATEWAY_KEY_STORE)")
    parser.add_argument("--monitoring", action="store_true",
                        help="also start a local Prometheus scraping the stack, with the rules "
                             "in monitoring/prometheus/rules (needs the prometheus binary)")
    parser.add_argument("--prometheus-port", type=int, default=PROMETHEUS_PORT,
                        help=f"Prometheus port with --monitoring (default {PROMETHEUS_PORT})")
    parser.add_argument("--scrape-interval", default=SCRAPE_INTERVAL,
                        help="Prometheus scrape and rule interval with --monitoring (default "
                             f"{SCRAPE_INTERVAL})")
    parser.set_defaults(func=run)


def metrics_port(args: argparse.Namespace) -> int:
    return args.metrics_port or args.port + METRICS_PORT_OFFSET


def banner(name: str, port: int, api_key: str | None, metrics: int | None = None) -> str:
    base = f"http://127.0.0.1:{port}"
    shown = api_key if api_key is not None else f"${API_KEY_ENV}"
    lines = [f"quiver up: gateway on {base} (OpenAI API at {base}/v1) for model {name!r}."]
    if metrics is not None:
        lines.append(f"Gateway metrics (for Prometheus): http://127.0.0.1:{metrics}/metrics")
    if api_key is not None:
        lines.append(f"API key (new, named {UP_KEY_NAME!r}): {api_key}")
    else:
        lines.append(f"API key: the one in ${API_KEY_ENV}")
    lines += [
        f"  curl {base}/v1/chat/completions -H 'authorization: Bearer {shown}' \\",
        "    -H 'content-type: application/json' \\",
        f"    -d '{{\"model\": \"{name}\", \"messages\": [{{\"role\": \"user\", "
        "\"content\": \"What is the capital of France?\"}]}'",
        f"  python -c \"from openai import OpenAI; c = OpenAI(base_url='{base}/v1', "
        f"api_key='{shown}'); print(c.chat.completions.create(model='{name}', "
        "messages=[{'role': 'user', 'content': 'Hi'}]).choices[0].message.content)\"",
        "Ctrl-C stops it.",
    ]
    return "\n".join(lines)


def check_args(args: argparse.Namespace) -> float:
    if args.canary_weight is not None and args.canary_model is None:
        raise QuiverError("--canary-weight needs --canary-model")
    weight = 10.0 if args.canary_weight is None else args.canary_weight
    if args.canary_model is not None and not 0 <= weight <= 100:
        raise QuiverError(f"--canary-weight must be between 0 and 100, got {weight}")
    for model in (args.model, args.canary_model):
        if model is not None and not Path(model).is_dir():
            raise QuiverError(f"model {model} is not a directory (make model fetches SmolLM2)")
    servers = ["model server", "canary model server"][:1 + (args.canary_model is not None)]
    for offset, what in enumerate(servers):
        check_port_free(args.server_port + offset, what, "--server-port")
    check_port_free(args.port, "gateway", "--port")
    return weight


def check_port_free(port: int, what: str, flag: str) -> None:
    """Refuse a port something already listens on: a stale server there would answer our
    readiness check in place of the one we start."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            raise QuiverError(f"port {port} for the {what} is in use ({exc.strerror}); stop "
                              f"what listens there or choose another with {flag}") from exc


def start_server(model: Path, name: str, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "quiver", "serve", "--model", str(model), "--port",
               str(port), "--served-model-name", name]
    return subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_ready(process: subprocess.Popen, port: int) -> None:
    wait_until_serving(process, f"http://127.0.0.1:{port}/ready",
                       what=f"the model server on :{port}", timeout_s=READY_TIMEOUT_S,
                       log_hint=lambda: " (its log is above)")


async def ensure_key(store_location: str) -> str | None:
    """Make `QUIVER_API_KEY` (or a new key) the active `quiver-up` key; the new one is returned."""
    from gateway.keys import ApiKey, generate_key, hash_key
    from gateway.stores import open_key_store

    given = os.environ.get(API_KEY_ENV) or None
    store = open_key_store(store_location)
    try:
        if given is not None and hash_key(given) in await store.active_keys():
            return None
        await store.revoke(UP_KEY_NAME)
        secret = given or generate_key()
        await store.create(ApiKey(name=UP_KEY_NAME, key_hash=hash_key(secret),
                                  can_pin_variant=True, created_at=time.time()))
    finally:
        await store.close()
    return None if given is not None else secret


def gateway_settings(args: argparse.Namespace, name: str, weight: float, store: str):
    from gateway.settings import load_settings

    stable = {"name": "stable", "weight": 100 - weight if args.canary_model else 100,
              "replicas": [f"http://127.0.0.1:{args.server_port}"]}
    variants = [stable]
    if args.canary_model is not None:
        variants.append({"name": "canary", "weight": weight,
                         "replicas": [f"http://127.0.0.1:{args.server_port + 1}"]})
    rollback = {"quality": {"enabled": True}} if args.canary_model is not None else None
    return load_settings(None, host="127.0.0.1", port=args.port, key_store=store,
                         metrics_port=metrics_port(args), rollback=rollback,
                         models=[{"name": name, "variants": variants}])


def start_monitoring(args: argparse.Namespace, server_ports: list[int]):
    targets = ScrapeTargets(gateway=f"127.0.0.1:{metrics_port(args)}",
                            servers=tuple(f"127.0.0.1:{port}" for port in server_ports))
    return start_prometheus(targets, port=args.prometheus_port, interval=args.scrape_interval)


def run(args: argparse.Namespace) -> int:
    from gateway.cli import serve
    from gateway.settings import DEFAULT_KEY_STORE

    weight = check_args(args)
    name = Path(args.model).name
    store = args.store or os.environ.get("QUIVER_GATEWAY_KEY_STORE") or DEFAULT_KEY_STORE
    models = [args.model] + ([args.canary_model] if args.canary_model is not None else [])
    servers = [(start_server(model, name, args.server_port + i), args.server_port + i)
               for i, model in enumerate(models)]
    prometheus = None
    try:
        for process, port in servers:
            wait_ready(process, port)
        settings = gateway_settings(args, name, weight, store)
        api_key = asyncio.run(ensure_key(store))
        text = banner(name, args.port, api_key, metrics_port(args))
        if args.monitoring:
            prometheus = start_monitoring(args, [port for _, port in servers])
            if prometheus is not None:
                text += (f"\nPrometheus: http://127.0.0.1:{args.prometheus_port} (Quiver's "
                         "rules and alerts loaded; dashboards in monitoring/grafana/)")
        serve(settings, banner=text)
    finally:
        stop_prometheus(prometheus)
        for process, _ in servers:
            if process.poll() is None:
                process.terminate()
        for process, _ in servers:
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
    return 0
