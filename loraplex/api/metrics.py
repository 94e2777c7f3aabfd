"""Prometheus metrics: per-request latencies and token counts, and engine state read at scrape time.

Each server has its own registry (no process-wide state). Adapter labels are bounded: an adapter
gets its own label while it is among the `max_adapters` most requested (counted since the start),
up to twice that many labels in all (a series, once made, stays: counters must not jump); all
others count as `other`, and the base model as `base`. A server with thousands of adapters keeps a
fixed number of series, and they go to its busiest adapters.
"""

from __future__ import annotations

import time
from collections import Counter as Counter_
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from loraplex.engine.compositions import PREFIX as COMPOSITION_PREFIX
from loraplex.engine.llm_engine import EngineStats, RequestOutput

BASE_LABEL = "base"
OTHER_LABEL = "other"
COMPOSITION_LABEL = "composition"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class EngineCollector(Collector):
    """Gauges and counters read from the engine at each scrape."""

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        yield GaugeMetricFamily("loraplex_num_requests_running", "Sequences in the running batch", s.num_running)
        yield GaugeMetricFamily("loraplex_num_requests_waiting", "Sequences queued for admission", s.num_waiting)
        usage = s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0
        yield GaugeMetricFamily("loraplex_kv_cache_usage_ratio", "KV-cache blocks held by sequences / all", usage)
        yield GaugeMetricFamily("loraplex_kv_cache_blocks", "KV-cache blocks in all", s.kv_blocks_total)
        resident = GaugeMetricFamily("loraplex_adapters_resident", "Adapters resident, by tier", labels=["tier"])
        resident.add_metric(["device"], s.adapters_on_device)
        resident.add_metric(["host"], s.adapters_in_host)
        yield resident
        loads = CounterMetricFamily("loraplex_adapter_loads", "Adapter loads into a tier (host: from disk, "
                                    "device: from host memory into a slot)", labels=["tier"])
        loads.add_metric(["host"], s.adapter_disk_loads)
        loads.add_metric(["device"], s.adapter_device_loads)
        yield loads
        evictions = CounterMetricFamily("loraplex_adapter_evictions", "Adapters evicted from a tier", labels=["tier"])
        evictions.add_metric(["host"], s.adapter_host_evictions)
        evictions.add_metric(["device"], s.adapter_device_evictions)
        yield evictions
        sparse = GaugeMetricFamily("loraplex_sparse_pool_bytes", "The device pool for the sparse parts of adapters "
                                   "in slots (--max-sparse-memory)", labels=["state"])
        sparse.add_metric(["used"], s.sparse_bytes_used)
        sparse.add_metric(["capacity"], s.sparse_bytes_capacity)
        yield sparse
        yield CounterMetricFamily("loraplex_sparse_pool_compactions", "Times the sparse pool moved its ranges "
                                  "together to fit an adapter", s.sparse_compactions)
        yield GaugeMetricFamily("loraplex_compositions", "Per-request compositions built and registered now",
                                s.compositions)
        yield CounterMetricFamily("loraplex_composition_builds", "Per-request compositions built", s.composition_builds)
        yield CounterMetricFamily("loraplex_composition_hits", "Requests on a composition built before",
                                  s.composition_hits)
        yield CounterMetricFamily("loraplex_composition_dropped", "Compositions dropped because an input was "
                                  "deleted or replaced", s.compositions_dropped)


class Metrics:
    def __init__(self, stats: Callable[[], EngineStats], drain_load_seconds: Callable[[], list[float]],
                 max_adapters: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._drain_load_seconds = drain_load_seconds
        self._max_adapters = max_adapters
        self._labelled: set[str] = set()
        self._requests: Counter_[str] = Counter_()  # per adapter name, to rank them
        r = self.registry
        self.requests = Counter("loraplex_requests", "Finished generation requests by outcome "
                                "(stop, length, abort, error, rejected)", ["adapter", "outcome"], registry=r)
        self.ttft = Histogram("loraplex_time_to_first_token_seconds", "Arrival to first output token",
                              ["adapter"], buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("loraplex_inter_token_latency_seconds", "Time between output tokens of a sequence",
                             ["adapter"], buckets=_TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("loraplex_e2e_request_latency_seconds", "Arrival to last output token",
                             ["adapter"], buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("loraplex_prompt_tokens", "Prompt tokens of admitted sequences", ["adapter"],
                                     registry=r)
        self.generation_tokens = Counter("loraplex_generation_tokens", "Output tokens generated", ["adapter"],
                                         registry=r)
        self.adapter_load_seconds = Histogram("loraplex_adapter_load_seconds", "Background adapter reads from "
                                              "disk into host memory", buckets=_LATENCY_BUCKETS, registry=r)
        r.register(EngineCollector(stats))

    def label(self, adapter: str | None) -> str:
        if adapter is None:
            return BASE_LABEL
        if adapter.startswith(COMPOSITION_PREFIX):  # one label for all: recipes are unbounded
            return COMPOSITION_LABEL
        self._requests[adapter] += 1
        if adapter in self._labelled:
            return adapter
        if len(self._labelled) < 2 * self._max_adapters and self._in_top(adapter):
            self._labelled.add(adapter)
            return adapter
        return OTHER_LABEL

    def _in_top(self, adapter: str) -> bool:
        count = self._requests[adapter]
        busier = sum(1 for c in self._requests.values() if c > count)
        return busier < self._max_adapters

    def track(self, adapter: str | None) -> SequenceTracker:
        return SequenceTracker(self, self.label(adapter))

    def reject(self, adapter: str | None) -> None:
        self.requests.labels(self.label(adapter), "rejected").inc()

    def render(self) -> bytes:
        for seconds in self._drain_load_seconds():
            self.adapter_load_seconds.observe(seconds)
        return generate_latest(self.registry)


class SequenceTracker:
    """Latencies and token counts of one sequence, from its stream of outputs."""

    def __init__(self, metrics: Metrics, label: str) -> None:
        self.metrics = metrics
        self.label = label
        self.start = time.perf_counter()
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.num_tokens = 0
        self.outcome: str | None = None
        self._itl = metrics.itl.labels(label)  # per token: looked up once
        self._generated = metrics.generation_tokens.labels(label)

    def observe(self, out: RequestOutput) -> None:
        now = time.perf_counter()
        m = self.metrics
        new = len(out.token_ids) - self.num_tokens
        if self.first_token_time is None and out.token_ids:
            self.first_token_time = now
            m.ttft.labels(self.label).observe(now - self.start)
            m.prompt_tokens.labels(self.label).inc(len(out.prompt_token_ids))
        elif new > 0 and self.last_token_time is not None:
            self._itl.observe((now - self.last_token_time) / new)
        if new > 0:
            self.last_token_time = now
            self.num_tokens = len(out.token_ids)
            self._generated.inc(new)
        if out.finished:
            self.finish(out.finish_reason or "stop")

    def finish(self, outcome: str) -> None:
        """Count the sequence once: by its finish reason, or `abort` / `error` if it ended otherwise."""
        if self.outcome is not None:
            return
        self.outcome = outcome
        self.metrics.requests.labels(self.label, outcome).inc()
        if outcome in ("stop", "length"):
            self.metrics.e2e.labels(self.label).observe(time.perf_counter() - self.start)

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.start
