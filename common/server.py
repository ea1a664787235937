"""The uvicorn server both `quiver serve` and `quiver gateway` run: HTTP limits, draining on
SIGTERM, and optional side listeners (the gateway's metrics port).

`server_config` is the one place the HTTP-level limits (`common.http_limits.HttpLimits`:
header size, header and keep-alive timeouts, connections, backlog) become a uvicorn
config, so both servers apply them the same way. Import this module lazily (it loads
uvicorn): the `quiver` command's start-up does not need it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import uvicorn
from starlette.types import ASGIApp

from common.http_limits import HttpLimits, limited_protocol

logger = logging.getLogger(__name__)
STARTUP_FAILURE = 3  # uvicorn's exit code when it cannot start


class Drainable(Protocol):
    draining: bool


@dataclass(frozen=True)
class SideListener:
    """A second port served by the same process and event loop, with its own small app
    (e.g. /metrics where only Prometheus reaches it)."""

    port: int
    app: ASGIApp
    what: str = "side listener"


def server_config(app: ASGIApp, *, host: str, port: int, limits: HttpLimits,
                  grace_s: float, log_level: str = "warning",
                  lifespan: str = "on") -> uvicorn.Config:
    """A uvicorn config with `limits` applied (no websockets, no access log)."""
    return uvicorn.Config(app, host=host, port=port, lifespan=lifespan, ws="none",
                          access_log=False, log_level=log_level,
                          http=limited_protocol(limits), backlog=limits.backlog,
                          timeout_keep_alive=limits.keep_alive_timeout_s,  # type: ignore
                          timeout_graceful_shutdown=grace_s)  # type: ignore[arg-type]


class DrainingServer(uvicorn.Server):
    """Marks `state` as draining (/ready -> 503, no new work) the moment a shutdown signal
    arrives; uvicorn then drains connections for the grace period before `serve()`
    returns. `side_listeners` open once the main port is up, with the same limits, and
    close with it."""

    def __init__(self, config: uvicorn.Config, *, state: Drainable,
                 side_listeners: tuple[SideListener, ...] = ()) -> None:
        super().__init__(config)
        self.drainable = state
        self.side_listeners = side_listeners

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.drainable.draining = True
        super().handle_exit(sig, frame)

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets=sockets)
        for listener in self.side_listeners:
            if self.should_exit:
                return
            await self._open_side_listener(listener)

    async def _open_side_listener(self, listener: SideListener) -> None:
        side = uvicorn.Config(listener.app, host=self.config.host, port=listener.port,
                              lifespan="off", ws="none", access_log=False,
                              http=self.config.http, log_level=self.config.log_level)
        side.load()

        def create_protocol(_loop: asyncio.AbstractEventLoop | None = None) -> Any:
            return side.http_protocol_class(config=side, server_state=self.server_state,
                                            app_state={}, _loop=_loop)

        try:
            server = await asyncio.get_running_loop().create_server(
                create_protocol, host=side.host, port=side.port, backlog=self.config.backlog)
        except OSError as exc:
            logger.error("cannot open the %s on %s:%d: %s", listener.what, side.host,
                         side.port, exc)
            await self.lifespan.shutdown()
            sys.exit(STARTUP_FAILURE)
        self.servers.append(server)
        logger.info("%s on http://%s:%d", listener.what, side.host, side.port)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """As uvicorn's, minus re-raising the signal at the end: that would kill the
        process before the engine is shut down, and a drained exit is a clean one."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {sig: signal.signal(sig, self.handle_exit)
                     for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)


def make_draining_server(config: uvicorn.Config, *, state: Drainable,
                         side_listeners: tuple[SideListener, ...] = ()) -> DrainingServer:
    return DrainingServer(config, state=state, side_listeners=side_listeners)
