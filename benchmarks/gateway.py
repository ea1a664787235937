"""Gateway benchmark: what the gateway adds over calling the same upstream directly.

    python benchmarks/gateway.py [--requests 500] [--concurrency 16] [--duration 10]
                                 [--skip-tiny] [--pin-gateway-core 1]

Upstreams, one after the other: a fast in-process fake (`fake_upstream.py`, raw ASGI on
uvicorn) and the tiny-model `quiver serve`. Each gets its own `quiver gateway` (one model
`tiny`, variant `stable`, SQLite key store, memory cache, health checks on) pinned to one
core with `taskset`; the client and upstreams run unpinned. One API key with huge limits,
so the rate limiter runs on every request.

Latency: one keep-alive `http.client` connection per target, the same request bytes to
both, direct and gateway calls interleaved (alternating first) so machine noise hits both
alike. Non-streamed (`temperature` 1.0: the cache bypasses) and streamed (TTFT = first
`data:` event with content). Added latency = gateway percentile - direct percentile, and
the median / p99 of paired differences. Cache hits: a `temperature` 0 request, then repeats
that must answer `x-quiver-cache: hit`. Requests/s: `--concurrency` connections for
`--duration` s against the gateway (one core) and directly against the fake upstream.
Results go to benchmarks/results/gateway.json and gateway.png.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODEL = "tiny"
ADDED_P50_MS, ADDED_P99_MS, HIT_P50_MS = 1.0, 3.0, 1.0
MESSAGES = [{"role": "user", "content": "Say hello to the benchmark."}]


# -- processes ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_status(url: str, path: str) -> int | None:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=1)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


@dataclass
class Service:
    name: str
    url: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, num_chars: int = 3000) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-num_chars:]

    def wait_ready(self, path: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if http_status(self.url, path) == 200:
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} not ready on {self.url}{path} "
                           f"(exit {self.process.poll()}):\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def launch(name: str, cmd: list[str], workdir: Path, port: int) -> Service:
    log_path = workdir / f"{name}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    with log_path.open("w") as log:
        process = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
    return Service(name, f"http://127.0.0.1:{port}", process, log_path)


def start_fake(workdir: Path) -> Service:
    port = free_port()
    service = launch("fake-upstream", [sys.executable, str(ROOT / "benchmarks" /
                                                            "fake_upstream.py"),
                                       "--port", str(port)], workdir, port)
    service.wait_ready("/ready", 30)
    return service


def start_tiny(workdir: Path) -> Service:
    subprocess.run([sys.executable, "-m", "quiver", "models", "tiny"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    port = free_port()
    service = launch("tiny-server", [sys.executable, "-m", "quiver", "serve", "--model",
                                     str(ROOT / "models" / "tiny-llama"), "--port", str(port),
                                     "--served-model-name", MODEL], workdir, port)
    service.wait_ready("/ready", 180)
    return service


def create_key(store: str) -> str:
    from gateway.keys import ApiKey, generate_key, hash_key
    from gateway.stores import open_key_store

    secret = generate_key()

    async def add() -> None:
        key_store = open_key_store(store)
        try:
            await key_store.create(ApiKey(name="bench", key_hash=hash_key(secret),
                                          rpm=10**9, tpm=10**12, created_at=time.time()))
        finally:
            await key_store.close()

    asyncio.run(add())
    return secret


def start_gateway(upstream: Service, workdir: Path, core: int | None) -> tuple[Service, str]:
    import yaml

    port = free_port()
    store = str(workdir / f"keys-{port}.db")
    config = {"host": "127.0.0.1", "port": port, "key_store": store,
              "models": [{"name": MODEL, "stable": "stable", "variants": [
                  {"name": "stable", "weight": 100, "replicas": [upstream.url]}]}],
              "cache": {"enabled": True, "backend": "memory"},
              "health_checks": {"enabled": True}}
    config_path = workdir / f"gateway-{port}.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    secret = create_key(store)
    cmd = [sys.executable, "-m", "quiver", "gateway", "--config", str(config_path)]
    if core is not None:
        cmd = ["taskset", "-c", str(core), *cmd]
    service = launch(f"gateway-{upstream.name}", cmd, workdir, port)
    service.wait_ready("/ready", 60)
    return service, secret


# -- latency client ----------------------------------------------------------------------

@dataclass
class Target:
    """One keep-alive connection; the same request bytes whichever side it points at."""

    url: str
    secret: str
    conn: http.client.HTTPConnection = field(init=False)

    def __post_init__(self) -> None:
        host, port = self.url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=60)
        self.conn.connect()
        self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.headers = {"Content-Type": "application/json",
                        "Authorization": f"Bearer {self.secret}"}

    def _send(self, body: bytes) -> tuple[float, http.client.HTTPResponse]:
        start = time.perf_counter()
        self.conn.request("POST", "/v1/chat/completions", body=body, headers=self.headers)
        return start, self.conn.getresponse()

    def call(self, body: bytes) -> tuple[float, http.client.HTTPResponse, bytes]:
        start, response = self._send(body)
        data = response.read()
        elapsed = time.perf_counter() - start
        if response.status != 200:
            raise RuntimeError(f"{self.url}: HTTP {response.status}: {data[:500]!r}")
        return elapsed, response, data

    def ttft(self, body: bytes) -> float:
        """Seconds to the first `data:` event with content; reads the stream to its end."""
        start, response = self._send(body)
        if response.status != 200:
            raise RuntimeError(f"{self.url}: HTTP {response.status}: {response.read()[:500]!r}")
        first = None
        while line := response.readline():
            if first is None and line.startswith(b"data: {"):
                choices = json.loads(line[6:]).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    first = time.perf_counter() - start
        response.read()
        if first is None:
            raise RuntimeError(f"{self.url}: stream had no content event")
        return first

    def close(self) -> None:
        self.conn.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(direct: list[float], gateway: list[float]) -> dict:
    ms = [1000 * d for d in direct], [1000 * g for g in gateway]
    diffs = [g - d for d, g in zip(*ms, strict=True)]
    row = {"n": len(direct)}
    for name, values in (("direct", ms[0]), ("gateway", ms[1]), ("paired_diff", diffs)):
        row[name] = {"p50_ms": round(percentile(values, 50), 4),
                     "p99_ms": round(percentile(values, 99), 4),
                     "mean_ms": round(sum(values) / len(values), 4)}
    row["added_p50_ms"] = round(row["gateway"]["p50_ms"] - row["direct"]["p50_ms"], 4)
    row["added_p99_ms"] = round(row["gateway"]["p99_ms"] - row["direct"]["p99_ms"], 4)
    return row


def interleaved(direct: Target, gateway: Target, measure, num_requests: int,
                num_warmup: int) -> dict:
    """`measure(target) -> seconds` on both targets, alternating which goes first."""
    for _ in range(num_warmup):
        measure(direct), measure(gateway)
    times: dict[str, list[float]] = {"direct": [], "gateway": []}
    for i in range(num_requests):
        order = (("direct", direct), ("gateway", gateway))
        for name, target in order if i % 2 == 0 else order[::-1]:
            times[name].append(measure(target))
    return summarize(times["direct"], times["gateway"])


def request_body(*, temperature: float, max_tokens: int, stream: bool = False) -> bytes:
    body: dict = {"model": MODEL, "messages": MESSAGES, "temperature": temperature,
                  "max_tokens": max_tokens, "ignore_eos": True}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return json.dumps(body).encode()


def cache_hits(direct: Target, gateway: Target, num_requests: int, max_tokens: int) -> dict:
    body = request_body(temperature=0.0, max_tokens=max_tokens)
    _, first, _ = gateway.call(body)
    misses: dict[str, int] = {}

    def measure(target: Target) -> float:
        elapsed, response, _ = target.call(body)
        verdict = response.getheader("x-quiver-cache")
        if target is gateway and verdict != "hit":
            misses[str(verdict)] = misses.get(str(verdict), 0) + 1
        return elapsed

    row = interleaved(direct, gateway, measure, num_requests, 5)
    row["first_verdict"] = first.getheader("x-quiver-cache")
    row["num_not_hit"] = sum(misses.values())
    row["not_hit_verdicts"] = misses
    return row


def latency_scenarios(upstream: Service, gateway: Service, secret: str, num_requests: int,
                      max_tokens: int) -> dict:
    direct, via = Target(upstream.url, secret), Target(gateway.url, secret)
    try:
        _, response, data = via.call(request_body(temperature=1.0, max_tokens=max_tokens))
        print(f"   gateway check: variant={response.getheader('x-quiver-variant')} "
              f"cache={response.getheader('x-quiver-cache')} "
              f"ratelimit-remaining={response.getheader('x-ratelimit-remaining-requests')}",
              flush=True)
        warmup = max(20, num_requests // 10)
        plain = request_body(temperature=1.0, max_tokens=max_tokens)
        streamed = request_body(temperature=1.0, max_tokens=max_tokens, stream=True)
        rows = {"non_streamed": interleaved(direct, via, lambda t: t.call(plain)[0],
                                            num_requests, warmup)}
        print("   non-streamed done", flush=True)
        rows["streamed_ttft"] = interleaved(direct, via, lambda t: t.ttft(streamed),
                                            num_requests, warmup)
        print("   streamed done", flush=True)
        rows["cache_hit"] = cache_hits(direct, via, num_requests, max_tokens)
        return rows
    finally:
        direct.close()
        via.close()


# -- throughput client -------------------------------------------------------------------

class LoadConnection(asyncio.Protocol):
    """A keep-alive connection that sends the next request as soon as a response ends."""

    def __init__(self, request: bytes, deadline: float, stats: dict) -> None:
        import httptools

        self.request, self.deadline, self.stats = request, deadline, stats
        self.parser = httptools.HttpResponseParser(self)
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()
        self.started = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.send()

    def send(self) -> None:
        self.started = time.perf_counter()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except Exception as exc:  # a malformed response: count it, drop the connection
            self.finish(f"parse error: {exc}")

    def on_message_complete(self) -> None:
        now = time.perf_counter()
        status = self.parser.get_status_code()
        if status == 200:
            self.stats["ok"] += 1
            self.stats["latencies"].append(now - self.started)
        else:
            self.stats["errors"][str(status)] = self.stats["errors"].get(str(status), 0) + 1
        if now < self.deadline:
            self.send()
        else:
            self.finish(None)

    def finish(self, error: str | None) -> None:
        if error is not None:
            self.stats["errors"][error] = self.stats["errors"].get(error, 0) + 1
        if not self.done.done():
            self.done.set_result(None)
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.finish("connection lost")


async def load(url: str, secret: str, concurrency: int, duration_s: float) -> dict:
    host, port = url.removeprefix("http://").split(":")
    body = request_body(temperature=1.0, max_tokens=8)
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
               f"Authorization: Bearer {secret}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    stats: dict = {"ok": 0, "errors": {}, "latencies": []}
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    deadline = start + duration_s
    connections = [
        (await loop.create_connection(lambda: LoadConnection(request, deadline, stats),
                                      host, int(port)))[1] for _ in range(concurrency)]
    await asyncio.gather(*(c.done for c in connections))
    elapsed = time.perf_counter() - start
    latencies = [1000 * s for s in stats["latencies"]] or [0.0]
    return {"requests_per_s": round(stats["ok"] / elapsed, 1), "num_ok": stats["ok"],
            "num_errors": sum(stats["errors"].values()), "errors": stats["errors"],
            "p50_ms": round(percentile(latencies, 50), 3),
            "p99_ms": round(percentile(latencies, 99), 3), "duration_s": round(elapsed, 2)}


def throughput(upstream: Service, gateway: Service, secret: str, args) -> dict:
    import uvloop

    results = {}
    for name, url in (("direct", upstream.url), ("gateway", gateway.url)):
        uvloop.run(load(url, secret, args.concurrency, 1.0))  # warm-up
        results[name] = uvloop.run(load(url, secret, args.concurrency, args.duration))
        print(f"   {name}: {results[name]['requests_per_s']} req/s, "
              f"{results[name]['num_errors']} errors", flush=True)
    results["gateway_over_direct"] = round(results["gateway"]["requests_per_s"]
                                           / max(results["direct"]["requests_per_s"], 1e-9), 3)
    results["concurrency"] = args.concurrency
    return results


# -- report ------------------------------------------------------------------------------

def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def checks(scenarios: dict) -> list[dict]:
    rows = []
    for upstream, result in scenarios.items():
        for kind in ("non_streamed", "streamed_ttft"):
            row = result[kind]
            rows.append({"check": f"{upstream} {kind}: added p50 <= {ADDED_P50_MS} ms",
                         "value_ms": row["added_p50_ms"],
                         "result": verdict(row["added_p50_ms"] <= ADDED_P50_MS)})
            rows.append({"check": f"{upstream} {kind}: added p99 <= {ADDED_P99_MS} ms",
                         "value_ms": row["added_p99_ms"],
                         "result": verdict(row["added_p99_ms"] <= ADDED_P99_MS)})
        hit = result["cache_hit"]
        rows.append({"check": f"{upstream} cache hit ({hit['num_not_hit']} not hit): "
                              f"p50 <= {HIT_P50_MS} ms",
                     "value_ms": hit["gateway"]["p50_ms"],
                     "result": verdict(hit["gateway"]["p50_ms"] <= HIT_P50_MS
                                       and hit["num_not_hit"] == 0)})
    return rows


def print_table(summary: dict) -> None:
    print(f"\nmachine: {summary['machine']['cpu_model']}, "
          f"{summary['machine']['cpu_count']} CPUs; {summary['pinning']}")
    head = (f"{'scenario':<28}{'direct p50':>11}{'p99':>9}{'gateway p50':>13}{'p99':>9}"
            f"{'added p50':>11}{'p99':>9}{'paired p50':>12}{'p99':>9}")
    print(head + "\n" + "-" * len(head))
    for upstream, result in summary["scenarios"].items():
        for kind, row in result.items():
            d, g, p = row["direct"], row["gateway"], row["paired_diff"]
            added = (f"{row['added_p50_ms']:>11.3f}{row['added_p99_ms']:>9.3f}"
                     if kind != "cache_hit" else f"{'':>20}")
            print(f"{upstream + ' ' + kind:<28}{d['p50_ms']:>11.3f}{d['p99_ms']:>9.3f}"
                  f"{g['p50_ms']:>13.3f}{g['p99_ms']:>9.3f}{added}"
                  f"{p['p50_ms']:>12.3f}{p['p99_ms']:>9.3f}")
    print("(ms; added = gateway percentile - direct percentile; paired = percentiles of "
          "per-pair gateway - direct; cache_hit gateway column = hits)")
    if tp := summary.get("throughput"):
        print(f"\nrequests/s, {tp['concurrency']} connections, fake upstream: "
              f"direct {tp['direct']['requests_per_s']}, gateway "
              f"{tp['gateway']['requests_per_s']} (one core) = "
              f"{tp['gateway_over_direct']}x; errors direct {tp['direct']['num_errors']}, "
              f"gateway {tp['gateway']['num_errors']}")
    print("\ntargets:")
    for row in summary["checks"]:
        print(f"  {row['result']}  {row['check']}: {row['value_ms']:.3f} ms")


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, p50, p99 = [], [], []
    for upstream, result in summary["scenarios"].items():
        for kind, short in (("non_streamed", "added"), ("streamed_ttft", "added TTFT"),
                            ("cache_hit", "hit")):
            row = result[kind]
            labels.append(f"{upstream}\n{short}")
            if kind == "cache_hit":
                p50.append(row["gateway"]["p50_ms"]), p99.append(row["gateway"]["p99_ms"])
            else:
                p50.append(row["added_p50_ms"]), p99.append(row["added_p99_ms"])
    fig, ax = plt.subplots(figsize=(7.2, 4.0), dpi=100)
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], p50, width=0.4, label="p50")
    ax.bar([x + 0.2 for x in xs], p99, width=0.4, label="p99")
    ax.axhline(ADDED_P50_MS, color="tab:blue", linestyle="--", linewidth=1,
               label=f"target p50 {ADDED_P50_MS:g} ms")
    ax.axhline(ADDED_P99_MS, color="tab:orange", linestyle="--", linewidth=1,
               label=f"target p99 {ADDED_P99_MS:g} ms")
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("ms (added over direct; hit = absolute)")
    tp = summary.get("throughput")
    rps = (f"; {tp['gateway']['requests_per_s']:.0f} vs {tp['direct']['requests_per_s']:.0f}"
           " req/s" if tp else "")
    ax.set_title(f"Gateway on loopback, gateway on one core{rps}", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.set_ylim(0, max([*p50, *p99, ADDED_P99_MS]) * 1.3)
    ax.legend(fontsize=8, ncols=4, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)


def machine() -> dict:
    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu_model": cpu_model, "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def write_results(path: Path, args: argparse.Namespace, results: dict, target_met: bool) -> None:
    """A benchmark's JSON: the machine, its arguments, its results and the verdict."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), "args": {
        k: str(v) for k, v in vars(args).items()}, "results": results,
        "target_met": target_met}, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")


# -- main --------------------------------------------------------------------------------

def run_upstream(name: str, workdir: Path, args, num_requests: int, max_tokens: int,
                 summary: dict) -> None:
    print(f"== {name} upstream", flush=True)
    upstream = start_fake(workdir) if name == "fake" else start_tiny(workdir)
    gateway = None
    try:
        gateway, secret = start_gateway(upstream, workdir, args.pin_gateway_core)
        summary["scenarios"][name] = latency_scenarios(upstream, gateway, secret,
                                                       num_requests, max_tokens)
        if name == "fake":
            print("== requests/s (fake upstream)", flush=True)
            summary["throughput"] = throughput(upstream, gateway, secret, args)
    except Exception:
        if gateway is not None:
            print(f"-- gateway log tail:\n{gateway.log_tail()}", file=sys.stderr)
        raise
    finally:
        if gateway is not None:
            gateway.stop()
        upstream.stop()


def main() -> int:
    # Run as a script, benchmarks/ is sys.path[0] and this file would shadow `gateway`.
    sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT /
                                 "benchmarks"]
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=None,
                        help="measured requests per scenario (default 500 fake, 200 tiny)")
    parser.add_argument("--concurrency", type=int, default=16, help="connections for req/s")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per req/s run")
    parser.add_argument("--skip-tiny", action="store_true", help="fake upstream only")
    parser.add_argument("--pin-gateway-core", type=int, default=1 if (os.cpu_count() or 1) > 1
                        else -1, help="taskset core for the gateway; -1: unpinned")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.pin_gateway_core < 0:
        args.pin_gateway_core = None
    pinning = (f"gateway pinned to core {args.pin_gateway_core}, client and upstreams unpinned"
               if args.pin_gateway_core is not None else "nothing pinned")
    summary: dict = {"created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "machine": machine(), "pinning": pinning,
                     "targets": {"added_p50_ms": ADDED_P50_MS, "added_p99_ms": ADDED_P99_MS,
                                 "cache_hit_p50_ms": HIT_P50_MS},
                     "scenarios": {}}
    print(f"-- {pinning}", flush=True)
    load_1m = summary["machine"]["load_average_at_start"][0]
    if load_1m > 0.25 * (os.cpu_count() or 1):
        print(f"-- note: 1-minute load average {load_1m} at start: other work on this machine "
              "skews latencies", flush=True)
    with tempfile.TemporaryDirectory(prefix="quiver-gw-bench-") as tmp:
        run_upstream("fake", Path(tmp), args, args.requests or 500, 8, summary)
        if not args.skip_tiny:
            run_upstream("tiny", Path(tmp), args, args.requests or 200, 8, summary)
    summary["checks"] = checks(summary["scenarios"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gateway.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, args.out / "gateway.png")
    print_table(summary)
    errors = summary.get("throughput", {}).get("gateway", {}).get("num_errors", 0)
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
