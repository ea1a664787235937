"""API keys: what a key is, how it is hashed, and the `KeyStore` protocol.

A key is `qk-` + 43 url-safe characters (256 bits). Only its SHA-256 is stored; a
high-entropy secret needs no salt or slow hash (as with GitHub or Stripe tokens). Lookups
go by hash, and the stored hash is compared with `hmac.compare_digest`.

Stores: SQLite (`gateway.stores.sqlite_keys`, default, file `.quiver/keys.db`) and Redis
(`gateway.stores.redis_keys`, for several gateway replicas) implement `KeyStore`;
`gateway.stores.open_key_store(location)` picks one from a path or a `redis://` URL. This
module imports no store, so the stores can import it.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, get_args

KEY_PREFIX = "qk-"
KEY_NAME_PATTERN = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
KeyPriority = Literal["high", "normal", "low"]
PRIORITIES: tuple[KeyPriority, ...] = get_args(KeyPriority)  # served in this order (saturated)


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    """A key's record; never holds the secret itself."""

    name: str
    key_hash: str
    models: tuple[str, ...] = ()          # empty: every model
    rpm: int | None = None
    tpm: int | None = None
    budget_tokens: int | None = None      # lifetime token budget; None: unlimited
    used_tokens: int = 0                  # tokens spent against the budget so far
    owner: str | None = None              # tenant for cache isolation; default: the name
    can_pin_variant: bool = False         # may send `x-quiver-variant`
    max_concurrency: int | None = None    # calls in flight at once; more wait (admission)
    priority: KeyPriority = "normal"      # class served first when upstreams are saturated
    created_at: float = 0.0
    revoked_at: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def tenant(self) -> str:
        """Cache namespace and fair-sharing unit: the owner's, or this very key's (a
        re-created name is new)."""
        return f"owner:{self.owner}" if self.owner else f"key:{self.key_hash[:32]}"

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None

    def allows_model(self, model: str) -> bool:
        return not self.models or model in self.models

    @property
    def budget_left(self) -> int | None:
        return None if self.budget_tokens is None else self.budget_tokens - self.used_tokens


class KeyStoreError(Exception):
    """A key store operation failed in a way the caller should report (name taken, ...)."""


class KeyStore(Protocol):
    """Where keys live. Every method is async; implementations never log secrets."""

    async def create(self, key: ApiKey) -> None:
        """Add a key; `KeyStoreError` when an unrevoked key already has its name."""

    async def list_keys(self, *, include_revoked: bool = False) -> list[ApiKey]: ...

    async def revoke(self, name: str) -> bool:
        """Revoke the active key `name`; False when there is none."""

    async def active_keys(self) -> dict[str, ApiKey]:
        """Every unrevoked key by hash: the gateway's auth snapshot (refreshed each second)."""

    async def add_usage(self, name: str, tokens: int) -> int:
        """Add `tokens` to the key's `used_tokens` atomically; returns the new total.

        Counts against the active key of that name, else the most recently created one (a
        request still in flight when its key was revoked is counted); `KeyNotFoundError`
        when no key ever had the name."""

    async def close(self) -> None: ...


class InvalidKeyError(KeyStoreError):
    """A key record breaks a rule (name pattern, positive limits); the message names it."""


class KeyNameTakenError(KeyStoreError):
    """An unrevoked key already has this name."""


class KeyNotFoundError(KeyStoreError):
    """No key (or no active key, for `revoke`) has this name."""


class KeyStoreUnavailableError(KeyStoreError):
    """The store cannot be reached or read (file not writable, Redis down, ...)."""


_POSITIVE_FIELDS = ("rpm", "tpm", "budget_tokens", "max_concurrency")
MAX_LIMIT = 2**62  # far beyond any real limit; keeps SQLite's and Lua's integers exact


def validate_key(key: ApiKey) -> None:
    """Raise `InvalidKeyError` naming the first field of `key` that breaks a rule."""
    if not KEY_NAME_PATTERN.fullmatch(key.name):
        raise InvalidKeyError(
            f"invalid key name {key.name!r}: use 1-64 letters, digits or . _ @ -")
    for field_name in _POSITIVE_FIELDS:
        value = getattr(key, field_name)
        if value is not None and (isinstance(value, bool) or not 1 <= value <= MAX_LIMIT):
            raise InvalidKeyError(f"{field_name} must be an integer from 1 to {MAX_LIMIT}, "
                                  f"got {value!r}")
    if key.priority not in PRIORITIES:
        raise InvalidKeyError(f"priority must be one of {', '.join(PRIORITIES)}, "
                              f"got {key.priority!r}")
    if key.used_tokens < 0:
        raise InvalidKeyError(f"used_tokens must be 0 or more, got {key.used_tokens!r}")
    if any(not model or model != model.strip() for model in key.models):
        raise InvalidKeyError(f"model names must be non-empty and unpadded, got {key.models!r}")
    if key.owner is not None and not key.owner.strip():
        raise InvalidKeyError("owner must not be blank")
    if not re.fullmatch(r"[0-9a-f]{64}", key.key_hash):
        raise InvalidKeyError(f"key {key.name!r} has no valid SHA-256 key_hash")


def mint_key(name: str, *, models: tuple[str, ...] = (), rpm: int | None = None,
             tpm: int | None = None, budget_tokens: int | None = None,
             owner: str | None = None, can_pin_variant: bool = False,
             max_concurrency: int | None = None, priority: KeyPriority = "normal",
             metadata: dict[str, str] | None = None) -> tuple[str, ApiKey]:
    """A fresh secret and its validated record (created now); store the record, show the
    secret once."""
    secret = generate_key()
    key = ApiKey(name=name, key_hash=hash_key(secret), models=tuple(models), rpm=rpm, tpm=tpm,
                 budget_tokens=budget_tokens, owner=owner, can_pin_variant=can_pin_variant,
                 max_concurrency=max_concurrency, priority=priority, created_at=time.time(),
                 metadata=dict(metadata or {}))
    validate_key(key)
    return secret, key


def public_record(key: ApiKey) -> dict[str, Any]:
    """The JSON view of a key for `quiver keys list --json` and `GET /admin/keys`: every
    field except `key_hash` (the hash is never shown, like the secret)."""
    return {
        "name": key.name,
        "models": list(key.models),
        "rpm": key.rpm,
        "tpm": key.tpm,
        "budget_tokens": key.budget_tokens,
        "used_tokens": key.used_tokens,
        "owner": key.owner,
        "can_pin_variant": key.can_pin_variant,
        "max_concurrency": key.max_concurrency,
        "priority": key.priority,
        "created_at": key.created_at,
        "revoked_at": key.revoked_at,
        "metadata": dict(key.metadata),
    }
