"""A routed model call takes a slot of its variant before it goes upstream (`gateway.admission`).

Innermost of the chain, after the response cache (a hit needs no upstream slot) and the route
decision (the slot is its variant's). The call starts at once while its variant, key and
tenant have room; else it waits in its tenant's queue, and a client that disconnects while
waiting leaves it. A refusal (full queue, or no slot in time) is answered here in OpenAI's
shape. The slot is held until the response has ended however it ended (streams included,
fallbacks too: a fallback answers within the routed variant's slot) and given back in
`finally`. Quality replays and shadow copies go around it.

With several gateway replicas sharing Redis (`rate_limit.backend: redis`), a call of a key
with a `max_concurrency` first takes one of the key's leases (`gateway.stores.redis_leases`),
so the cap holds across replicas: it waits for one (at most `max_queue_per_tenant` of the
key's calls wait here, for at most `queue_timeout_seconds`) before it waits for a slot, and
gives it back with the slot.
"""

from __future__ import annotations

from collections import Counter

from starlette.types import ASGIApp, Receive, Scope, Send

from common.asgi.disconnect import ClientDisconnectedError, until_disconnect
from common.errors import send_api_error
from gateway.admission import AdmissionController, KeyLeases, Lease, Slot, Ticket
from gateway.context import RequestContext, is_model_call, request_context
from gateway.errors import GatewayError, LimiterDownError
from gateway.ratelimit import LimiterUnavailableError
from gateway.spans import phase_span, set_attributes

ACROSS_REPLICAS = " across the gateway replicas"


def ticket_for(context: RequestContext) -> Ticket:
    key, decision = context.key, context.decision
    assert key is not None and decision is not None  # auth and route ran
    return Ticket(model=decision.model, variant=decision.variant, key_name=key.name,
                  tenant=key.tenant, priority=key.priority,
                  max_concurrency=key.max_concurrency)


class AdmissionMiddleware:
    def __init__(self, app: ASGIApp, *, admission: AdmissionController,
                 leases: KeyLeases | None = None) -> None:
        self.app = app
        self.admission = admission
        self.leases = leases
        self._waiting_for_lease: Counter[str] = Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        context = request_context(scope) if is_model_call(scope) else None
        if context is None or context.key is None or context.decision is None:
            await self.app(scope, receive, send)
            return
        ticket = ticket_for(context)
        lease: Lease | None = None
        try:
            if self.leases is not None and ticket.max_concurrency is not None:
                lease = await self.take_lease(ticket, receive)
            slot = self.admission.try_admit(ticket)  # the fast path: no task, no span
            if slot is None:
                slot = await self.wait(ticket, receive)
        except ClientDisconnectedError:
            await self.give_back(lease)
            return  # left while queued: nobody to answer, nothing held
        except GatewayError as error:
            await self.give_back(lease)
            await send_api_error(send, error)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            slot.release()
            await self.give_back(lease)

    async def wait(self, ticket: Ticket, receive: Receive) -> Slot:
        with phase_span("admission") as span:
            slot = await until_disconnect(receive, self.admission.admit(ticket))
            set_attributes(span, waited_s=slot.waited_s)
            return slot

    async def take_lease(self, ticket: Ticket, receive: Receive) -> Lease:
        """One of the key's `max_concurrency` places across every gateway replica."""
        assert self.leases is not None and ticket.max_concurrency is not None
        settings = self.admission.settings
        key_name = ticket.key_name
        if self._waiting_for_lease[key_name] >= settings.max_queue_per_tenant:
            raise self.admission.key_cap_error(ticket, "queue_full", where=ACROSS_REPLICAS)
        self._waiting_for_lease[key_name] += 1
        try:
            with phase_span("key_lease") as span:
                lease = await until_disconnect(receive, self.leases.acquire(
                    key_name, ticket.max_concurrency,
                    wait_s=settings.queue_timeout_seconds))
                set_attributes(span, granted=lease is not None)
        except LimiterUnavailableError:
            raise LimiterDownError(
                "Keys' concurrency limits cannot be checked right now (their store is "
                "unreachable), so this gateway refuses calls of keys with a max_concurrency; "
                "retry shortly.", retry_after_s=1.0) from None
        finally:
            self._waiting_for_lease[key_name] -= 1
            if not self._waiting_for_lease[key_name]:
                del self._waiting_for_lease[key_name]
        if lease is None:
            raise self.admission.key_cap_error(ticket, "queue_timeout", where=ACROSS_REPLICAS)
        return lease

    async def give_back(self, lease: Lease | None) -> None:
        if lease is not None and self.leases is not None:
            await self.leases.release(lease)
