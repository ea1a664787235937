"""Tenants: `QUIVER_API_KEYS` and the tenants file parsed into keys and weights, with errors
that name the bad entry; each call's tenant drawn by weight."""

from __future__ import annotations

import random

import pytest

from loadtests.errors import LoadTestError
from loadtests.tenants import (
    Tenant,
    format_api_keys,
    load_tenants_file,
    parse_api_keys,
    pick_tenant,
    rate_shares,
    tenants_from_env,
)


def test_api_keys_with_names_and_weights_round_trip():
    tenants = parse_api_keys("quiet=qk-aaa:1, noisy=qk-bbb:10")
    assert tenants == [Tenant("quiet", "qk-aaa", 1.0), Tenant("noisy", "qk-bbb", 10.0)]
    assert parse_api_keys(format_api_keys(tenants)) == tenants


def test_unnamed_keys_are_numbered_with_weight_one():
    assert parse_api_keys("qk-a,qk-b:2") == [Tenant("tenant-1", "qk-a"),
                                             Tenant("tenant-2", "qk-b", 2.0)]


@pytest.mark.parametrize("text, message", [
    ("quiet=qk-a:x", "weight 'x' is not a number"),
    ("quiet=qk-a:0", "weight must be a positive number"),
    ("quiet=:2", "entry 1 (quiet) has no key"),
    ("a=qk-1,a=qk-2", "tenant(s) named twice: a"),
    ("bad name=qk-1", "tenant name 'bad name'"),
    (" , ", "names no tenant"),
])
def test_bad_api_keys_are_clear_errors(text, message):
    with pytest.raises(LoadTestError) as exc:
        parse_api_keys(text)
    assert message in str(exc.value)


def test_env_falls_back_to_one_default_tenant(monkeypatch):
    monkeypatch.delenv("QUIVER_API_KEYS", raising=False)
    assert tenants_from_env("qk-one") == [Tenant("default", "qk-one")]
    monkeypatch.setenv("QUIVER_API_KEYS", "x=qk-x")
    assert tenants_from_env("qk-one") == [Tenant("x", "qk-x")]


def test_tenants_file_with_weights_keys_and_keys_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("NOISY_KEY", "qk-noisy")
    path = tmp_path / "tenants.yaml"
    path.write_text("quiet: {weight: 1, api_key: qk-quiet}\n"
                    "noisy: {weight: 10, api_key_env: NOISY_KEY}\n"
                    "plain:\n")
    assert load_tenants_file(path) == [Tenant("quiet", "qk-quiet", 1.0),
                                       Tenant("noisy", "qk-noisy", 10.0),
                                       Tenant("plain", None, 1.0)]


@pytest.mark.parametrize("text, message", [
    ("quiet: {weight: 1, rpm: 5}\n", "tenant quiet: unknown key(s) rpm"),
    ("quiet: {weight: lots}\n", "weight must be a number, got 'lots'"),
    ("quiet: {api_key_env: NO_SUCH_VAR_HERE}\n", "$NO_SUCH_VAR_HERE is not set"),
    ("- quiet\n", "must map tenant names"),
    ("quiet: 3\n", "tenant quiet must map to"),
    ("quiet: [\n", "not valid YAML"),
])
def test_bad_tenants_files_are_clear_errors(tmp_path, text, message):
    path = tmp_path / "tenants.yaml"
    path.write_text(text)
    with pytest.raises(LoadTestError) as exc:
        load_tenants_file(path)
    assert message in str(exc.value) and str(path) in str(exc.value)


def test_calls_go_to_tenants_in_proportion_to_their_weights():
    tenants = [Tenant("quiet", "k1", 1.0), Tenant("noisy", "k2", 10.0)]
    rng = random.Random(7)
    picks = [pick_tenant(tenants, rng).name for _ in range(11_000)]
    assert picks.count("noisy") / picks.count("quiet") == pytest.approx(10, rel=0.15)
    assert rate_shares(tenants, 11.0) == {"quiet": 1.0, "noisy": 10.0}
