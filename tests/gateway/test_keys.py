"""Key stores (SQLite and a real Redis) behave the same: create, list, revoke, name reuse,
exact concurrent usage counts, and the gateway's active-key snapshot."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path

import pytest

from gateway.keys import (
    ApiKey,
    InvalidKeyError,
    KeyNameTakenError,
    KeyNotFoundError,
    KeyStore,
    KeyStoreUnavailableError,
    hash_key,
    mint_key,
)
from gateway.stores import open_key_store
from gateway.stores.location import describe_location
from gateway.stores.redis_keys import RedisKeyStore
from gateway.stores.sqlite_keys import SqliteKeyStore


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[KeyStore]:
    if request.param == "sqlite":
        location = str(tmp_path / "nested" / "keys.db")
    else:
        location = request.getfixturevalue("redis_url")
    opened = open_key_store(location)
    yield opened
    await opened.close()


def test_open_key_store_picks_the_backend_from_the_location(tmp_path: Path):
    assert isinstance(open_key_store(str(tmp_path / "k.db")), SqliteKeyStore)
    for url in ("redis://127.0.0.1:1/0", "rediss://h:6380", "unix:///tmp/redis.sock"):
        assert isinstance(open_key_store(url), RedisKeyStore)
    with pytest.raises(KeyStoreUnavailableError):
        open_key_store("  ")


def test_describe_location_hides_a_redis_password():
    assert describe_location("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert describe_location("redis://user:s3cret@host/1") == "redis://user:***@host/1"
    assert describe_location("redis://host:6379") == "redis://host:6379"
    assert describe_location(".quiver/keys.db") == ".quiver/keys.db"


def test_mint_key_validates_and_hashes():
    secret, key = mint_key("svc-a", models=("m1",), rpm=5)
    assert secret.startswith("qk-") and len(secret) == 46
    assert key.key_hash == hash_key(secret) != secret
    assert key.created_at > 0
    with pytest.raises(InvalidKeyError, match="invalid key name"):
        mint_key("has space")
    with pytest.raises(InvalidKeyError, match="rpm must be an integer from 1 to"):
        mint_key("ok", rpm=0)
    with pytest.raises(InvalidKeyError, match="budget_tokens"):
        mint_key("ok", budget_tokens=-3)
    with pytest.raises(InvalidKeyError, match="max_concurrency must be an integer from 1"):
        mint_key("ok", max_concurrency=0)
    with pytest.raises(InvalidKeyError, match="priority must be one of high, normal, low"):
        mint_key("ok", priority="urgent")
    assert (key.max_concurrency, key.priority) == (None, "normal")


async def test_a_key_store_file_from_before_fair_sharing_is_migrated(tmp_path: Path):
    """A SQLite file written before `max_concurrency` and `priority` existed opens, keeps
    its keys (unlimited, normal priority) and stores the new fields."""
    path = tmp_path / "old.db"
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.executescript("""
            CREATE TABLE api_keys (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL,
                key_hash TEXT NOT NULL UNIQUE, models TEXT NOT NULL DEFAULT '[]', rpm INTEGER,
                tpm INTEGER, budget_tokens INTEGER, used_tokens INTEGER NOT NULL DEFAULT 0,
                owner TEXT, can_pin_variant INTEGER NOT NULL DEFAULT 0,
                created_at REAL NOT NULL, revoked_at REAL,
                metadata TEXT NOT NULL DEFAULT '{}');""")
        conn.execute("INSERT INTO api_keys (name, key_hash, rpm, created_at) "
                     "VALUES ('old', ?, 7, 1.0)", (hash_key("qk-old"),))
    store = SqliteKeyStore(path)
    try:
        [old] = (await store.active_keys()).values()
        assert (old.name, old.rpm, old.max_concurrency, old.priority) == ("old", 7, None,
                                                                         "normal")
        _, new = mint_key("new", max_concurrency=3, priority="high")
        await store.create(new)
        assert new in await store.list_keys()
    finally:
        await store.close()
    second = SqliteKeyStore(path)   # opening a migrated file again changes nothing
    try:
        assert len(await second.list_keys()) == 2
    finally:
        await second.close()


async def test_create_then_list_and_active_keys(store: KeyStore):
    secret, key = mint_key("svc-a", models=("tiny", "big"), rpm=60, tpm=1000,
                           budget_tokens=5000, owner="team-x", can_pin_variant=True,
                           max_concurrency=8, priority="low")
    await store.create(key)
    [listed] = await store.list_keys()
    assert listed == key
    assert (listed.max_concurrency, listed.priority) == (8, "low")
    active = await store.active_keys()
    assert set(active) == {hash_key(secret)}
    assert active[hash_key(secret)] == key
    assert secret not in active and all(k.key_hash != secret for k in active.values())


async def test_duplicate_active_name_is_refused(store: KeyStore):
    _, first = mint_key("dup")
    await store.create(first)
    _, second = mint_key("dup")
    with pytest.raises(KeyNameTakenError, match="'dup' already exists"):
        await store.create(second)
    assert [k.key_hash for k in await store.list_keys(include_revoked=True)] == [first.key_hash]


async def test_concurrent_creates_of_one_name_have_one_winner(store: KeyStore):
    keys = [mint_key("race")[1] for _ in range(10)]
    results = await asyncio.gather(*(store.create(k) for k in keys), return_exceptions=True)
    assert sum(r is None for r in results) == 1
    assert all(isinstance(r, KeyNameTakenError) for r in results if r is not None)
    assert len(await store.active_keys()) == 1


async def test_revoke_hides_key_and_frees_the_name(store: KeyStore):
    old_secret, old = mint_key("rotate")
    await store.create(old)
    assert await store.revoke("rotate") is True
    assert await store.revoke("rotate") is False
    assert await store.revoke("never-existed") is False
    assert await store.active_keys() == {}
    assert await store.list_keys() == []
    [revoked] = await store.list_keys(include_revoked=True)
    assert revoked.is_revoked and revoked.key_hash == hash_key(old_secret)

    new_secret, new = mint_key("rotate")
    await store.create(new)
    assert set(await store.active_keys()) == {hash_key(new_secret)}
    everything = await store.list_keys(include_revoked=True)
    assert [(k.key_hash, k.is_revoked) for k in everything] == [
        (old.key_hash, True), (new.key_hash, False)]


async def test_concurrent_add_usage_is_exact(store: KeyStore):
    _, key = mint_key("busy", budget_tokens=10_000)
    await store.create(key)
    totals = await asyncio.gather(*(store.add_usage("busy", 7) for _ in range(50)))
    assert sorted(totals) == [7 * i for i in range(1, 51)]
    [stored] = (await store.active_keys()).values()
    assert stored.used_tokens == 350
    assert stored.budget_left == 10_000 - 350


async def test_add_usage_goes_to_the_newest_key_of_a_name(store: KeyStore):
    _, key = mint_key("spender")
    await store.create(key)
    await store.add_usage("spender", 10)
    await store.revoke("spender")
    # a request that was in flight when the key was revoked still counts
    assert await store.add_usage("spender", 5) == 15
    _, fresh = mint_key("spender")
    await store.create(fresh)
    assert await store.add_usage("spender", 3) == 3
    with pytest.raises(KeyNotFoundError):
        await store.add_usage("nobody", 1)
    with pytest.raises(ValueError, match="0 or more"):
        await store.add_usage("spender", -1)


async def test_store_rejects_an_invalid_record(store: KeyStore):
    bad = ApiKey(name="bad name", key_hash=hash_key("x"))
    with pytest.raises(InvalidKeyError):
        await store.create(bad)
    assert await store.list_keys(include_revoked=True) == []


async def test_two_sqlite_stores_on_one_file_see_each_other(tmp_path: Path):
    """The CLI and a running gateway open the same file at once."""
    path = tmp_path / "shared.db"
    cli, gateway = SqliteKeyStore(path), SqliteKeyStore(path)
    try:
        assert await gateway.active_keys() == {}
        secret, key = mint_key("shared")
        await cli.create(key)
        assert set(await gateway.active_keys()) == {hash_key(secret)}
        await asyncio.gather(*(s.add_usage("shared", 2) for s in (cli, gateway) * 20))
        assert (await gateway.active_keys())[key.key_hash].used_tokens == 80
        assert (await cli.active_keys())[key.key_hash].used_tokens == 80
        await cli.revoke("shared")
        assert await gateway.active_keys() == {}
        await gateway.create(mint_key("shared")[1])
        with pytest.raises(KeyNameTakenError):
            await cli.create(mint_key("shared")[1])
        with closing(sqlite3.connect(path)) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        await cli.close()
        await gateway.close()


async def test_two_redis_stores_see_each_other(redis_url: str):
    first, second = RedisKeyStore(redis_url), RedisKeyStore(redis_url)
    try:
        secret, key = mint_key("replica")
        await first.create(key)
        assert set(await second.active_keys()) == {hash_key(secret)}
        await second.revoke("replica")
        assert await first.active_keys() == {}
    finally:
        await first.close()
        await second.close()


async def test_sqlite_store_reports_an_unusable_path(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    store = SqliteKeyStore(blocker / "keys.db")
    with pytest.raises(KeyStoreUnavailableError, match="cannot create key store"):
        await store.list_keys()
    await store.close()


async def test_redis_store_reports_an_unreachable_server():
    store = RedisKeyStore("redis://:topsecret@127.0.0.1:1/0")
    with pytest.raises(KeyStoreUnavailableError) as exc:
        await store.active_keys()
    assert "topsecret" not in str(exc.value)
    await store.close()


class SlowUsageStore(SqliteKeyStore):
    """SQLite whose usage writes take a while: a reload is in progress at shutdown."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.writing = asyncio.Event()

    async def add_usage(self, name: str, tokens: int) -> int:
        self.writing.set()
        await asyncio.sleep(0.3)
        return await super().add_usage(name, tokens)


async def test_closing_the_keyring_mid_reload_loses_no_usage(tmp_path: Path):
    from gateway.keyring import KeyRing

    store = SlowUsageStore(tmp_path / "keys.db")
    _, key = mint_key("busy")
    await store.create(key)
    ring = KeyRing(store, refresh_seconds=0.01)
    await ring.start()
    ring.add_usage(key, 100)
    await asyncio.wait_for(store.writing.wait(), 5)  # the reload is writing those 100 now
    ring.add_usage(key, 7)                           # and more comes in meanwhile
    await ring.close()
    reopened = SqliteKeyStore(tmp_path / "keys.db")
    (stored,) = await reopened.list_keys()
    await reopened.close()
    assert stored.used_tokens == 107
