"""Active health checks: one task per replica GETs `health_checks.path` every interval."""

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
        self._replicas = replicas
        self._settings = settings
        self._session = session
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run(replica),
                                           name=f"health-check {replica.url}")
                       for replica in self._replicas]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def check(self, replica: Replica) -> bool:
        """One probe: True when the replica answers 200 in time."""
        timeout = aiohttp.ClientTimeout(total=self._settings.timeout_seconds)
        try:
            async with self._session.get(replica.url + self._settings.path,
                                         timeout=timeout) as response:
                await response.read()
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            logger.debug("health check of %s failed: %r", replica.url, exc)
            return False

    async def _run(self, replica: Replica) -> None:
        while True:
            try:
                replica.record_health(await self.check(replica), self._settings)
            except Exception:  # keep probing whatever one probe did
                logger.exception("health check of %s crashed", replica.url)
            await asyncio.sleep(self._settings.interval_seconds)
