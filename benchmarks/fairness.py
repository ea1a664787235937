"""Fair sharing: does a noisy tenant raise a quiet tenant's time to first token?

    python benchmarks/fairness.py [--model models/smollm2-135m-instruct] [--slots 4]
                                  [--quiet-rate 0.5] [--ratio 10] [--duration 60]

Two `quiver serve` replicas of SmolLM2-135M (`--threads` torch threads each; the tiny model's
time to first token is all HTTP and Python overhead, and it answers faster than one client
process can overload it) behind `quiver gateway`s that route two public models to the
same replicas: `fair` (`max_concurrency_per_replica: --slots`: the gateway queues per tenant
and starts calls in a fair order once the replicas are saturated) and `off`
(`max_concurrency_per_replica: null`: every call goes straight on and queues in the engine,
first come first served). A second gateway orders its queue fairly but keeps no spare slots
(`admission.spare_slots_per_tenant: 0`), to show what the fair order alone buys. Two keys,
two tenants, open loop (Poisson arrivals): `quiet` at `--quiet-rate` calls/s, `noisy` at
`--ratio` times that. Each call is streamed, `--max-tokens` tokens with EOS ignored; TTFT is
measured at the client (first content event); a call with no token by the end of its phase
(arrivals stop, then `--grace` seconds) counts as infinitely slow.

Phases, in one run: the quiet tenant alone (`fair`), then both tenants through `off`,
`fair_order` (fair order, no spare slots) and `fair` (the default admission settings).
Reported per phase: the quiet tenant's TTFT p50/p95 (and its ratio to alone), calls finished
and refused per tenant. Target (issue #18): with the noisy tenant at 10x, the quiet tenant's
p95 TTFT <= 1.2x alone. Results go to benchmarks/results/fairness.json.
`--replica-args` passes flags to both replicas' `quiver serve` (on a GPU host:
`--device cuda --kv-cache-memory 8`, so the two share one card).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the `gateway` package, not benchmarks/gateway.py

import httpx  # noqa: E402
import yaml  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from benchmarks.gateway import (  # noqa: E402
    Service,
    free_port,
    launch,
    percentile,
    write_results,
)

RESULTS = ROOT / "benchmarks" / "results"
SMOLLM2 = ROOT / "models" / "smollm2-135m-instruct"
SERVED = "chat"
TARGET = 1.2
PROMPT = "Write a few sentences about the sea and the ships that cross it."


def start_replica(model_dir: Path, workdir: Path, index: int, threads: int,
                  extra_args: str = "") -> Service:
    port = free_port()
    os.environ["OMP_NUM_THREADS"] = str(threads)   # two replicas share the host's cores
    service = launch(f"replica-{index}", [
        sys.executable, "-m", "quiver", "serve", "--model", str(model_dir), "--port",
        str(port), "--served-model-name", SERVED, *extra_args.split()], workdir, port)
    service.wait_ready("/ready", 300)
    return service


def create_keys(store: str) -> dict[str, str]:
    from gateway.keys import mint_key
    from gateway.stores import open_key_store

    secrets: dict[str, str] = {}

    async def add() -> None:
        key_store = open_key_store(store)
        try:
            for name in ("quiet", "noisy"):
                secrets[name], key = mint_key(name)
                await key_store.create(key)
        finally:
            await key_store.close()

    asyncio.run(add())
    return secrets


def start_gateway(name: str, replicas: list[Service], workdir: Path, slots: int,
                  spare: int) -> Service:
    port = free_port()
    urls = [r.url for r in replicas]
    models = [{"name": public, "variants": [{
        "name": "stable", "weight": 100, "replicas": urls, "upstream_model": SERVED,
        "balance": "least_outstanding", "max_concurrency_per_replica": per_replica}]}
        for public, per_replica in (("fair", slots), ("off", None))]
    config = {"host": "127.0.0.1", "port": port, "key_store": str(workdir / "keys.db"),
              "models": models, "cache": {"enabled": False},
              "admission": {"spare_slots_per_tenant": spare, "queue_timeout_seconds": 60},
              "timeouts": {"first_byte_seconds": 600}}
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    service = launch(name, [sys.executable, "-m", "quiver", "gateway", "--config", str(path)],
                     workdir, port)
    service.wait_ready("/ready", 60)
    return service


@dataclass
class Tally:
    ttfts: list[float] = field(default_factory=list)   # as the first token arrives
    statuses: dict[str, int] = field(default_factory=dict)
    num_sent: int = 0
    num_unfinished: int = 0

    def percentile(self, q: float) -> float | None:
        """Of every call that was not refused, those with no first token by the end of the
        phase counted as infinitely slow (so a starved tenant cannot look fast)."""
        num_refused = sum(n for status, n in self.statuses.items() if status != "200")
        num_starved = max(0, self.num_sent - num_refused - len(self.ttfts))
        values = self.ttfts + [float("inf")] * num_starved
        return percentile(values, q) if values else None

    def count(self, status: int | str) -> None:
        self.statuses[str(status)] = self.statuses.get(str(status), 0) + 1


async def one_call(client: httpx.AsyncClient, model: str, secret: str, max_tokens: int,
                   tally: Tally) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": max_tokens, "ignore_eos": True, "stream": True, "temperature": 0.0}
    started = time.perf_counter()
    tally.num_sent += 1
    has_token = False
    async with client.stream("POST", "/v1/chat/completions", json=body,
                             headers={"authorization": f"Bearer {secret}"}) as response:
        async for line in response.aiter_lines():
            if not has_token and line.startswith("data: {") and '"content"' in line:
                has_token = True
                tally.ttfts.append(time.perf_counter() - started)
    tally.count(response.status_code)


async def tenant(client: httpx.AsyncClient, model: str, secret: str, rate: float,
                 args: argparse.Namespace, tally: Tally, seed: int) -> None:
    """Poisson arrivals at `rate` for the phase's duration; then a grace period to finish."""
    rng = random.Random(seed)
    tasks: list[asyncio.Task] = []
    deadline = time.perf_counter() + args.duration
    while time.perf_counter() < deadline:
        tasks.append(asyncio.create_task(one_call(client, model, secret, args.max_tokens,
                                                  tally)))
        await asyncio.sleep(rng.expovariate(rate))
    done, pending = await asyncio.wait(tasks, timeout=args.grace) if tasks else (set(), set())
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    tally.num_unfinished += len(pending)
    for task in done:
        if task.exception() is not None:
            tally.count(type(task.exception()).__name__)


async def drain(replicas: list[Service], timeout_s: float) -> None:
    """Wait until no replica runs or queues a call (what a phase cut off is aborted), so the
    next phase starts on idle replicas."""
    deadline = time.perf_counter() + timeout_s
    async with httpx.AsyncClient(timeout=10) as client:
        while time.perf_counter() < deadline:
            busy = 0.0
            for replica in replicas:
                text = (await client.get(f"{replica.url}/metrics")).text
                busy += sum(s.value for f in text_string_to_metric_families(text)
                            for s in f.samples if s.name in (
                                "vllm:num_requests_running", "vllm:num_requests_waiting"))
            if busy == 0:
                return
            await asyncio.sleep(0.5)
    print(f"replicas still busy after {timeout_s:.0f} s", flush=True)


async def run_phase(gateway: Service, replicas: list[Service], model: str,
                    secrets: dict[str, str], args: argparse.Namespace, *,
                    with_noisy: bool) -> dict:
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=httpx.Timeout(600),
                                 limits=limits) as client:
        tallies = {"quiet": Tally(), "noisy": Tally()}
        work = [tenant(client, model, secrets["quiet"], args.quiet_rate, args,
                       tallies["quiet"], seed=1)]
        if with_noisy:
            work.append(tenant(client, model, secrets["noisy"], args.quiet_rate * args.ratio,
                               args, tallies["noisy"], seed=2))
        await asyncio.gather(*work)
    await drain(replicas, args.settle)
    return {name: {"ttft_p50_s": t.percentile(50), "ttft_p95_s": t.percentile(95),
                   "num_sent": t.num_sent, "num_first_token": len(t.ttfts),
                   "statuses": t.statuses, "num_unfinished": t.num_unfinished}
            for name, t in tallies.items() if with_noisy or name == "quiet"}


def report(results: dict) -> bool:
    alone = results["alone"]["quiet"]["ttft_p95_s"]
    print(f"quiet alone: TTFT p50 {results['alone']['quiet']['ttft_p50_s'] * 1000:.1f} ms, "
          f"p95 {alone * 1000:.1f} ms")
    for phase in ("off", "fair_order", "fair"):
        quiet, noisy = results[phase]["quiet"], results[phase]["noisy"]
        p95 = quiet["ttft_p95_s"]
        ratio = p95 / alone if p95 is not None else float("inf")
        results[phase]["quiet_p95_ratio"] = round(ratio, 3)
        print(f"{phase:>10}: quiet p50 {quiet['ttft_p50_s'] * 1000:.1f} ms, p95 "
              f"{p95 * 1000:.1f} ms = {ratio:.2f}x alone; quiet {quiet['num_first_token']} "
              f"of {quiet['num_sent']} got a token, {quiet['statuses']}; noisy "
              f"{noisy['num_first_token']} of {noisy['num_sent']}, {noisy['statuses']}")
    ratio = results["fair"]["quiet_p95_ratio"]
    ok = ratio <= TARGET
    print(f"target: quiet p95 TTFT <= {TARGET}x alone with fair sharing (default settings): "
          f"{'MET' if ok else 'NOT MET'} ({ratio:.2f}x)")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=SMOLLM2)
    parser.add_argument("--quiet-rate", type=float, default=0.5, help="calls/s")
    parser.add_argument("--ratio", type=float, default=10.0, help="noisy rate / quiet rate")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--slots", type=int, default=4, help="max_concurrency_per_replica")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    parser.add_argument("--replica-args", default="",
                        help="extra `quiver serve` flags for both replicas, e.g. on one GPU "
                             "'--device cuda --kv-cache-memory 8'")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per phase")
    parser.add_argument("--grace", type=float, default=20.0,
                        help="seconds calls may finish after a phase's arrivals stop")
    parser.add_argument("--settle", type=float, default=60.0,
                        help="most seconds to wait for idle replicas between phases")
    parser.add_argument("--out", type=Path, default=RESULTS / "fairness.json")
    args = parser.parse_args()
    args.model = args.model.resolve()   # the replicas run in a scratch directory
    if args.model == SMOLLM2:
        from quiver.models.smollm2 import fetch_smollm2
        fetch_smollm2(args.model)
    with tempfile.TemporaryDirectory(prefix="fairness-") as work:
        workdir = Path(work)
        services: list[Service] = []
        try:
            replicas = [start_replica(args.model, workdir, i, args.threads, args.replica_args)
                        for i in range(2)]
            services += replicas
            secrets = create_keys(str(workdir / "keys.db"))
            default = start_gateway("gateway", replicas, workdir, args.slots, 1)
            services.append(default)
            order_only = start_gateway("gateway-order-only", replicas, workdir, args.slots, 0)
            services.append(order_only)
            phases = {"alone": (default, "fair", False), "off": (default, "off", True),
                      "fair_order": (order_only, "fair", True),
                      "fair": (default, "fair", True)}
            results = {}
            for phase, (gateway, model, with_noisy) in phases.items():
                print(f"phase {phase} ...", flush=True)
                results[phase] = asyncio.run(run_phase(gateway, replicas, model, secrets, args,
                                                       with_noisy=with_noisy))
        finally:
            for service in services:
                service.stop()
    ok = report(results)
    write_results(args.out, args, results, ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
