"""`quiver keys create|list|revoke`, run as a user would, against a real SQLite store."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.keys import KEY_PREFIX, hash_key
from gateway.stores.sqlite_keys import SqliteKeyStore


def quiver_keys(*args: str, env: dict[str, str] | None = None,
                cwd: Path | None = None) -> subprocess.CompletedProcess:
    base_env = {k: v for k, v in os.environ.items() if k != "QUIVER_GATEWAY_KEY_STORE"}
    return subprocess.run([sys.executable, "-m", "quiver", "keys", *args], capture_output=True,
                          text=True, env={**base_env, **(env or {})}, cwd=cwd, timeout=60,
                          check=False)


def active_hashes(path: Path) -> dict[str, str]:
    async def read() -> dict[str, str]:
        store = SqliteKeyStore(path)
        try:
            return {h: k.name for h, k in (await store.active_keys()).items()}
        finally:
            await store.close()

    return asyncio.run(read())


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "store" / "keys.db"


def test_create_prints_only_the_key_and_stores_its_hash(db: Path):
    result = quiver_keys("create", "--name", "ci", "--models", "tiny, big", "--rpm", "60",
                         "--tpm", "1000", "--budget-tokens", "5000", "--owner", "team-a",
                         "--allow-variant-pinning", "--max-concurrency", "4",
                         "--priority", "high", "--store", str(db))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and result.stdout == lines[0] + "\n"
    secret = lines[0]
    assert secret.startswith(KEY_PREFIX) and len(secret) == 46
    assert active_hashes(db) == {hash_key(secret): "ci"}
    assert secret not in result.stderr

    listed = json.loads(quiver_keys("list", "--json", "--store", str(db)).stdout)
    assert listed == [{
        "name": "ci", "models": ["tiny", "big"], "rpm": 60, "tpm": 1000,
        "budget_tokens": 5000, "used_tokens": 0, "owner": "team-a", "can_pin_variant": True,
        "max_concurrency": 4, "priority": "high", "created_at": listed[0]["created_at"],
        "revoked_at": None, "metadata": {}}]


def test_list_shows_a_table_without_secrets_or_hashes(db: Path):
    secret = quiver_keys("create", "--name", "alpha", "--rpm", "5", "--store",
                         str(db)).stdout.strip()
    quiver_keys("create", "--name", "beta", "--store", str(db))
    quiver_keys("revoke", "beta", "--store", str(db))

    table = quiver_keys("list", "--store", str(db))
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["NAME", "MODELS", "RPM", "TPM", "CONCURRENCY", "PRIORITY",
                              "BUDGET", "USED", "OWNER", "CREATED", "REVOKED"]
    assert [row.split()[0] for row in rows] == ["alpha"]
    assert rows[0].split()[1:9] == ["*", "5", "-", "-", "normal", "-", "0", "-"]

    everything = quiver_keys("list", "--all", "--store", str(db))
    names = [row.split()[0] for row in everything.stdout.splitlines()[1:]]
    assert names == ["alpha", "beta"]
    beta_row = everything.stdout.splitlines()[2].split()
    assert beta_row[-1].endswith("Z") and beta_row[-1] != "-"
    as_json = quiver_keys("list", "--all", "--json", "--store", str(db)).stdout
    for output in (table.stdout, everything.stdout, as_json):
        assert secret not in output
        assert hash_key(secret) not in output
        assert "key_hash" not in output


def test_env_var_chooses_the_store(db: Path, tmp_path: Path):
    env = {"QUIVER_GATEWAY_KEY_STORE": str(db)}
    secret = quiver_keys("create", "--name", "from-env", env=env).stdout.strip()
    assert active_hashes(db) == {hash_key(secret): "from-env"}
    assert "from-env" in quiver_keys("list", env=env).stdout
    assert quiver_keys("revoke", "from-env", env=env).returncode == 0
    assert active_hashes(db) == {}
    assert not (tmp_path / ".quiver").exists()


def test_default_store_is_under_the_working_directory(tmp_path: Path):
    secret = quiver_keys("create", "--name", "local", cwd=tmp_path).stdout.strip()
    assert active_hashes(tmp_path / ".quiver" / "keys.db") == {hash_key(secret): "local"}


def test_revoke_unknown_name_fails_clearly(db: Path):
    result = quiver_keys("revoke", "ghost", "--store", str(db))
    assert result.returncode == 1
    assert result.stdout == ""
    assert "quiver keys: error: no active key named 'ghost'" in result.stderr
    assert "Traceback" not in result.stderr


def test_revoked_name_can_be_reused_and_duplicates_are_refused(db: Path):
    first = quiver_keys("create", "--name", "svc", "--store", str(db)).stdout.strip()
    duplicate = quiver_keys("create", "--name", "svc", "--store", str(db))
    assert duplicate.returncode == 1 and duplicate.stdout == ""
    assert "an active key named 'svc' already exists" in duplicate.stderr
    assert quiver_keys("revoke", "svc", "--store", str(db)).returncode == 0
    second = quiver_keys("create", "--name", "svc", "--store", str(db)).stdout.strip()
    assert second != first
    assert active_hashes(db) == {hash_key(second): "svc"}


@pytest.mark.parametrize(("args", "message"), [
    (["--rpm", "0"], "argument --rpm: must be an integer from 1 to"),
    (["--tpm", "lots"], "argument --tpm: must be an integer from 1 to"),
    (["--budget-tokens", "-5"], "must be an integer from 1 to"),
    (["--budget-tokens", str(10**30)], "must be an integer from 1 to"),
    (["--models", " , "], "argument --models: expected model names"),
    (["--max-concurrency", "0"], "argument --max-concurrency: must be an integer from 1 to"),
    (["--priority", "urgent"], "argument --priority: invalid choice: 'urgent'"),
])
def test_bad_create_options_are_usage_errors(db: Path, args: list[str], message: str):
    result = quiver_keys("create", "--name", "x", *args, "--store", str(db))
    assert result.returncode == 2
    assert result.stdout == ""
    assert message in result.stderr
    assert not db.exists()


def test_bad_name_is_refused(db: Path):
    result = quiver_keys("create", "--name", "no spaces", "--store", str(db))
    assert result.returncode == 2
    assert "invalid key name 'no spaces'" in result.stderr
    assert not db.exists()


def test_unusable_store_is_one_clear_line(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = quiver_keys("list", "--store", str(blocker / "keys.db"))
    assert result.returncode == 1
    assert result.stderr.strip().startswith("quiver keys: error: cannot create key store")
    assert "Traceback" not in result.stderr


def test_keys_requires_a_verb():
    result = quiver_keys()
    assert result.returncode == 2
    assert "create" in result.stderr or "VERB" in result.stderr


async def test_a_running_gateway_store_sees_cli_changes(db: Path):
    """The gateway holds the file open and polls `active_keys()`; the CLI writes meanwhile."""
    gateway_store = SqliteKeyStore(db)
    try:
        assert await gateway_store.active_keys() == {}
        created = await asyncio.to_thread(quiver_keys, "create", "--name", "live", "--store",
                                          str(db))
        secret = created.stdout.strip()
        assert set(await gateway_store.active_keys()) == {hash_key(secret)}
        await gateway_store.add_usage("live", 42)
        listed = await asyncio.to_thread(quiver_keys, "list", "--json", "--store", str(db))
        assert json.loads(listed.stdout)[0]["used_tokens"] == 42
        revoked = await asyncio.to_thread(quiver_keys, "revoke", "live", "--store", str(db))
        assert revoked.returncode == 0, revoked.stderr
        assert await gateway_store.active_keys() == {}
    finally:
        await gateway_store.close()
