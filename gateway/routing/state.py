"""Route state: what the router obeys for each public model — its variants' weights, their
rollbacks and epochs — and where that state lives (`routing.backend`).

A `RouteDoc` is one model's state. It changes only through its two transitions, each of
which returns a new doc one `version` up: `with_weight` (an operator's act: the variant's
`epoch` goes up and its rollback is cleared) and `with_rollback` (a verdict; declined, as
`None`, when the variant was rolled back already or its epoch has moved on since the
verdict's samples were taken). Samples and verdicts carry the epoch they were taken in, so
one from before an operator's change never counts against the variant's new weight.

Backends:
- `MemoryRouteState` (`memory`): the state of this process only.
- `gateway.stores.redis_routes.RedisRouteState` (`redis`): one state for every gateway
  replica, written by compare-and-set on the doc's version, and the judging samples pooled.

`Router` holds the docs it routes by and applies the backend's answers; the backend decides
what a change is measured against (this process's doc, or the one in Redis).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from gateway.errors import BadRequestError
from gateway.routing import CallOutcome
from gateway.routing.rollback import RollbackVerdict
from gateway.settings import ModelRouteSettings

Change = Callable[["RouteDoc"], "RouteDoc | None"]


def fingerprint(route: ModelRouteSettings) -> str:
    """What of a model's config the stored state was made from: its stable variant and
    each variant's configured weight. A gateway started with a different one resets it."""
    text = json.dumps({"stable": route.stable,
                       "variants": [[v.name, v.weight] for v in route.variants]})
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


@dataclass(frozen=True)
class RouteDoc:
    weights: Mapping[str, float]
    epochs: Mapping[str, int]
    rolled_back: Mapping[str, RollbackVerdict] = field(default_factory=dict)
    version: int = 0
    fingerprint: str = ""

    @classmethod
    def initial(cls, route: ModelRouteSettings, *, after: RouteDoc | None = None) -> RouteDoc:
        """The config's weights; `after` a stored doc, one version and epoch past it (so
        none of its samples or verdicts apply any more)."""
        base_epoch = 1 + max(after.epochs.values(), default=0) if after else 0
        return cls(weights={v.name: v.weight for v in route.variants},
                   epochs={v.name: base_epoch for v in route.variants},
                   version=after.version + 1 if after else 0,
                   fingerprint=fingerprint(route))

    def with_weight(self, stable: str, variant: str, weight: float) -> RouteDoc:
        """`variant` at `weight` percent, the difference given to or taken from `stable`
        (so weights summing to 100 keep doing so); `BadRequestError` if impossible."""
        weights = dict(self.weights)
        if variant != stable:
            stable_weight = weights[stable] - (weight - weights[variant])
            if stable_weight < 0:
                raise BadRequestError(
                    f"cannot set {variant} to {weight:g}: the stable variant {stable!r} has "
                    f"only {weights[stable]:g} to give; lower it elsewhere first",
                    param="weight", code="invalid_weight")
            weights[stable] = min(100.0, stable_weight)
        weights[variant] = weight
        if sum(weights.values()) <= 0:
            raise BadRequestError("at least one variant needs a weight above 0",
                                  param="weight", code="invalid_weight")
        rolled_back = {name: v for name, v in self.rolled_back.items() if name != variant}
        return replace(self, weights=weights, rolled_back=rolled_back,
                       epochs={**self.epochs, variant: self.epochs[variant] + 1},
                       version=self.version + 1)

    def with_rollback(self, stable: str, verdict: RollbackVerdict, epoch: int) -> RouteDoc | None:
        """The canary at weight 0, its share back to `stable`; None when it is rolled back
        already, at weight 0, or no longer in the `epoch` the verdict was reached in."""
        variant = verdict.variant
        if (variant in self.rolled_back or self.epochs.get(variant) != epoch
                or self.weights.get(variant, 0) <= 0 or variant == stable):
            return None
        weights = dict(self.weights)
        weights[stable] = min(100.0, weights[stable] + weights[variant])
        weights[variant] = 0.0
        return replace(self, weights=weights, rolled_back={**self.rolled_back, variant: verdict},
                       version=self.version + 1)

    def to_json(self) -> str:
        return json.dumps({
            "version": self.version, "fingerprint": self.fingerprint,
            "weights": dict(self.weights), "epochs": dict(self.epochs),
            "rolled_back": {name: {"reason": v.reason, "detail": v.detail}
                            for name, v in self.rolled_back.items()}})

    @classmethod
    def from_json(cls, model: str, text: str | bytes) -> RouteDoc:
        data = json.loads(text)
        return cls(weights={k: float(w) for k, w in data["weights"].items()},
                   epochs={k: int(e) for k, e in data["epochs"].items()},
                   rolled_back={name: RollbackVerdict(model, name, v["reason"], v["detail"])
                                for name, v in data["rolled_back"].items()},
                   version=int(data["version"]), fingerprint=str(data["fingerprint"]))


@dataclass(frozen=True)
class Sample:
    """One judging sample as replicas share it: a call's outcome or a replay's agreement."""

    variant: str
    epoch: int
    at: float                         # wall-clock seconds where shared
    outcome: CallOutcome | None = None
    agreement: float | None = None

    def to_list(self, origin: str) -> list[Any]:
        if self.outcome is not None:
            o = self.outcome
            return [origin, self.variant, self.epoch, self.at, "o", o.key, o.is_error,
                    o.ttft_s, o.itl_s]
        return [origin, self.variant, self.epoch, self.at, "a", self.agreement]

    @classmethod
    def from_list(cls, fields: list[Any]) -> tuple[str, Sample]:
        origin, variant, epoch, at, kind = fields[:5]
        if kind == "o":
            key, is_error, ttft_s, itl_s = fields[5:9]
            return origin, cls(variant, int(epoch), float(at),
                               outcome=CallOutcome(str(key), bool(is_error), ttft_s, itl_s))
        return origin, cls(variant, int(epoch), float(at), agreement=float(fields[5]))


class RouteSink(Protocol):
    """What a backend tells the router (implemented by `Router`)."""

    def apply(self, model: str, doc: RouteDoc) -> None:
        """Route `model` by `doc` from now on."""

    def ingest(self, model: str, samples: list[Sample]) -> None:
        """Judging samples other replicas took, then judge."""

    def rollback_won(self, verdict: RollbackVerdict) -> None:
        """This replica's write of `verdict` is the one that rolled the canary back."""


class RouteStateUnavailableError(Exception):
    """The shared route state could not be read or written (Redis unreachable)."""


class RouteState(Protocol):
    is_shared: bool

    def bind(self, sink: RouteSink, docs: Mapping[str, RouteDoc]) -> None:
        """Attach the router and its starting (config) docs; before `start`."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def update(self, model: str, change: Change) -> RouteDoc:
        """Apply `change` to the model's current state; the resulting doc (the current one
        when `change` declines). Raises what `change` raises, and
        `RouteStateUnavailableError`."""

    def roll_back(self, model: str, change: Change, verdict: RollbackVerdict) -> None:
        """Write a rollback the router has applied locally already; tell the sink
        `rollback_won` if this replica's write made it."""

    def publish(self, model: str, sample: Sample) -> None:
        """Share a sample this replica took (never waits)."""

    def status(self) -> dict[str, Any]:
        """For `GET /admin/routes`: the backend and how fresh its state is."""


class MemoryRouteState:
    """This process's state only (one gateway, or tests)."""

    is_shared = False

    def __init__(self) -> None:
        self._sink: RouteSink | None = None
        self._docs: dict[str, RouteDoc] = {}

    def bind(self, sink: RouteSink, docs: Mapping[str, RouteDoc]) -> None:
        self._sink, self._docs = sink, dict(docs)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def update(self, model: str, change: Change) -> RouteDoc:
        doc = change(self._docs[model]) or self._docs[model]
        self._commit(model, doc)
        return doc

    def roll_back(self, model: str, change: Change, verdict: RollbackVerdict) -> None:
        doc = change(self._docs[model])
        if doc is not None:
            self._commit(model, doc)
            assert self._sink is not None
            self._sink.rollback_won(verdict)

    def publish(self, model: str, sample: Sample) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return {"backend": "memory"}

    def _commit(self, model: str, doc: RouteDoc) -> None:
        self._docs[model] = doc
        assert self._sink is not None
        self._sink.apply(model, doc)
