"""Rolling out a canary, end to end on real processes: the tiny model as stable, an
identical copy and a copy with noise in its weights as canaries behind one gateway.

The gateway replays stable's deterministic calls on each canary (`rollback.quality`): the
perturbed canary is rolled back for quality within the judging window while the identical
one keeps its weight, clients see only 200s and no replay reaches a key's usage. Then
`quiver promote` takes the identical canary to 100 % (exit 0) and rolls the perturbed one
back to 0 (exit 1), writing its report both times.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from quiver.cli import main
from tests.gateway.conftest import (  # noqa: F401  (tiny_servers is a fixture)
    GatewayProcess,
    ModelServer,
    create_key,
    start_gateway,
    start_model_server,
    tiny_servers,
    wait_until,
)

pytestmark = pytest.mark.slow
ADMIN_KEY = "admin-key-for-the-rollout-test"
WINDOW_S = 60
MIN_SAMPLES = 8


@pytest.fixture(scope="session")
def perturbed_model_dir(tiny_model_dir: Path, tmp_path_factory) -> Path:
    """The tiny model with Gaussian noise (half each tensor's spread) on its weights."""
    from safetensors.numpy import load_file, save_file

    target = tmp_path_factory.mktemp("perturbed") / "tiny-llama-noisy"
    shutil.copytree(tiny_model_dir, target)
    weights = target / "model.safetensors"
    tensors = load_file(weights)
    rng = np.random.default_rng(19)
    noisy = {name: (t + rng.normal(0.0, 0.5 * float(t.std()), t.shape)).astype(t.dtype)
             if t.std() > 0 else t for name, t in tensors.items()}
    save_file(noisy, weights, metadata={"format": "pt"})
    return target


@dataclass
class Stack:
    gateway: GatewayProcess
    key: str
    store: str
    workdir: Path

    def admin(self, path: str) -> dict:
        response = httpx.get(f"{self.gateway.url}{path}", timeout=30,
                             headers={"authorization": f"Bearer {ADMIN_KEY}"})
        response.raise_for_status()
        return response.json()

    def variant(self, model: str, variant: str = "canary") -> dict:
        return self.admin("/admin/routes")[model]["variants"][variant]


def route(name: str, stable: ModelServer, canary: ModelServer) -> dict:
    return {"name": name, "variants": [
        {"name": "stable", "weight": 90, "replicas": [stable.url], "upstream_model": "tiny"},
        {"name": "canary", "weight": 10, "replicas": [canary.url], "upstream_model": "tiny"}]}


@pytest.fixture(scope="module")
def stack(tiny_servers, perturbed_model_dir, tmp_path_factory) -> Iterator[Stack]:  # noqa: F811
    workdir = tmp_path_factory.mktemp("rollout")
    noisy = start_model_server(perturbed_model_dir, "tiny")
    store = str(workdir / "keys.db")
    config = {
        "key_store": store, "admin_key": ADMIN_KEY,
        "models": [route("same", tiny_servers[0], tiny_servers[1]),
                   route("noisy", tiny_servers[0], noisy)],
        "rollback": {"window_seconds": WINDOW_S, "max_p95_latency_ratio": 20,
                     "quality": {"enabled": True, "sample_share": 1.0,
                                 "min_samples": MIN_SAMPLES, "min_agreement": 0.9,
                                 "max_tokens": 16}}}
    gateway = start_gateway(config, workdir)
    try:
        key = create_key(store, "client")
        time.sleep(1.5)  # the gateway reloads keys every second
        yield Stack(gateway, key, store, workdir)
    finally:
        gateway.stop()
        noisy.kill()


def chat(stack: Stack, model: str, i: int, *, stream: bool) -> tuple[int, int]:
    """One deterministic call; (status, total tokens the client was told it used)."""
    body = {"model": model, "temperature": 0, "max_tokens": 12, "stream": stream,
            "user": f"user-{i}",
            "messages": [{"role": "user", "content": f"Tell me about the number {i}."}]}
    if stream:
        body["stream_options"] = {"include_usage": True}
    response = httpx.post(f"{stack.gateway.url}/v1/chat/completions", json=body, timeout=60,
                          headers={"authorization": f"Bearer {stack.key}"})
    if response.status_code != 200:
        return response.status_code, 0
    if not stream:
        return 200, response.json()["usage"]["total_tokens"]
    events = [json.loads(line[6:]) for line in response.text.splitlines()
              if line.startswith("data: {")]
    return 200, next(e["usage"]["total_tokens"] for e in events if e.get("usage"))


def used_tokens(stack: Stack) -> int:
    keys = stack.admin("/admin/keys")["data"]
    return next(k["used_tokens"] for k in keys if k["name"] == "client")


def test_a_perturbed_canary_is_rolled_back_for_quality_and_an_identical_one_is_not(stack):
    started = time.monotonic()
    statuses, charged = [], 0
    for i in range(24):
        for model in ("same", "noisy"):
            status, tokens = chat(stack, model, i, stream=i % 2 == 1)
            statuses.append(status)
            charged += tokens
    assert set(statuses) == {200}
    wait_until(lambda: stack.variant("noisy")["rolled_back"], 30, "the quality rollback")
    noisy, same = stack.variant("noisy"), stack.variant("same")
    assert time.monotonic() - started < WINDOW_S
    assert noisy["rollback_reason"] == "quality" and noisy["weight"] == 0
    assert noisy["quality"]["agreement"] < 0.9, noisy
    wait_until(lambda: stack.variant("same")["quality"]["samples"] >= MIN_SAMPLES, 30,
               "the identical canary's replays")
    same = stack.variant("same")
    assert same["weight"] == 10 and not same["rolled_back"]
    assert same["quality"]["agreement"] >= 0.9, same
    # usage: exactly what the clients were told, no replay in it
    wait_until(lambda: used_tokens(stack) >= charged, 15, "usage written")
    time.sleep(1.5)
    assert used_tokens(stack) == charged
    assert sample(stack, "quiver_gateway_rollbacks_total", model="noisy",
                  reason="quality") == 1
    assert sample(stack, "quiver_gateway_canary_agreement_ratio", model="same") >= 0.9
    assert sample(stack, "quiver_gateway_quality_replays_total", model="same",
                  outcome="compared") >= MIN_SAMPLES
    # the response cache saw the clients' calls only (a miss each, unique prompts)
    assert sample(stack, "quiver_gateway_cache_requests_total", result="miss",
                  variant=None) == len(statuses)


def sample(stack: Stack, name: str, **labels: str | None) -> float | None:
    """A canary series' value on the gateway's /metrics."""
    text = httpx.get(f"{stack.gateway.url}/metrics", timeout=30,
                     headers={"authorization": f"Bearer {ADMIN_KEY}"}).text
    wanted = {"variant": "canary", **labels}
    wanted = {k: v for k, v in wanted.items() if v is not None}
    return next((s.value for family in text_string_to_metric_families(text)
                 for s in family.samples if s.name == name
                 and all(s.labels.get(k) == v for k, v in wanted.items())), None)


def promote(stack: Stack, model: str, out: Path) -> int:
    return main(["promote", "--gateway", stack.gateway.url, "--admin-key", ADMIN_KEY,
                 "--api-key", stack.key, "--model", model, "--variant", "canary",
                 "--requests-per-step", "24", "--concurrency", "4", "--max-tokens", "12",
                 "--judge-seconds", "20", "--out", str(out)])


def test_promote_takes_an_identical_canary_to_100(stack, capsys):
    out = stack.workdir / "promote-same"
    assert promote(stack, "same", out) == 0, capsys.readouterr().out
    assert stack.admin("/admin/routes")["same"]["variants"]["canary"]["weight"] == 100
    report = json.loads((out / "promote.json").read_text())
    assert report["promoted"] and [r["weight"] for r in report["results"]] == [10, 50, 100]
    assert all(r["passed"] and r["num_errors"] == 0 for r in report["results"])
    assert report["results"][0]["num_replays"] > 0  # stable's calls were replayed at 10 %
    assert "promoted to 100 %" in (out / "promote.md").read_text()


def test_promote_rolls_a_perturbed_canary_back_to_0(stack, capsys):
    out = stack.workdir / "promote-noisy"
    assert promote(stack, "noisy", out) == 1
    printed = capsys.readouterr().out
    assert "rolled back to 0" in printed and "agreement" in printed
    assert stack.admin("/admin/routes")["noisy"]["variants"]["canary"]["weight"] == 0
    report = json.loads((out / "promote.json").read_text())
    assert not report["promoted"] and report["final_weight"] == 0
    failed = report["results"][-1]
    assert not failed["passed"] and failed["failures"], failed
    assert "rolled back to 0" in (out / "promote.md").read_text()
