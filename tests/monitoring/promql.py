"""What the monitoring tests need to read PromQL out of dashboards and rule files."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import promql_parser
import yaml

MONITORING = Path(__file__).resolve().parents[2] / "monitoring"
DASHBOARDS = sorted((MONITORING / "grafana" / "dashboards").glob("*.json"))
RULE_FILES = sorted((MONITORING / "prometheus" / "rules").glob("*.yml"))
TEMPLATE_VARIABLES = ("instance", "model_name", "model", "variant", "key")
# What Grafana puts in place of its built-in variables, for a test a minute or two long.
BUILTINS = {"$__rate_interval": "1m", "$__range": "10m", "$__interval": "15s"}
LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>\w+)\)$")


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel: str
    expr: str          # as written in the dashboard
    instant: bool

    @property
    def promql(self) -> str:
        return substitute(self.expr)


def substitute(expr: str) -> str:
    """A dashboard query as Prometheus would get it with every variable set to "All"."""
    for name, value in BUILTINS.items():
        expr = expr.replace(name, value)
    for name in TEMPLATE_VARIABLES:
        expr = expr.replace(f"${name}", ".*")
    return expr


def load_dashboard(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def panel_queries() -> Iterator[PanelQuery]:
    for path in DASHBOARDS:
        dashboard = load_dashboard(path)
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                yield PanelQuery(dashboard["uid"], panel["title"], target["expr"],
                                 target.get("instant", False))


def variable_queries() -> Iterator[tuple[str, str, str]]:
    """(dashboard uid, variable name, a PromQL query listing its values)."""
    for path in DASHBOARDS:
        dashboard = load_dashboard(path)
        for variable in dashboard["templating"]["list"]:
            if variable["type"] != "query":
                continue
            match = LABEL_VALUES.match(variable["definition"])
            assert match, f"{dashboard['uid']}: ${variable['name']} is not label_values(...)"
            query = f"count by ({match['label']}) ({substitute(match['selector'])})"
            yield dashboard["uid"], variable["name"], query


def rules() -> Iterator[dict]:
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            yield from group["rules"]


def metric_names(expr: str) -> set[str]:
    """Every metric name a PromQL expression selects."""
    names: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            return
        for attribute in ("lhs", "rhs", "expr", "vector_selector", "param"):
            child = getattr(node, attribute, None)
            if child is not None:
                walk(child)
        for child in getattr(node, "args", None) or ():
            walk(child)

    walk(promql_parser.parse(expr))
    return names
