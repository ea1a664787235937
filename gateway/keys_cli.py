"""`quiver keys create|list|revoke`: manage the gateway's API keys.

`create` prints the new key alone on stdout (the only time it is shown; only its hash is
stored), so `KEY=$(quiver keys create --name ci)` works. Every verb takes `--store`: a
SQLite file or a `redis://` URL, default `$QUIVER_GATEWAY_KEY_STORE`, else
`.quiver/keys.db` under the working directory (the store `quiver up` and the gateway use).
A running gateway sees a new or revoked key within a second.

Imports stay light (no redis, no FastAPI): `quiver --help` imports this module.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

from common.errors import QuiverError
from gateway.keys import (
    KEY_NAME_PATTERN,
    MAX_LIMIT,
    PRIORITIES,
    ApiKey,
    KeyNameTakenError,
    KeyStore,
    KeyStoreError,
    mint_key,
    public_record,
)
from gateway.settings import DEFAULT_KEY_STORE
from gateway.stores import open_key_store
from gateway.stores.location import describe_location


class ApiKeyError(QuiverError):
    """`quiver keys` could not create, find or revoke a key, or reach the key store."""


logger = logging.getLogger(__name__)

T = TypeVar("T")

STORE_ENV = "QUIVER_GATEWAY_KEY_STORE"
_TABLE_COLUMNS = ("NAME", "MODELS", "RPM", "TPM", "CONCURRENCY", "PRIORITY", "BUDGET", "USED",
                  "OWNER", "CREATED", "REVOKED")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"must be an integer from 1 to {MAX_LIMIT}, "
                                         f"got {text!r}")
    return value


def _key_name(text: str) -> str:
    if not KEY_NAME_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"invalid key name {text!r}: use 1-64 letters, digits or . _ @ -")
    return text


def _model_list(text: str) -> tuple[str, ...]:
    models = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not models:
        raise argparse.ArgumentTypeError(f"expected model names separated by commas, got {text!r}")
    return models


def _owner(text: str) -> str:
    if not text.strip() or text != text.strip():
        raise argparse.ArgumentTypeError(f"owner must be non-blank and unpadded, got {text!r}")
    return text


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    summary = "create, list and revoke gateway API keys"
    parser = subparsers.add_parser("keys", help=summary, description=summary)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", default=None, metavar="PATH_OR_URL",
                        help=f"SQLite file or redis:// URL (default: ${STORE_ENV}, "
                             f"else {DEFAULT_KEY_STORE})")
    verbs = parser.add_subparsers(dest="keys_command", metavar="VERB", required=True)

    create = verbs.add_parser("create", parents=[common],
                              help="create a key and print it (alone) on stdout")
    create.add_argument("--name", required=True, type=_key_name, help="unique among active keys")
    create.add_argument("--models", type=_model_list, default=(), metavar="A,B",
                        help="models the key may use (default: all)")
    create.add_argument("--rpm", type=_positive_int, help="requests per minute")
    create.add_argument("--tpm", type=_positive_int, help="tokens per minute")
    create.add_argument("--max-concurrency", type=_positive_int, metavar="N",
                        help="calls in flight at once; more wait in the key's queue "
                             "(default: unlimited)")
    create.add_argument("--priority", choices=PRIORITIES, default="normal",
                        help="class served first when the upstreams are saturated "
                             "(default: normal)")
    create.add_argument("--budget-tokens", type=_positive_int,
                        help="lifetime token budget (default: unlimited)")
    create.add_argument("--owner", type=_owner, metavar="TENANT",
                        help="tenant for cache isolation (default: the key's name)")
    create.add_argument("--allow-variant-pinning", action="store_true",
                        help="let the key choose a variant with x-quiver-variant")
    create.set_defaults(func=_create)

    listing = verbs.add_parser("list", parents=[common], help="list keys (never the secrets)")
    listing.add_argument("--all", action="store_true", help="include revoked keys")
    listing.add_argument("--json", action="store_true", help="JSON instead of a table")
    listing.set_defaults(func=_list)

    revoke = verbs.add_parser("revoke", parents=[common], help="revoke the active key NAME")
    revoke.add_argument("name", help="the key's name")
    revoke.set_defaults(func=_revoke)


def _location(args: argparse.Namespace) -> str:
    return args.store or os.environ.get(STORE_ENV) or DEFAULT_KEY_STORE


def _with_store(location: str, action: Callable[[KeyStore], Awaitable[T]]) -> T:
    """Open the store, run `action` on it, close it; store errors become one clear line."""

    async def run() -> T:
        store = open_key_store(location)
        try:
            return await action(store)
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except KeyNameTakenError as exc:
        raise ApiKeyError(f"{exc}; revoke it first or pick another name") from exc
    except KeyStoreError as exc:
        raise ApiKeyError(str(exc)) from exc


def _create(args: argparse.Namespace) -> int:
    location = _location(args)
    try:
        secret, key = mint_key(args.name, models=args.models, rpm=args.rpm, tpm=args.tpm,
                               budget_tokens=args.budget_tokens, owner=args.owner,
                               can_pin_variant=args.allow_variant_pinning,
                               max_concurrency=args.max_concurrency, priority=args.priority)
    except KeyStoreError as exc:
        raise ApiKeyError(str(exc)) from exc
    _with_store(location, lambda store: store.create(key))
    logger.info("created API key %r in %s", key.name, describe_location(location))
    print(secret, flush=True)
    return 0


def _list(args: argparse.Namespace) -> int:
    include_revoked = bool(args.all)
    keys = _with_store(_location(args),
                       lambda store: store.list_keys(include_revoked=include_revoked))
    if args.json:
        print(json.dumps([public_record(key) for key in keys], indent=2))
    else:
        print(format_table(keys))
    return 0


def _revoke(args: argparse.Namespace) -> int:
    location = _location(args)
    if not _with_store(location, lambda store: store.revoke(args.name)):
        raise ApiKeyError(
            f"no active key named {args.name!r} in {describe_location(location)}")
    logger.info("revoked API key %r in %s", args.name, describe_location(location))
    return 0


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cell(value: int | str | None) -> str:
    return "-" if value is None else str(value)


def format_table(keys: list[ApiKey]) -> str:
    """Aligned columns: name, models, limits, concurrency, priority, budget, usage, owner,
    dates; never a hash."""
    rows = [_TABLE_COLUMNS] + [
        (key.name, ",".join(key.models) or "*", _cell(key.rpm), _cell(key.tpm),
         _cell(key.max_concurrency), key.priority, _cell(key.budget_tokens),
         str(key.used_tokens), _cell(key.owner),
         _when(key.created_at), _when(key.revoked_at))
        for key in keys]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_TABLE_COLUMNS))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths,
                                                                          strict=True)).rstrip()
                     for row in rows)
