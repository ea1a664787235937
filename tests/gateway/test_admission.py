"""The admission controller on its own (no processes): who starts at once, who waits, in
which order waiters start, and how waits end (queue full, timeout, cancellation)."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.admission import AdmissionController, Slot, Ticket
from gateway.errors import ConcurrencyLimitError, SaturatedError, TenantQueueFullError
from gateway.metrics import GatewayMetrics
from gateway.settings import AdmissionSettings

MODEL, VARIANT = "m", "stable"


def ticket(tenant: str, *, key: str | None = None, priority: str = "normal",
           max_concurrency: int | None = None) -> Ticket:
    return Ticket(MODEL, VARIANT, key_name=key or tenant, tenant=tenant, priority=priority,
                  max_concurrency=max_concurrency)


class Harness:
    def __init__(self, slots: int | None, *, clock=time.monotonic, **settings) -> None:
        self.slots = slots
        self.metrics = GatewayMetrics()
        self.controller = AdmissionController(
            AdmissionSettings(**settings), self.metrics, lambda m, v: self.slots,
            variants=[(MODEL, VARIANT)], clock=clock)
        self.started: list[str] = []     # labels, in the order their calls got a slot

    def hold(self, label: str, call: Ticket) -> asyncio.Task[Slot]:
        """Ask for a slot in a task; its label is recorded when it gets one."""
        async def run() -> Slot:
            slot = await self.controller.admit(call)
            self.started.append(label)
            return slot
        return asyncio.create_task(run())

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    @property
    def waiting(self) -> int:
        return self.controller.num_waiting(MODEL, VARIANT)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_call_with_room_starts_at_once_and_gives_its_slot_back():
    harness = Harness(slots=2)
    slot = harness.controller.try_admit(ticket("a"))
    assert slot is not None and slot.waited_s == 0.0
    assert harness.controller.num_in_flight(MODEL, VARIANT) == 1
    assert harness.sample("quiver_gateway_key_in_flight_requests", key="a") == 1
    slot.release()
    slot.release()  # idempotent
    assert harness.controller.num_in_flight(MODEL, VARIANT) == 0
    assert harness.sample("quiver_gateway_key_in_flight_requests", key="a") == 0
    assert harness.sample("quiver_gateway_admission_wait_seconds_count", model=MODEL,
                          variant=VARIANT, priority="normal") == 1


async def test_unbounded_variants_never_queue():
    harness = Harness(slots=None)
    slots = [harness.controller.try_admit(ticket("a")) for _ in range(500)]
    assert all(slot is not None for slot in slots)


async def test_a_quiet_tenant_starts_before_a_noisy_tenants_backlog():
    harness = Harness(slots=2)
    held = [harness.controller.try_admit(ticket("noisy")) for _ in range(2)]
    assert harness.controller.try_admit(ticket("noisy")) is None
    noisy = [harness.hold(f"noisy{i}", ticket("noisy")) for i in range(5)]
    await settle()
    quiet = harness.hold("quiet", ticket("quiet"))
    await settle()
    assert harness.waiting == 6
    held[0].release()
    await settle()
    assert harness.started == ["quiet"]      # it arrived last, yet holds no slot
    (await quiet).release()
    await settle()
    # noisy holds its fair share (1 of 2 slots while quiet is active): the free slot stays
    # spare for quiet's next call
    assert harness.started == ["quiet"]
    held[1].release()
    await settle()
    assert harness.started == ["quiet", "noisy0"]   # FIFO within the tenant
    for task in noisy:
        task.cancel()
    await settle()
    (await noisy[0]).release()


async def test_the_tenant_holding_fewest_slots_goes_next():
    harness = Harness(slots=3)
    held = [harness.controller.try_admit(ticket(t)) for t in ("a", "a", "b")]
    tasks = [harness.hold("a", ticket("a")), harness.hold("b", ticket("b")),
             harness.hold("c", ticket("c"))]
    await settle()
    held[0].release()          # a: 1, b: 1, c: 0 in flight
    await settle()
    assert harness.started == ["c"]
    held[1].release()          # a: 0, b: 1 in flight: a's waiter, though b's is as old
    await settle()
    assert harness.started == ["c", "a"]
    for task in tasks:
        task.cancel()


async def test_priority_classes_are_served_strictly_in_order():
    harness = Harness(slots=1)
    first = harness.controller.try_admit(ticket("x"))
    tasks = {label: harness.hold(label, ticket(label, priority=label))
             for label in ("low", "normal", "high")}
    await settle()
    assert harness.sample("quiver_gateway_admission_queued_requests", model=MODEL,
                          variant=VARIANT, priority="high") == 1
    first.release()
    for label in ("high", "normal", "low"):
        (await tasks[label]).release()   # each, once it started, lets the next one go
    assert harness.started == ["high", "normal", "low"]


async def test_a_keys_max_concurrency_holds_its_calls_back_but_not_others():
    harness = Harness(slots=10)
    capped = ticket("t", key="capped", max_concurrency=1)
    first = harness.controller.try_admit(capped)
    assert first is not None
    assert harness.controller.try_admit(capped) is None   # room upstream, but the key is full
    waiting = harness.hold("capped", capped)
    await settle()
    assert harness.controller.try_admit(ticket("t", key="other")) is not None  # same tenant
    assert harness.started == []
    first.release()
    await settle()
    assert harness.started == ["capped"]
    assert harness.controller.key_in_flight("capped") == 1
    (await waiting).release()


async def test_a_full_tenant_queue_is_a_429_that_says_why():
    harness = Harness(slots=1, max_queue_per_tenant=2)
    held = harness.controller.try_admit(ticket("a"))
    tasks = [harness.hold(str(i), ticket("a")) for i in range(2)]
    await settle()
    with pytest.raises(TenantQueueFullError) as refused:
        await harness.controller.admit(ticket("a"))
    assert refused.value.status_code == 429 and refused.value.code == "tenant_queue_full"
    assert "max_queue_per_tenant" in str(refused.value)
    other = harness.hold("b", ticket("b"))     # another tenant's queue has room
    await settle()
    assert harness.waiting == 3
    assert harness.sample("quiver_gateway_admission_rejections_total", model=MODEL,
                          variant=VARIANT, key="a", reason="queue_full") == 1
    for task in [*tasks, other]:
        task.cancel()
    held.release()


async def test_a_capped_keys_full_queue_is_a_429_concurrency_limit_exceeded():
    harness = Harness(slots=None, max_queue_per_tenant=1)
    capped = ticket("t", key="capped", max_concurrency=2)
    held = [harness.controller.try_admit(capped) for _ in range(2)]
    task = harness.hold("queued", capped)
    await settle()
    with pytest.raises(ConcurrencyLimitError) as refused:
        await harness.controller.admit(capped)
    assert refused.value.status_code == 429
    assert refused.value.code == "concurrency_limit_exceeded"
    assert "2 requests in flight (its max_concurrency)" in str(refused.value)
    assert harness.sample("quiver_gateway_admission_rejections_total", model=MODEL,
                          variant=VARIANT, key="capped", reason="concurrency_limit") == 1
    task.cancel()
    for slot in held:
        slot.release()


async def test_no_slot_in_time_is_a_503_with_retry_after():
    harness = Harness(slots=1, queue_timeout_seconds=0.05, retry_after_seconds=3)
    held = harness.controller.try_admit(ticket("a"))
    with pytest.raises(SaturatedError) as refused:
        await harness.controller.admit(ticket("b"))
    assert refused.value.status_code == 503 and refused.value.code == "upstreams_saturated"
    assert refused.value.headers()["retry-after"] == "3"
    assert "saturated" in str(refused.value)
    assert harness.waiting == 0            # it left the queue
    assert harness.sample("quiver_gateway_admission_rejections_total", model=MODEL,
                          variant=VARIANT, key="b", reason="queue_timeout") == 1
    held.release()


async def test_a_capped_key_that_times_out_gets_a_429_not_a_503():
    harness = Harness(slots=None, queue_timeout_seconds=0.05)
    capped = ticket("t", key="capped", max_concurrency=1)
    held = harness.controller.try_admit(capped)
    with pytest.raises(ConcurrencyLimitError):
        await harness.controller.admit(capped)
    held.release()


async def test_a_caller_that_leaves_the_queue_frees_its_place():
    harness = Harness(slots=1, max_queue_per_tenant=1)
    held = harness.controller.try_admit(ticket("a"))
    leaving = harness.hold("leaving", ticket("a"))
    await settle()
    assert harness.waiting == 1
    leaving.cancel()
    await settle()
    assert harness.waiting == 0
    staying = harness.hold("staying", ticket("a"))   # the place is free again
    await settle()
    held.release()
    await settle()
    assert harness.started == ["staying"]
    (await staying).release()
    assert harness.controller.num_in_flight(MODEL, VARIANT) == 0


async def test_a_slot_granted_as_the_caller_leaves_is_given_back():
    harness = Harness(slots=1)
    held = harness.controller.try_admit(ticket("a"))
    leaving = harness.hold("leaving", ticket("b"))
    await settle()
    held.release()           # grants the waiter's future ...
    leaving.cancel()         # ... and the caller leaves before it runs again
    await settle()
    assert leaving.cancelled()
    assert harness.controller.num_in_flight(MODEL, VARIANT) == 0
    assert harness.controller.try_admit(ticket("c")) is not None


async def test_beyond_its_fair_share_a_tenant_leaves_a_spare_slot_per_active_tenant():
    harness = Harness(slots=4)
    quiet = harness.controller.try_admit(ticket("quiet"))
    quiet.release()                          # quiet is idle now, but was active just now
    noisy = [harness.controller.try_admit(ticket("noisy")) for _ in range(4)]
    assert [slot is not None for slot in noisy] == [True, True, True, False]
    assert harness.controller.try_admit(ticket("quiet")) is not None   # no wait at all


async def test_a_lone_tenant_may_fill_every_slot():
    harness = Harness(slots=4)
    assert all(harness.controller.try_admit(ticket("alone")) is not None for _ in range(4))


async def test_tenants_idle_past_active_tenant_seconds_are_forgotten():
    now = [0.0]
    harness = Harness(slots=2, active_tenant_seconds=5, clock=lambda: now[0])
    harness.controller.try_admit(ticket("quiet")).release()
    assert harness.controller.try_admit(ticket("noisy")) is not None
    assert harness.controller.try_admit(ticket("noisy")) is None    # one kept for quiet
    now[0] = 6.0
    assert harness.controller.try_admit(ticket("noisy")) is not None  # quiet went idle


async def test_max_tenant_share_keeps_slots_for_other_tenants():
    harness = Harness(slots=4, max_tenant_share=0.5)
    noisy = [harness.controller.try_admit(ticket("noisy")) for _ in range(3)]
    assert [slot is not None for slot in noisy] == [True, True, False]
    assert harness.controller.try_admit(ticket("quiet")) is not None   # no wait at all


async def test_capacity_that_grows_is_used_on_the_next_release():
    harness = Harness(slots=1, spare_slots_per_tenant=0)
    held = harness.controller.try_admit(ticket("a"))
    tasks = [harness.hold(f"w{i}", ticket("b")) for i in range(3)]
    await settle()
    harness.slots = 3        # a replica came back
    held.release()
    await settle()
    assert harness.started == ["w0", "w1", "w2"]
    for task in tasks:
        (await task).release()
