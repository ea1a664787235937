"""Soak test: minutes of steady load through the gateway to tiny-model servers, then proof
that nothing leaked.

    python benchmarks/soak.py [--minutes 10] [--load 0.7] [--replicas 2] [--warmup 60]

Starts `--replicas` tiny-model `quiver serve` replicas and a `quiver gateway` in front
(memory limits and cache, SQLite keys, metrics on their own port) on free ports, measures
capacity (closed loop, `--calibration-workers` workers for `--calibration` s), then sends
Poisson arrivals at `--load` x that rate for `--minutes`, at most `--max-in-flight` at a
time (on a small host everything shares the CPU: past a few dozen calls in flight the
throughput falls, latency rises, more calls pile up, and the run measures a collapse
instead of a steady load; arrivals over the cap wait in the client). The mix: streamed
chat (a share abandoned after a few tokens), plain chat, completions, and deterministic
calls from a small set of prompts (cache hits after the first). It reports

- unexpected errors: any answer but 200, an error event, a dropped connection (abandoned
  streams are the client's own doing, not errors);
- the RSS of every process (the gateway, each server), sampled every 10 s: growth from the
  end of the warm-up (`--warmup` s) to the end, and over the second half alone (a leak
  keeps growing; an allocator settling does not);
- after the load, once idle: the servers' KV cache usage (`vllm:kv_cache_usage_perc`) and
  running/waiting requests, the gateway's outstanding upstream requests, and each
  process's open TCP connections against their idle values before the load.

Not part of the test suite (it runs for minutes); results go to benchmarks/results/soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))
from benchmarks.gateway import free_port  # noqa: E402

CACHED_PROMPTS = [f"Name a river in country number {i}." for i in range(10)]
MIX = (("stream", 0.35), ("chat", 0.25), ("completion", 0.15), ("cached", 0.25))
ABANDON_SHARE = 0.25  # of streams: read 3 tokens, then hang up


@dataclass
class Stack:
    gateway: str
    metrics: str
    servers: list[str]
    key: str
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


def wait_ready(url: str, process: subprocess.Popen, what: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{what} not ready in {timeout_s} s")


def start_stack(workdir: Path, model_dir: Path, replicas: int) -> Stack:
    from gateway.keys import ApiKey, generate_key, hash_key
    from gateway.stores import open_key_store

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    stack = Stack("", "", [], generate_key())
    for i in range(replicas):
        port = free_port()
        log = (workdir / f"server-{i}.log").open("w")
        stack.processes[f"server-{i}"] = subprocess.Popen(
            [sys.executable, "-m", "quiver", "serve", "--model", str(model_dir), "--port",
             str(port), "--served-model-name", "tiny"], env=env, stdout=log,
            stderr=subprocess.STDOUT, cwd=workdir)
        stack.servers.append(f"http://127.0.0.1:{port}")
    store = str(workdir / "keys.db")

    async def add_key() -> None:
        keys = open_key_store(store)
        await keys.create(ApiKey(name="soak", key_hash=hash_key(stack.key),
                                 created_at=time.time()))
        await keys.close()

    asyncio.run(add_key())
    port, metrics_port = free_port(), free_port()
    config = {"port": port, "metrics_port": metrics_port, "key_store": store,
              "models": [{"name": "tiny", "variants": [
                  {"name": "stable", "weight": 100, "replicas": stack.servers}]}]}
    (workdir / "gateway.yaml").write_text(yaml.safe_dump(config))
    log = (workdir / "gateway.log").open("w")
    for i, url in enumerate(stack.servers):
        wait_ready(f"{url}/ready", stack.processes[f"server-{i}"], f"server {i}")
    stack.processes["gateway"] = subprocess.Popen(
        [sys.executable, "-m", "quiver", "gateway", "--config", "gateway.yaml"], env=env,
        stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    stack.gateway, stack.metrics = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}"
    wait_ready(f"{stack.gateway}/ready", stack.processes["gateway"], "gateway")
    return stack


# -- the load ----------------------------------------------------------------------------

@dataclass
class Tally:
    done: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    cache_hits: int = 0
    abandoned: int = 0

    def ok(self, kind: str, seconds: float) -> None:
        self.done[kind] = self.done.get(kind, 0) + 1
        self.latencies.setdefault(kind, []).append(seconds)

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


async def one_call(client: httpx.AsyncClient, stack: Stack, tally: Tally,
                   rng: random.Random) -> None:
    kind = rng.choices([k for k, _ in MIX], [w for _, w in MIX])[0]
    chat = {"model": "tiny", "max_tokens": 32, "temperature": 1.0,
            "messages": [{"role": "user", "content": f"Tell me about {rng.random()}"}]}
    started = time.perf_counter()
    try:
        if kind == "stream":
            await stream_call(client, stack, chat, tally, rng.random() < ABANDON_SHARE)
        else:
            path, body = "/v1/chat/completions", chat
            if kind == "completion":
                path, body = "/v1/completions", {"model": "tiny", "prompt": "Once upon a",
                                                 "max_tokens": 16, "temperature": 1.0}
            elif kind == "cached":
                body = {**chat, "temperature": 0, "max_tokens": 16, "messages": [
                    {"role": "user", "content": rng.choice(CACHED_PROMPTS)}]}
            response = await client.post(f"{stack.gateway}{path}", json=body)
            if response.status_code != 200:
                tally.error(f"{kind}: HTTP {response.status_code}")
                return
            tally.cache_hits += response.headers.get("x-quiver-cache") == "hit"
        tally.ok(kind, time.perf_counter() - started)
    except httpx.HTTPError as exc:
        tally.error(f"{kind}: {type(exc).__name__}")


async def stream_call(client: httpx.AsyncClient, stack: Stack, chat: dict, tally: Tally,
                      abandon: bool) -> None:
    async with client.stream("POST", f"{stack.gateway}/v1/chat/completions",
                             json={**chat, "stream": True}) as response:
        if response.status_code != 200:
            raise httpx.HTTPStatusError(str(response.status_code), request=response.request,
                                        response=response)
        tokens, done = 0, False
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith('data: {"error"'):
                tally.error(f"stream: error event {line[:120]}")
                return
            elif '"content":"' in line and '"content":""' not in line:
                tokens += 1
                if abandon and tokens == 3:
                    tally.abandoned += 1
                    return  # leaving the block closes the connection mid-stream
        if not done:
            tally.error("stream: ended without [DONE]")


async def closed_loop(stack: Stack, workers: int, seconds: float) -> float:
    """Requests/s with `workers` calls always in flight: the capacity."""
    tally, rng = Tally(), random.Random(1)
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=120, headers={"authorization": f"Bearer {stack.key}"},
                                 limits=httpx.Limits(max_connections=workers)) as client:
        async def worker() -> None:
            while time.monotonic() < deadline:
                await one_call(client, stack, tally, rng)
        await asyncio.gather(*(worker() for _ in range(workers)))
    return sum(tally.done.values()) / seconds


async def open_loop(stack: Stack, rate: float, seconds: float, monitor: Monitor,
                    max_in_flight: int) -> Tally:
    """Poisson arrivals at `rate` per second for `seconds`, at most `max_in_flight` open."""
    tally, rng = Tally(), random.Random(2)
    tasks: set[asyncio.Task[None]] = set()
    slots = asyncio.Semaphore(max_in_flight)

    async def bounded() -> None:
        async with slots:
            await one_call(client, stack, tally, rng)

    async with httpx.AsyncClient(timeout=120, headers={"authorization": f"Bearer {stack.key}"},
                                 limits=httpx.Limits(max_connections=512)) as client:
        started = time.monotonic()
        next_at = started
        while time.monotonic() - started < seconds:
            next_at += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            task = asyncio.create_task(bounded())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            monitor.maybe_sample()
        await asyncio.gather(*tasks)
    return tally


# -- what the processes hold -------------------------------------------------------------

@dataclass
class Monitor:
    stack: Stack
    samples: list[dict] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    _last: float = 0.0

    def maybe_sample(self, every_s: float = 10.0) -> None:
        if time.monotonic() - self._last >= every_s:
            self._last = time.monotonic()
            self.samples.append({"t_s": round(self._last - self.started, 1),
                                 **{name: rss_mb(p.pid)
                                    for name, p in self.stack.processes.items()}})


def rss_mb(pid: int) -> float:
    process = psutil.Process(pid)
    total = process.memory_info().rss + sum(child.memory_info().rss
                                            for child in process.children(recursive=True))
    return round(total / 2**20, 1)


def open_connections(pid: int) -> int:
    return sum(1 for c in psutil.Process(pid).net_connections(kind="tcp")
               if c.status == psutil.CONN_ESTABLISHED)


def scrape(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def end_state(stack: Stack) -> dict:
    servers = [scrape(url) for url in stack.servers]
    return {
        "kv_cache_usage_perc": [s.get("vllm:kv_cache_usage_perc", -1) for s in servers],
        "requests_running": [s.get("vllm:num_requests_running", -1) for s in servers],
        "requests_waiting": [s.get("vllm:num_requests_waiting", -1) for s in servers],
        "gateway_outstanding_upstream": scrape(stack.metrics).get(
            "quiver_gateway_upstream_outstanding_requests", -1),
        "connections": {name: open_connections(p.pid)
                        for name, p in stack.processes.items()},
    }


def settle(stack: Stack, idle: dict[str, int], timeout_s: float = 90) -> tuple[dict, float]:
    """Wait until every count is back to idle (keep-alive pools expire); the state, and
    how long it took."""
    started = time.monotonic()
    while True:
        state = end_state(stack)
        is_idle = (all(v == 0 for v in state["kv_cache_usage_perc"] + state["requests_running"]
                       + state["requests_waiting"])
                   and state["gateway_outstanding_upstream"] == 0
                   and all(state["connections"][n] <= idle[n] for n in idle))
        if is_idle or time.monotonic() - started > timeout_s:
            return state, round(time.monotonic() - started, 1)
        time.sleep(2)


def cpu_flags() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                  if line.startswith("model name")), platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines()
                  if line.startswith("flags")), [])
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
    return f"{model} ({os.cpu_count()} cores; {' '.join(wanted)})"


def summarize(args: argparse.Namespace, capacity: float, rate: float, tally: Tally,
              monitor: Monitor, idle: dict[str, int], state: dict, settle_s: float) -> dict:
    warm = [s for s in monitor.samples if s["t_s"] >= args.warmup] or monitor.samples
    half = warm[len(warm) // 2]
    rss = {name: {"after_warmup_mb": warm[0][name], "end_mb": warm[-1][name],
                  "max_mb": max(s[name] for s in warm),
                  "growth_mb": round(warm[-1][name] - warm[0][name], 1),
                  "growth_second_half_mb": round(warm[-1][name] - half[name], 1)}
           for name in idle}
    latency = {kind: {"p50_ms": round(1000 * statistics.median(v), 1),
                      "p95_ms": round(1000 * sorted(v)[int(0.95 * (len(v) - 1))], 1)}
               for kind, v in tally.latencies.items()}
    return {"host": cpu_flags(), "minutes": args.minutes, "load": args.load,
            "replicas": args.replicas, "max_in_flight": args.max_in_flight,
            "capacity_rps": round(capacity, 2),
            "target_rps": round(rate, 2),
            "achieved_rps": round(sum(tally.done.values()) / (args.minutes * 60), 2),
            "completed": tally.done, "abandoned_streams": tally.abandoned,
            "cache_hits": tally.cache_hits, "unexpected_errors": tally.errors,
            "latency": latency, "rss": rss, "rss_samples": monitor.samples,
            "idle_connections_before": idle, "end_state": state,
            "seconds_to_idle": settle_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--load", type=float, default=0.7, help="share of measured capacity")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--warmup", type=float, default=60, help="seconds before RSS counts")
    parser.add_argument("--calibration", type=float, default=30)
    parser.add_argument("--calibration-workers", type=int, default=16)
    parser.add_argument("--max-in-flight", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    args = parser.parse_args()

    from quiver.models.tiny import build_tiny

    models = Path(os.environ.get("QUIVER_TEST_MODELS", ROOT / "models"))
    model_dir = build_tiny(models / "tiny-llama")
    with tempfile.TemporaryDirectory(prefix="quiver-soak-") as tmp:
        stack = start_stack(Path(tmp), model_dir, args.replicas)
        try:
            time.sleep(3)  # health checks settle; their keep-alive connections are idle
            idle = {name: open_connections(p.pid) for name, p in stack.processes.items()}
            capacity = asyncio.run(closed_loop(stack, args.calibration_workers,
                                               args.calibration))
            rate = args.load * capacity
            print(f"capacity {capacity:.1f} req/s; soaking at {rate:.1f} req/s for "
                  f"{args.minutes:g} min", flush=True)
            monitor = Monitor(stack)
            monitor.maybe_sample(0)
            tally = asyncio.run(open_loop(stack, rate, args.minutes * 60, monitor,
                                          args.max_in_flight))
            monitor.maybe_sample(0)
            state, settle_s = settle(stack, idle)
        finally:
            stack.stop()
    report = summarize(args, capacity, rate, tally, monitor, idle, state, settle_s)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "rss_samples"}, indent=2))
    clean = (not tally.errors and state["gateway_outstanding_upstream"] == 0
             and not any(state["kv_cache_usage_perc"]))
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
