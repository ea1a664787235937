"""`Router`: picks the variant of a public model that serves a request.

Weighted rendezvous hashing: every variant gets the score `-ln(u) / weight`, `u` a stable
hash of (sticky key, model, variant) mapped into (0, 1), and the lowest score wins. Over many
keys each variant wins its weight's share; when one weight rises, only that variant's scores
fall, so a key moves only *to* it, never between the others (and vice versa for a fall).

Weights are percents. Changing a non-stable variant's weight gives or takes the difference
from the stable variant, so weights that sum to 100 keep doing so; an automatic rollback is
the same move to 0, with the freed share going to stable. Rollbacks come from call outcomes
(`record`, judged by `RollbackMonitor`) and from answer agreement (`record_agreement`, fed
by `gateway.routing.quality`'s replays and judged by `QualityMonitor`).

The weights, rollbacks and epochs are one `RouteDoc` per model (`gateway.routing.state`),
kept by a `RouteState` backend: this process's (`memory`), or one shared by every gateway
replica through Redis, which also pools the judging samples so every replica judges a
canary on all of its traffic (`ingest`). A rollback takes effect here at once and is then
written to the backend; with several replicas reaching one verdict, the one whose write
lands counts it (`rollback_won`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import time
from collections.abc import Callable
from typing import Any, get_args

from gateway.errors import BadRequestError, NotFoundError, RouteStateDownError
from gateway.metrics import GatewayMetrics
from gateway.routing import CallOutcome, RouteDecision
from gateway.routing.agreement import QualityMonitor
from gateway.routing.fallback import FALLBACK_REASONS
from gateway.routing.rollback import RollbackMonitor, RollbackReason, RollbackVerdict
from gateway.routing.state import (
    MemoryRouteState,
    RouteDoc,
    RouteState,
    RouteStateUnavailableError,
    Sample,
)
from gateway.settings import ModelRouteSettings, RollbackSettings

logger = logging.getLogger(__name__)

_HASH_SPAN = float(2**64)


def rendezvous_score(sticky_key: str, model: str, variant: str, weight: float) -> float:
    """Lower wins. `weight` must be > 0."""
    digest = hashlib.blake2b(f"{sticky_key}\x00{model}\x00{variant}".encode(),
                             digest_size=8).digest()
    u = (int.from_bytes(digest, "big") + 0.5) / _HASH_SPAN  # strictly inside (0, 1)
    return -math.log(u) / weight


class Router:
    def __init__(self, routes: list[ModelRouteSettings], rollback: RollbackSettings,
                 metrics: GatewayMetrics, *, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None, state: RouteState | None = None) -> None:
        self._routes = {route.name: route for route in routes}
        self._configured = {route.name: {v.name: v.weight for v in route.variants}
                            for route in routes}
        self._docs = {route.name: RouteDoc.initial(route) for route in routes}
        self._foreign_versions: dict[str, int] = {}  # docs of another config, logged once
        self._upstream_models = {
            (route.name, v.name): v.upstream_model or route.name
            for route in routes for v in route.variants}
        self._monitor = RollbackMonitor(rollback, clock=clock)
        self._quality = QualityMonitor(rollback.quality, rollback.window_seconds, clock=clock)
        self._clock = clock
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._fallbacks = {route.name: list(route.fallbacks) for route in routes}
        self.state = state or MemoryRouteState()
        self.state.bind(self, self._docs)
        for route in routes:
            self._update_gauges(route.name)
            for fallback in route.fallbacks:  # zeros, so increase() works before one
                for reason in FALLBACK_REASONS:
                    metrics.fallbacks.labels(model=route.name, fallback=fallback,
                                             reason=reason)
            for variant in route.variants:  # zeros, so increase() works before a rollback
                if variant.name != route.stable:
                    for reason in get_args(RollbackReason):
                        metrics.rollbacks.labels(model=route.name, variant=variant.name,
                                                 reason=reason)

    def model_names(self) -> list[str]:
        return list(self._routes)

    def upstream_model(self, model: str, variant: str) -> str:
        """The model name a variant's replicas serve (its `upstream_model`, else the
        public name)."""
        return self._upstream_models[(model, variant)]

    def fallbacks(self, model: str) -> list[str]:
        """The models tried in order when `model` cannot answer (its config's list)."""
        return list(self._fallbacks.get(model, ()))

    def choose(self, model: str, sticky_key: str, pinned_variant: str | None = None, *,
               may_shadow: bool = True) -> RouteDecision:
        """The variant for one request; a pinned variant is honoured even at weight 0."""
        route = self._route(model)
        if pinned_variant is None:
            variant = self._pick(model, sticky_key)
        elif pinned_variant in self._docs[model].weights:
            variant = pinned_variant
        else:
            raise BadRequestError(
                f"model {model!r} has no variant {pinned_variant!r}; "
                f"variants: {', '.join(self._docs[model].weights)}", code="unknown_variant")
        return RouteDecision(model=model, variant=variant,
                             upstream_model=self._upstream_models[(model, variant)],
                             shadow_variant=(self._shadow_for(route, variant)
                                             if may_shadow else None))

    def record(self, model: str, variant: str, outcome: CallOutcome) -> None:
        """One finished call's outcome; may roll a canary of `model` back."""
        if (model, variant) in self._upstream_models:
            self._take_own(model, variant, outcome=outcome)

    def canaries(self, model: str) -> list[str]:
        """The variants of `model` judged against stable: not stable, weight above 0."""
        stable = self._routes[model].stable
        return [name for name, weight in self._docs[model].weights.items()
                if name != stable and weight > 0]

    def is_stable(self, model: str, variant: str) -> bool:
        return self._route(model).stable == variant

    def record_agreement(self, model: str, variant: str, agreement: float) -> None:
        """One replay's agreement with stable (0..1); may roll the canary back (`quality`)."""
        if variant in self.canaries(model):
            self._take_own(model, variant, agreement=agreement)

    def weights(self) -> dict[str, dict[str, float]]:
        return {name: dict(doc.weights) for name, doc in self._docs.items()}

    async def set_weight(self, model: str, variant: str, weight: float) -> None:
        """Set a variant's weight (an operator's act; clears a rollback of that variant and
        judges it afresh). `RouteStateUnavailableError` when a shared state is out of reach."""
        stable = self._route(model).stable
        if variant not in self._docs[model].weights:
            raise NotFoundError(f"model {model!r} has no variant {variant!r}",
                                param="variant", code="variant_not_found")
        if not (isinstance(weight, int | float) and 0 <= weight <= 100):
            raise BadRequestError(f"weight must be a number from 0 to 100, got {weight!r}",
                                  param="weight", code="invalid_weight")
        try:
            doc = await self.state.update(
                model, lambda doc: doc.with_weight(stable, variant, float(weight)))
        except RouteStateUnavailableError as exc:
            raise RouteStateDownError(f"cannot change routes now: {exc}",
                                      retry_after_s=1.0) from exc
        logger.info("route weights of %s set to %s (state version %d)", model,
                    dict(doc.weights), doc.version)

    def snapshot(self) -> dict[str, Any]:
        """Routes, weights, rollbacks and window stats, JSON-ready (`GET /admin/routes`)."""
        return {name: self._model_snapshot(route) for name, route in self._routes.items()}

    # -- what the state backend tells the router (`RouteSink`) --------------------------

    def apply(self, model: str, doc: RouteDoc) -> None:
        """Route `model` by `doc`; a variant whose epoch moved is judged afresh."""
        old = self._docs.get(model)
        if old is None:
            return
        if set(doc.weights) != set(self._configured[model]):
            # another release's config (a variant added or removed): its variants are not
            # ours to route to; keep ours until this replica is replaced too
            if doc.version != self._foreign_versions.get(model):
                self._foreign_versions[model] = doc.version
                logger.warning("route state of %s (version %d) names variants %s, this "
                               "gateway's config %s: not applied", model, doc.version,
                               sorted(doc.weights), sorted(self._configured[model]))
            return
        for variant, epoch in doc.epochs.items():
            if old.epochs.get(variant) != epoch:
                self._monitor.forget(model, variant)
                self._quality.forget(model, variant)
        self._docs[model] = doc
        if old.weights != doc.weights:
            self._update_gauges(model)
            if self.state.is_shared:
                logger.info("route weights of %s now %s (state version %d)", model,
                            dict(doc.weights), doc.version)

    def ingest(self, model: str, samples: list[Sample]) -> None:
        """Samples other replicas took; those of a past epoch are dropped."""
        doc = self._docs.get(model)
        if doc is None:
            return
        for sample in samples:
            if doc.epochs.get(sample.variant) == sample.epoch:
                self._take(model, sample)
        self._judge(model)

    def rollback_won(self, verdict: RollbackVerdict) -> None:
        logger.warning("rolled back model %s variant %s (to %s): %s: %s", verdict.model,
                       verdict.variant, self._routes[verdict.model].stable, verdict.reason,
                       verdict.detail)
        self._metrics.rollbacks.labels(model=verdict.model, variant=verdict.variant,
                                       reason=verdict.reason).inc()

    # -- internals ---------------------------------------------------------------------

    def _route(self, model: str) -> ModelRouteSettings:
        route = self._routes.get(model)
        if route is None:
            raise NotFoundError(f"The model {model!r} does not exist", param="model",
                                code="model_not_found")
        return route

    def _pick(self, model: str, sticky_key: str) -> str:
        candidates = [(rendezvous_score(sticky_key, model, name, weight), name)
                      for name, weight in self._docs[model].weights.items() if weight > 0]
        assert candidates, f"every variant of {model} has weight 0"
        return min(candidates)[1]

    def _shadow_for(self, route: ModelRouteSettings, variant: str) -> str | None:
        shadow = route.shadow
        if shadow is None or shadow.variant == variant or shadow.percent <= 0:
            return None
        return shadow.variant if self._rng.random() * 100 < shadow.percent else None

    def _take_own(self, model: str, variant: str, *, outcome: CallOutcome | None = None,
                  agreement: float | None = None) -> None:
        sample = Sample(variant, self._docs[model].epochs[variant], self._clock(),
                        outcome=outcome, agreement=agreement)
        self.state.publish(model, sample)
        self._take(model, sample)
        self._judge(model)

    def _take(self, model: str, sample: Sample) -> None:
        if sample.outcome is not None:
            self._monitor.record(model, sample.variant, sample.outcome, at=sample.at)
        elif sample.agreement is not None:
            stats = self._quality.record(model, sample.variant, sample.agreement,
                                         at=sample.at)
            if stats.mean is not None:
                self._metrics.canary_agreement.labels(model=model,
                                                      variant=sample.variant).set(stats.mean)

    def _judge(self, model: str) -> None:
        doc = self._docs[model]
        stable = self._routes[model].stable
        for variant in self.canaries(model):
            if variant in doc.rolled_back:
                continue
            verdict = (self._monitor.judge(model, variant, stable)
                       or self._quality.judge(model, variant))
            if verdict is not None:
                self._roll_back(verdict)

    def _roll_back(self, verdict: RollbackVerdict) -> None:
        """Take the canary out here at once, then write it to the backend."""
        model, variant = verdict.model, verdict.variant
        stable = self._routes[model].stable
        epoch = self._docs[model].epochs[variant]

        def change(doc: RouteDoc) -> RouteDoc | None:
            return doc.with_rollback(stable, verdict, epoch)

        local = change(self._docs[model])
        if local is None:
            return
        self.apply(model, local)
        self.state.roll_back(model, change, verdict)

    def _update_gauges(self, model: str) -> None:
        for name, share in self._shares(model).items():
            self._metrics.route_weight.labels(model=model, variant=name).set(share)

    def _shares(self, model: str) -> dict[str, float]:
        weights = self._docs[model].weights
        total = sum(weights.values())
        return {name: 100.0 * weight / total for name, weight in weights.items()}

    def _model_snapshot(self, route: ModelRouteSettings) -> dict[str, Any]:
        shares = self._shares(route.name)
        doc = self._docs[route.name]
        variants: dict[str, Any] = {}
        for name, weight in doc.weights.items():
            verdict = doc.rolled_back.get(name)
            stats = self._monitor.stats(route.name, name)
            agreement = self._quality.stats(route.name, name)
            variants[name] = {
                "weight": weight,
                "configured_weight": self._configured[route.name][name],
                "share_percent": shares[name],
                "upstream_model": self._upstream_models[(route.name, name)],
                "rolled_back": verdict is not None,
                "rollback_reason": verdict.reason if verdict else None,
                "rollback_detail": verdict.detail if verdict else None,
                "window": {"samples": stats.num_samples, "keys": stats.num_keys,
                           "error_rate": stats.error_rate, "p95_ttft_s": stats.p95_ttft_s,
                           "p95_itl_s": stats.p95_itl_s},
                "quality": {"samples": agreement.num_samples, "agreement": agreement.mean},
            }
        shadow = route.shadow
        return {"stable": route.stable, "variants": variants,
                "shadow": ({"variant": shadow.variant, "percent": shadow.percent}
                           if shadow else None),
                "state": {**self.state.status(), "version": doc.version}}
