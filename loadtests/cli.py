"""`quiver loadtest`: Locust, headless, against an endpoint (or a local stack it starts),
then Locust's CSV/JSON/HTML, an HTML report with plots, results.json, and an SLO check.

Closed loop by default (`--users` that each wait for their answer); `--rate R` runs an open
loop instead: Poisson arrivals at R requests/s whatever is still in flight. `--user-class
conversation` sends multi-turn conversations with long shared system prompts; `--tenants FILE`
(or `QUIVER_API_KEYS`) spreads the load over several API keys by weight.

Without `--host` it starts `quiver up` on free ports with the tiny test model (or `--model`)
and stops it afterwards, whatever happens. Exits 1 when an SLO is breached, naming it.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loadtests.arrivals import DEFAULT_MAX_IN_FLIGHT
from loadtests.errors import LoadTestError

if TYPE_CHECKING:  # imported where used: `quiver --help` stays light
    from loadtests.report import RunInfo
    from loadtests.server_metrics import ServerCacheStats
    from loadtests.tenants import Tenant

logger = logging.getLogger(__name__)

DEFAULT_MODEL = Path("models/tiny-llama")
DEFAULT_SLO = Path(__file__).resolve().parent / "slo.yaml"
DEFAULT_USERS = 4
SHAPES = ("constant", "ramp", "step", "spike", "soak")
DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?$")
READY_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class RunSetup:
    """The checked arguments of one run."""

    duration_s: int
    kinds: list[str]                 # workloads, run together by weight
    tenants: list[Tenant] | None     # None: the one --api-key, as a single tenant
    out_dir: Path


@dataclass(frozen=True)
class Target:
    host: str
    tenants: list[Tenant]            # with their keys
    model: str | None
    metrics_urls: list[str]          # model servers' /metrics, for their prefix-cache counters


def parse_duration(text: str) -> int:
    """`60s`, `90`, `2m`, `1h30m` -> seconds."""
    match = DURATION.match(text.strip().lower())
    if not text.strip() or match is None or not any(match.groups()):
        raise LoadTestError(f"--duration {text!r} is not a duration (examples: 60s, 2m, 1h30m)")
    hours, minutes, seconds = (int(group or 0) for group in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total < 1:
        raise LoadTestError(f"--duration must be at least 1 s, got {text!r}")
    return total


def parse_user_classes(text: str) -> list[str]:
    """`mix` or a comma list of workload kinds -> the kinds."""
    from loadtests.runner import USER_CLASSES
    from loadtests.workloads import MIX

    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["mix"]:
        return list(MIX)
    unknown = [name for name in names if name not in USER_CLASSES]
    if unknown or not names:
        raise LoadTestError(f"--user-class {text!r}: choose mix or a comma list of "
                            f"{', '.join(USER_CLASSES)}")
    return list(dict.fromkeys(names))


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    summary = "load-test an endpoint with Locust (report + SLO check)"
    parser = subparsers.add_parser("loadtest", help=summary, description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--host", default=None, help="base URL of the endpoint (default: start a local stack)")
    add("--users", type=int, default=None,
        help=f"closed loop: (peak) users (default {DEFAULT_USERS})")
    add("--spawn-rate", type=float, default=2.0, help="users started per second (default 2)")
    add("--rate", type=float, default=None,
        help="open loop: Poisson arrivals at RATE requests/s, however slow the answers")
    add("--max-in-flight", type=int, default=None,
        help=f"open loop: arrivals finding this many calls in flight are dropped and counted "
             f"(default {DEFAULT_MAX_IN_FLIGHT})")
    add("--seed", type=int, default=None,
        help="open loop: repeat the same arrival times, tenants and prompts run after run")
    add("--duration", default="60s", help="run time, e.g. 60s, 5m (default 60s)")
    add("--shape", choices=SHAPES, default="constant",
        help="closed loop: load shape (default constant: --users throughout)")
    add("--user-class", default="mix",
        help="mix (default: stream,chat,completion,cached by weight) or a comma list of "
             "stream, chat, completion, cached, conversation")
    add("--turns", type=int, default=None,
        help="turns per conversation (default 4; needs the conversation user class)")
    add("--tenants", type=Path, default=None,
        help="YAML file: tenant name -> {weight, api_key | api_key_env} (default: "
             "$QUIVER_API_KEYS, else one tenant); a local stack creates the keys")
    add("--server-metrics", default=None, metavar="URL,...",
        help="model servers' /metrics to read vllm:prefix_cache_* from before and after "
             "(a local stack's is read without it)")
    add("--slo", type=Path, default=DEFAULT_SLO, help="SLO YAML file (default loadtests/slo.yaml)")
    add("--no-slo", action="store_true", help="check no SLO")
    add("--out", type=Path, default=None, help="output dir (default .quiver/loadtest/<time>)")
    add("--model", type=Path, default=DEFAULT_MODEL,
        help=f"model dir for the local stack (default {DEFAULT_MODEL})")
    add("--model-name", default=os.environ.get("QUIVER_MODEL"),
        help="model to request (env QUIVER_MODEL; default: the served one)")
    add("--api-key", default=None,
        help="API key (default env QUIVER_API_KEY; a new one for a local stack)")
    add("--max-tokens", type=int, default=None, help="cap on each prompt's max_tokens")
    parser.set_defaults(func=run)


def check_open_loop(args: argparse.Namespace) -> None:
    if args.rate is None:
        if args.seed is not None or args.max_in_flight is not None:
            raise LoadTestError("--seed and --max-in-flight shape the open loop's arrivals: "
                                "they need --rate")
        return
    if not args.rate > 0:
        raise LoadTestError(f"--rate must be positive, got {args.rate:g}")
    if args.users is not None or args.shape != "constant":
        raise LoadTestError("--users and --shape drive closed-loop users; --rate runs an "
                            "open loop (leave them out)")
    if args.max_in_flight is not None and args.max_in_flight < 1:
        raise LoadTestError(f"--max-in-flight must be at least 1, got {args.max_in_flight}")


def check_args(args: argparse.Namespace) -> None:
    if args.users is not None and args.users < 1:
        raise LoadTestError(f"--users must be at least 1, got {args.users}")
    if args.spawn_rate <= 0:
        raise LoadTestError(f"--spawn-rate must be positive, got {args.spawn_rate:g}")
    check_open_loop(args)
    if args.max_tokens is not None and args.max_tokens < 1:
        raise LoadTestError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.turns is not None and args.turns < 1:
        raise LoadTestError(f"--turns must be at least 1, got {args.turns}")
    named = {name.strip() for name in args.user_class.split(",")}
    if args.turns is not None and "conversation" not in named:
        raise LoadTestError("--turns sets the length of conversations: add conversation to "
                            "--user-class")
    for url in [args.host or "", *metrics_urls(args)]:
        parsed = urllib.parse.urlparse(url)
        if url and (parsed.scheme not in ("http", "https") or not parsed.netloc):
            raise LoadTestError(f"{url!r} is not an http(s) URL "
                                f"(example: http://127.0.0.1:8000)")
    if args.host is None and not Path(args.model).is_dir():
        raise LoadTestError(f"model {args.model} is not a directory (`quiver models tiny` "
                            f"makes models/tiny-llama), or pass --host URL")


def metrics_urls(args: argparse.Namespace) -> list[str]:
    return [url.strip() for url in (args.server_metrics or "").split(",") if url.strip()]


def resolve_tenants(args: argparse.Namespace) -> list[Tenant] | None:
    """The tenants file's or `QUIVER_API_KEYS`' tenants; None: one key, as before."""
    from loadtests.tenants import API_KEYS_ENV, load_tenants_file, parse_api_keys

    if args.tenants is not None:
        tenants = load_tenants_file(args.tenants)
        if args.host is None and (keyed := [t.name for t in tenants if t.api_key]):
            raise LoadTestError(f"{args.tenants}: a local stack creates each tenant's key; "
                                f"leave api_key / api_key_env out ({', '.join(keyed)})")
        if args.host is not None and (keyless := [t.name for t in tenants if not t.api_key]):
            raise LoadTestError(f"{args.tenants}: --host needs a key per tenant (api_key or "
                                f"api_key_env); none for {', '.join(keyless)}")
        return tenants
    if text := os.environ.get(API_KEYS_ENV, "").strip():
        if args.host is None:
            raise LoadTestError(f"${API_KEYS_ENV} names keys of a running endpoint: pass "
                                f"--host URL, or --tenants FILE to have a local stack make keys")
        return parse_api_keys(text)
    return None


def output_dir(args: argparse.Namespace) -> Path:
    if args.out is not None:
        return Path(args.out)
    return Path(".quiver") / "loadtest" / time.strftime("%Y%m%d-%H%M%S")


def run(args: argparse.Namespace) -> int:
    from loadtests.slo import Slo, load_slo
    from loadtests.summary import finish
    from loadtests.tenants import DEFAULT_TENANT, Tenant

    check_args(args)
    setup = RunSetup(duration_s=parse_duration(args.duration),
                     kinds=parse_user_classes(args.user_class),
                     tenants=resolve_tenants(args), out_dir=output_dir(args))
    slo = Slo() if args.no_slo else load_slo(args.slo)  # a bad SLO file fails before the run
    setup.out_dir.mkdir(parents=True, exist_ok=True)
    api_key = args.api_key or os.environ.get("QUIVER_API_KEY") or None
    if args.host is not None:
        tenants = setup.tenants or [Tenant(DEFAULT_TENANT, api_key)]
        target = Target(args.host.rstrip("/"), tenants, args.model_name, metrics_urls(args))
        returncode, server_cache = run_plan(args, setup, target)
    else:
        returncode, server_cache = run_with_stack(args, setup, api_key)
    tenants = setup.tenants or [Tenant(DEFAULT_TENANT, None)]
    return finish(run_info(args, setup, tenants), slo, tenants, setup.out_dir, returncode,
                  server_cache)


def run_info(args: argparse.Namespace, setup: RunSetup, tenants: list[Tenant]) -> RunInfo:
    from loadtests.report import RunInfo
    from loadtests.tenants import rate_shares

    host = args.host or f"local stack ({args.model})"
    if args.model_name:
        model = args.model_name
    else:
        model = Path(args.model).name if args.host is None else "the first of /v1/models"
    users = 0 if args.rate else args.users or DEFAULT_USERS   # 0: an open loop has none
    return RunInfo(host=host, model=model, users=users,
                   spawn_rate=args.spawn_rate, duration_s=setup.duration_s, shape=args.shape,
                   user_classes=setup.kinds, rate=args.rate,
                   tenant_rates=rate_shares(tenants, args.rate) if args.rate else {})


def run_with_stack(args: argparse.Namespace, setup: RunSetup,
                   api_key: str | None) -> tuple[int, ServerCacheStats | None]:
    from loadtests.runner import create_keys, new_api_key, start_stack, stop_process, wait_ready
    from loadtests.tenants import DEFAULT_TENANT, Tenant

    api_key = api_key or new_api_key()
    with tempfile.TemporaryDirectory(prefix="quiver-loadtest-") as workdir:
        tenants = [Tenant(DEFAULT_TENANT, api_key)]
        if setup.tenants:
            keys = create_keys(Path(workdir), [t.name for t in setup.tenants])
            tenants = [Tenant(t.name, keys[t.name], t.weight) for t in setup.tenants]
        stack = start_stack(Path(args.model), Path(workdir), api_key)
        try:
            wait_ready(stack, READY_TIMEOUT_S)
            target = Target(stack.url, tenants, args.model_name or Path(args.model).name,
                            [f"{stack.server_url}/metrics", *metrics_urls(args)])
            return run_plan(args, setup, target)
        finally:
            logger.info("stopping the local stack")
            stop_process(stack.process, "the local stack")
            (setup.out_dir / "stack.log").write_text(stack.log_path.read_text(errors="replace"))


def run_plan(args: argparse.Namespace, setup: RunSetup,
             target: Target) -> tuple[int, ServerCacheStats | None]:
    """Locust's exit code, and the servers' prefix-cache counters over the run (or None)."""
    from loadtests.runner import LocustPlan, check_outputs, run_locust
    from loadtests.server_metrics import scrape_all, server_cache_stats

    shape = None if args.shape == "constant" else args.shape
    plan = LocustPlan(host=target.host, tenants=target.tenants, model=target.model,
                      users=args.users or DEFAULT_USERS, spawn_rate=args.spawn_rate,
                      duration_s=setup.duration_s, shape=shape, kinds=setup.kinds,
                      out_dir=setup.out_dir, max_tokens=args.max_tokens, rate=args.rate,
                      max_in_flight=(args.max_in_flight or DEFAULT_MAX_IN_FLIGHT)
                      if args.rate else None,
                      num_turns=args.turns, seed=args.seed)
    before = scrape_all(target.metrics_urls)
    returncode = run_locust(plan)
    check_outputs(plan, returncode)
    return returncode, server_cache_stats(before, scrape_all(target.metrics_urls))
