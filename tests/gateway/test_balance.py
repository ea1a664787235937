"""Prefix-aware balancing inside a variant: the affinity key, the rendezvous ranking and its
bounded load (pure, on real `Replica` objects), then end to end through a real gateway over
fake replicas: conversations stay on one replica, sessions too, load spills, dead replicas
are skipped, and `balance: least_outstanding` spreads."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import GatewayMetrics
from gateway.settings import CircuitBreakerSettings
from gateway.upstream.balance import (
    affinity_key,
    choose_by_prefix,
    load_bound,
    rendezvous_order,
)
from gateway.upstream.replica import Replica
from tests.gateway.conftest import create_key, start_gateway

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
SYSTEM = {"role": "system", "content": "You are a careful assistant. " * 20}
ADMIN = "admin-key-for-balance-tests"


def replicas(num: int) -> list[Replica]:
    metrics = GatewayMetrics()
    return [Replica("m", "stable", f"http://10.0.0.{i}:8001", CircuitBreakerSettings(),
                    metrics) for i in range(num)]


def conversation(topic: str, num_turns: int) -> list[list[dict]]:
    """The message lists of each turn of one conversation."""
    messages, turns = [SYSTEM], []
    for turn in range(num_turns):
        messages = [*messages, {"role": "user", "content": f"{topic}, part {turn}?"}]
        turns.append(messages)
        messages = [*messages, {"role": "assistant", "content": f"answer {turn} on {topic}"}]
    return turns


# -- the affinity key ------------------------------------------------------------------

def test_every_turn_of_a_conversation_has_its_opening_as_key():
    turns = conversation("tides", 4)
    keys = {affinity_key({"messages": m}, CHAT, None) for m in turns}
    assert len(keys) == 1 and None not in keys
    other = affinity_key({"messages": conversation("volcanoes", 1)[0]}, CHAT, None)
    assert other not in keys


def test_a_long_shared_system_prompt_does_not_hide_the_first_turn():
    system = {"role": "system", "content": "Shared rules. " * 1000}    # past PREFIX_CHARS
    keys = {affinity_key({"messages": [system, {"role": "user", "content": f"q{i}"}]}, CHAT,
                         None) for i in range(20)}
    assert len(keys) == 20
    spread = {rendezvous_order(k, replicas(2))[0].url for k in keys}
    assert len(spread) == 2


def test_a_session_or_user_outranks_the_prompt():
    body = {"messages": conversation("tides", 1)[0], "user": "u-1"}
    assert affinity_key(body, CHAT, "s-9") == "session:s-9"
    assert affinity_key(body, CHAT, None) == "user:u-1"
    other = {"messages": conversation("volcanoes", 1)[0], "user": "u-1"}
    assert affinity_key(other, CHAT, None) == affinity_key(body, CHAT, None)


def test_a_completion_is_keyed_by_the_start_of_its_prompt():
    head = "x" * 5000
    assert (affinity_key({"prompt": head + "a"}, COMPLETIONS, None)
            == affinity_key({"prompt": [head + "b"]}, COMPLETIONS, None))
    assert affinity_key({"prompt": [1, 2, 3]}, COMPLETIONS, None) is None
    assert affinity_key({"input": "hello"}, "/v1/embeddings", None) is None


# -- ranking and bounded load ----------------------------------------------------------

def test_removing_a_replica_moves_only_its_own_keys():
    pool = replicas(4)
    keys = [f"chat:{i}" for i in range(2000)]
    before = {k: rendezvous_order(k, pool)[0].url for k in keys}
    shares = [sum(1 for url in before.values() if url == r.url) / len(keys) for r in pool]
    assert all(0.2 < share < 0.3 for share in shares)             # an even spread
    gone = pool[1]
    after = {k: rendezvous_order(k, [r for r in pool if r is not gone])[0].url for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == gone.url for k in moved)     # only the leaver's keys
    assert len(moved) == sum(1 for url in before.values() if url == gone.url)
    joined = replicas(5)
    again = {k: rendezvous_order(k, joined)[0].url for k in keys}
    assert all(again[k] in (before[k], joined[4].url) for k in keys)  # only to the joiner


def test_a_replica_over_the_load_bound_spills_to_the_keys_next_replica():
    pool = replicas(2)
    first, second = rendezvous_order("chat:hot", pool)
    assert choose_by_prefix("chat:hot", pool, pool).replica is first
    first.num_outstanding = 3                     # bound: ceil(1.5 * 4 / 2) = 3 -> full
    assert load_bound(pool) == 3
    choice = choose_by_prefix("chat:hot", pool, pool)
    assert choice.replica is second and choice.outcome == "spill"
    first.num_outstanding = 1                     # bound ceil(1.5 * 2 / 2) = 2: room again
    assert choose_by_prefix("chat:hot", pool, pool).outcome == "preferred"


# -- end to end through a real gateway -------------------------------------------------

def gateway_for(fakes, tmp_path, balance: str = "prefix", **variant_settings):
    store = str(tmp_path / f"keys-{balance}.db")
    key = create_key(store, f"bal-{balance}")
    variant = {"name": "stable", "weight": 100, "replicas": [f.url for f in fakes],
               "balance": balance, **variant_settings}
    gateway = start_gateway({"key_store": store, "admin_key": ADMIN,
                             "models": [{"name": "tiny", "variants": [variant]}],
                             "health_checks": {"interval_seconds": 0.3}}, tmp_path,
                            name=f"gateway-{balance}")
    return gateway, key


def ask(gateway, key: str, messages: list[dict], **extra) -> str:
    headers = {"authorization": f"Bearer {key}", **extra.pop("headers", {})}
    response = httpx.post(f"{gateway.url}/v1/chat/completions", timeout=30, headers=headers,
                          json={"model": "tiny", "messages": messages, **extra})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"].removeprefix("hi from ")


def decisions(gateway) -> dict[str, float]:
    text = httpx.get(f"{gateway.url}/metrics", timeout=10,
                     headers={"authorization": f"Bearer {ADMIN}"}).text
    return {s.labels["outcome"]: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "quiver_gateway_balance_decisions_total"}


@pytest.fixture
def three_fakes(fake_upstreams):
    return [fake_upstreams(f"r{i}") for i in range(3)]


def test_conversations_keep_to_one_replica_and_spread_over_all(three_fakes, tmp_path):
    gateway, key = gateway_for(three_fakes, tmp_path)
    try:
        homes = {}
        for topic in range(36):
            served = {ask(gateway, key, m) for m in conversation(f"topic {topic}", 3)}
            assert len(served) == 1, f"conversation {topic} moved: {served}"
            homes[topic] = served.pop()
        counts = {name: list(homes.values()).count(name) for name in ("r0", "r1", "r2")}
        # the replicas' ports, and so the hash's choices, differ per run: with a fair hash
        # some replica gets under 2 of 36 once in ~40,000 runs (under 3 of 24, the bound
        # this had, once in ~70: it failed CI)
        assert all(count >= 2 for count in counts.values()), counts
        assert decisions(gateway) == {"preferred": 108, "spill": 0, "unkeyed": 0}
    finally:
        gateway.stop()


def test_a_session_header_or_user_keeps_different_prompts_together(three_fakes, tmp_path):
    gateway, key = gateway_for(three_fakes, tmp_path)
    try:
        prompts = [conversation(f"subject {i}", 1)[0] for i in range(12)]
        by_session = {ask(gateway, key, m, headers={"x-quiver-session": "s-1"})
                      for m in prompts}
        by_user = {ask(gateway, key, m, user="alice") for m in prompts}
        unkeyed = {ask(gateway, key, m) for m in prompts}
        assert len(by_session) == 1 and len(by_user) == 1
        assert len(unkeyed) > 1                    # without them, prompts spread
    finally:
        gateway.stop()


def test_load_over_the_bound_spills_and_a_dead_replica_is_skipped(fake_upstreams, tmp_path):
    fakes = [fake_upstreams(f"r{i}", response_delay=1.0) for i in range(2)]
    # at 1.25 x the average, 8 calls at once leave the preferred replica at most 5
    gateway, key = gateway_for(fakes, tmp_path, balance_load_factor=1.25)
    try:
        hot = conversation("the one hot prefix", 1)[0]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            served = list(pool.map(lambda _: ask(gateway, key, hot), range(8)))
        assert set(served) == {"r0", "r1"}         # the preferred one alone would queue 8
        assert max(served.count("r0"), served.count("r1")) <= 5
        counted = decisions(gateway)
        assert counted["spill"] >= 3 and counted["preferred"] + counted["spill"] == 8
        home = max(set(served), key=served.count)  # the prefix's preferred replica
        fakes[int(home[1])].kill()
        time.sleep(1.0)                            # health checks mark it down
        assert {ask(gateway, key, hot) for _ in range(4)} == {"r0", "r1"} - {home}
    finally:
        gateway.stop()


def test_least_outstanding_spreads_a_shared_prefix(three_fakes, tmp_path):
    gateway, key = gateway_for(three_fakes, tmp_path, balance="least_outstanding")
    try:
        served = {ask(gateway, key, m) for m in conversation("tides", 12)}
        assert len(served) > 1
        assert decisions(gateway) == {}            # only prefix variants count decisions
    finally:
        gateway.stop()


def test_body_is_passed_on_unchanged(three_fakes, tmp_path):
    gateway, key = gateway_for(three_fakes, tmp_path)
    try:
        messages = conversation("bytes", 1)[0]
        ask(gateway, key, messages, headers={"x-quiver-session": "s-2"})
        seen = [f.stats()["last_body"] for f in three_fakes]
        assert [json.dumps(b["messages"]) for b in seen if b] == [json.dumps(messages)]
    finally:
        gateway.stop()
