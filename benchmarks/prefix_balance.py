"""Prefix-aware balancing: do a conversation's follow-up turns find their prompt cached?

    python benchmarks/prefix_balance.py [--model models/tiny-llama] [--conversations 16]
                                        [--turns 6] [--concurrency 8] [--system-chars 4000]
                                        [--load-factor 1.5]

Two `quiver serve` replicas of one model (the tiny model by default; SmolLM2 with
`--model models/smollm2-135m-instruct`) behind one `quiver gateway` that routes two public
models to the same two replicas: `prefix` (variant `balance: prefix`) and `lo` (`balance:
least_outstanding`). Each policy in turn, in the same run, gets its own set of
conversations: a long system prompt shared by all of them (its own per policy, so neither
finds the other's in cache) and growing turns, each answer (streamed, `--max-tokens`
tokens, EOS ignored) appended before the next question. Turns go in lockstep: every
conversation's turn k (`--concurrency` at a time), then turn k+1.

Reported per policy, from the servers' own counters (`vllm:prefix_cache_hits_total` /
`vllm:prefix_cache_queries_total`, deltas over the follow-up turns 2..N only; and
`vllm:request_success_total` over all turns): the follow-up turns' prefix-cache hit share,
each replica's share of the requests, and the follow-up turns' time to first token p50 (at
the client, first content event). Target (DESIGN.md): hit share >= 93 % with `prefix`, every
replica >= 25 % of the load. Results go to benchmarks/results/prefix_balance.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the `gateway` package, not benchmarks/gateway.py

from pydoc_data.topics import topics  # noqa: E402

import httpx  # noqa: E402
import yaml  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from benchmarks.gateway import (  # noqa: E402
    Service,
    create_key,
    free_port,
    launch,
    write_results,
)

RESULTS = ROOT / "benchmarks" / "results"
SERVED = "chat"
ADMIN = "prefix-balance-admin"
POLICIES = {"prefix": "prefix", "lo": "least_outstanding"}
HIT_TARGET, LOAD_TARGET = 0.93, 0.25
CORPUS = "\n".join(topics[name] for name in sorted(topics))
TOPIC_CHARS = 4000


def start_replica(model_dir: Path, workdir: Path, index: int) -> Service:
    port = free_port()
    service = launch(f"replica-{index}", [
        sys.executable, "-m", "quiver", "serve", "--model", str(model_dir), "--port",
        str(port), "--served-model-name", SERVED], workdir, port)
    service.wait_ready("/ready", 300)
    return service


def start_gateway(replicas: list[Service], workdir: Path,
                  load_factor: float) -> tuple[Service, str]:
    port = free_port()
    store = str(workdir / "keys.db")
    urls = [r.url for r in replicas]
    models = [{"name": name, "variants": [{"name": "stable", "weight": 100, "replicas": urls,
                                           "upstream_model": SERVED, "balance": balance,
                                           "balance_load_factor": load_factor}]}
              for name, balance in POLICIES.items()]
    config = {"host": "127.0.0.1", "port": port, "key_store": store, "models": models,
              "admin_key": ADMIN,
              "cache": {"enabled": False}, "timeouts": {"first_byte_seconds": 600}}
    path = workdir / "gateway.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    secret = create_key(store)
    service = launch("gateway", [sys.executable, "-m", "quiver", "gateway", "--config",
                                 str(path)], workdir, port)
    service.wait_ready("/ready", 60)
    return service, secret


def server_counters(replica: Service) -> dict[str, float]:
    text = httpx.get(f"{replica.url}/metrics", timeout=30).text
    wanted = {"vllm:prefix_cache_hits_total": "hits", "vllm:prefix_cache_queries_total":
              "queries", "vllm:request_success_total": "requests"}
    counters = dict.fromkeys(wanted.values(), 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                counters[wanted[sample.name]] += sample.value
    return counters


def spills(gateway: Service) -> float:
    """Prefix-balanced calls the gateway spilled past their preferred replica so far."""
    text = httpx.get(f"{gateway.url}/metrics", timeout=30,
                     headers={"authorization": f"Bearer {ADMIN}"}).text
    return sum(s.value for family in text_string_to_metric_families(text)
               for s in family.samples
               if s.name == "quiver_gateway_balance_decisions_total"
               and s.labels.get("outcome") == "spill")


def delta(after: list[dict], before: list[dict]) -> list[dict[str, float]]:
    return [{k: a[k] - b[k] for k in a} for a, b in zip(after, before, strict=True)]


class Conversation:
    def __init__(self, system: str, topic: str, question_chars: int) -> None:
        self.messages = [{"role": "system", "content": system}]
        self.topic, self.question_chars = topic, question_chars

    def ask(self, turn: int) -> list[dict]:
        start = (turn * self.question_chars) % max(1, len(self.topic) - self.question_chars)
        question = f"Turn {turn}: {self.topic[start:start + self.question_chars]}"
        self.messages.append({"role": "user", "content": question})
        return self.messages

    def answer(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})


async def turn(client: httpx.AsyncClient, model: str, secret: str, conversation: Conversation,
               index: int, max_tokens: int) -> float:
    """One streamed turn; returns its time to first token, seconds."""
    body = {"model": model, "messages": conversation.ask(index), "stream": True,
            "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
    started, ttft, parts = time.perf_counter(), None, []
    async with client.stream("POST", "/v1/chat/completions", json=body,
                             headers={"authorization": f"Bearer {secret}"}) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{model} turn {index}: HTTP {response.status_code}: "
                               f"{(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                text = (choice.get("delta") or {}).get("content")
                if text:
                    ttft = ttft or time.perf_counter() - started
                    parts.append(text)
    conversation.answer("".join(parts))
    return ttft if ttft is not None else time.perf_counter() - started


async def run_policy(gateway: Service, secret: str, replicas: list[Service], model: str,
                     args: argparse.Namespace) -> dict:
    offset = 0 if model == "prefix" else len(CORPUS) // 2   # each policy its own texts
    system = f"[{model}] " + CORPUS[offset:offset + args.system_chars]
    starts = [offset + args.system_chars + i * TOPIC_CHARS for i in range(args.conversations)]
    conversations = [Conversation(system, CORPUS[start:start + TOPIC_CHARS],
                                  args.question_chars) for start in starts]
    limit = asyncio.Semaphore(args.concurrency)
    start, spills_before = [server_counters(r) for r in replicas], spills(gateway)
    follow_up_ttfts: list[float] = []
    async with httpx.AsyncClient(base_url=gateway.url, timeout=600) as client:

        async def one(conversation: Conversation, index: int) -> float:
            async with limit:
                return await turn(client, model, secret, conversation, index, args.max_tokens)

        for index in range(args.turns):
            if index == 1:
                after_first = [server_counters(r) for r in replicas]
            ttfts = await asyncio.gather(*(one(c, index) for c in conversations))
            if index > 0:
                follow_up_ttfts += ttfts
    end = [server_counters(r) for r in replicas]
    follow_ups, whole = delta(end, after_first), delta(end, start)
    hits, queries = (sum(d[k] for d in follow_ups) for k in ("hits", "queries"))
    total_requests = sum(d["requests"] for d in whole)
    return {"balance": POLICIES[model],
            "follow_up_hit_share": hits / queries if queries else 0.0,
            "follow_up_prompt_tokens": queries,
            "load_share": [d["requests"] / total_requests for d in whole],
            "follow_up_ttft_p50_ms": 1000 * statistics.median(follow_up_ttfts),
            "num_requests": total_requests, "num_spills": spills(gateway) - spills_before}


def report(results: dict) -> bool:
    print(f"\n{'balance':<18} {'follow-up hit share':>20} {'load share per replica':>26} "
          f"{'follow-up TTFT p50':>20} {'spills':>7}")
    for result in results.values():
        shares = " / ".join(f"{100 * s:.1f} %" for s in result["load_share"])
        print(f"{result['balance']:<18} {100 * result['follow_up_hit_share']:>18.1f} % "
              f"{shares:>26} {result['follow_up_ttft_p50_ms']:>17.1f} ms "
              f"{result['num_spills']:>7.0f}")
    prefix = results["prefix"]
    ok = (prefix["follow_up_hit_share"] >= HIT_TARGET
          and min(prefix["load_share"]) >= LOAD_TARGET)
    print(f"\ntarget: prefix hit share >= {100 * HIT_TARGET:.0f} %, every replica >= "
          f"{100 * LOAD_TARGET:.0f} % of the load: {'MET' if ok else 'NOT MET'}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "tiny-llama")
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--system-chars", type=int, default=4000)
    parser.add_argument("--question-chars", type=int, default=160)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--load-factor", type=float, default=1.5,
                        help="the prefix variant's balance_load_factor")
    parser.add_argument("--out", type=Path, default=RESULTS / "prefix_balance.json")
    args = parser.parse_args()
    if args.model == ROOT / "models" / "tiny-llama":
        from quiver.models.tiny import build_tiny
        build_tiny(args.model)
    with tempfile.TemporaryDirectory(prefix="prefix-balance-") as work:
        workdir = Path(work)
        replicas: list[Service] = []
        gateway = None
        try:
            replicas = [start_replica(args.model, workdir, i) for i in range(2)]
            gateway, secret = start_gateway(replicas, workdir, args.load_factor)
            results = {model: asyncio.run(run_policy(gateway, secret, replicas, model, args))
                       for model in POLICIES}
        finally:
            for service in [gateway, *replicas]:
                if service is not None:
                    service.stop()
    ok = report(results)
    write_results(args.out, args, results, ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
