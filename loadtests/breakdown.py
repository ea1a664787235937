"""Per-tenant and per-turn figures from the call log: TTFT percentiles per tenant (API key),
and the prefix-cache hit share (cached prompt tokens / prompt tokens, from each response's
`usage.prompt_tokens_details.cached_tokens`) of first turns against follow-up turns.

Percentiles here are exact (nearest rank over every value), not Locust's rounded histogram.
A hit share counts only answered calls whose server reported cached tokens; None when none did.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from loadtests.calllog import OK, RATE_LIMITED, CallRecord
from loadtests.tenants import Tenant

SINGLE_CALLS = "single calls"
FIRST_TURNS = "first turns"
FOLLOW_UPS = "follow-ups"


def percentile(values: list[float], fraction: float) -> float | None:
    """The smallest value with at least `fraction` of the values at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(fraction * len(ordered))) - 1]


@dataclass(frozen=True)
class CacheShare:
    num_calls: int          # answered calls that reported cached tokens
    prompt_tokens: int
    cached_tokens: int
    # Follow-ups: of `ceiling_prompt_tokens` (their prompts), how many repeat the previous
    # turn's prompt + reply, i.e. the most a prefix cache could serve from their own history.
    ceiling_prompt_tokens: int = 0
    reusable_tokens: int = 0

    @property
    def hit_share(self) -> float | None:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else None

    @property
    def ceiling(self) -> float | None:
        if not self.ceiling_prompt_tokens:
            return None
        return self.reusable_tokens / self.ceiling_prompt_tokens

    @classmethod
    def of(cls, records: Iterable[CallRecord]) -> CacheShare:
        counted = [r for r in records if r.status == OK and r.cached_tokens is not None
                   and r.prompt_tokens is not None]
        known = [r for r in counted if r.reusable_tokens is not None]
        return cls(len(counted), sum(r.prompt_tokens or 0 for r in counted),
                   sum(r.cached_tokens or 0 for r in counted),
                   sum(r.prompt_tokens or 0 for r in known),
                   sum(min(r.reusable_tokens or 0, r.prompt_tokens or 0) for r in known))


@dataclass(frozen=True)
class TtftStats:
    num_samples: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None

    @classmethod
    def of(cls, records: Iterable[CallRecord]) -> TtftStats:
        values = [r.ttft_ms for r in records if r.status == OK and r.ttft_ms is not None]
        return cls(len(values), percentile(values, 0.5), percentile(values, 0.95),
                   percentile(values, 0.99))


@dataclass(frozen=True)
class TenantStats:
    tenant: str
    weight: float | None        # None: a tenant the log names but the run did not configure
    num_calls: int              # sent and finished, 429s included
    num_failures: int
    num_rate_limited: int
    calls_per_s: float          # num_calls over the run's span
    ttft: TtftStats
    cache: CacheShare


@dataclass(frozen=True)
class TurnStats:
    label: str          # "single calls", "turn 1", "turn 2", ..., "first turns", "follow-ups"
    num_calls: int
    ttft: TtftStats
    cache: CacheShare


@dataclass(frozen=True)
class Breakdown:
    tenants: list[TenantStats]
    turns: list[TurnStats]

    def turn(self, label: str) -> TurnStats | None:
        return next((t for t in self.turns if t.label == label), None)

    @property
    def follow_up_hit_share(self) -> float | None:
        follow_ups = self.turn(FOLLOW_UPS)
        return None if follow_ups is None else follow_ups.cache.hit_share

    @property
    def max_tenant_p95_ttft_ms(self) -> float | None:
        values = [t.ttft.p95_ms for t in self.tenants if t.ttft.p95_ms is not None]
        return max(values) if values else None


def span_s(records: list[CallRecord]) -> float:
    if len(records) < 2:
        return 0.0
    starts = [r.started_at for r in records]
    return max(starts) - min(starts)


def tenant_stats(records: list[CallRecord], tenants: list[Tenant]) -> list[TenantStats]:
    weights = {t.name: t.weight for t in tenants}
    names = [t.name for t in tenants] + sorted({r.tenant for r in records} - set(weights))
    run_span = span_s(records)
    stats = []
    for name in names:
        mine = [r for r in records if r.tenant == name]
        stats.append(TenantStats(
            tenant=name, weight=weights.get(name), num_calls=len(mine),
            num_failures=sum(r.status not in (OK, RATE_LIMITED) for r in mine),
            num_rate_limited=sum(r.status == RATE_LIMITED for r in mine),
            calls_per_s=len(mine) / run_span if run_span > 0 else 0.0,
            ttft=TtftStats.of(mine), cache=CacheShare.of(mine)))
    return stats


def turn_group(label: str, records: list[CallRecord]) -> TurnStats:
    return TurnStats(label, len(records), TtftStats.of(records), CacheShare.of(records))


def turn_stats(records: list[CallRecord]) -> list[TurnStats]:
    """Single calls (no conversation), each turn number, then first turns and follow-ups."""
    groups = []
    if singles := [r for r in records if r.turn is None]:
        groups.append(turn_group(SINGLE_CALLS, singles))
    turns = [r for r in records if r.turn is not None]
    for number in sorted({r.turn for r in turns if r.turn is not None}):
        groups.append(turn_group(f"turn {number}", [r for r in turns if r.turn == number]))
    if turns:
        groups.append(turn_group(FIRST_TURNS, [r for r in turns if r.turn == 1]))
        groups.append(turn_group(FOLLOW_UPS, [r for r in turns if r.turn and r.turn > 1]))
    return groups


def compute_breakdown(records: list[CallRecord], tenants: list[Tenant]) -> Breakdown:
    return Breakdown(tenants=tenant_stats(records, tenants), turns=turn_stats(records))
