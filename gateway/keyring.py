"""`KeyRing`: the gateway's in-memory view of the key store, refreshed every second.

Authentication never touches the store: it hashes the presented secret and looks the hash
up in the last snapshot (then compares in constant time). A background task reloads the
snapshot every `refresh_seconds`, so keys created or revoked by `quiver keys` or the admin
API take effect within a second, without a restart.

Token usage is counted locally at once (so a budget holds between refreshes) and written
to the store in one batch per key just before each reload, and at shutdown: no store write
on the request path. While the store is unreachable the last snapshot keeps serving, and
`snapshot_age_s` / `is_store_up` say so (the `quiver_gateway_key_*` gauges).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time

from gateway.keys import ApiKey, KeyNotFoundError, KeyStore, hash_key

logger = logging.getLogger(__name__)
CLOSE_WAIT_S = 5.0  # for a reload in progress at shutdown


class KeyRing:
    def __init__(self, store: KeyStore, *, refresh_seconds: float = 1.0) -> None:
        self.store = store
        self.refresh_seconds = refresh_seconds
        self._keys: dict[str, ApiKey] = {}
        self._unflushed: dict[str, int] = {}      # not yet written to the store
        self._since_snapshot: dict[str, int] = {}  # not yet in the snapshot's used_tokens
        self._reserved: dict[str, int] = {}        # estimates of calls in flight
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._loaded_at: float | None = None       # monotonic time of the last snapshot
        self.is_store_up = False                   # the last reload succeeded

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._refresh_forever(), name="quiver-keyring")

    async def close(self) -> None:
        """Stop refreshing — between two reloads, never inside one: a write cancelled half
        way may have landed or not, and its batch would be lost or counted twice — then
        write what is pending and close the store."""
        if self._task is not None:
            self._stopping.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), CLOSE_WAIT_S)
            except TimeoutError:  # a reload that hangs: give up on it
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        try:
            await self.flush()
        finally:
            await self.store.close()

    async def flush(self) -> None:
        """Write pending usage per key; what fails stays pending (unless the key is gone).
        A store that fails is not tried again for the other keys until the next flush."""
        pending, self._unflushed = self._unflushed, {}
        failure: Exception | None = None
        for name, tokens in pending.items():
            if failure is not None:
                self._unflushed[name] = self._unflushed.get(name, 0) + tokens
                continue
            try:
                await self.store.add_usage(name, tokens)
            except KeyNotFoundError:
                logger.warning("dropping %d tokens of usage: key %r is not in the store",
                               tokens, name)
            except Exception as exc:
                failure = exc
                self._unflushed[name] = self._unflushed.get(name, 0) + tokens
        if failure is not None and self.is_store_up:  # said once per outage, not per second
            logger.warning("could not write usage to the key store (%s: %s); it stays pending",
                           type(failure).__name__, failure)

    def snapshot_age_s(self) -> float | None:
        """Seconds since keys were last loaded; None before the first load."""
        return None if self._loaded_at is None else time.monotonic() - self._loaded_at

    async def refresh(self) -> None:
        await self.flush()
        try:
            keys = await self.store.active_keys()
        except Exception:
            self.is_store_up = False
            raise
        self._loaded_at = time.monotonic()
        self.is_store_up = True
        self._keys = keys
        # usage recorded while the snapshot was read is in neither: keep counting it
        self._since_snapshot = dict(self._unflushed)

    async def _refresh_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.refresh_seconds)
            if self._stopping.is_set():
                return
            was_up = self.is_store_up
            try:
                await self.refresh()
            except Exception as exc:  # the store is down: keep the last snapshot, say so once
                if was_up:
                    logger.warning("key store unreachable (%s: %s); serving the last snapshot "
                                   "of keys until it answers again", type(exc).__name__, exc)
                continue
            if not was_up:
                logger.warning("key store reachable again; keys reloaded")

    def snapshot(self) -> list[ApiKey]:
        """The active keys as last loaded (for metrics and the admin API)."""
        return list(self._keys.values())

    def used_tokens(self, key: ApiKey) -> int:
        """Tokens the key has spent: the store's count plus what is not in it yet."""
        return key.used_tokens + self._since_snapshot.get(key.name, 0)

    def lookup(self, secret: str) -> ApiKey | None:
        digest = hash_key(secret)
        key = self._keys.get(digest)
        if key is None or not hmac.compare_digest(key.key_hash, digest):
            return None
        return key

    def budget_left(self, key: ApiKey) -> int | None:
        left = key.budget_left
        if left is None:
            return None
        return left - self._since_snapshot.get(key.name, 0)

    def reserve(self, key: ApiKey, tokens: int) -> int | None:
        """Hold `tokens` of the key's budget for a call; None when it fits (or there is no
        budget), else the tokens left (calls in flight counted) and nothing is held."""
        left = self.budget_left(key)
        if left is None:
            return None
        left -= self._reserved.get(key.name, 0)
        if tokens > left:
            return left
        self._reserved[key.name] = self._reserved.get(key.name, 0) + tokens
        return None

    def release(self, key: ApiKey, tokens: int) -> None:
        """Give back what `reserve` held (call once the call is over)."""
        if key.budget_tokens is None or key.name not in self._reserved:
            return
        held = self._reserved[key.name] - tokens
        if held > 0:
            self._reserved[key.name] = held
        else:
            del self._reserved[key.name]

    def add_usage(self, key: ApiKey, tokens: int) -> None:
        if tokens <= 0:
            return
        self._unflushed[key.name] = self._unflushed.get(key.name, 0) + tokens
        self._since_snapshot[key.name] = self._since_snapshot.get(key.name, 0) + tokens
