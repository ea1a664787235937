"""The HTML report: headline metrics, SLO verdicts, every entry, and matplotlib plots
(PNG, base64-embedded, so the report is one self-contained file)."""

from __future__ import annotations

import base64
import html
import io
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from loadtests.breakdown import Breakdown, CacheShare, TtftStats
from loadtests.calls import ITL, POST, RATE_LIMITED, TOKENS_PER_S, TTFT
from loadtests.results import Entry, OpenLoopStats, RunMetrics, RunResults
from loadtests.server_metrics import ServerCacheStats
from loadtests.slo import SloCheck

STYLE = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}
table{border-collapse:collapse;margin:8px 0 20px}td,th{border:1px solid #ccc;padding:4px 8px;
text-align:right}th{background:#f3f3f3}td:first-child,td:nth-child(2),td.l{text-align:left}
.ok{color:#17692c;font-weight:600}.bad{color:#b00020;font-weight:600}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:12px}img{width:100%}
.cards{display:flex;gap:12px;flex-wrap:wrap}.card{border:1px solid #ddd;border-radius:6px;
padding:8px 14px}.card b{display:block;font-size:1.4em}"""


@dataclass(frozen=True)
class RunInfo:
    host: str
    model: str
    users: int
    spawn_rate: float
    duration_s: float
    shape: str
    user_classes: list[str] = field(default_factory=list)
    rate: float | None = None               # open loop: target arrivals/s
    tenant_rates: dict[str, float] = field(default_factory=dict)   # open loop, by weight


@dataclass(frozen=True)
class RunDetails:
    """What the call log, the open loop and the servers' counters add to Locust's entries."""

    breakdown: Breakdown
    open_loop: OpenLoopStats | None = None
    server_cache: ServerCacheStats | None = None


def figure_png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def new_axes(title: str, xlabel: str, ylabel: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def plot_latency_over_time(results: RunResults) -> str:
    fig, ax = new_axes("Latency over time (recent-window percentiles)", "seconds", "ms")
    rows = [r for r in results.history if r.request_type == POST]
    start = min((r.timestamp for r in results.history), default=0)
    for name in sorted({r.name for r in rows}):
        mine = [r for r in rows if r.name == name]
        for key, style in (("50%", "--"), ("95%", "-")):
            points = [(r.timestamp - start, r.percentiles.get(key)) for r in mine
                      if r.percentiles.get(key)]
            if points:
                ax.plot(*zip(*points, strict=True), style, label=f"{name} p{key[:-1]}")
    if ax.has_data():
        ax.legend(fontsize=7)
    return figure_png(fig)


def plot_rps_over_time(results: RunResults) -> str:
    fig, ax = new_axes("Requests/s and users over time", "seconds", "requests/s")
    rows = [r for r in results.history if r.request_type in (POST, RATE_LIMITED)]
    start = min((r.timestamp for r in results.history), default=0)
    rps: dict[int, float] = defaultdict(float)
    fails: dict[int, float] = defaultdict(float)
    limited: dict[int, float] = defaultdict(float)
    users: dict[int, int] = {}
    for row in results.history:
        users[row.timestamp - start] = row.user_count
    for row in rows:
        target = limited if row.request_type == RATE_LIMITED else rps
        target[row.timestamp - start] += row.rps
        fails[row.timestamp - start] += row.failures_per_s
    for series, label in ((rps, "requests/s"), (fails, "failures/s"), (limited, "429/s")):
        if series:
            ax.plot(sorted(series), [series[t] for t in sorted(series)], label=label)
    if users:
        twin = ax.twinx()
        twin.plot(sorted(users), [users[t] for t in sorted(users)], ":", color="grey")
        twin.set_ylabel("users (dotted)")
    if ax.has_data():
        ax.legend(fontsize=7, loc="upper left")
    return figure_png(fig)


def histogram_bins(entries: list[Entry]) -> list[float] | int:
    """Log-spaced bins when values span more than 20x (cache hits next to real decoding)."""
    values = [v for e in entries for v in e.response_times if v > 0]
    if not values or max(values) < 20 * min(values):
        return 40
    low, high = math.log10(min(values)), math.log10(max(values))
    return [10 ** (low + (high - low) * i / 40) for i in range(41)]


def plot_distribution(entries: list[Entry], title: str, xlabel: str) -> str:
    fig, ax = new_axes(title, xlabel, "count")
    bins = histogram_bins(entries)
    if not isinstance(bins, int):
        ax.set_xscale("log")
    for entry in entries:
        if entry.response_times:
            low = bins if isinstance(bins, int) else bins[0]
            values = [v if isinstance(bins, int) else max(v, low) for v in entry.response_times]
            ax.hist(values, weights=list(entry.response_times.values()), bins=bins,
                    histtype="step", linewidth=1.5, label=entry.name)
    if ax.has_data():
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no samples", ha="center", transform=ax.transAxes)
    return figure_png(fig)


def plot_errors(results: RunResults) -> str:
    fig, ax = new_axes("Failures and 429s", "occurrences", "")
    labels, counts = [], []
    for failure in sorted(results.failures, key=lambda f: -f.occurrences)[:10]:
        labels.append(f"{failure.name}: {failure.error}"[:70])
        counts.append(failure.occurrences)
    for entry in results.entries:
        if entry.request_type == RATE_LIMITED:
            labels.append(f"429 rate limited: {entry.name}"[:70])
            counts.append(entry.num_requests)
    if counts:
        ax.barh(range(len(counts)), counts, color="#b00020")
        ax.set_yticks(range(len(counts)), labels, fontsize=7)
        ax.invert_yaxis()
    else:
        ax.text(0.5, 0.5, "no failures, no 429s", ha="center", transform=ax.transAxes)
        ax.set_axis_off()
    return figure_png(fig)


def render_plots(results: RunResults) -> list[tuple[str, str]]:
    return [
        ("Latency over time", plot_latency_over_time(results)),
        ("Requests/s over time", plot_rps_over_time(results)),
        ("TTFT", plot_distribution(results.of_type(TTFT), "Time to first token", "ms")),
        ("ITL", plot_distribution(results.of_type(ITL), "Inter-token latency", "ms")),
        ("Tokens/s", plot_distribution(results.of_type(TOKENS_PER_S),
                                       "Output tokens/s per request", "tokens/s")),
        ("Errors", plot_errors(results)),
    ]


def fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def share(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def cards_html(metrics: RunMetrics, details: RunDetails) -> str:
    cards = [("requests", str(metrics.num_requests)), ("failures", str(metrics.num_failures)),
             ("429s", str(metrics.num_rate_limited)), ("requests/s", fmt(metrics.requests_per_s)),
             ("p95 TTFT ms", fmt(metrics.p95_ttft_ms)),
             ("p99 latency ms", fmt(metrics.p99_latency_ms)),
             ("output tokens/s", fmt(metrics.output_tokens_per_s))]
    if (loop := details.open_loop) is not None:
        cards += [("target arrivals/s", fmt(loop.target_rate)),
                  ("achieved arrivals/s", fmt(loop.arrival_rate)),
                  ("dropped arrivals", str(loop.num_dropped))]
    if metrics.follow_up_cache_hit_share is not None:
        cards.append(("follow-up prefix hits", share(metrics.follow_up_cache_hit_share)))
    return "<div class=cards>" + "".join(
        f"<div class=card>{html.escape(k)}<b>{html.escape(v)}</b></div>" for k, v in cards
    ) + "</div>"


def slo_html(checks: list[SloCheck]) -> str:
    if not checks:
        return "<p>No SLO checked.</p>"
    rows = "".join(
        f"<tr><td>{c.key}</td><td class={'ok' if c.passed else 'bad'}>"
        f"{'pass' if c.passed else 'BREACH'}</td>"
        f"<td class=l>{html.escape(c.describe())}</td></tr>"
        for c in checks)
    return f"<table><tr><th>SLO</th><th>verdict</th><th>detail</th></tr>{rows}</table>"


def entries_html(results: RunResults) -> str:
    head = ("<tr><th>type</th><th>name</th><th>count</th><th>failures</th><th>p50</th>"
            "<th>p95</th><th>p99</th><th>mean</th></tr>")
    rows = "".join(
        f"<tr><td>{html.escape(e.request_type)}</td><td>{html.escape(e.name)}</td>"
        f"<td>{e.num_requests}</td><td>{e.num_failures}</td><td>{fmt(e.percentile(0.5))}</td>"
        f"<td>{fmt(e.percentile(0.95))}</td><td>{fmt(e.percentile(0.99))}</td>"
        f"<td>{fmt(e.mean())}</td></tr>"
        for e in sorted(results.entries, key=lambda e: (e.request_type, e.name)))
    note = ("<p>Values are ms, except TOKENS/s (output tokens per second of one request). "
            "429 rows are rate-limited calls, not counted as failures. ARRIVAL rows are the "
            "open loop's arrivals, their time how late each left (failures: dropped at the "
            "in-flight cap).</p>")
    return f"<table>{head}{rows}</table>{note}"


def ttft_cells(ttft: TtftStats) -> str:
    return (f"<td>{ttft.num_samples}</td><td>{fmt(ttft.p50_ms)}</td><td>{fmt(ttft.p95_ms)}</td>"
            f"<td>{fmt(ttft.p99_ms)}</td>")


def cache_cells(cache: CacheShare) -> str:
    return (f"<td>{cache.prompt_tokens}</td><td>{cache.cached_tokens}</td>"
            f"<td>{share(cache.hit_share)}</td>")


def tenants_html(info: RunInfo, breakdown: Breakdown) -> str:
    if not breakdown.tenants:
        return "<p>No call log: per-tenant figures need `quiver loadtest`'s call log.</p>"
    head = ("<tr><th>tenant</th><th>weight</th><th>target req/s</th><th>calls</th>"
            "<th>failures</th><th>429s</th><th>calls/s</th><th>TTFT n</th><th>p50 ms</th>"
            "<th>p95 ms</th><th>p99 ms</th><th>prompt tokens</th><th>cached</th>"
            "<th>hit share</th></tr>")
    rows = "".join(
        f"<tr><td>{html.escape(t.tenant)}</td><td>{fmt(t.weight)}</td>"
        f"<td>{fmt(info.tenant_rates.get(t.tenant))}</td><td>{t.num_calls}</td>"
        f"<td>{t.num_failures}</td><td>{t.num_rate_limited}</td><td>{fmt(t.calls_per_s)}</td>"
        f"{ttft_cells(t.ttft)}{cache_cells(t.cache)}</tr>" for t in breakdown.tenants)
    return (f"<table>{head}{rows}</table><p>TTFT over each tenant's answered streamed calls "
            f"(exact percentiles); calls/s over the run's span.</p>")


def prefix_cache_html(details: RunDetails) -> str:
    if not details.breakdown.turns:
        return "<p>No call log: prefix-cache figures need `quiver loadtest`'s call log.</p>"
    head = ("<tr><th>calls</th><th>count</th><th>TTFT n</th><th>p50 ms</th><th>p95 ms</th>"
            "<th>p99 ms</th><th>prompt tokens</th><th>cached</th><th>hit share</th>"
            "<th>ceiling</th></tr>")
    rows = "".join(f"<tr><td>{html.escape(t.label)}</td><td>{t.num_calls}</td>"
                   f"{ttft_cells(t.ttft)}{cache_cells(t.cache)}<td>{share(t.cache.ceiling)}</td>"
                   f"</tr>" for t in details.breakdown.turns)
    text = ("<p>Hit share: cached prompt tokens / prompt tokens, from each answer's "
            "<code>usage.prompt_tokens_details.cached_tokens</code>; first turns can find only "
            "their shared system prompt, follow-ups their whole history. Ceiling: the share of "
            "a follow-up's prompt that repeats the previous turn's prompt and reply (usage "
            "counts), the most a prefix cache could serve from its own history.")
    if (server := details.server_cache) is not None:
        text += (f" Servers' own counters over the run (<code>vllm:prefix_cache_hits_total / "
                 f"queries_total</code>, {len(server.urls)} server(s)): "
                 f"{server.hits:.0f} / {server.queries:.0f} tokens = {share(server.hit_share)}.")
    return f"<table>{head}{rows}</table>{text}</p>"


def setup_text(info: RunInfo, metrics: RunMetrics) -> str:
    classes = ", ".join(info.user_classes) or "mix of all users"
    if info.rate is not None:
        load = f"open loop: Poisson arrivals at {info.rate:g}/s of {classes}"
    else:
        load = (f"{info.users} users (spawn {info.spawn_rate:g}/s) · shape {info.shape} · "
                f"{classes}")
    return (f"{html.escape(info.host)} · model {html.escape(info.model)} · "
            f"{html.escape(load)} · {info.duration_s:g} s · measured span "
            f"{metrics.duration_s:.1f} s")


def write_report(path: Path, info: RunInfo, results: RunResults, metrics: RunMetrics,
                 checks: list[SloCheck], details: RunDetails) -> None:
    plots = "".join(f"<figure><img alt='{html.escape(title)}' src='data:image/png;base64,"
                    f"{png}'></figure>" for title, png in render_plots(results))
    path.write_text(
        f"<!doctype html><html><head><meta charset=utf-8><title>Quiver load test</title>"
        f"<style>{STYLE}</style></head><body><h1>Quiver load test</h1>"
        f"<p>{setup_text(info, metrics)}</p>{cards_html(metrics, details)}"
        f"<h2>SLOs</h2>{slo_html(checks)}<h2>Tenants</h2>{tenants_html(info, details.breakdown)}"
        f"<h2>Prefix cache and turns</h2>{prefix_cache_html(details)}<h2>Plots</h2>"
        f"<div class=grid>{plots}</div><h2>Entries</h2>{entries_html(results)}"
        f"<p>Raw data: locust.json, locust_stats_history.csv, locust_failures.csv, "
        f"locust.html (Locust's own report).</p></body></html>", encoding="utf-8")
