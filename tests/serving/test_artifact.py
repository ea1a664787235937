"""The manifest at serve time: a failed gate is refused unless allowed; `/v1/models` and
`/metrics` say what the artifact is."""

from __future__ import annotations

import asyncio
import json
import shutil

import httpx
import pytest
from prometheus_client import CollectorRegistry

from quiver.cli import main
from serving.api.app import create_app
from serving.artifact import ArtifactSummary
from tests.serving.api.conftest import serve_in_thread, tiny_settings

GATE = {"max_ppl_increase": 1.0, "ppl_increase": 7.5, "passed": False, "forced": True}


@pytest.fixture
def failed_artifact(tiny_model_dir, tmp_path):
    out = tmp_path / "int8-forced"
    shutil.copytree(tiny_model_dir, out)
    (out / "manifest.json").write_text(json.dumps({
        "format": "safetensors", "method": "int8", "params": {},
        "source": {"path": str(tiny_model_dir), "sha256": "0" * 64},
        "metrics": {"perplexity": 10.75, "baseline_perplexity": 10.0}, "gate": GATE}))
    return out


def test_serve_refuses_a_failed_gate_in_one_line(failed_artifact, capsys):
    assert main(["serve", "--model", str(failed_artifact)]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "quality gate failed (perplexity +7.50 % over its source, +1.00 % allowed; " \
           "written with --force)" in error and "--allow-failed-gate" in error


def test_allowed_it_serves_and_says_so(failed_artifact):
    from transformers import AutoTokenizer

    from serving.backends.factory import create_engine_client

    settings = tiny_settings(failed_artifact, allow_failed_gate=True)
    registry = CollectorRegistry()
    engine = create_engine_client(settings, registry)
    try:
        app = create_app(settings, engine, AutoTokenizer.from_pretrained(failed_artifact),
                         registry)
        with serve_in_thread(app) as url:
            card = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]
            metrics = httpx.get(f"{url}/metrics", timeout=10).text
    finally:
        asyncio.run(engine.shutdown())
    assert card["quiver"] == {"method": "int8", "format": "safetensors", "gate": GATE,
                              "metrics": {"perplexity": 10.75, "baseline_perplexity": 10.0}}
    assert 'quiver_server_artifact_info{format="safetensors",gate="failed",method="int8"' \
        in metrics
    assert 'quiver_server_artifact_ppl_increase_percent{model_name="tiny"} 7.5' in metrics


def test_a_plain_checkpoint_is_method_none(tiny_model_dir):
    summary = ArtifactSummary.read(tiny_model_dir)
    assert summary.as_card() == {"method": "none", "format": "safetensors", "metrics": {},
                                 "gate": None}
    summary.check_gate(tiny_model_dir, allow_failed=False)  # nothing to refuse


def test_the_refusal_names_every_limit_missed(tmp_path):
    from serving.artifact import FailedGateError

    summary = ArtifactSummary(method="awq", gate={
        "max_ppl_increase": 8.0, "ppl_increase": 3.1, "max_task_score_drop": 5.0,
        "task_score_drop": 9.38, "min_greedy_agreement": 80.0, "greedy_agreement": 61.25,
        "passed": False, "forced": True})
    with pytest.raises(FailedGateError) as exc:
        summary.check_gate(tmp_path, allow_failed=False)
    message = str(exc.value)
    assert "perplexity" not in message                       # that limit held
    assert ("quality gate failed (task score 9.38 points below its source's, 5.00 allowed; "
            "greedy agreement 61.25 %, 80.00 % required; written with --force)") in message
    summary.check_gate(tmp_path, allow_failed=True)
