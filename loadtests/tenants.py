"""Tenants: the API keys a load test sends under, each with a weight (its share of the load).

Two ways to name them, one contract between `quiver loadtest` and the Locust process:
- `QUIVER_API_KEYS`: comma-separated `[NAME=]KEY[:WEIGHT]` entries, e.g.
  `quiet=qk-aaa:1,noisy=qk-bbb:10` (unnamed entries are `tenant-1`, `tenant-2`, ...;
  weight 1 by default). Locust reads this; `quiver loadtest` writes it.
- a tenants file (`quiver loadtest --tenants FILE`), YAML mapping each name to
  `{weight, api_key | api_key_env}`; against a local stack the keys are left out and
  `quiver loadtest` creates one per tenant.

Each call (or conversation) goes to a tenant drawn by weight, so with `--rate R` a tenant of
weight w gets its own Poisson stream of R * w / (sum of weights) requests/s.
"""

from __future__ import annotations

import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from loadtests.errors import LoadTestError

API_KEYS_ENV = "QUIVER_API_KEYS"
DEFAULT_TENANT = "default"
NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
FILE_KEYS = ("weight", "api_key", "api_key_env")


@dataclass(frozen=True)
class Tenant:
    name: str
    api_key: str | None
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not NAME.fullmatch(self.name):
            raise LoadTestError(f"tenant name {self.name!r}: use 1-64 letters, digits or . _ -")
        if isinstance(self.weight, bool) or not self.weight > 0 or math.isinf(self.weight):
            raise LoadTestError(f"tenant {self.name}: weight must be a positive number, "
                                f"got {self.weight!r}")


def check_unique(tenants: list[Tenant], source: str) -> list[Tenant]:
    if not tenants:
        raise LoadTestError(f"{source} names no tenant")
    names = [tenant.name for tenant in tenants]
    if duplicates := sorted({name for name in names if names.count(name) > 1}):
        raise LoadTestError(f"{source}: tenant(s) named twice: {', '.join(duplicates)}")
    return tenants


def parse_weight(text: str, source: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise LoadTestError(f"{source}: weight {text!r} is not a number") from None


def parse_api_keys(text: str, source: str = API_KEYS_ENV) -> list[Tenant]:
    """`[NAME=]KEY[:WEIGHT],...` -> tenants."""
    tenants = []
    for number, entry in enumerate((e.strip() for e in text.split(",") if e.strip()), 1):
        name, has_name, rest = entry.partition("=")
        key = rest if has_name else name
        name = name.strip() if has_name else f"tenant-{number}"
        key, has_weight, weight = key.rpartition(":") if ":" in key else (key, "", "")
        if not key.strip():
            raise LoadTestError(f"{source}: entry {number} ({name}) has no key")
        tenants.append(Tenant(name, key.strip(),
                              parse_weight(weight, source) if has_weight else 1.0))
    return check_unique(tenants, source)


def format_api_keys(tenants: list[Tenant]) -> str:
    """The inverse of `parse_api_keys`, for the Locust process's environment."""
    return ",".join(f"{t.name}={t.api_key or ''}:{t.weight:g}" for t in tenants)


def file_tenant(name: object, entry: object, source: str) -> Tenant:
    entry = {} if entry is None else entry
    if not isinstance(entry, dict):
        raise LoadTestError(f"{source}: tenant {name} must map to {{weight, api_key | "
                            f"api_key_env}}, got {entry!r}")
    if unknown := sorted(str(key) for key in entry if key not in FILE_KEYS):
        raise LoadTestError(f"{source}: tenant {name}: unknown key(s) {', '.join(unknown)}; "
                            f"known: {', '.join(FILE_KEYS)}")
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise LoadTestError(f"{source}: tenant {name}: weight must be a number, got {weight!r}")
    api_key = entry.get("api_key")
    if (env := entry.get("api_key_env")) is not None:
        api_key = os.environ.get(str(env))
        if not api_key:
            raise LoadTestError(f"{source}: tenant {name}: ${env} is not set")
    return Tenant(str(name), None if api_key is None else str(api_key), float(weight))


def load_tenants_file(path: Path) -> list[Tenant]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise LoadTestError(f"cannot read tenants file {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise LoadTestError(f"tenants file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise LoadTestError(f"tenants file {path} must map tenant names to "
                            f"{{weight, api_key | api_key_env}}")
    return check_unique([file_tenant(name, entry, str(path)) for name, entry in data.items()],
                        str(path))


def tenants_from_env(default_key: str | None) -> list[Tenant]:
    """`QUIVER_API_KEYS` when set, else one tenant with `default_key`."""
    if text := os.environ.get(API_KEYS_ENV, "").strip():
        return parse_api_keys(text)
    return [Tenant(DEFAULT_TENANT, default_key)]


def pick_tenant(tenants: list[Tenant], rng: random.Random) -> Tenant:
    if len(tenants) == 1:
        return tenants[0]
    return rng.choices(tenants, weights=[t.weight for t in tenants])[0]


def rate_shares(tenants: list[Tenant], rate: float) -> dict[str, float]:
    """Each tenant's arrival rate when `rate` requests/s are split by weight."""
    total = sum(t.weight for t in tenants)
    return {t.name: rate * t.weight / total for t in tenants}
