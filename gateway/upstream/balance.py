"""Which replica of a variant takes a call: prefix-aware with bounded load, or the least busy.

`balance: prefix` (the default) ranks a variant's replicas for a call's affinity key by
rendezvous hashing (highest `hash(key, replica URL)` first) and takes the first usable one
whose outstanding requests stay within `balance_load_factor` (1.5) x the average after this call
("consistent hashing with bounded loads", Mirrokni et al. 2018); a replica over it *spills*
the call to the next in the key's order instead of queueing it. So calls sharing a key meet
their KV prefix cache on one replica, no replica takes much more than its share, and a
replica joining or leaving moves only the keys it wins (each key's ranking of the others is
unchanged). Unhealthy replicas and open circuits are skipped like absent ones.

The affinity key (`affinity_key`): the `x-quiver-session` header, else the request's `user`,
else the leading part of the prompt: a chat's system prompt and first user turn (what every
later turn of the conversation starts with; the first `PREFIX_CHARS` characters of each), a
completion's first `PREFIX_CHARS` characters. A call with none (embeddings, a token-id
prompt) goes to the least busy replica, as does every call of a variant with `balance:
least_outstanding`.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from gateway.upstream.replica import Replica

SESSION_HEADER = "x-quiver-session"
LOAD_FACTOR = 1.5           # default `balance_load_factor`: times the average outstanding
PREFIX_CHARS = 2048         # how much of a prompt (or a chat's opening) names its prefix
CHAT_PATH, COMPLETIONS_PATH = "/v1/chat/completions", "/v1/completions"
BalanceOutcome = Literal["preferred", "spill", "unkeyed"]


@dataclass(frozen=True)
class BalanceChoice:
    replica: Replica
    outcome: BalanceOutcome   # preferred: the key's first usable replica; spill: a later one


def affinity_key(body: dict[str, Any] | None, path: str, session: str | None) -> str | None:
    """What keeps a call with others on one replica; None: nothing to keep it with."""
    if session:
        return f"session:{session}"
    if body is None:
        return None
    user = body.get("user")
    if isinstance(user, str) and user:
        return f"user:{user}"
    if path == CHAT_PATH:
        return _chat_opening(body.get("messages"))
    if path == COMPLETIONS_PATH:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        return f"prompt:{prompt[:PREFIX_CHARS]}" if isinstance(prompt, str) and prompt else None
    return None


def _chat_opening(messages: Any) -> str | None:
    """The system prompt(s) and the first user turn, each as JSON cut to `PREFIX_CHARS`
    (cut each, not the whole: a long system prompt shared by every conversation must not
    crowd out the turn that tells conversations apart)."""
    if not isinstance(messages, list) or not messages:
        return None
    opening = []
    for message in messages:
        text = json.dumps(message, sort_keys=True, separators=(",", ":"), default=str)
        opening.append(text[:PREFIX_CHARS])
        if isinstance(message, dict) and message.get("role") == "user":
            break
    return "chat:" + "\x1e".join(opening)


def rendezvous_order(key: str, replicas: Sequence[Replica]) -> list[Replica]:
    """The key's ranking of `replicas`, best first; stable whatever else is in the list."""
    def score(replica: Replica) -> bytes:
        return hashlib.blake2b(f"{key}\x00{replica.url}".encode(), digest_size=8).digest()

    return sorted(replicas, key=score, reverse=True)


def load_bound(replicas: Sequence[Replica], load_factor: float = LOAD_FACTOR) -> int:
    """Most outstanding requests a replica may hold once this call joins them."""
    total = sum(r.num_outstanding for r in replicas) + 1
    return max(1, math.ceil(load_factor * total / len(replicas)))


def choose_by_prefix(key: str, candidates: Sequence[Replica], usable: Sequence[Replica],
                     load_factor: float = LOAD_FACTOR) -> BalanceChoice:
    """The first of the key's ranking among `candidates` within the load bound (the bound
    over every `usable` replica); the least loaded candidate when all are over it."""
    bound = load_bound(usable, load_factor)
    order = rendezvous_order(key, candidates)
    for index, replica in enumerate(order):
        if replica.num_outstanding + 1 <= bound:
            return BalanceChoice(replica, "preferred" if index == 0 else "spill")
    fewest = min(order, key=lambda r: r.num_outstanding)
    return BalanceChoice(fewest, "preferred" if fewest is order[0] else "spill")


def choose_least_outstanding(candidates: Sequence[Replica],
                             rng: random.Random) -> BalanceChoice:
    fewest = min(r.num_outstanding for r in candidates)
    return BalanceChoice(rng.choice([r for r in candidates if r.num_outstanding == fewest]),
                         "unkeyed")
