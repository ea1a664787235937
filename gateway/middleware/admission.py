"""A routed model call takes a slot of its variant before it goes upstream (`gateway.admission`).

Innermost of the chain, after the response cache (a hit needs no upstream slot) and the route
decision (the slot is its variant's). The call starts at once while its variant, key and
tenant have room; else it waits in its tenant's queue, and a client that disconnects while
waiting leaves it. A refusal (full queue, or no slot in time) is answered here in OpenAI's
shape. The slot is held until the response has ended however it ended (streams included,
fallbacks too: a fallback answers within the routed variant's slot) and given back in
`finally`. Quality replays and shadow copies go around it.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from common.asgi.disconnect import ClientDisconnectedError, until_disconnect
from common.errors import send_api_error
from gateway.admission import AdmissionController, Slot, Ticket
from gateway.context import RequestContext, is_model_call, request_context
from gateway.errors import GatewayError
from gateway.spans import phase_span, set_attributes


def ticket_for(context: RequestContext) -> Ticket:
    key, decision = context.key, context.decision
    assert key is not None and decision is not None  # auth and route ran
    return Ticket(model=decision.model, variant=decision.variant, key_name=key.name,
                  tenant=key.tenant, priority=key.priority,
                  max_concurrency=key.max_concurrency)


class AdmissionMiddleware:
    def __init__(self, app: ASGIApp, *, admission: AdmissionController) -> None:
        self.app = app
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        context = request_context(scope) if is_model_call(scope) else None
        if context is None or context.key is None or context.decision is None:
            await self.app(scope, receive, send)
            return
        ticket = ticket_for(context)
        slot = self.admission.try_admit(ticket)  # the fast path: no task, no span
        if slot is None:
            try:
                slot = await self.wait(ticket, receive)
            except ClientDisconnectedError:
                return  # left while queued: nobody to answer, nothing held
            except GatewayError as error:
                await send_api_error(send, error)
                return
        try:
            await self.app(scope, receive, send)
        finally:
            slot.release()

    async def wait(self, ticket: Ticket, receive: Receive) -> Slot:
        with phase_span("admission") as span:
            slot = await until_disconnect(receive, self.admission.admit(ticket))
            set_attributes(span, waited_s=slot.waited_s)
            return slot
