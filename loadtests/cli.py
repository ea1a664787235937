"""`quiver loadtest`: Locust, headless, against an endpoint (or a local stack it starts),
then Locust's CSV/JSON/HTML, an HTML report with plots, and an SLO check.

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

from loadtests.errors import LoadTestError, SloBreachError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = Path("models/tiny-llama")
DEFAULT_SLO = Path(__file__).resolve().parent / "slo.yaml"
SHAPES = ("constant", "ramp", "step", "spike", "soak")
USER_CLASSES = {"stream": "StreamingChatUser", "chat": "ChatUser",
                "completion": "CompletionUser", "cached": "CachedPromptUser"}
DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?$")
READY_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Target:
    host: str
    api_key: str | None
    model: str | None


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
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["mix"]:
        return []
    unknown = [name for name in names if name not in USER_CLASSES]
    if unknown or not names:
        raise LoadTestError(f"--user-class {text!r}: choose mix or a comma list of "
                            f"{', '.join(USER_CLASSES)}")
    return [USER_CLASSES[name] for name in names]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    summary = "load-test an endpoint with Locust (report + SLO check)"
    parser = subparsers.add_parser("loadtest", help=summary, description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=None,
                        help="base URL of the endpoint (default: start a local stack)")
    parser.add_argument("--users", type=int, default=4, help="(peak) users (default 4)")
    parser.add_argument("--spawn-rate", type=float, default=2.0,
                        help="users started per second (default 2)")
    parser.add_argument("--duration", default="60s", help="run time, e.g. 60s, 5m (default 60s)")
    parser.add_argument("--shape", choices=SHAPES, default="constant",
                        help="load shape (default constant: --users throughout)")
    parser.add_argument("--user-class", default="mix",
                        help=f"mix (default, weighted) or a comma list of "
                             f"{', '.join(USER_CLASSES)}")
    parser.add_argument("--slo", type=Path, default=DEFAULT_SLO,
                        help="SLO YAML file (default loadtests/slo.yaml)")
    parser.add_argument("--no-slo", action="store_true", help="check no SLO")
    parser.add_argument("--out", type=Path, default=None,
                        help="output dir (default .quiver/loadtest/<time>)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help=f"model dir for the local stack (default {DEFAULT_MODEL})")
    parser.add_argument("--model-name", default=os.environ.get("QUIVER_MODEL"),
                        help="model to request (env QUIVER_MODEL; default: the served one)")
    parser.add_argument("--api-key", default=None,
                        help="API key (default env QUIVER_API_KEY; a new one for a local stack)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="cap on each prompt's max_tokens")
    parser.set_defaults(func=run)


def check_args(args: argparse.Namespace) -> None:
    if args.users < 1:
        raise LoadTestError(f"--users must be at least 1, got {args.users}")
    if args.spawn_rate <= 0:
        raise LoadTestError(f"--spawn-rate must be positive, got {args.spawn_rate:g}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise LoadTestError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.host is not None:
        url = urllib.parse.urlparse(args.host)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise LoadTestError(f"--host {args.host!r} is not an http(s) URL "
                                f"(example: http://127.0.0.1:8000)")
    elif not Path(args.model).is_dir():
        raise LoadTestError(f"model {args.model} is not a directory (`quiver models tiny` "
                            f"makes models/tiny-llama), or pass --host URL")


def output_dir(args: argparse.Namespace) -> Path:
    if args.out is not None:
        return Path(args.out)
    return Path(".quiver") / "loadtest" / time.strftime("%Y%m%d-%H%M%S")


def run(args: argparse.Namespace) -> int:
    from loadtests.slo import Slo, load_slo

    check_args(args)
    duration_s = parse_duration(args.duration)
    user_classes = parse_user_classes(args.user_class)
    slo = Slo() if args.no_slo else load_slo(args.slo)  # a bad SLO file fails before the run
    out_dir = output_dir(args)
    out_dir.mkdir(parents=True, exist_ok=True)
    api_key = args.api_key or os.environ.get("QUIVER_API_KEY") or None
    if args.host is not None:
        target = Target(args.host.rstrip("/"), api_key, args.model_name)
        returncode = run_plan(args, target, duration_s, user_classes, out_dir)
    else:
        returncode = run_with_stack(args, api_key, duration_s, user_classes, out_dir)
    return finish(args, target_host(args), slo, duration_s, user_classes, out_dir, returncode)


def target_host(args: argparse.Namespace) -> str:
    return args.host or f"local stack ({args.model})"


def model_label(args: argparse.Namespace) -> str:
    if args.model_name:
        return args.model_name
    return Path(args.model).name if args.host is None else "the first of /v1/models"


def run_with_stack(args: argparse.Namespace, api_key: str | None, duration_s: int,
                   user_classes: list[str], out_dir: Path) -> int:
    from loadtests.runner import new_api_key, start_stack, stop_process, wait_ready

    api_key = api_key or new_api_key()
    with tempfile.TemporaryDirectory(prefix="quiver-loadtest-") as workdir:
        stack = start_stack(Path(args.model), Path(workdir), api_key)
        try:
            wait_ready(stack, READY_TIMEOUT_S)
            target = Target(stack.url, api_key, args.model_name or Path(args.model).name)
            return run_plan(args, target, duration_s, user_classes, out_dir)
        finally:
            logger.info("stopping the local stack")
            stop_process(stack.process, "the local stack")
            (out_dir / "stack.log").write_text(stack.log_path.read_text(errors="replace"))


def run_plan(args: argparse.Namespace, target: Target, duration_s: int,
             user_classes: list[str], out_dir: Path) -> int:
    from loadtests.runner import LocustPlan, check_outputs, run_locust

    shape = None if args.shape == "constant" else args.shape
    plan = LocustPlan(host=target.host, api_key=target.api_key, model=target.model,
                      users=args.users, spawn_rate=args.spawn_rate, duration_s=duration_s,
                      shape=shape, user_classes=user_classes, out_dir=out_dir,
                      max_tokens=args.max_tokens)
    returncode = run_locust(plan)
    check_outputs(plan, returncode)
    return returncode


def finish(args: argparse.Namespace, host: str, slo, duration_s: int, user_classes: list[str],
           out_dir: Path, returncode: int) -> int:
    from loadtests.report import RunInfo, write_report
    from loadtests.results import compute_metrics, load_results
    from loadtests.slo import breach_message, check_slo

    results = load_results(out_dir / "locust")
    metrics = compute_metrics(results)
    checks = check_slo(slo, metrics)
    info = RunInfo(host=host, model=model_label(args),
                   users=args.users, spawn_rate=args.spawn_rate, duration_s=duration_s,
                   shape=args.shape, user_classes=user_classes)
    write_report(out_dir / "report.html", info, results, metrics, checks)
    print(summary_text(metrics, out_dir))
    for check in checks:
        print(f"  SLO {check.describe()}")
    if (message := breach_message(checks)) is not None:
        raise SloBreachError(message)
    if metrics.num_failures:
        logger.warning("%d of %d calls failed (Locust exit code %d); see %s",
                       metrics.num_failures, metrics.num_requests, returncode,
                       out_dir / "locust_failures.csv")
    return 0


def summary_text(metrics, out_dir: Path) -> str:
    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4g}"

    return (f"quiver loadtest: {metrics.num_requests} calls, {metrics.num_failures} failed, "
            f"{metrics.num_rate_limited} rate-limited (429) in {metrics.duration_s:.1f} s: "
            f"{metrics.requests_per_s:.3g} req/s, p95 TTFT {fmt(metrics.p95_ttft_ms)} ms, "
            f"p99 latency {fmt(metrics.p99_latency_ms)} ms, "
            f"{metrics.output_tokens_per_s:.4g} output tokens/s\n"
            f"report: {out_dir / 'report.html'} (Locust's: {out_dir / 'locust.html'})")
