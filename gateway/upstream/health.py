"""Active health checks: one task per replica GETs `health_checks.path` every interval.

A replica that passes and whose context length is not known yet is also asked for its
`/v1/models`: the `max_model_len` of the model it serves bounds the gateway's token
estimate of calls without `max_tokens` (vLLM and Quiver both list it)."""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from gateway.settings import HealthCheckSettings
from gateway.upstream.replica import Replica

logger = logging.getLogger(__name__)


class HealthChecker:
    def __init__(self, replicas: list[Replica], settings: HealthCheckSettings,
                 session: aiohttp.ClientSession) -> None:
        self._replicas = list(replicas)
        self._settings = settings
        self._session = session
        self._tasks: dict[Replica, asyncio.Task[None]] = {}

    def start(self) -> None:
        for replica in self._replicas:
            self.add(replica)

    def add(self, replica: Replica) -> None:
        """Probe `replica` too (one that joined a variant)."""
        if replica not in self._tasks:
            self._tasks[replica] = asyncio.create_task(self._run(replica),
                                                       name=f"health-check {replica.url}")

    def remove(self, replica: Replica) -> None:
        """Stop probing `replica` (it left its variant)."""
        task = self._tasks.pop(replica, None)
        if task is not None:
            task.cancel()

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks = {}

    async def check(self, replica: Replica) -> bool:
        """One probe: True when the replica answers 200 in time."""
        timeout = aiohttp.ClientTimeout(total=self._settings.timeout_seconds)
        try:
            async with self._session.get(replica.url + self._settings.path,
                                         headers=replica.headers,
                                         timeout=timeout) as response:
                await response.read()
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            logger.debug("health check of %s failed: %r", replica.url, exc)
            return False

    async def model_len(self, replica: Replica) -> int | None:
        """The `max_model_len` its `/v1/models` gives the model it serves, if any."""
        timeout = aiohttp.ClientTimeout(total=self._settings.timeout_seconds)
        try:
            async with self._session.get(replica.url + "/v1/models", headers=replica.headers,
                                         timeout=timeout) as response:
                listing = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
            return None
        entries = listing.get("data") if isinstance(listing, dict) else None
        for entry in entries if isinstance(entries, list) else []:
            length = entry.get("max_model_len") if isinstance(entry, dict) else None
            if entry.get("id") == replica.upstream_model and isinstance(length, int):
                return length
        return None

    async def _run(self, replica: Replica) -> None:
        while True:
            try:
                is_ok = await self.check(replica)
                replica.record_health(is_ok, self._settings)
                if is_ok and replica.max_model_len is None:
                    replica.max_model_len = await self.model_len(replica)
            except Exception:  # keep probing whatever one probe did
                logger.exception("health check of %s crashed", replica.url)
            await asyncio.sleep(self._settings.interval_seconds)
