"""`quiver promote`: walk a canary's weight up step by step, judging it at every step.

At each step (default 10, 50, 100 percent) the variant's weight is set through the
gateway's admin API (`PUT /admin/routes/{model}/{variant}`), a bounded load goes through the
gateway (`--requests-per-step` deterministic chat calls, half streamed, `--concurrency` at a
time, each with its own `user` so that they spread over the variants by weight), and then
the gateway's judging is waited for (`GET /admin/routes`, until the variant's replay count
settles or it was rolled back, at most `--judge-seconds`). The step passes when:
- the gateway did not roll the variant back (error rate, latency or quality);
- the variant's calls in this step's load failed no more than the SLO's `max_error_ratio`
  (0 without an SLO file);
- the variant's calls meet the latency SLOs of `--slo` (the file `quiver loadtest --slo`
  reads; only keys a single step measures: `p95_ttft_ms`, `p99_latency_ms`,
  `min_output_tokens_per_s`, `max_error_ratio`);
- its mean answer agreement with stable (`rollback.quality`'s replays, when there were any)
  is at least `--min-agreement`.
It then goes on to the next step; on the first failure the variant's weight is set back to
0 and the command exits 1 naming what failed. A report is written either way:
`promote.json` and `promote.md` in `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from common.errors import QuiverError
from loadtests.calls import POST, CallOutcome, OpenAICaller, messages_spec, new_session
from loadtests.prompts import load_prompts
from loadtests.results import RunMetrics
from loadtests.slo import Slo, SloCheck, check_slo, load_slo

DEFAULT_STEPS = "10,50,100"
STEP_SLO_KEYS = ("p95_ttft_ms", "p99_latency_ms", "max_error_ratio", "min_output_tokens_per_s")
SETTLE_S = 2.0
POLL_S = 0.5


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    summary = "walk a canary's weight up step by step, judging it at each"
    parser = subparsers.add_parser("promote", help=summary, description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--gateway", required=True, help="the gateway's base URL, e.g. http://127.0.0.1:8000")
    add("--admin-key", required=True, help="the gateway's admin key")
    add("--api-key", required=True, help="an API key for the load")
    add("--model", required=True, help="public model name")
    add("--variant", required=True, help="the canary variant to promote")
    add("--steps", default=DEFAULT_STEPS, help=f"weights in percent (default {DEFAULT_STEPS})")
    add("--requests-per-step", type=int, default=40, help="calls per step (default 40)")
    add("--concurrency", type=int, default=4, help="calls in flight (default 4)")
    add("--max-tokens", type=int, default=16, help="per call (default 16)")
    add("--slo", type=Path, default=None, help="SLO file (as quiver loadtest --slo)")
    add("--min-agreement", type=float, default=0.9,
        help="least mean answer agreement with stable (default 0.9)")
    add("--judge-seconds", type=float, default=60.0,
        help="longest wait for the gateway's judging after each step's load (default 60)")
    add("--out", type=Path, default=Path(".quiver/promote"),
        help="report dir (default .quiver/promote)")
    parser.set_defaults(func=run)


def parse_steps(text: str) -> list[float]:
    try:
        steps = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise QuiverError(f"--steps must be comma-separated percents, got {text!r}") from exc
    if not steps or any(not 0 < s <= 100 for s in steps) or steps != sorted(set(steps)):
        raise QuiverError(f"--steps must rise within (0, 100], got {text!r}")
    return steps


class AdminClient:
    def __init__(self, gateway: str, admin_key: str) -> None:
        self._client = httpx.Client(base_url=gateway.rstrip("/"), timeout=30,
                                    headers={"authorization": f"Bearer {admin_key}"})

    def close(self) -> None:
        self._client.close()

    def routes(self) -> dict[str, Any]:
        return self._checked(self._client.get("/admin/routes"))

    def set_weight(self, model: str, variant: str, weight: float) -> dict[str, Any]:
        return self._checked(self._client.put(f"/admin/routes/{model}/{variant}",
                                              json={"weight": weight}))

    @staticmethod
    def _checked(response: httpx.Response) -> dict[str, Any]:
        if response.status_code != 200:
            raise QuiverError(f"admin API: {response.request.method} {response.request.url.path}"
                              f" answered {response.status_code}: {response.text[:300]}")
        return response.json()


@dataclass
class StepResult:
    weight: float
    passed: bool = False
    failures: list[str] = field(default_factory=list)
    num_requests: int = 0          # the variant's calls in this step's load
    num_errors: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    slo: list[str] = field(default_factory=list)
    agreement: float | None = None
    num_replays: int = 0
    gateway_state: dict[str, Any] = field(default_factory=dict)


class Load:
    """Sends a step's calls and sorts their outcomes by the variant that served them."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.prompts = load_prompts(max_tokens_cap=args.max_tokens).prompts
        self._local = threading.local()

    def send(self, step: int) -> dict[str, list[CallOutcome]]:
        session = new_session(self.args.concurrency)
        session.hooks["response"].append(self._note_variant)
        caller = OpenAICaller(session, self.args.gateway, self.args.api_key)
        by_variant: dict[str, list[CallOutcome]] = {}
        lock = threading.Lock()

        def one(i: int) -> None:
            prompt = self.prompts[i % len(self.prompts)]
            spec = messages_spec(self.args.model, [{"role": "user", "content":
                                 f"{prompt.text}\n(promote step {step}, call {i})"}],
                                 self.args.max_tokens, stream=i % 2 == 0, temperature=0.0)
            spec.body["user"] = f"promote-{step}-{i}"
            self._local.variant = ""
            outcome = caller.exchange(spec)
            with lock:
                by_variant.setdefault(self._local.variant, []).append(outcome)

        with ThreadPoolExecutor(self.args.concurrency) as pool:
            list(pool.map(one, range(self.args.requests_per_step)))
        session.close()
        return by_variant

    def _note_variant(self, response: Any, *args: Any, **kwargs: Any) -> None:
        self._local.variant = response.headers.get("x-quiver-variant", "")


def _quantile(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return ordered[math.ceil(q * len(ordered)) - 1] if ordered else None


def run_metrics(outcomes: list[CallOutcome], duration_s: float) -> RunMetrics:
    calls = [o.call for o in outcomes if o.call.request_type == POST]
    failures = [c for c in calls if c.error is not None]
    ttfts = [o.ttft_ms for o in outcomes if o.ttft_ms is not None]
    tokens = sum(o.usage.completion_tokens for o in outcomes if o.usage is not None)
    return RunMetrics(
        num_requests=len(calls), num_failures=len(failures),
        num_rate_limited=len(outcomes) - len(calls), duration_s=duration_s,
        requests_per_s=len(calls) / duration_s if duration_s else 0.0,
        error_ratio=len(failures) / len(calls) if calls else None,
        p95_ttft_ms=_quantile(ttfts, 0.95),
        p99_latency_ms=_quantile([c.response_time_ms for c in calls], 0.99),
        output_tokens_per_s=tokens / duration_s if duration_s else 0.0)


def step_slo_checks(slo: Slo | None, metrics: RunMetrics) -> list[SloCheck]:
    limits = {key: getattr(slo, key) for key in STEP_SLO_KEYS} if slo else {}
    limits.setdefault("max_error_ratio", None)
    if limits["max_error_ratio"] is None:
        limits["max_error_ratio"] = 0.0
    return check_slo(Slo(**limits), metrics)


def wait_for_judging(admin: AdminClient, model: str, variant: str,
                     timeout_s: float) -> dict[str, Any]:
    """The variant's admin state once it was rolled back or its replays stopped coming."""
    deadline = time.monotonic() + timeout_s
    last_count, last_change = -1, time.monotonic()
    while True:
        state = admin.routes()[model]["variants"][variant]
        count = (state.get("quality") or {}).get("samples", 0)
        now = time.monotonic()
        if count != last_count:
            last_count, last_change = count, now
        if state["rolled_back"] or now >= deadline or now - last_change >= SETTLE_S:
            return state
        time.sleep(POLL_S)


def judge_step(result: StepResult, args: argparse.Namespace, slo: Slo | None,
               outcomes: list[CallOutcome], duration_s: float,
               state: dict[str, Any]) -> None:
    metrics = run_metrics(outcomes, duration_s)
    result.metrics = asdict(metrics)
    result.num_requests, result.num_errors = metrics.num_requests, metrics.num_failures
    result.gateway_state = state
    quality = state.get("quality") or {}
    result.agreement, result.num_replays = quality.get("agreement"), quality.get("samples", 0)
    if state["rolled_back"]:
        result.failures.append(f"the gateway rolled {args.variant} back "
                               f"({state['rollback_reason']}: {state['rollback_detail']})")
    if metrics.num_requests:
        checks = step_slo_checks(slo, metrics)
        result.slo = [check.describe() for check in checks]
        result.failures += [f"SLO {check.describe()}" for check in checks if not check.passed]
    if result.agreement is not None and result.agreement < args.min_agreement:
        result.failures.append(f"answer agreement with stable {result.agreement:.3f} over "
                               f"{result.num_replays} replays < {args.min_agreement:g}")
    result.passed = not result.failures


def check_target(admin: AdminClient, model: str, variant: str) -> None:
    routes = admin.routes()
    if model not in routes:
        raise QuiverError(f"the gateway has no model {model!r} (it has {', '.join(routes)})")
    route = routes[model]
    if variant not in route["variants"]:
        raise QuiverError(f"model {model!r} has no variant {variant!r}")
    if variant == route["stable"]:
        raise QuiverError(f"{variant!r} is the stable variant of {model!r}: nothing to promote")


def run(args: argparse.Namespace) -> int:
    steps = parse_steps(args.steps)
    if args.requests_per_step < 1 or args.concurrency < 1:
        raise QuiverError("--requests-per-step and --concurrency must be at least 1")
    slo = load_slo(args.slo) if args.slo is not None else None
    admin = AdminClient(args.gateway, args.admin_key)
    try:
        return walk(args, admin, steps, slo)
    finally:
        admin.close()


def walk(args: argparse.Namespace, admin: AdminClient, steps: list[float],
         slo: Slo | None) -> int:
    check_target(admin, args.model, args.variant)
    load, results = Load(args), []
    for index, weight in enumerate(steps):
        admin.set_weight(args.model, args.variant, weight)
        started = time.perf_counter()
        by_variant = load.send(index)
        duration_s = time.perf_counter() - started
        state = wait_for_judging(admin, args.model, args.variant, args.judge_seconds)
        result = StepResult(weight=weight)
        judge_step(result, args, slo, by_variant.get(args.variant, []), duration_s, state)
        results.append(result)
        print(f"quiver promote: step {weight:g}%: {'ok' if result.passed else 'FAILED'} "
              f"({result.num_requests} calls to {args.variant}, {result.num_errors} errors, "
              f"agreement {fmt(result.agreement)} over {result.num_replays} replays)")
        if not result.passed:
            admin.set_weight(args.model, args.variant, 0)
            write_report(args, steps, results, promoted=False)
            print(f"quiver promote: {args.variant} rolled back to 0: "
                  f"{'; '.join(result.failures)}")
            return 1
    write_report(args, steps, results, promoted=True)
    print(f"quiver promote: {args.model}/{args.variant} is at {steps[-1]:g}%")
    return 0


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def write_report(args: argparse.Namespace, steps: list[float], results: list[StepResult], *,
                 promoted: bool) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"gateway": args.gateway, "model": args.model, "variant": args.variant,
              "steps": steps, "promoted": promoted,
              "final_weight": steps[-1] if promoted else 0.0,
              "results": [asdict(result) for result in results]}
    (out / "promote.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    verdict = f"promoted to {steps[-1]:g} %" if promoted else "rolled back to 0"
    lines = [f"# quiver promote: {args.model}/{args.variant}", "",
             f"**{verdict}** (steps {', '.join(f'{s:g}' for s in steps)} %)", "",
             "| step | verdict | calls | errors | p95 TTFT ms | p99 latency ms | agreement "
             "(replays) | failures |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        m = r.metrics
        lines.append(f"| {r.weight:g} % | {'ok' if r.passed else 'FAILED'} | {r.num_requests} "
                     f"| {r.num_errors} | {_num(m.get('p95_ttft_ms'))} | "
                     f"{_num(m.get('p99_latency_ms'))} | {fmt(r.agreement)} ({r.num_replays}) "
                     f"| {'; '.join(r.failures) or '-'} |")
    (out / "promote.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"quiver promote: report in {out / 'promote.md'} and {out / 'promote.json'}")


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
