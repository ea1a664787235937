"""Token-bucket rate limits: the arithmetic on a fake clock, the same behaviour against a real
Redis, and the headline proof that two gateway processes sharing one Redis together admit
within 2 % of the configured limit."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.ratelimit import (
    LimiterUnavailableError,
    Limits,
    RateLimitDecision,
    format_duration,
)
from gateway.stores.memory_ratelimit import MemoryRateLimiter
from gateway.stores.redis_ratelimit import RedisRateLimiter
from tests.gateway.conftest import free_port


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def memory(clock: FakeClock) -> MemoryRateLimiter:
    return MemoryRateLimiter(clock=clock)


@pytest.fixture(params=["memory", "redis"])
async def limiter(request: pytest.FixtureRequest,
                  clock: FakeClock) -> AsyncIterator[MemoryRateLimiter | RedisRateLimiter]:
    """Either store; the fake clock never moves here, and Redis's refill during a test of a
    few milliseconds stays far below one request or token at these limits."""
    if request.param == "memory":
        store: MemoryRateLimiter | RedisRateLimiter = MemoryRateLimiter(clock=clock)
    else:
        store = RedisRateLimiter(request.getfixturevalue("redis_url"))
    yield store
    await store.close()


async def take(limiter, key: str, limits: Limits, tokens: int, times: int) -> int:
    allowed = [(await limiter.acquire(key, limits, tokens)).allowed for _ in range(times)]
    return sum(allowed)


# --- behaviour shared by both stores ---------------------------------------------------------


async def test_bucket_starts_full_then_refuses_with_retry_after(limiter) -> None:
    limits = Limits(rpm=3)
    assert await take(limiter, "k", limits, 0, 3) == 3
    refused = await limiter.acquire("k", limits, 0)
    assert not refused.allowed
    assert refused.refused_by == "requests"
    assert refused.retry_after_s == pytest.approx(20.0, abs=0.05)   # 1 request at 3/min
    assert refused.remaining_requests == 0
    assert refused.reset_requests_s == pytest.approx(60.0, abs=0.05)
    assert refused.limit_tokens is None and refused.remaining_tokens is None


async def test_both_buckets_or_neither(limiter) -> None:
    limits = Limits(rpm=10, tpm=100)
    first = await limiter.acquire("k", limits, 80)
    assert first.allowed
    assert (first.remaining_requests, first.remaining_tokens) == (9, 20)
    refused = await limiter.acquire("k", limits, 30)
    assert not refused.allowed and refused.refused_by == "tokens"
    assert refused.retry_after_s == pytest.approx(10 * 60 / 100, abs=0.05)
    # the refused request took nothing from the request bucket either
    assert (refused.remaining_requests, refused.remaining_tokens) == (9, 20)
    second = await limiter.acquire("k", limits, 20)
    assert second.allowed
    assert (second.remaining_requests, second.remaining_tokens) == (8, 0)


async def test_refused_by_the_bucket_that_binds_longest(limiter) -> None:
    limits = Limits(rpm=2, tpm=1000)
    assert await take(limiter, "k", limits, 400, 2) == 2           # requests empty, 200 tokens
    small = await limiter.acquire("k", limits, 100)               # only requests bind
    assert small.refused_by == "requests"
    assert small.retry_after_s == pytest.approx(30.0, abs=0.05)
    big = await limiter.acquire("k", limits, 900)                 # 700 tokens = 42 s > 30 s
    assert big.refused_by == "tokens"
    assert big.retry_after_s == pytest.approx(42.0, abs=0.05)


async def test_request_over_token_capacity_admitted_only_when_full(limiter) -> None:
    limits = Limits(tpm=100)
    huge = await limiter.acquire("k", limits, 250)
    assert huge.allowed and huge.remaining_tokens == 0             # took the whole bucket
    again = await limiter.acquire("k", limits, 250)
    assert not again.allowed and again.refused_by == "tokens"
    assert again.retry_after_s == pytest.approx(60.0, abs=0.05)    # until full again


async def test_settle_refund_capped_and_debt(limiter) -> None:
    limits = Limits(tpm=100)
    assert (await limiter.acquire("k", limits, 80)).remaining_tokens == 20
    await limiter.settle("k", limits, reserved=80, actual=30)       # refund 50
    assert (await limiter.acquire("k", limits, 0)).remaining_tokens == 70
    await limiter.settle("k", limits, reserved=80, actual=0)        # refund past capacity
    assert (await limiter.acquire("k", limits, 0)).remaining_tokens == 100
    await limiter.settle("k", limits, reserved=50, actual=250)      # 200 more: debt of 100
    in_debt = await limiter.acquire("k", limits, 1)
    assert not in_debt.allowed and in_debt.refused_by == "tokens"
    assert in_debt.remaining_tokens == 0
    assert in_debt.retry_after_s == pytest.approx(101 * 0.6, abs=0.05)
    assert in_debt.reset_tokens_s == pytest.approx(200 * 0.6, abs=0.05)


async def test_settle_charges_real_usage_of_an_over_capacity_request(limiter) -> None:
    """Such a request only took the bucket's capacity; settling charges what it really used."""
    limits = Limits(tpm=100)
    assert (await limiter.acquire("k", limits, 250)).allowed
    await limiter.settle("k", limits, reserved=250, actual=30)
    assert (await limiter.acquire("k", limits, 0)).remaining_tokens == 70
    await limiter.settle("k", limits, reserved=0, actual=70)
    await limiter.settle("k", limits, reserved=250, actual=250)    # 150 over what it took
    assert (await limiter.acquire("k", limits, 0)).reset_tokens_s == pytest.approx(
        250 * 0.6, abs=0.05)


async def test_unlimited_and_partial_limits(limiter) -> None:
    unlimited = await limiter.acquire("k", Limits(), 10**9)
    assert unlimited == RateLimitDecision(allowed=True)
    assert unlimited.headers() == []
    tokens_only = await limiter.acquire("k", Limits(tpm=1000), 10)
    assert tokens_only.limit_requests is None and tokens_only.remaining_requests is None
    assert [name for name, _ in tokens_only.headers()] == [
        b"x-ratelimit-limit-tokens", b"x-ratelimit-remaining-tokens",
        b"x-ratelimit-reset-tokens"]


async def test_keys_have_separate_buckets(limiter) -> None:
    limits = Limits(rpm=1)
    assert (await limiter.acquire("alice", limits, 0)).allowed
    assert not (await limiter.acquire("alice", limits, 0)).allowed
    assert (await limiter.acquire("bob", limits, 0)).allowed


async def test_many_coroutines_never_over_admit(limiter) -> None:
    limits = Limits(rpm=50, tpm=5000)
    decisions = await asyncio.gather(
        *(limiter.acquire("k", limits, 100) for _ in range(300)))
    assert sum(d.allowed for d in decisions) == 50                 # refill in ms: < 1 request
    assert all(d.refused_by in ("requests", "tokens") for d in decisions if not d.allowed)


async def test_headers_values_and_format(limiter) -> None:
    decision = await limiter.acquire("k", Limits(rpm=60, tpm=1000), 250)
    headers = dict(decision.headers())
    assert headers[b"x-ratelimit-limit-requests"] == b"60"
    assert headers[b"x-ratelimit-remaining-requests"] == b"59"
    assert headers[b"x-ratelimit-limit-tokens"] == b"1000"
    assert headers[b"x-ratelimit-remaining-tokens"] == b"750"
    if isinstance(limiter, MemoryRateLimiter):                    # exact on the fake clock
        assert headers[b"x-ratelimit-reset-requests"] == b"1s"
        assert headers[b"x-ratelimit-reset-tokens"] == b"15s"
    else:
        assert float(headers[b"x-ratelimit-reset-tokens"].rstrip(b"s")) == pytest.approx(
            15.0, abs=0.05)


# --- the arithmetic on a fake clock ----------------------------------------------------------


async def test_continuous_refill(memory: MemoryRateLimiter, clock: FakeClock) -> None:
    limits = Limits(rpm=6)                                         # one request per 10 s
    assert await take(memory, "k", limits, 0, 6) == 6
    clock.advance(5.0)
    half = await memory.acquire("k", limits, 0)
    assert not half.allowed and half.retry_after_s == pytest.approx(5.0)
    clock.advance(5.0)
    assert (await memory.acquire("k", limits, 0)).allowed
    clock.advance(1000.0)                                          # never above capacity
    assert await take(memory, "k", limits, 0, 10) == 6


@pytest.mark.parametrize("rpm, tpm, tokens", [(7, None, 0), (13, 997, 333), (None, 61, 17),
                                              (3, 10**6, 10**5)])
async def test_retry_after_is_exact(memory: MemoryRateLimiter, clock: FakeClock,
                                    rpm: int | None, tpm: int | None, tokens: int) -> None:
    limits = Limits(rpm=rpm, tpm=tpm)
    while (await memory.acquire("k", limits, tokens)).allowed:
        clock.advance(0.37)
    for _ in range(5):
        refused = await memory.acquire("k", limits, tokens)
        assert not refused.allowed and refused.retry_after_s > 0
        clock.advance(refused.retry_after_s - 1e-3)
        assert not (await memory.acquire("k", limits, tokens)).allowed
        clock.advance(1e-3)
        assert (await memory.acquire("k", limits, tokens)).allowed


async def test_debt_delays_until_repaid(memory: MemoryRateLimiter, clock: FakeClock) -> None:
    limits = Limits(rpm=1000, tpm=600)                             # 10 tokens per second
    assert (await memory.acquire("k", limits, 100)).allowed        # 500 left
    await memory.settle("k", limits, reserved=100, actual=1100)    # -500
    clock.advance(50.0)                                            # back to 0
    refused = await memory.acquire("k", limits, 10)
    assert not refused.allowed and refused.retry_after_s == pytest.approx(1.0)
    clock.advance(1.0)
    assert (await memory.acquire("k", limits, 10)).allowed


async def test_reset_counts_down_to_full(memory: MemoryRateLimiter, clock: FakeClock) -> None:
    limits = Limits(rpm=60, tpm=600)
    first = await memory.acquire("k", limits, 300)
    assert (first.reset_requests_s, first.reset_tokens_s) == pytest.approx((1.0, 30.0))
    clock.advance(10.0)
    later = await memory.acquire("k", limits, 0)
    assert (later.remaining_requests, later.remaining_tokens) == (59, 400)
    assert (later.reset_requests_s, later.reset_tokens_s) == pytest.approx((1.0, 20.0))


async def test_full_buckets_are_forgotten(memory: MemoryRateLimiter, clock: FakeClock) -> None:
    limits = Limits(rpm=10**6)
    for i in range(1024):
        await memory.acquire(f"key-{i}", limits, 0)
    assert memory.num_buckets == 1024
    clock.advance(1.0)                                             # all refilled by now
    for _ in range(1024):
        await memory.acquire("busy", limits, 0)                    # the 2048th acquire sweeps
    assert memory.num_buckets == 1                                 # only "busy" is not full
    assert (await memory.acquire("key-1", limits, 0)).remaining_requests == 10**6 - 1


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 20), st.integers(0, 300), st.integers(0, 400),
                          st.floats(0, 20)), max_size=60))
def test_never_admits_more_than_capacity_plus_refill(
        ops: list[tuple[float, int, int, float]]) -> None:
    """Whatever the sequence: admitted requests <= capacity + refill, and tokens really used
    (settled) <= capacity + refill + the debt still owed at the end."""
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    limits = Limits(rpm=5, tpm=200)
    num_admitted = num_used = 0
    loop = asyncio.new_event_loop()
    try:
        for advance_s, tokens, actual, generation_s in ops:
            clock.advance(advance_s)
            if loop.run_until_complete(limiter.acquire("k", limits, tokens)).allowed:
                num_admitted += 1
                num_used += actual
                clock.advance(generation_s)
                loop.run_until_complete(limiter.settle("k", limits, tokens, actual))
        final = loop.run_until_complete(limiter.acquire("k", limits, 0))
    finally:
        loop.close()
    elapsed_s = clock.now - FakeClock().now
    assert num_admitted <= 5 + elapsed_s * 5 / 60 + 1e-6
    token_level = 200 - final.reset_tokens_s * 200 / 60
    assert num_used + token_level <= 200 + elapsed_s * 200 / 60 + 1e-6


@pytest.mark.parametrize("seconds, text", [
    (0, "0s"), (-3, "0s"), (0.0004, "0s"), (0.5, "0.5s"), (1.25, "1.25s"), (12, "12s"),
    (59.9996, "60s"), (60, "1m0s"), (90, "1m30s"), (3599.6, "1h0m0s"), (7200, "2h0m0s")])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_headers_floor_remaining_and_clamp_negative() -> None:
    decision = RateLimitDecision(allowed=False, limit_requests=10, remaining_requests=-3,
                                 reset_requests_s=90.0, limit_tokens=None)
    assert decision.headers() == [(b"x-ratelimit-limit-requests", b"10"),
                                  (b"x-ratelimit-remaining-requests", b"0"),
                                  (b"x-ratelimit-reset-requests", b"1m30s")]


# --- Redis only: real refill, expiry, failure ------------------------------------------------


async def test_redis_refills_on_its_own_clock(redis_url: str) -> None:
    limiter = RedisRateLimiter(redis_url)
    limits = Limits(tpm=6000)                                      # 100 tokens per second
    assert (await limiter.acquire("k", limits, 6000)).allowed
    refused = await limiter.acquire("k", limits, 30)
    assert not refused.allowed
    assert 0.25 < refused.retry_after_s <= 0.3
    await asyncio.sleep(refused.retry_after_s + 0.02)
    assert (await limiter.acquire("k", limits, 30)).allowed
    await limiter.close()


async def test_redis_keys_expire_after_refilling(redis_url: str) -> None:
    limiter = RedisRateLimiter(redis_url, prefix="t:")
    client = aioredis.Redis.from_url(redis_url)
    await limiter.acquire("k", Limits(rpm=60, tpm=600), 300)       # full in 1 s and 30 s
    assert 149_000 < await client.pttl("t:{k}") <= 150_000          # + 2 min margin
    await limiter.settle("k", Limits(rpm=60, tpm=600), reserved=300, actual=900)
    assert 209_000 < await client.pttl("t:{k}") <= 210_000          # debt: full in 90 s
    assert await limiter.acquire("k", Limits(), 1) == RateLimitDecision(allowed=True)
    await client.aclose()
    await limiter.close()


async def test_redis_down_fails_open_or_raises(unused_port: int) -> None:
    url = f"redis://127.0.0.1:{unused_port}/0"
    open_limiter = RedisRateLimiter(url)
    decision = await open_limiter.acquire("k", Limits(rpm=1), 1)
    assert decision == RateLimitDecision(allowed=True, is_unchecked=True)
    await open_limiter.settle("k", Limits(tpm=10), 1, 5)          # no exception
    await open_limiter.close()
    strict = RedisRateLimiter(url, fail_open=False)
    with pytest.raises(LimiterUnavailableError):
        await strict.acquire("k", Limits(rpm=1), 1)
    await strict.close()


@pytest.fixture
def unused_port() -> int:
    return free_port()


# --- two gateway processes, one Redis --------------------------------------------------------

HAMMER = textwrap.dedent("""
    import asyncio, json, sys, time
    import redis.asyncio as aioredis
    from gateway.ratelimit import Limits
    from gateway.stores.redis_ratelimit import RedisRateLimiter

    async def redis_time_s(client):
        seconds, micros = await client.time()
        return seconds + micros / 1e6

    async def main(url, rpm, duration_s, concurrency):
        client = aioredis.Redis.from_url(url)
        limiter = RedisRateLimiter(client)
        limits = Limits(rpm=rpm, tpm=10**9)
        await limiter.acquire("warm-up", limits, 1)      # script loaded, connections open
        print("ready", flush=True)
        sys.stdin.readline()                             # the test says go to both at once
        counts = {"admitted": 0, "refused": 0}
        started_at = await redis_time_s(client)
        deadline = time.monotonic() + duration_s

        async def worker():
            while time.monotonic() < deadline:
                decision = await limiter.acquire("shared", limits, 7)
                counts["admitted" if decision.allowed else "refused"] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        ended_at = await redis_time_s(client)
        print(json.dumps({**counts, "started_at": started_at, "ended_at": ended_at}))
        await client.aclose()

    asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])))
""")


def test_two_processes_share_one_limit_within_two_percent(redis_url: str) -> None:
    rpm, duration_s = 1200, 4.0
    workers = [subprocess.Popen(
        [sys.executable, "-c", HAMMER, redis_url, str(rpm), str(duration_s), "8"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for worker in workers:
            assert worker.stdout.readline().strip() == "ready"
        for worker in workers:
            worker.stdin.write("go\n")
            worker.stdin.flush()
        results = [json.loads(worker.communicate(timeout=60)[0]) for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    assert all(worker.returncode == 0 for worker in workers)
    admitted = sum(r["admitted"] for r in results)
    # The bucket starts full at the first take, after the earliest start; Redis's clock.
    window_s = max(r["ended_at"] for r in results) - min(r["started_at"] for r in results)
    expected = rpm + rpm / 60 * window_s
    print(f"2 processes admitted {admitted} of {sum(r['admitted'] + r['refused'] for r in results)}"
          f" attempts; expected {expected:.1f} over {window_s:.3f} s")
    assert all(r["admitted"] > 0 and r["refused"] > 0 for r in results)   # both competed
    assert abs(admitted - expected) <= 0.02 * expected
    assert admitted <= expected + 1                                       # never over
