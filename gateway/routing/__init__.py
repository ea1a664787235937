"""Canary routing: which variant of a public model serves a request.

`Router.choose` assigns a variant by weighted rendezvous hashing of a sticky key (the API
key's name, or the request's `user`), so a user stays on one variant while weights change;
`RollbackMonitor` drops a canary's weight to 0 when it does worse than stable.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RouteDecision:
    model: str                 # public model name
    variant: str
    upstream_model: str        # the name the variant's replicas serve
    shadow_variant: str | None = None  # also mirror this request there, answers discarded


@dataclass(frozen=True)
class CallOutcome:
    """One finished call as canary judging sees it (client errors are never one)."""

    key: str                    # the API key's name: a key's share of a window is capped
    is_error: bool              # the variant's fault: a 5xx or a stream it broke
    ttft_s: float | None = None  # streams: until the first generated token
    itl_s: float | None = None   # inter-token latency; unary calls: time per output token
