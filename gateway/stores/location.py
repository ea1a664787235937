"""Where a store lives: a SQLite file path or a Redis URL, and how to print one safely."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def is_redis_location(location: str) -> bool:
    return location.startswith(REDIS_SCHEMES)


def describe_location(location: str) -> str:
    """`location` safe to print or log: a Redis URL's password becomes `***`."""
    if not is_redis_location(location):
        return location
    parts = urlsplit(location)
    if parts.password is None:
        return location
    user = f"{parts.username}:" if parts.username else ":"
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}***@{host}"))
