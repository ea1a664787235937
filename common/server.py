"""The uvicorn server both `quiver serve` and `quiver gateway` run: draining on SIGTERM."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any, Protocol


class Drainable(Protocol):
    draining: bool


def make_draining_server(config: Any, *, state: Drainable) -> Any:
    """A uvicorn server that marks `state` as draining (/ready -> 503, no new work) the
    moment a shutdown signal arrives; uvicorn then drains connections for the grace period
    before `serve()` returns."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            state.draining = True
            super().handle_exit(sig, frame)

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

    return DrainingServer(config)
