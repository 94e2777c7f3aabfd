"""Prometheus metrics: per-request latencies and token counts, and engine state read at scrape time.

Each server has its own registry (no process-wide state). Adapter labels are bounded: an adapter
gets its own label while it is among the `max_adapters` most requested (counted since the start),
up to twice that many labels in all (a series, once made, stays: counters must not jump); all
others count as `other`, and the base model as `base`. A server with thousands of adapters keeps a
fixed number of series, and they go to its busiest adapters.

The same figures are also exported under vLLM's metric names (`vllm:...`, labelled with the served
model's name), so that dashboards made for vLLM work unchanged: `VLLMCollector` re-reads loraplex's own
counters and histograms at scrape time, summed over the adapter label (vLLM labels by model, not by
adapter), and reads the engine's gauges; nothing is observed or timed twice.
"""

from __future__ import annotations

import time
from collections import Counter as Counter_
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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
        yield GaugeMetricFamily("loraplex_kv_cache_usage_ratio", "KV-cache blocks held by sequences / all",
                                _kv_usage(s))
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
        self._stats = stats
        self._scrape_stats: EngineStats | None = None  # one snapshot per scrape, for both sets of names
        r.register(EngineCollector(self.stats))

    def export_vllm_names(self, model_name: str, max_loras: int,
                          lora_queues: Callable[[], tuple[Iterable[str | None], Iterable[str | None]]] | None) -> None:
        """Also export vLLM's metric names, labelled `model_name` (the served name of the base model) and
        `engine` ("0": one engine), and, where adapters are enabled (`lora_queues` not None: it gives the
        adapters of the running and of the waiting sequences), `vllm:lora_requests_info`."""
        self.registry.register(VLLMCollector(self, model_name, max_loras, lora_queues))

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

    def stats(self) -> EngineStats:
        """The engine's stats: during a scrape, the snapshot taken at its start (so that a loraplex_ gauge
        and its vllm: twin show the same reading)."""
        return self._scrape_stats if self._scrape_stats is not None else self._stats()

    def render(self) -> bytes:
        for seconds in self._drain_load_seconds():
            self.adapter_load_seconds.observe(seconds)
        self._scrape_stats = self._stats()
        try:
            return generate_latest(self.registry)
        finally:
            self._scrape_stats = None


VLLM_ENGINE = "0"  # vLLM labels every series with its engine's index; loraplex has one engine
VLLM_FINISHED_REASONS = ("stop", "length", "abort")  # vLLM's finish reasons (loraplex's `error` and
# `rejected` are not finishes of a request the engine ran to its end, and vLLM has no such reason)


class VLLMCollector(Collector):
    """loraplex's figures under vLLM's names, read at each scrape: the counters and histograms summed
    over the adapter label (the same observations, so a `vllm:` series moves exactly as the sum of its
    `loraplex_` twin's series), the gauges from the engine's stats."""

    def __init__(self, metrics: Metrics, model_name: str, max_loras: int,
                 lora_queues: Callable[[], tuple[Iterable[str | None], Iterable[str | None]]] | None) -> None:
        self.metrics = metrics
        self.labels = [model_name, VLLM_ENGINE]
        self.max_loras = max_loras
        self.lora_queues = lora_queues

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        s = m.stats()
        for name, doc, value in (
            ("vllm:num_requests_running", "Sequences in the running batch (loraplex_num_requests_running)",
             s.num_running),
            ("vllm:num_requests_waiting", "Sequences queued for admission (loraplex_num_requests_waiting)",
             s.num_waiting),
            ("vllm:gpu_cache_usage_perc", "KV-cache usage, 1 = all blocks held (loraplex_kv_cache_usage_ratio; "
             "vLLM's older name of vllm:kv_cache_usage_perc)", _kv_usage(s)),
            ("vllm:kv_cache_usage_perc", "KV-cache usage, 1 = all blocks held (loraplex_kv_cache_usage_ratio)",
             _kv_usage(s)),
        ):
            gauge = GaugeMetricFamily(name, doc, labels=["model_name", "engine"])
            gauge.add_metric(self.labels, value)
            yield gauge
        for name, doc, counter in (
            ("vllm:prompt_tokens", "Prompt tokens of admitted sequences (loraplex_prompt_tokens_total)",
             m.prompt_tokens),
            ("vllm:generation_tokens", "Output tokens generated (loraplex_generation_tokens_total)",
             m.generation_tokens),
        ):
            family = CounterMetricFamily(name, doc, labels=["model_name", "engine"])
            family.add_metric(self.labels, sum(v for _, v in _samples(counter, "_total")))
            yield family
        success = CounterMetricFamily("vllm:request_success", "Sequences finished, by finish reason "
                                      "(loraplex_requests_total by outcome)",
                                      labels=["model_name", "engine", "finished_reason"])
        by_outcome = dict.fromkeys(VLLM_FINISHED_REASONS, 0.0)
        for labels, v in _samples(m.requests, "_total"):
            if labels["outcome"] in by_outcome:
                by_outcome[labels["outcome"]] += v
        for reason, v in by_outcome.items():
            success.add_metric([*self.labels, reason], v)
        yield success
        for name, doc, histogram, buckets in (
            ("vllm:time_to_first_token_seconds", "Arrival to first output token "
             "(loraplex_time_to_first_token_seconds)", m.ttft, _LATENCY_BUCKETS),
            ("vllm:time_per_output_token_seconds", "Time between output tokens of a sequence "
             "(loraplex_inter_token_latency_seconds)", m.itl, _TOKEN_BUCKETS),
            ("vllm:inter_token_latency_seconds", "Time between output tokens of a sequence "
             "(loraplex_inter_token_latency_seconds)", m.itl, _TOKEN_BUCKETS),
            ("vllm:e2e_request_latency_seconds", "Arrival to last output token "
             "(loraplex_e2e_request_latency_seconds)", m.e2e, _LATENCY_BUCKETS),
        ):
            yield self._summed_histogram(name, doc, histogram, buckets)
        if self.lora_queues is not None:
            running, waiting = self.lora_queues()
            info = GaugeMetricFamily("vllm:lora_requests_info", "The adapters of the running and of the waiting "
                                     "sequences (comma-separated names); the value is the time of the scrape",
                                     labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"])
            info.add_metric([str(self.max_loras), _adapter_list(waiting), _adapter_list(running)], time.time())
            yield info

    def _summed_histogram(self, name: str, doc: str, histogram: Histogram,
                          bounds: tuple[float, ...]) -> HistogramMetricFamily:
        buckets = {floatToGoString(b): 0.0 for b in (*bounds, float("inf"))}
        total = 0.0
        for labels, v in _samples(histogram, "_bucket"):
            buckets[labels["le"]] += v
        for _, v in _samples(histogram, "_sum"):
            total += v
        family = HistogramMetricFamily(name, doc, labels=["model_name", "engine"])
        family.add_metric(self.labels, list(buckets.items()), total)
        return family


def _samples(metric: Counter | Histogram, suffix: str) -> Iterator[tuple[dict[str, Any], float]]:
    """(labels, value) of a metric's samples named <name><suffix>, across all its label values."""
    for family in metric.collect():
        for sample in family.samples:
            if sample.name == family.name + suffix:
                yield sample.labels, sample.value


def _kv_usage(s: EngineStats) -> float:
    return s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0


def _adapter_list(adapters: Iterable[str | None]) -> str:
    """vLLM's label value: the distinct adapter names, comma-separated (the base model's sequences are
    not listed; compositions are listed as `composition`, as in the adapter label)."""
    names = {COMPOSITION_LABEL if a.startswith(COMPOSITION_PREFIX) else a for a in adapters if a is not None}
    return ",".join(sorted(names))


def adapters_in_queues(scheduler: Any) -> tuple[list[str | None], list[str | None]]:
    """The adapters of the scheduler's running and waiting sequences, read from another thread while the
    engine steps (as EngineStats is): each queue is copied in one go first."""
    for _ in range(3):
        try:
            running, waiting = tuple(scheduler.running), tuple(scheduler.waiting)
        except RuntimeError:  # a queue changed while it was copied: read again
            continue
        return [seq.adapter for seq in running], [seq.adapter for seq in waiting]
    return [], []


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
