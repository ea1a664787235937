"""Grafana dashboards: current with their generator, importable, and every query well formed
and scoped by the datasource and instance variables. Whether each query returns data for
real traffic is test_stack.py's job."""

from __future__ import annotations

import json

import promql_parser
import pytest

from tests.file_modules import load_file_module
from tests.monitoring.promql import (
    DASHBOARDS,
    MONITORING,
    load_dashboard,
    panel_queries,
    variable_queries,
)


def load_generator():
    return load_file_module(MONITORING / "grafana" / "generate.py", "quiver_dashboards")


def test_the_three_dashboards_are_current_with_their_generator():
    generator = load_generator()
    files = generator.rendered_files()
    assert sorted(path.name for path in files) == ["engine.json", "overview.json",
                                                   "tenants.json"]
    for path, text in files.items():
        assert path.read_text(encoding="utf-8") == text, (
            f"{path.name} is stale: run python monitoring/grafana/generate.py")
    assert generator.main(["--check"]) == 0


def test_the_generator_check_notices_a_hand_edit(tmp_path, monkeypatch):
    generator = load_generator()
    for path in DASHBOARDS:
        (tmp_path / path.name).write_text(path.read_text(encoding="utf-8"))
    edited = tmp_path / "engine.json"
    edited.write_text(edited.read_text().replace("KV cache usage", "KV usage"))
    monkeypatch.setattr(generator, "DASHBOARDS_DIR", tmp_path)
    assert generator.main(["--check"]) == 1


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_is_importable_into_grafana_10(path):
    dashboard = load_dashboard(path)
    assert dashboard["uid"].startswith("quiver-") and dashboard["title"].startswith("Quiver")
    assert dashboard["schemaVersion"] >= 36  # Grafana 9.x+ (10 writes 38/39)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["type"] == "query"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
    json.dumps(dashboard)  # plain JSON, nothing a file import cannot read


def test_every_panel_query_parses_and_is_scoped_to_the_chosen_instance():
    queries = list(panel_queries())
    assert len(queries) >= 50
    for query in queries:
        promql_parser.parse(query.promql)  # raises on a syntax error
        assert 'instance=~"$instance"' in query.expr, (query.dashboard, query.panel)


def test_every_template_variable_query_parses():
    found = list(variable_queries())
    assert {(uid, name) for uid, name, _ in found} >= {
        ("quiver-overview", "instance"), ("quiver-overview", "variant"),
        ("quiver-engine", "instance"), ("quiver-tenants", "key")}
    for _, _, query in found:
        promql_parser.parse(query)


def test_overview_shows_stable_and_canary_side_by_side():
    dashboard = load_dashboard(MONITORING / "grafana" / "dashboards" / "overview.json")
    repeated = [p for p in dashboard["panels"] if p.get("repeat") == "variant"]
    assert len(repeated) >= 3
    assert all(p["repeatDirection"] == "h" for p in repeated)
