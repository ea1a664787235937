"""The model servers' own prefix-cache counters, read before and after a run.

vLLM and Quiver's native engine export `vllm:prefix_cache_queries_total` (prompt tokens looked
up) and `vllm:prefix_cache_hits_total` (prompt tokens found) on `/metrics`; their growth over the
run, summed over the servers, is the server-side hit share of every request the run sent,
a cross-check of the one computed from responses' `cached_tokens`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import requests

logger = logging.getLogger(__name__)

QUERIES = "vllm:prefix_cache_queries_total"
HITS = "vllm:prefix_cache_hits_total"


@dataclass(frozen=True)
class PrefixCounters:
    queries: float
    hits: float


@dataclass(frozen=True)
class ServerCacheStats:
    urls: list[str]
    queries: float              # prompt tokens looked up during the run, all servers
    hits: float

    @property
    def hit_share(self) -> float | None:
        return self.hits / self.queries if self.queries else None


def sample_value(line: str, name: str) -> float | None:
    """The value of a sample line of metric `name` (any labels), else None."""
    if not line.startswith(name) or line[len(name):len(name) + 1] not in ("{", " "):
        return None
    rest = line[line.rindex("}") + 1:] if "}" in line else line[len(name):]
    try:
        return float(rest.split()[0])
    except (IndexError, ValueError):
        return None


def parse_counters(text: str) -> PrefixCounters | None:
    """Both counters summed over their label sets; None when the text lacks either."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        for name in (QUERIES, HITS):
            if (value := sample_value(line, name)) is not None:
                totals[name] = totals.get(name, 0.0) + value
    if QUERIES not in totals or HITS not in totals:
        return None
    return PrefixCounters(queries=totals[QUERIES], hits=totals[HITS])


def scrape(url: str, timeout_s: float = 10.0) -> PrefixCounters | None:
    """One server's counters; None (logged) when it cannot be read or exports neither."""
    try:
        response = requests.get(url, timeout=timeout_s)
        response.raise_for_status()
    except requests.RequestException as exc:
        logger.warning("cannot read %s: %s", url, exc)
        return None
    counters = parse_counters(response.text)
    if counters is None:
        logger.warning("%s exports no %s / %s", url, QUERIES, HITS)
    return counters


def scrape_all(urls: list[str]) -> dict[str, PrefixCounters | None]:
    return {url: scrape(url) for url in urls}


def server_cache_stats(before: dict[str, PrefixCounters | None],
                       after: dict[str, PrefixCounters | None]) -> ServerCacheStats | None:
    """Growth over the run of the servers read both times; None when none was."""
    pairs = {url: (first, last) for url, first in before.items()
             if first is not None and (last := after.get(url)) is not None}
    if not pairs:
        return None
    return ServerCacheStats(urls=list(pairs),
                            queries=sum(last.queries - first.queries
                                        for first, last in pairs.values()),
                            hits=sum(last.hits - first.hits for first, last in pairs.values()))
