"""Engine metrics under vLLM's names and semantics, so one dashboard serves both engines.

Everything is registered in a registry the caller owns (no process-wide singletons); the
engine loop calls `record_step` once per step with the outputs and the scheduler's stats.
Times are `time.time()` seconds, like `Request.arrival_time`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from serving.engine.outputs import SchedulerStats
from serving.engine.request import FinishReason

# Buckets as vLLM uses them, so histogram_quantile over both engines compares like with like.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                   50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
FINISH_REASONS = tuple(reason.value for reason in FinishReason)


@dataclass
class RequestTiming:
    """Per-request times the engine loop keeps while a request is alive."""

    arrival_time: float
    num_prompt_tokens: int
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None


@dataclass
class _Cumulative:
    queries: int = 0
    hits: int = 0
    preemptions: int = 0


@dataclass
class EngineMetrics:
    registry: CollectorRegistry
    model_name: str
    _last: _Cumulative = field(default_factory=_Cumulative)

    def __post_init__(self) -> None:
        labels = ["model_name"]
        registry = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=registry).labels(self.model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=registry).labels(self.model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets,
                             registry=registry).labels(self.model_name)

        self.num_running = gauge("vllm:num_requests_running", "Requests in the running batch.")
        self.num_waiting = gauge("vllm:num_requests_waiting", "Requests waiting to run.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc",
                              "Fraction of KV cache blocks in use (1 = full).")
        self.prefix_queries = counter("vllm:prefix_cache_queries",
                                      "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("vllm:prefix_cache_hits",
                                   "Prompt tokens served from the prefix cache.")
        self.preemptions = counter("vllm:num_preemptions", "Requests preempted by recompute.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prefilled prompt tokens.")
        self.generation_tokens = counter("vllm:generation_tokens", "Generated tokens.")
        self.success = Counter("vllm:request_success", "Finished requests by finish reason.",
                               ["model_name", "finished_reason"], registry=registry)
        self.ttft = histogram("vllm:time_to_first_token_seconds",
                              "Time from arrival to the first generated token.", TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds",
                             "Time between consecutive generated tokens.", ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds",
                             "Time from arrival to the last token.", REQUEST_BUCKETS)
        self.queue_time = histogram("vllm:request_queue_time_seconds",
                                    "Time from arrival to first scheduling.", REQUEST_BUCKETS)
        for reason in FINISH_REASONS:  # export zeros so rate() works from the first scrape
            self.success.labels(self.model_name, reason)

    def record_stats(self, stats: SchedulerStats) -> None:
        self.num_running.set(stats.num_running)
        self.num_waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        last = self._last
        self.prefix_queries.inc(stats.prefix_cache_queries - last.queries)
        self.prefix_hits.inc(stats.prefix_cache_hits - last.hits)
        self.preemptions.inc(stats.num_preemptions - last.preemptions)
        self._last = _Cumulative(stats.prefix_cache_queries, stats.prefix_cache_hits,
                                     stats.num_preemptions)

    def record_tokens(self, timing: RequestTiming, num_new_tokens: int, now: float) -> None:
        """A request produced `num_new_tokens` tokens at `now`."""
        if num_new_tokens <= 0:
            return
        if timing.first_token_time is None:
            timing.first_token_time = now
            self.ttft.observe(now - timing.arrival_time)
            self.prompt_tokens.inc(timing.num_prompt_tokens)
        elif timing.last_token_time is not None:
            self.itl.observe(now - timing.last_token_time)
        timing.last_token_time = now
        self.generation_tokens.inc(num_new_tokens)

    def record_finished(self, timing: RequestTiming, finish_reason: str, now: float) -> None:
        self.success.labels(self.model_name, finish_reason).inc()
        self.e2e.observe(now - timing.arrival_time)
        if timing.first_scheduled_time is not None:
            self.queue_time.observe(timing.first_scheduled_time - timing.arrival_time)
