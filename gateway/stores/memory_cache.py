"""`MemoryCache`: the response cache in this process's memory, LRU under a byte cap, with TTL.

Sizes are `CachedResponse.size_bytes` (body plus a fixed overhead). An entry larger than
`max_entry_bytes` (or than the whole cap) is not stored. An expired entry is dropped when
it is read, or evicted in LRU order when room is needed (no background sweep). The
`cache_entries` and `cache_bytes` gauges of a passed `GatewayMetrics` follow every change.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from gateway.cache import CachedResponse
from gateway.metrics import GatewayMetrics


@dataclass(frozen=True)
class _Slot:
    entry: CachedResponse
    expires_at: float


class MemoryCache:
    def __init__(self, max_bytes: int, max_entry_bytes: int, ttl_seconds: float,
                 metrics: GatewayMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_bytes <= 0 or max_entry_bytes <= 0 or ttl_seconds <= 0:
            raise ValueError(
                f"cache sizes and ttl must be positive, got max_bytes={max_bytes}, "
                f"max_entry_bytes={max_entry_bytes}, ttl_seconds={ttl_seconds}")
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes
        self.ttl_seconds = ttl_seconds
        self._metrics = metrics
        self._clock = clock
        self._slots: OrderedDict[str, _Slot] = OrderedDict()   # least recently used first
        self._num_bytes = 0

    @property
    def num_entries(self) -> int:
        return len(self._slots)

    @property
    def num_bytes(self) -> int:
        return self._num_bytes

    async def get(self, key: str) -> CachedResponse | None:
        slot = self._slots.get(key)
        if slot is None:
            return None
        if self._clock() >= slot.expires_at:
            self._remove(key)
            self._update_gauges()
            return None
        self._slots.move_to_end(key)
        return slot.entry

    async def put(self, key: str, entry: CachedResponse) -> None:
        size = entry.size_bytes
        if size > self.max_entry_bytes or size > self.max_bytes:
            return
        if key in self._slots:
            self._remove(key)
        while self._slots and self._num_bytes + size > self.max_bytes:
            self._remove(next(iter(self._slots)))
        self._slots[key] = _Slot(entry, self._clock() + self.ttl_seconds)
        self._num_bytes += size
        self._update_gauges()

    async def close(self) -> None:
        self._slots.clear()
        self._num_bytes = 0
        self._update_gauges()

    def _remove(self, key: str) -> None:
        slot = self._slots.pop(key)
        self._num_bytes -= slot.entry.size_bytes

    def _update_gauges(self) -> None:
        if self._metrics is not None:
            self._metrics.cache_entries.set(len(self._slots))
            self._metrics.cache_bytes.set(self._num_bytes)
