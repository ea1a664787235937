"""What the middleware chain learns about one request, shared through the ASGI scope.

The body middleware parses the JSON once; auth sets the key; the route middleware the
variant's decision; the proxy records the variant (and fallback model) that answered, the
usage and whether the response completed, which rate limiting (settle), budgets and
the cache (store or not) read after the response.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

from starlette.types import Message, Scope

from gateway.keys import ApiKey
from gateway.routing import RouteDecision

STATE_KEY = "quiver.gateway"
MODEL_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})


@dataclass
class RequestContext:
    raw_body: bytes = b""
    body: dict[str, Any] | None = None        # set for model calls (MODEL_PATHS, POST)
    key: ApiKey | None = None
    pinned_variant: str | None = None         # x-quiver-variant, once the key may pin
    estimated_tokens: int = 0                 # prompt + most completion, before the call
    estimated_prompt_tokens: int = 0          # its prompt part (charged for cut streams)
    cache_status: str = "bypass"              # hit | miss | bypass
    decision: RouteDecision | None = None     # the variant chosen, before the cache
    variant: str | None = None                # the variant that answered
    fallback_model: str | None = None         # the fallback model that answered, if one did
    prompt_tokens: int = 0
    completion_tokens: int = 0
    is_complete: bool = False                 # a 200 answer that ended normally

    @property
    def model(self) -> str | None:
        return None if self.body is None else self.body.get("model")

    @property
    def answering_model(self) -> str | None:
        """The model whose answer the client got: charged, counted and labelled with."""
        return self.fallback_model or self.model

    @property
    def sticky_key(self) -> str:
        """What keeps a caller on one variant: the request's `user`, else the key's name."""
        user = self.body.get("user") if self.body is not None else None
        if isinstance(user, str) and user:
            return user
        return self.key.name if self.key is not None else ""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def is_model_call(scope: Scope) -> bool:
    return scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in MODEL_PATHS


def request_context(scope: Scope) -> RequestContext:
    state = scope.setdefault("state", {})
    context = state.get(STATE_KEY)
    if context is None:
        context = state[STATE_KEY] = RequestContext()
    return context


def with_headers(message: Message, extra: list[tuple[bytes, bytes]]) -> Message:
    """An `http.response.start` message with `extra` headers appended (names lower-case)."""
    names = {name for name, _ in extra}
    headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
    return {**message, "headers": headers + extra}


class InFlight:
    """Model calls between admission and the end of their bookkeeping (usage charged,
    limits settled). Shutdown waits for them before it closes the stores, so a call cut
    off by the grace period still has its usage written."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def __enter__(self) -> InFlight:
        self.count += 1
        self._idle.clear()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once no call is in flight; False when `timeout_s` passed first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        return self.count == 0
