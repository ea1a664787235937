"""Waiting for a child process to serve: shared by `quiver up` (model servers), its local
Prometheus, and `quiver loadtest` (the stack it starts)."""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from common.errors import QuiverError


def answers_200(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_until_serving(process: subprocess.Popen, url: str, *, what: str, timeout_s: float,
                       log_hint: Callable[[], str] = str,
                       error: type[QuiverError] = QuiverError) -> None:
    """Poll `url` until it answers 200; `error` (naming `what`, with `log_hint()` appended)
    when the process exits first or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise error(f"{what} exited with code {process.returncode} before it was ready"
                        f"{log_hint()}")
        if answers_200(url):
            return
        time.sleep(0.2)
    raise error(f"{what} was not ready within {timeout_s:g} s{log_hint()}")
