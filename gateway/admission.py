"""Admission: fair sharing of saturated upstreams between tenants, and per-key concurrency.

Every routed model call (after auth, limits, routing and the cache) takes a *slot* of its
variant before it goes upstream and gives it back when its response ends, however it ends
(answer, error, fallback, cancelled stream). A variant has `max_concurrency_per_replica` x
its usable replicas slots (`None`: unbounded; no usable replica: unbounded too, so the
relay fails fast or falls back instead of queueing). A call starts at once when

- its variant has a free slot,
- its key has fewer than its `max_concurrency` calls in flight (any variant), and
- its tenant holds fewer than `max_tenant_share` of the variant's slots;

otherwise it waits in its tenant's queue for that variant (bounded by
`max_queue_per_tenant`: a full queue is a 429, `concurrency_limit_exceeded` when the key's
own cap holds it back, else `tenant_queue_full`) for at most `queue_timeout_seconds` (then
a 503 `upstreams_saturated` with Retry-After, or the 429 when it was the key's cap).

Whenever a slot comes free, the next waiter is chosen: the highest priority class first
(`high`, `normal`, `low`; strict), then among tenants the one holding the fewest of the
variant's slots (ties: the longest waiting), FIFO within a tenant. A waiter held back by
its key's cap or its tenant's share is passed over, not waited for. So a tenant sending
many calls gets what the others leave, and a quiet tenant's call is the next to start.

A caller that leaves while queued (client disconnect, cancellation) leaves the queue;
a slot granted in that instant is given back. The queue lives in this gateway process: each
gateway replica shares out its own view of the upstreams (README, "Fair sharing"); only a
key's `max_concurrency` is also counted across replicas, by leases in Redis
(`gateway.stores.redis_leases`, taken before the slot, in the middleware). Pure asyncio;
no I/O.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.errors import (
    ConcurrencyLimitError,
    GatewayError,
    SaturatedError,
    TenantQueueFullError,
)
from gateway.keys import PRIORITIES, KeyPriority
from gateway.metrics import GatewayMetrics
from gateway.settings import AdmissionSettings

Priority = KeyPriority   # PRIORITIES: high, normal, low, served in this order
RejectReason = Literal["queue_full", "queue_timeout", "concurrency_limit"]
REJECT_REASONS: tuple[RejectReason, ...] = ("queue_full", "queue_timeout",
                                            "concurrency_limit")


@dataclass(frozen=True)
class Ticket:
    """What one call asks admission for."""

    model: str
    variant: str
    key_name: str
    tenant: str
    priority: Priority = "normal"
    max_concurrency: int | None = None    # the key's cap on its calls in flight


@dataclass(eq=False)
class _Waiter:
    ticket: Ticket
    seq: int
    enqueued: float
    future: asyncio.Future[Slot]


@dataclass(eq=False)
class _Pool:
    """One variant's slots and queues."""

    model: str
    variant: str
    num_in_flight: int = 0
    tenant_in_flight: dict[str, int] = field(default_factory=dict)
    # priority -> tenant -> waiters in arrival order
    queues: dict[Priority, dict[str, deque[_Waiter]]] = field(
        default_factory=lambda: {p: {} for p in PRIORITIES})
    num_waiting: dict[Priority, int] = field(default_factory=lambda: dict.fromkeys(PRIORITIES, 0))
    last_seen: dict[str, float] = field(default_factory=dict)   # tenant -> its last arrival

    def tenant_queue_length(self, tenant: str) -> int:
        return sum(len(self.queues[p].get(tenant, ())) for p in PRIORITIES)


class Slot:
    """A call's hold on one slot of its variant; `release()` gives it back (idempotent)."""

    def __init__(self, controller: AdmissionController, pool: _Pool, ticket: Ticket,
                 waited_s: float) -> None:
        self._controller, self._pool, self.ticket = controller, pool, ticket
        self.waited_s = waited_s
        self._is_released = False

    def release(self) -> None:
        if not self._is_released:
            self._is_released = True
            self._controller._release(self._pool, self.ticket)


@dataclass(frozen=True)
class Lease:
    """One call's hold on one of its key's `max_concurrency` places across gateways."""

    key_name: str
    lease_id: str
    is_checked: bool = True   # False: the store was down and the call went on unchecked


class KeyLeases(Protocol):
    """Keys' calls in flight counted across gateway replicas (`RedisKeyLeases`)."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def acquire(self, key_name: str, cap: int, *, wait_s: float) -> Lease | None:
        """A lease once the key has fewer than `cap` calls in flight anywhere, waiting up to
        `wait_s`; None when the wait ran out (`LimiterUnavailableError`: store down, closed)."""
        ...

    async def release(self, lease: Lease) -> None: ...


class AdmissionController:
    def __init__(self, settings: AdmissionSettings, metrics: GatewayMetrics,
                 capacity: Callable[[str, str], int | None], *,
                 variants: Iterable[tuple[str, str]] = (),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._metrics = metrics
        self._capacity = capacity           # a variant's slots now; None: unbounded
        self._clock = clock
        self._pools: dict[tuple[str, str], _Pool] = {}
        self._key_in_flight: dict[str, int] = {}
        self._seq = itertools.count()
        for model, variant in variants:     # zeros from the start, not "no data"
            self._pool(model, variant)
            for priority in PRIORITIES:
                metrics.admission_queue_depth.labels(model, variant, priority).set(0)

    # -- the caller's side -------------------------------------------------------------

    def try_admit(self, ticket: Ticket) -> Slot | None:
        """A slot at once when the call may start now (the fast path); else None."""
        pool = self._pool(ticket.model, ticket.variant)
        self._note_arrival(pool, ticket.tenant)
        if not self._may_start(pool, ticket):
            return None
        self._metrics.admission_wait.labels(pool.model, pool.variant,
                                            ticket.priority).observe(0.0)
        return self._grant(pool, ticket, 0.0)

    async def admit(self, ticket: Ticket) -> Slot:
        """A slot, at once or after waiting in the tenant's queue; a `GatewayError` (429 or
        503, saying why) when the queue is full or the wait runs out."""
        slot = self.try_admit(ticket)
        if slot is not None:
            return slot
        pool = self._pool(ticket.model, ticket.variant)
        if pool.tenant_queue_length(ticket.tenant) >= self.settings.max_queue_per_tenant:
            raise self._reject(pool, ticket, "queue_full")
        waiter = self._enqueue(pool, ticket)
        try:
            async with asyncio.timeout(self.settings.queue_timeout_seconds):
                return await waiter.future
        except TimeoutError:
            if waiter.future.done() and not waiter.future.cancelled():
                return waiter.future.result()   # granted as the time ran out
            self._dequeue(pool, waiter)
            raise self._reject(pool, ticket, "queue_timeout") from None
        except asyncio.CancelledError:
            self._dequeue(pool, waiter)
            if waiter.future.done() and not waiter.future.cancelled():
                waiter.future.result().release()   # granted in the same instant
            raise

    # -- state -------------------------------------------------------------------------

    def slots(self, model: str, variant: str) -> int | None:
        """The variant's slots now; None: unbounded."""
        return self._capacity(model, variant)

    def num_waiting(self, model: str, variant: str) -> int:
        pool = self._pools.get((model, variant))
        return 0 if pool is None else sum(pool.num_waiting.values())

    def num_in_flight(self, model: str, variant: str) -> int:
        pool = self._pools.get((model, variant))
        return 0 if pool is None else pool.num_in_flight

    def key_in_flight(self, key_name: str) -> int:
        return self._key_in_flight.get(key_name, 0)

    def key_cap_error(self, ticket: Ticket, reason: RejectReason, *,
                      where: str = "") -> GatewayError:
        """The 429 for a call its key's `max_concurrency` held back (counted, like every
        refusal); `where` names whose calls filled the cap (default: this gateway's)."""
        return self._reject(self._pool(ticket.model, ticket.variant), ticket, reason,
                            key_at_cap=True, where=where)

    # -- internals ---------------------------------------------------------------------

    def _pool(self, model: str, variant: str) -> _Pool:
        pool = self._pools.get((model, variant))
        if pool is None:
            pool = self._pools[(model, variant)] = _Pool(model, variant)
        return pool

    def _note_arrival(self, pool: _Pool, tenant: str) -> None:
        pool.last_seen.pop(tenant, None)   # re-inserted last: the dict stays oldest first
        pool.last_seen[tenant] = self._clock()

    def _tenant_cap(self, capacity: int) -> int:
        return max(1, math.floor(capacity * self.settings.max_tenant_share))

    def _is_key_at_cap(self, ticket: Ticket) -> bool:
        cap = ticket.max_concurrency
        return cap is not None and self._key_in_flight.get(ticket.key_name, 0) >= cap

    def _may_start(self, pool: _Pool, ticket: Ticket) -> bool:
        if self._is_key_at_cap(ticket):
            return False
        capacity = self._capacity(pool.model, pool.variant)
        if capacity is None:
            return True
        num_free = capacity - pool.num_in_flight
        held = pool.tenant_in_flight.get(ticket.tenant, 0)
        if num_free <= 0 or held >= self._tenant_cap(capacity):
            return False
        num_others = self._num_active_tenants(pool) - (ticket.tenant in pool.last_seen)
        if held < math.ceil(capacity / (num_others + 1)):   # within its fair share
            return True
        return num_free - 1 >= self.settings.spare_slots_per_tenant * num_others

    def _num_active_tenants(self, pool: _Pool) -> int:
        """Tenants that sent this variant a call within `active_tenant_seconds`, or still
        hold or wait for one of its slots (the others are forgotten)."""
        horizon = self._clock() - self.settings.active_tenant_seconds
        for tenant in [t for t, seen in pool.last_seen.items() if seen < horizon]:
            if tenant not in pool.tenant_in_flight and not pool.tenant_queue_length(tenant):
                del pool.last_seen[tenant]
        return len(pool.last_seen)

    def _grant(self, pool: _Pool, ticket: Ticket, waited_s: float) -> Slot:
        pool.num_in_flight += 1
        pool.tenant_in_flight[ticket.tenant] = pool.tenant_in_flight.get(ticket.tenant, 0) + 1
        num_key = self._key_in_flight[ticket.key_name] = (
            self._key_in_flight.get(ticket.key_name, 0) + 1)
        self._metrics.key_in_flight.labels(ticket.key_name).set(num_key)
        return Slot(self, pool, ticket, waited_s)

    def _release(self, pool: _Pool, ticket: Ticket) -> None:
        pool.num_in_flight -= 1
        left = pool.tenant_in_flight[ticket.tenant] - 1
        if left:
            pool.tenant_in_flight[ticket.tenant] = left
        else:
            del pool.tenant_in_flight[ticket.tenant]
        num_key = self._key_in_flight[ticket.key_name] - 1
        self._key_in_flight[ticket.key_name] = num_key
        self._metrics.key_in_flight.labels(ticket.key_name).set(num_key)
        assert pool.num_in_flight >= 0 and num_key >= 0, ticket
        for other in self._pools.values():   # a key's slot may free a waiter elsewhere
            if any(other.num_waiting.values()):
                self._dispatch(other)

    def _enqueue(self, pool: _Pool, ticket: Ticket) -> _Waiter:
        waiter = _Waiter(ticket, next(self._seq), self._clock(),
                         asyncio.get_running_loop().create_future())
        pool.queues[ticket.priority].setdefault(ticket.tenant, deque()).append(waiter)
        self._count_waiting(pool, ticket.priority, +1)
        return waiter

    def _dequeue(self, pool: _Pool, waiter: _Waiter) -> None:
        """Take a waiter out of its queue, if it is still there."""
        priority, tenant = waiter.ticket.priority, waiter.ticket.tenant
        queue = pool.queues[priority].get(tenant)
        if queue is None or waiter not in queue:
            return
        queue.remove(waiter)
        if not queue:
            del pool.queues[priority][tenant]
        self._count_waiting(pool, priority, -1)

    def _count_waiting(self, pool: _Pool, priority: Priority, delta: int) -> None:
        pool.num_waiting[priority] += delta
        self._metrics.admission_queue_depth.labels(pool.model, pool.variant, priority).set(
            pool.num_waiting[priority])

    def _dispatch(self, pool: _Pool) -> None:
        """Start waiters while slots are free, in the fair order (module docstring)."""
        while True:
            capacity = self._capacity(pool.model, pool.variant)
            if capacity is not None and pool.num_in_flight >= capacity:
                return
            waiter = self._next_waiter(pool)
            if waiter is None:
                return
            self._dequeue(pool, waiter)
            waited = self._clock() - waiter.enqueued
            self._metrics.admission_wait.labels(pool.model, pool.variant,
                                                waiter.ticket.priority).observe(waited)
            waiter.future.set_result(self._grant(pool, waiter.ticket, waited))

    def _next_waiter(self, pool: _Pool) -> _Waiter | None:
        for priority in PRIORITIES:
            best: tuple[int, int] | None = None
            chosen: _Waiter | None = None
            for tenant, queue in list(pool.queues[priority].items()):
                waiter = self._first_startable(pool, queue)
                if waiter is None:
                    continue
                rank = (pool.tenant_in_flight.get(tenant, 0), waiter.seq)
                if best is None or rank < best:
                    best, chosen = rank, waiter
            if chosen is not None:
                return chosen
        return None

    def _first_startable(self, pool: _Pool, queue: deque[_Waiter]) -> _Waiter | None:
        """The tenant's oldest live waiter that may start now (abandoned ones dropped)."""
        while queue and queue[0].future.done():   # cancelled, not yet cleaned up
            self._dequeue(pool, queue[0])
        for waiter in queue:
            if not waiter.future.done() and self._may_start(pool, waiter.ticket):
                return waiter
        return None

    def _reject(self, pool: _Pool, ticket: Ticket, reason: RejectReason, *,
                key_at_cap: bool = False, where: str = "") -> GatewayError:
        """The error for a call that cannot wait (queue full) or waited too long."""
        settings = self.settings
        if key_at_cap or self._is_key_at_cap(ticket):
            reason_label: RejectReason = "concurrency_limit"
            detail = ("its queue is full" if reason == "queue_full" else
                      f"no slot came free within {settings.queue_timeout_seconds:g}s")
            error: GatewayError = ConcurrencyLimitError(
                f"Concurrency limit reached for key {ticket.key_name!r}: "
                f"{ticket.max_concurrency} requests in flight{where} (its "
                f"max_concurrency), and {detail}. Wait for a request to finish, then retry.",
                retry_after_s=1.0)
        elif reason == "queue_full":
            reason_label = reason
            error = TenantQueueFullError(
                f"The upstreams of {pool.model}/{pool.variant} are saturated and this "
                f"tenant's queue already holds {settings.max_queue_per_tenant} requests "
                "(max_queue_per_tenant). Send fewer requests at once.", retry_after_s=1.0)
        else:
            reason_label = reason
            error = SaturatedError(
                f"The upstreams of {pool.model}/{pool.variant} are saturated: no slot came "
                f"free within {settings.queue_timeout_seconds:g}s "
                "(queue_timeout_seconds). Retry later.",
                retry_after_s=settings.retry_after_seconds)
        self._metrics.admission_rejections.labels(pool.model, pool.variant, ticket.key_name,
                                                  reason_label).inc()
        return error


class AdmissionCollector(Collector):
    """Each variant's slots and the calls holding them, read at scrape time."""

    def __init__(self, controller: AdmissionController,
                 variants: Iterable[tuple[str, str]]) -> None:
        self.controller = controller
        self.variants = list(variants)

    def collect(self) -> Iterator[Metric]:
        slots = GaugeMetricFamily(
            "quiver_gateway_admission_slots", "Calls a variant's usable replicas take at once "
            "(max_concurrency_per_replica x usable replicas); absent when unbounded",
            labels=["model", "variant"])
        in_flight = GaugeMetricFamily(
            "quiver_gateway_admission_in_flight_requests",
            "Calls holding a slot of the variant now", labels=["model", "variant"])
        for model, variant in self.variants:
            capacity = self.controller.slots(model, variant)
            if capacity is not None:
                slots.add_metric([model, variant], capacity)
            in_flight.add_metric([model, variant], self.controller.num_in_flight(model, variant))
        yield from (slots, in_flight)
