"""Shared route state: how soon does a second gateway obey the first one's change?

    python benchmarks/route_state.py [--changes 40] [--sync-seconds 0.25]

One `redis-server`, one fake upstream per variant and two `quiver gateway` processes with
`routing.backend: redis`. Measured, in one run:

- **Weight changes**: `--changes` times, `PUT /admin/routes/model/canary` on gateway A
  (weights alternating), then gateway B's `GET /admin/routes` polled every 5 ms until it
  shows the new weight: the delay from A's answer to B obeying (p50, p95, max).
- **Rollback**: the canary's upstream dies and calls go through both gateways in
  turn; the delay from A's first rolled-back answer to B showing the rollback, and the
  number of rollbacks counted across both (must be exactly 1).

Target (DESIGN.md / issue #18): a weight change on one gateway is obeyed by the other within
1 s; a canary rolled back on one is rolled back on both. Results go to
benchmarks/results/route_state.json.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the `gateway` package, not benchmarks/gateway.py

import httpx  # noqa: E402
import yaml  # noqa: E402

from benchmarks.gateway import (  # noqa: E402
    Service,
    create_key,
    free_port,
    launch,
    machine,
    start_fake,
)

RESULTS = ROOT / "benchmarks" / "results"
ADMIN = "route-state-admin"
HEADERS = {"authorization": f"Bearer {ADMIN}"}
TARGET_S = 1.0
POLL_S = 0.005


def start_redis(workdir: Path) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (make system-deps installs it)")
    port = free_port()
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save",
                                "", "--appendonly", "no", "--dir", str(workdir)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            import redis

            redis.Redis.from_url(url).ping()
            return process, url
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.05)
    process.kill()
    raise SystemExit("redis-server did not start")


def start_gateway(name: str, config: dict, workdir: Path) -> Service:
    port = free_port()
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**config, "host": "127.0.0.1", "port": port}),
                    encoding="utf-8")
    service = launch(name, [sys.executable, "-m", "quiver", "gateway", "--config", str(path)],
                     workdir, port)
    service.wait_ready("/health", 60)
    return service


def canary(gateway: Service) -> dict:
    reply = httpx.get(f"{gateway.url}/admin/routes", headers=HEADERS, timeout=10)
    return reply.json()["tiny"]["variants"]["canary"]


def wait_for(predicate, timeout_s: float) -> float:
    """Seconds until `predicate()` holds (polled every POLL_S); inf if never."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        if predicate():
            return time.perf_counter() - start
        time.sleep(POLL_S)
    return float("inf")


def weight_changes(a: Service, b: Service, num: int) -> list[float]:
    rng = random.Random(0)
    delays = []
    with httpx.Client(headers=HEADERS, timeout=10) as client:
        for i in range(num):
            weight = 20 + 10 * (i % 5)
            reply = client.put(f"{a.url}/admin/routes/tiny/canary", json={"weight": weight})
            reply.raise_for_status()
            delays.append(wait_for(lambda w=weight: client.get(
                f"{b.url}/admin/routes").json()["tiny"]["variants"]["canary"]["weight"] == w,
                10))
            time.sleep(rng.uniform(0.0, 0.3))  # land anywhere in the sync period
    return delays


def rollback(a: Service, b: Service, fake_canary: Service, secret: str) -> dict:
    fake_canary.stop()  # the canary's only replica dies: its calls fail
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(timeout=30, headers={"authorization": f"Bearer {secret}"}) as client:
        for user in range(400):
            client.post(f"{(a, b)[user % 2].url}/v1/chat/completions",
                        json={**body, "user": f"user-{user}"})
            if canary(a)["rolled_back"] or canary(b)["rolled_back"]:
                break
    first, other = (a, b) if canary(a)["rolled_back"] else (b, a)
    delay = wait_for(lambda: canary(other)["rolled_back"], 10)
    time.sleep(1.0)

    def count(gateway: Service) -> float:
        text = httpx.get(f"{gateway.url}/metrics", headers=HEADERS, timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("quiver_gateway_rollbacks_total{")
                   and 'variant="canary"' in line)

    return {"first": first.name, "delay_s": delay, "num_rollbacks": count(a) + count(b),
            "samples_in_window": canary(other)["window"]["samples"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=40)
    parser.add_argument("--sync-seconds", type=float, default=0.25)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="quiver-route-state-") as tmp:
        workdir = Path(tmp)
        redis_process, redis_url = start_redis(workdir)
        services: list[Service] = []
        try:
            stable, fake_canary = start_fake(workdir), start_fake(workdir)
            services += [stable, fake_canary]
            secret = create_key(redis_url)
            config = {
                "key_store": redis_url, "redis_url": redis_url, "admin_key": ADMIN,
                "cache": {"enabled": False},
                "routing": {"backend": "redis", "sync_seconds": args.sync_seconds},
                "rollback": {"window_seconds": 300, "min_samples": 20, "max_key_share": 1.0,
                             "max_error_rate_increase": 0.1},
                "models": [{"name": "tiny", "variants": [
                    {"name": "stable", "weight": 80, "replicas": [stable.url]},
                    {"name": "canary", "weight": 20, "replicas": [fake_canary.url]}]}]}
            a = start_gateway("gateway-a", config, workdir)
            services.append(a)
            b = start_gateway("gateway-b", config, workdir)
            services.append(b)
            delays = weight_changes(a, b, args.changes)
            rolled = rollback(a, b, fake_canary, secret)
        finally:
            for service in services:
                service.stop()
            redis_process.terminate()
            redis_process.wait(10)
    finite = sorted(d for d in delays if d != float("inf"))
    summary = {
        "machine": machine(), "sync_seconds": args.sync_seconds, "changes": len(delays),
        "weight_change_delay_s": {
            "p50": statistics.median(finite) if finite else None,
            "p95": finite[max(0, round(0.95 * len(finite)) - 1)] if finite else None,
            "max": max(delays), "missed": len(delays) - len(finite)},
        "rollback": rolled,
        "target_s": TARGET_S,
    }
    ok = (summary["weight_change_delay_s"]["max"] <= TARGET_S
          and rolled["delay_s"] <= TARGET_S and rolled["num_rollbacks"] == 1)
    summary["target_met"] = ok
    (RESULTS / "route_state.json").write_text(json.dumps(summary, indent=2) + "\n")
    w = summary["weight_change_delay_s"]
    print(f"weight change obeyed by the other gateway: p50 {w['p50']:.3f} s, p95 {w['p95']:.3f}"
          f" s, max {w['max']:.3f} s over {len(delays)} changes (sync every "
          f"{args.sync_seconds} s; target <= {TARGET_S} s)")
    print(f"rollback on {rolled['first']} seen by the other after {rolled['delay_s']:.3f} s; "
          f"rollbacks counted across both: {rolled['num_rollbacks']:g}; pooled window "
          f"{rolled['samples_in_window']} samples")
    print("target met" if ok else "TARGET MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
