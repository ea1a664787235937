"""DNS discovery of a variant's replicas (`discovery: dns`).

A variant's `replicas` then name hosts whose DNS records list the replicas — in Kubernetes a
headless Service, whose name resolves to the IPs of its ready pods — and each URL stands for
one replica per address: `http://svc-pods:8001` becomes `http://10.0.3.7:8001`,
`http://10.0.4.2:8001`, ... The names are resolved at start and every
`discovery_interval_seconds` after; the pool keeps a replica that stays (its health, circuit
and load), adds a new one (health-checked before it takes calls) and retires one that went
(calls already on it finish). So prefix-aware balancing sees the pods themselves, and a pod
joining or leaving moves only the affinity keys it wins.

A name that fails to resolve keeps the replicas it had (a DNS hiccup must not empty a
variant); one that resolves to no address has none.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[list[str]]]
VariantKey = tuple[str, str]


async def resolve(host: str, port: int) -> list[str]:
    """The host's addresses (A and AAAA), sorted; `OSError` when the name does not resolve."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def with_address(url: str, address: str) -> str:
    """`url` with its host replaced by `address` (bracketed when IPv6)."""
    parts = urlsplit(url)
    host = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}".rstrip("/")


def default_port(url: str) -> int:
    parts = urlsplit(url)
    return parts.port or (443 if parts.scheme == "https" else 80)


class DnsDiscovery:
    """Resolves each DNS-discovered variant's names and hands the pool the replica URLs."""

    def __init__(self, targets: dict[VariantKey, list[str]], *, interval_seconds: float,
                 apply: Callable[[VariantKey, list[str]], None],
                 resolver: Resolver = resolve) -> None:
        self._targets = targets
        self._interval = interval_seconds
        self._apply = apply
        self._resolver = resolver
        self._known: dict[str, list[str]] = {}   # name URL -> its last expansion
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> None:
        """Resolve every name once and apply the result."""
        for key, urls in self._targets.items():
            expanded: list[str] = []
            for url in urls:
                expanded += await self._expand(url)
            self._apply(key, list(dict.fromkeys(expanded)))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="dns-discovery")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _expand(self, url: str) -> list[str]:
        host = urlsplit(url).hostname or ""
        try:
            addresses = await self._resolver(host, default_port(url))
        except OSError as exc:
            if url not in self._known:
                logger.warning("cannot resolve replicas of %s: %s", url, exc)
            return self._known.get(url, [])
        if not addresses and self._known.get(url):
            logger.warning("%s resolves to no address: its replicas are gone", url)
        self._known[url] = [with_address(url, address) for address in addresses]
        return self._known[url]

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.refresh()
            except Exception:  # keep discovering whatever one round did
                logger.exception("DNS discovery round failed")
