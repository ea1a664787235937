"""Errors `quiver loadtest` reports as one clear line (the CLI prints them, no traceback)."""

from __future__ import annotations

from common.errors import QuiverError


class LoadTestError(QuiverError):
    """The load test could not run: bad arguments, the stack or Locust failed."""


class SloFileError(LoadTestError):
    """The SLO file is missing, not YAML, has an unknown key or a bad value."""


class SloBreachError(LoadTestError):
    """The run finished but broke at least one SLO; the message says which and by how much."""
