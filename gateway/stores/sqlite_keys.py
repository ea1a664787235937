"""`SqliteKeyStore`: API keys in one SQLite file (default `.quiver/keys.db`).

`quiver keys` and a running gateway open the same file at once: WAL mode lets readers and
one writer work together, and `busy_timeout` makes a writer wait for the lock instead of
failing. Each store owns one connection, used from one worker thread, so the event loop
never blocks on disk and calls on one store run in order.

A partial unique index allows one *unrevoked* key per name, so a revoked key's name can be
taken again and two concurrent creates cannot both win. `active_keys()` is called by the
gateway every second: it re-reads the table only when `PRAGMA data_version` (commits by
other connections) or this store's own write count has moved.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from gateway.keys import (
    ApiKey,
    KeyNameTakenError,
    KeyNotFoundError,
    KeyStoreError,
    KeyStoreUnavailableError,
    validate_key,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

BUSY_TIMEOUT_MS = 5000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE,
    models TEXT NOT NULL DEFAULT '[]',
    rpm INTEGER,
    tpm INTEGER,
    budget_tokens INTEGER,
    used_tokens INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    can_pin_variant INTEGER NOT NULL DEFAULT 0,
    max_concurrency INTEGER,
    priority TEXT NOT NULL DEFAULT 'normal',
    created_at REAL NOT NULL,
    revoked_at REAL,
    metadata TEXT NOT NULL DEFAULT '{}'
);
CREATE UNIQUE INDEX IF NOT EXISTS api_keys_active_name
    ON api_keys (name) WHERE revoked_at IS NULL;
CREATE INDEX IF NOT EXISTS api_keys_name ON api_keys (name, id);
"""

_COLUMNS = ("name, key_hash, models, rpm, tpm, budget_tokens, used_tokens, owner, "
            "can_pin_variant, max_concurrency, priority, created_at, revoked_at, metadata")
# Columns added since the first schema: a file written before gets them on open.
_ADDED_COLUMNS = {"max_concurrency": "INTEGER",
                  "priority": "TEXT NOT NULL DEFAULT 'normal'"}


def _to_row(key: ApiKey) -> tuple[object, ...]:
    return (key.name, key.key_hash, json.dumps(list(key.models)), key.rpm, key.tpm,
            key.budget_tokens, key.used_tokens, key.owner, int(key.can_pin_variant),
            key.max_concurrency, key.priority, key.created_at, key.revoked_at,
            json.dumps(key.metadata, sort_keys=True))


def _from_row(row: sqlite3.Row) -> ApiKey:
    return ApiKey(name=row["name"], key_hash=row["key_hash"],
                  models=tuple(json.loads(row["models"])), rpm=row["rpm"], tpm=row["tpm"],
                  budget_tokens=row["budget_tokens"], used_tokens=row["used_tokens"],
                  owner=row["owner"], can_pin_variant=bool(row["can_pin_variant"]),
                  max_concurrency=row["max_concurrency"], priority=row["priority"],
                  created_at=row["created_at"], revoked_at=row["revoked_at"],
                  metadata=json.loads(row["metadata"]))


def _migrate(conn: sqlite3.Connection) -> None:
    """Add the columns a file from an older Quiver lacks (their defaults fill old rows)."""
    present = {row["name"] for row in conn.execute("PRAGMA table_info(api_keys)")}
    for column, declaration in _ADDED_COLUMNS.items():
        if column not in present:
            try:
                conn.execute(f"ALTER TABLE api_keys ADD COLUMN {column} {declaration}")
            except sqlite3.OperationalError as exc:  # another process added it first
                if "duplicate column" not in str(exc):
                    raise
            logger.info("key store: added column %s", column)


class SqliteKeyStore:
    """`KeyStore` over a SQLite file; safe to share with other processes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quiver-keys")
        self._conn: sqlite3.Connection | None = None
        self._num_local_writes = 0
        self._active_stamp: tuple[int, int] | None = None
        self._active_cache: dict[str, ApiKey] = {}
        self._is_closed = False

    def __repr__(self) -> str:
        return f"SqliteKeyStore({str(self.path)!r})"

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._is_closed:
            raise KeyStoreUnavailableError(f"key store {self.path} is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, fn)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Runs on the worker thread: open on first use, translate sqlite errors."""
        try:
            if self._conn is None:
                self._conn = self._open()
            return fn(self._conn)
        except sqlite3.Error as exc:
            raise KeyStoreUnavailableError(f"key store {self.path}: {exc}") from exc
        except OSError as exc:
            raise KeyStoreUnavailableError(
                f"cannot create key store {self.path}: {exc.strerror}") from exc

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.executescript(_SCHEMA)
            _migrate(conn)
        except BaseException:
            conn.close()
            raise
        logger.debug("opened key store %s", self.path)
        return conn

    async def create(self, key: ApiKey) -> None:
        validate_key(key)

        def insert(conn: sqlite3.Connection) -> None:
            placeholders = ", ".join("?" * len(_COLUMNS.split(",")))
            try:
                conn.execute(f"INSERT INTO api_keys ({_COLUMNS}) VALUES ({placeholders})",
                             _to_row(key))
            except sqlite3.IntegrityError as exc:
                if "key_hash" in str(exc):
                    raise KeyStoreError(f"key {key.name!r}: its hash is already stored") from exc
                raise KeyNameTakenError(
                    f"an active key named {key.name!r} already exists") from exc
            self._num_local_writes += 1

        await self._run(insert)

    async def list_keys(self, *, include_revoked: bool = False) -> list[ApiKey]:
        where = "" if include_revoked else "WHERE revoked_at IS NULL"

        def select(conn: sqlite3.Connection) -> list[ApiKey]:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM api_keys {where} ORDER BY id")
            return [_from_row(row) for row in rows]

        return await self._run(select)

    async def revoke(self, name: str) -> bool:
        def update(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                (time.time(), name))
            self._num_local_writes += 1
            return cursor.rowcount > 0

        return await self._run(update)

    async def active_keys(self) -> dict[str, ApiKey]:
        def snapshot(conn: sqlite3.Connection) -> dict[str, ApiKey]:
            data_version = conn.execute("PRAGMA data_version").fetchone()[0]
            stamp = (data_version, self._num_local_writes)
            if stamp != self._active_stamp:
                rows = conn.execute(
                    f"SELECT {_COLUMNS} FROM api_keys WHERE revoked_at IS NULL")
                self._active_cache = {row["key_hash"]: _from_row(row) for row in rows}
                self._active_stamp = stamp
            return dict(self._active_cache)

        return await self._run(snapshot)

    async def add_usage(self, name: str, tokens: int) -> int:
        if isinstance(tokens, bool) or tokens < 0:
            raise ValueError(f"tokens must be 0 or more, got {tokens!r}")

        def increment(conn: sqlite3.Connection) -> int:
            # The active key of that name is always its newest row.
            rows = conn.execute(
                "UPDATE api_keys SET used_tokens = used_tokens + ? WHERE id = "
                "(SELECT max(id) FROM api_keys WHERE name = ?) RETURNING used_tokens",
                (tokens, name)).fetchall()
            self._num_local_writes += 1
            if not rows:
                raise KeyNotFoundError(f"no key named {name!r}")
            return int(rows[0][0])

        return await self._run(increment)

    async def close(self) -> None:
        if self._is_closed:
            return
        self._is_closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._close_connection)
        self._executor.shutdown(wait=True)

    def _close_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
