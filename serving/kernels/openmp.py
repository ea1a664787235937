"""Keep one OpenMP master thread per process: torch's CPU kernels spin-wait only then.

libgomp keeps a pool of worker threads for every thread that ever ran a parallel region.
Once the process holds more of them than it has CPUs (the loader's pool plus the engine
thread's, on a 2-core host), every worker only spins ~100 iterations before sleeping, so
each of the hundreds of parallel regions in a decode step waits on a futex wake-up:
SmolLM2's batch-1 step took 29 ms when the model was loaded and compiled on one thread and
run on another, 21 ms when one thread did both (2-core Zen 4, same process otherwise).

`run_in_passing_thread` runs set-up work (loading, packing, compiling, warming up) on a
thread that then exits, taking its pool with it, so the thread that later runs the steps
owns the only one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def run_in_passing_thread(fn: Callable[[], T], name: str = "quiver-model-setup") -> T:
    """`fn()` on a new thread that exits when it returns; its result or exception."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # handed to the caller below
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=name)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]
