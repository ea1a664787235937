"""Writes Quiver's Grafana dashboards (grafana/dashboards/*.json) from the panel lists below.

    python monitoring/grafana/generate.py          # rewrite the JSON files
    python monitoring/grafana/generate.py --check  # exit 1 if a file is out of date

The JSON files are what users import (Grafana 10+, "Import dashboard", or the Helm chart's
sidecar ConfigMaps); this script is how they are edited, so panels stay consistent. The test
suite checks the files are current and runs every panel's query against a real Prometheus.
Every query uses only metric names the code exports (DESIGN.md) and takes the datasource
and instance from template variables.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

DASHBOARDS_DIR = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""
    instant: bool = False


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"      # timeseries | stat | table | bargauge
    width: int = 12
    height: int = 8
    description: str = ""
    repeat: str | None = None     # a template variable: one panel per value, side by side


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


@dataclass
class Dashboard:
    uid: str
    title: str
    description: str
    variables: list[dict] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)


def q(expr: str, legend: str = "", instant: bool = False) -> Query:
    return Query(" ".join(expr.split()), legend, instant)


def quantiles(metric: str, selector: str, by: str, label: str) -> tuple[Query, ...]:
    """p50/p95/p99 of a histogram, one series per `by` value."""
    return tuple(q(f"histogram_quantile({p}, sum by (le, {by}) "
                   f"(rate({metric}_bucket{{{selector}}}[{RATE}])))", f"p{int(p * 100)} {label}")
                 for p in (0.5, 0.95, 0.99))


def ratio(numerator: str, denominator: str, by: str) -> str:
    """numerator / denominator by `by`, 0 (not "no data") while the numerator has no series."""
    total = f"sum by ({by}) (rate({denominator}[{RATE}]))"
    return f"(sum by ({by}) (rate({numerator}[{RATE}])) or {total} * 0) / {total}"


# -- variables ----------------------------------------------------------------------

def datasource_variable() -> dict:
    return {"name": "datasource", "label": "Data source", "type": "datasource",
            "query": "prometheus", "current": {}, "hide": 0, "refresh": 1, "regex": "",
            "options": []}


def query_variable(name: str, label: str, definition: str) -> dict:
    return {"name": name, "label": label, "type": "query", "datasource": DATASOURCE,
            "definition": definition, "query": {"query": definition, "refId": name},
            "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*", "sort": 1,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "hide": 0, "options": [], "regex": ""}


# -- the three dashboards -----------------------------------------------------------

GW = 'instance=~"$instance", model=~"$model", variant=~"$variant"'
REQUESTS = f"quiver_gateway_requests_total{{{GW}}}"
AGREEMENT = f"quiver_gateway_canary_agreement_ratio{{{GW}}}"


def overview() -> Dashboard:
    five_xx = f'quiver_gateway_requests_total{{{GW}, status=~"5.."}}'
    four_xx = f'quiver_gateway_requests_total{{{GW}, status=~"4.."}}'
    cache = 'quiver_gateway_cache_requests_total{instance=~"$instance"'
    upstream = 'instance=~"$instance", model=~"$model", variant=~"$variant"'
    headline = (
        Panel("Requests/s", (q(f"sum(rate({REQUESTS}[{RATE}]))"),), "reqps", "stat", 6, 4),
        Panel("5xx ratio", (q(ratio(five_xx, REQUESTS, "model")),), "percentunit", "stat",
              6, 4),
        Panel("p95 latency", (q("histogram_quantile(0.95, sum by (le) (rate("
                                f"quiver_gateway_request_duration_seconds_bucket{{{GW}}}"
                                f"[{RATE}])))"),), "s", "stat", 6, 4),
        Panel("Cache hit ratio", (q(f'sum(rate({cache}, result="hit"}}[{RATE}])) / '
                                    f'sum(rate({cache}, result=~"hit|miss"}}[{RATE}]))'),),
              "percentunit", "stat", 6, 4),
    )
    per_variant = tuple(
        Panel(f"{title}: $variant", (query,), unit, "stat", 6, 4, repeat="variant")
        for title, query, unit in (
            ("Requests/s", q(f"sum(rate({REQUESTS}[{RATE}]))"), "reqps"),
            ("p95 latency", q("histogram_quantile(0.95, sum by (le) (rate("
                              f"quiver_gateway_request_duration_seconds_bucket{{{GW}}}"
                              f"[{RATE}])))"), "s"),
            ("5xx ratio", q(ratio(five_xx, REQUESTS, "variant")), "percentunit"),
            ("Agreement with stable", q(f"min({AGREEMENT})"), "percentunit")))
    traffic = (
        Panel("Requests/s by variant", (q(f"sum by (variant) (rate({REQUESTS}[{RATE}]))",
                                          "{{variant}}"),), "reqps"),
        Panel("Requests/s by status", (q(f"sum by (status) (rate({REQUESTS}[{RATE}]))",
                                         "{{status}}"),), "reqps"),
        Panel("Error ratio by variant", (q(ratio(five_xx, REQUESTS, "variant"), "5xx {{variant}}"),
                                         q(ratio(four_xx, REQUESTS, "variant"), "4xx {{variant}}")),
              "percentunit", description="Share of routed requests answered 5xx (server "
              "errors, the SLO's) and 4xx (client errors)."),
        Panel("Latency by variant", quantiles("quiver_gateway_request_duration_seconds", GW,
                                              "variant", "{{variant}}"), "s",
              description="Routed requests, until the last byte (streams included)."),
        Panel("Answer agreement with stable by canary", (
            q(f"min by (model, variant) ({AGREEMENT})", "{{model}}/{{variant}}"),), "percentunit",
              description="Mean token agreement of stable's replayed deterministic calls "
              "with the canary's answers over the judging window (rollback.quality); below "
              "min_agreement the canary is rolled back with reason quality."),
        Panel("Quality replays/s by outcome", (q(
            "sum by (variant, outcome) (rate(quiver_gateway_quality_replays_total"
            f"{{{GW}}}[{RATE}]))", "{{variant}} {{outcome}}"),), "reqps",
              description="Stable calls replayed on each canary: compared, invalid (broke "
              "the JSON or tool-call form), skipped, error, dropped (queue full)."),
        Panel("Time to first token by variant (streamed)",
              quantiles("quiver_gateway_time_to_first_token_seconds", GW, "variant",
                        "{{variant}}"), "s"),
        Panel("Tokens/s by variant", (q("sum by (variant, kind) (rate(quiver_gateway_tokens_"
                                        f"total{{{GW}}}[{RATE}]))", "{{kind}} {{variant}}"),),
              "short"),
    )
    protection = (
        Panel("Cache lookups/s by result", (q(f"sum by (result) (rate({cache}}}[{RATE}]))",
                                              "{{result}}"),), "reqps", width=8),
        Panel("Cache size", (q('sum(quiver_gateway_cache_size_bytes{instance=~"$instance"})',
                               "bytes"),), "bytes", width=8,
              description="Memory cache only (a Redis cache reports nothing here)."),
        Panel("Rate-limited requests/s by limit", (q(
            'sum by (kind) (rate(quiver_gateway_rate_limited_total{instance=~"$instance"}'
            f"[{RATE}]))", "{{kind}}"),), "reqps", width=8),
        Panel("Auth failures/s by reason", (q(
            'sum by (reason) (rate(quiver_gateway_auth_failures_total{instance=~"$instance"}'
            f"[{RATE}]))", "{{reason}}"),), "reqps", width=8),
        Panel("Route weights", (q(f"max by (model, variant) (quiver_gateway_route_weight_percent"
                                  f"{{{GW}}})", "{{model}}/{{variant}}"),), "percent", width=8),
        Panel("Rollbacks in range", (q("sum by (model, variant) (increase("
                                       f"quiver_gateway_rollbacks_total{{{GW}}}[$__range]))",
                                       "{{model}}/{{variant}}"),), "short", "stat", 8),
    )
    upstreams = (
        Panel("Upstream p95 by replica", (q(
            "histogram_quantile(0.95, sum by (le, replica) (rate("
            f"quiver_gateway_upstream_request_duration_seconds_bucket{{{upstream}}}[{RATE}])))",
            "{{replica}}"),), "s", width=8),
        Panel("Upstream attempts/s by outcome", (q(
            "sum by (replica, outcome) (rate(quiver_gateway_upstream_requests_total"
            f"{{{upstream}}}[{RATE}]))", "{{replica}} {{outcome}}"),), "reqps", width=8),
        Panel("Retries and broken streams /s", (
            q(f"sum by (variant) (rate(quiver_gateway_upstream_retries_total{{{upstream}}}"
              f"[{RATE}]))", "retries {{variant}}"),
            q(f"sum by (variant) (rate(quiver_gateway_stream_errors_total{{{upstream}}}"
              f"[{RATE}]))", "stream errors {{variant}}")), "reqps", width=8),
        Panel("Replica health and circuit breakers", (
            q(f"max by (replica) (quiver_gateway_upstream_healthy{{{upstream}}})",
              "healthy {{replica}}"),
            q(f"max by (replica) (quiver_gateway_circuit_open{{{upstream}}})",
              "circuit open {{replica}}")), "short"),
        Panel("In-flight requests per replica", (q(
            f"sum by (replica) (quiver_gateway_upstream_outstanding_requests{{{upstream}}})",
            "{{replica}}"),), "short"),
    )
    replicas = (
        Panel("Route state in sync, per gateway", (q(
            'min by (instance) (quiver_gateway_route_state_up{instance=~"$instance"})',
            "{{instance}}"),), "short", width=8,
              description="1 while the gateway's canary weights, rollbacks and judging "
              "windows are in sync with routing.backend (memory: always); 0 while Redis is "
              "out of reach and it routes by the last state it read."),
        Panel("Route state age, per gateway", (q(
            'max by (instance) (quiver_gateway_route_state_age_seconds{instance=~"$instance"})',
            "{{instance}}"),), "s", width=8,
              description="Since the gateway last synced the shared route state: an admin "
              "change or rollback on another replica is obeyed within about this plus "
              "routing.sync_seconds (memory backend: 0)."),
        Panel("Replica choice/s by outcome (balance: prefix)", (q(
            "sum by (variant, outcome) (rate(quiver_gateway_balance_decisions_total"
            f"{{{GW}}}[{RATE}]))", "{{variant}} {{outcome}}"),), "reqps", width=8,
              description="preferred: the call went to its prefix's replica (a likely "
              "prefix-cache hit); spill: that replica was over its load bound, so the next "
              "in the ranking took it; unkeyed: no prefix or session to key on."),
    )
    return Dashboard(
        "quiver-overview", "Quiver / Service overview",
        "Gateway traffic, errors, latency, TTFT, tokens, cache, limits and canaries.",
        [datasource_variable(),
         query_variable("instance", "Gateway", 'label_values(quiver_build_info'
                        '{component="gateway"}, instance)'),
         query_variable("model", "Model", 'label_values(quiver_gateway_route_weight_percent'
                        '{instance=~"$instance"}, model)'),
         query_variable("variant", "Variant", "label_values(quiver_gateway_route_weight_"
                        'percent{instance=~"$instance", model=~"$model"}, variant)')],
        [Row("Now", headline), Row("Stable vs canary", per_variant), Row("Traffic", traffic),
         Row("Cache, limits, routing", protection),
         Row("Routing across gateway and server replicas", replicas),
         Row("Upstreams", upstreams)])


EN = 'instance=~"$instance", model_name=~"$model_name"'


def engine() -> Dashboard:
    by_instance = "instance"
    load = (
        Panel("Running and waiting requests", (
            q(f"sum by (instance) (vllm:num_requests_running{{{EN}}})", "running {{instance}}"),
            q(f"sum by (instance) (vllm:num_requests_waiting{{{EN}}})", "waiting {{instance}}")),
              "short", width=8),
        Panel("KV cache usage", (q(f"max by (instance) (vllm:kv_cache_usage_perc{{{EN}}})",
                                   "{{instance}}"),), "percentunit", width=8),
        Panel("Prefix cache hit rate", (q(
            f"sum by (instance) (rate(vllm:prefix_cache_hits_total{{{EN}}}[{RATE}])) / "
            f"sum by (instance) (rate(vllm:prefix_cache_queries_total{{{EN}}}[{RATE}]))",
            "{{instance}}"),), "percentunit", width=8,
              description="Prompt tokens served from cached KV blocks."),
    )
    latency = (
        Panel("Queue time", quantiles("vllm:request_queue_time_seconds", EN, by_instance,
                                      "{{instance}}")[:2], "s", width=8),
        Panel("Time to first token", quantiles("vllm:time_to_first_token_seconds", EN,
                                               by_instance, "{{instance}}"), "s", width=8),
        Panel("Inter-token latency", quantiles("vllm:inter_token_latency_seconds", EN,
                                               by_instance, "{{instance}}"), "s", width=8),
        Panel("End-to-end request latency", quantiles("vllm:e2e_request_latency_seconds", EN,
                                                      by_instance, "{{instance}}"), "s"),
        Panel("Finished requests/s by reason", (q(
            f"sum by (finished_reason) (rate(vllm:request_success_total{{{EN}}}[{RATE}]))",
            "{{finished_reason}}"),), "reqps"),
    )
    throughput = (
        Panel("Tokens/s", (
            q(f"sum by (instance) (rate(vllm:prompt_tokens_total{{{EN}}}[{RATE}]))",
              "prompt {{instance}}"),
            q(f"sum by (instance) (rate(vllm:generation_tokens_total{{{EN}}}[{RATE}]))",
              "generation {{instance}}")), "short", width=8),
        Panel("Preemptions/s", (q(f"sum by (instance) (rate(vllm:num_preemptions_total{{{EN}}}"
                                  f"[{RATE}]))", "{{instance}}"),), "short", width=8),
        Panel("HTTP requests/s by route and status", (q(
            'sum by (route, status) (rate(quiver_server_http_requests_total{instance=~'
            f'"$instance"}}[{RATE}]))', "{{route}} {{status}}"),), "reqps", width=8),
    )
    process = (
        Panel("Model load time", (q('max by (instance) (quiver_server_model_load_seconds'
                                    '{instance=~"$instance"})', "{{instance}}"),), "s",
              "stat", 6),
        Panel("Resident memory", (q('max by (instance) (process_resident_memory_bytes'
                                    '{instance=~"$instance"})', "{{instance}}"),), "bytes",
              width=6),
        Panel("CPU", (q('sum by (instance) (rate(process_cpu_seconds_total{instance=~'
                        f'"$instance"}}[{RATE}]))', "{{instance}}"),), "percentunit", width=6),
        Panel("Builds", (q('max by (instance, version, engine, model) (quiver_build_info'
                           '{component="server", instance=~"$instance"})', instant=True),),
              "short", "table", 6),
    )
    return Dashboard(
        "quiver-engine", "Quiver / Engine",
        "Model servers (native and vLLM engines alike, vLLM's metric names): load, KV cache, "
        "latency phases, throughput, per replica.",
        [datasource_variable(),
         query_variable("instance", "Model server", "label_values(vllm:num_requests_running, "
                        "instance)"),
         query_variable("model_name", "Model", 'label_values(vllm:num_requests_running'
                        '{instance=~"$instance"}, model_name)')],
        [Row("Load", load), Row("Latency", latency), Row("Throughput", throughput),
         Row("Process", process)])


TN = 'instance=~"$instance", key=~"$key"'


def tenants() -> Dashboard:
    requests = f"quiver_gateway_requests_total{{{TN}}}"
    usage = (
        Panel("Requests/s by key", (q(f"sum by (key) (rate({requests}[{RATE}]))", "{{key}}"),),
              "reqps"),
        Panel("Tokens/s by key", (q(f"sum by (key, kind) (rate(quiver_gateway_tokens_total"
                                    f"{{{TN}}}[{RATE}]))", "{{key}} {{kind}}"),), "short"),
        Panel("Tokens in range by key", (q("sum by (key) (increase(quiver_gateway_tokens_total"
                                           f"{{{TN}}}[$__range]))", "{{key}}"),), "short",
              "bargauge"),
        Panel("5xx ratio by key", (q(ratio(f'quiver_gateway_requests_total{{{TN}, '
                                           'status=~"5.."}', requests, "key"), "{{key}}"),),
              "percentunit"),
    )
    limits = (
        Panel("Request rate against the key's rpm limit", (q(
            f"sum by (key) (rate({requests}[{RATE}])) * 60 / max by (key) "
            f'(quiver_gateway_key_rate_limit_per_minute{{{TN}, kind="requests"}})', "{{key}}"),),
              "percentunit", width=8),
        Panel("Token rate against the key's tpm limit", (q(
            f"sum by (key) (rate(quiver_gateway_tokens_total{{{TN}}}[{RATE}])) * 60 / max by "
            f'(key) (quiver_gateway_key_rate_limit_per_minute{{{TN}, kind="tokens"}})',
            "{{key}}"),), "percentunit", width=8),
        Panel("Rate-limited requests/s by key", (q(
            f"sum by (key, kind) (rate(quiver_gateway_rate_limited_total{{{TN}}}[{RATE}]))",
            "{{key}} {{kind}}"),), "reqps", width=8),
        Panel("Budget used", (q(f"max by (key) (quiver_gateway_key_used_tokens{{{TN}}}) / "
                                f"max by (key) (quiver_gateway_key_budget_tokens{{{TN}}})",
                                "{{key}}"),), "percentunit", "bargauge"),
        Panel("Limits", (q(f"max by (key, kind) (quiver_gateway_key_rate_limit_per_minute"
                           f"{{{TN}}})", instant=True),), "short", "table"),
    )
    return Dashboard(
        "quiver-tenants", "Quiver / Tenants",
        "Usage, limits and fair sharing per API key (key names, never keys).",
        [datasource_variable(),
         query_variable("instance", "Gateway", 'label_values(quiver_build_info'
                        '{component="gateway"}, instance)'),
         query_variable("key", "API key", 'label_values(quiver_gateway_key_used_tokens'
                        '{instance=~"$instance"}, key)')],
        [Row("Usage", usage), Row("Limits", limits), Row("Fair sharing", fair_sharing())])


def fair_sharing() -> tuple[Panel, ...]:
    """Admission (`gateway.admission`): slots in use, who waits, for how long, who is refused."""
    gw = 'instance=~"$instance"'
    return (
        Panel("Upstream slots in use by variant", (q(
            f"sum by (model, variant) (quiver_gateway_admission_in_flight_requests{{{gw}}}) / "
            f"sum by (model, variant) (quiver_gateway_admission_slots{{{gw}}})",
            "{{model}}/{{variant}}"),), "percentunit", width=8,
              description="Calls holding a slot over the variant's slots "
              "(max_concurrency_per_replica x usable replicas). At 100% calls queue per tenant."),
        Panel("Queued calls by priority", (q(
            f"sum by (priority) (quiver_gateway_admission_queued_requests{{{gw}}})",
            "{{priority}}"),), "short", width=8),
        Panel("Queue wait by priority", quantiles("quiver_gateway_admission_wait_seconds", gw,
                                                  "priority", "{{priority}}"), "s", width=8),
        Panel("Calls in flight by key", (q(
            f"max by (key) (quiver_gateway_key_in_flight_requests{{{TN}}})", "{{key}}"),),
              "short", description="What a key's max_concurrency caps."),
        Panel("Admission refusals/s by key and reason", (q(
            f"sum by (key, reason) (rate(quiver_gateway_admission_rejections_total{{{TN}}}"
            f"[{RATE}]))", "{{key}} {{reason}}"),), "reqps",
              description="queue_full (429 tenant_queue_full), concurrency_limit (429 "
              "concurrency_limit_exceeded), queue_timeout (503 upstreams_saturated)."),
    )


DASHBOARDS = (overview, engine, tenants)


# -- rendering ----------------------------------------------------------------------

PANEL_OPTIONS = {
    "timeseries": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                   "tooltip": {"mode": "multi", "sort": "desc"}},
    "stat": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
             "colorMode": "value", "graphMode": "area", "textMode": "auto"},
    "bargauge": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                 "orientation": "horizontal", "displayMode": "gradient"},
    "table": {"showHeader": True},
}


def render_panel(panel: Panel, panel_id: int, x: int, y: int) -> dict:
    targets = [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": query.expr,
                "legendFormat": query.legend or "__auto", "range": not query.instant,
                "instant": query.instant, "format": "table" if panel.kind == "table"
                else "time_series"} for i, query in enumerate(panel.queries)]
    rendered = {"id": panel_id, "type": panel.kind, "title": panel.title,
                "description": panel.description, "datasource": DATASOURCE,
                "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
                "targets": targets, "options": PANEL_OPTIONS[panel.kind],
                "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []}}
    if panel.kind == "table":
        rendered["transformations"] = [{"id": "organize", "options": {
            "excludeByName": {"Time": True, "Value": True}}}]
    if panel.repeat:
        rendered.update(repeat=panel.repeat, repeatDirection="h", maxPerRow=4)
    return rendered


def render(dashboard: Dashboard) -> dict:
    panels, panel_id, y = [], 1, 0
    for row in dashboard.rows:
        panels.append({"id": panel_id, "type": "row", "title": row.title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        panel_id, y, x, row_height = panel_id + 1, y + 1, 0, 0
        for panel in row.panels:
            if x + panel.width > 24:
                x, y, row_height = 0, y + row_height, 0
            panels.append(render_panel(panel, panel_id, x, y))
            panel_id, x, row_height = panel_id + 1, x + panel.width, max(row_height,
                                                                         panel.height)
        y += row_height
    return {
        "uid": dashboard.uid, "title": dashboard.title, "description": dashboard.description,
        "tags": ["quiver"], "timezone": "browser", "editable": True, "graphTooltip": 1,
        "schemaVersion": 39, "version": 1, "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"}, "timepicker": {},
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
            "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
            "name": "Annotations & Alerts", "type": "dashboard"}]},
        "links": [{"title": "Quiver dashboards", "type": "dashboards", "tags": ["quiver"],
                   "asDropdown": True, "includeVars": True, "keepTime": True}],
        "templating": {"list": dashboard.variables},
        "panels": panels,
    }


def rendered_files() -> dict[Path, str]:
    files = {}
    for build in DASHBOARDS:
        dashboard = build()
        name = dashboard.uid.removeprefix("quiver-") + ".json"
        files[DASHBOARDS_DIR / name] = json.dumps(render(dashboard), indent=2) + "\n"
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when a dashboard file differs from what this writes")
    args = parser.parse_args(argv)
    stale = []
    for path, text in rendered_files().items():
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        if args.check:
            stale.append(path.name)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run python {Path(__file__).as_posix()}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
