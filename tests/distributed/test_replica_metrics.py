"""merge_replica_metrics: the replicas' expositions, built with prometheus_client, merged into one that parses."""

from __future__ import annotations

import collections
import re

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary, generate_latest
from prometheus_client.core import GaugeMetricFamily, UnknownMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from loraplex.distributed.metrics import merge_replica_metrics

NASTY = 'say "hi"\\ then\na newline'  # a label value with a double quote, a backslash and a newline
BUCKETS = (0.005, 0.05, 0.5, 2.5)


class _EngineCollector(Collector):
    """A custom collector as vLLM's: a gauge whose name has a colon."""

    def __init__(self, running: dict[tuple[str, str], float]) -> None:
        self.running = running

    def collect(self):
        family = GaugeMetricFamily("vllm:num_requests_running", "Number of requests running.",
                                   labels=["model_name", "engine"])
        for (model, engine), value in self.running.items():
            family.add_metric([model, engine], value)
        yield family
        untyped = UnknownMetricFamily("loraplex_build", "An untyped sample.", labels=["version"])
        untyped.add_metric(["1.2.3"], 1)
        yield untyped


def _replica_text(seed: int, extra: bool = False) -> str:
    """One replica's /metrics: values differ with the seed; `extra` adds a family the others do not have."""
    registry = CollectorRegistry()
    requests = Counter("loraplex_requests", "Requests served.", ["adapter", "status"], registry=registry)
    requests.labels("base", "200").inc(10 + seed)
    requests.labels(NASTY, "500").inc(seed + 1)
    kv_help = 'Free KV cache blocks.\nA \\ and a "quote".'  # HELP text escaping: a newline, a backslash
    Gauge("loraplex_kv_blocks_free", kv_help, registry=registry).set(1e10 + seed * 0.25)
    latency = Histogram("loraplex_latency_seconds", "Request latency.", ["adapter"], buckets=BUCKETS,
                        registry=registry)
    for i in range(5 + seed):
        latency.labels("base").observe(0.001 * (i + 1) * (seed + 1) ** 2)
        latency.labels("sql").observe(0.3 * i + seed)
    summary = Summary("loraplex_prompt_tokens", "Prompt tokens.", registry=registry)
    summary.observe(100 + seed)
    registry.register(_EngineCollector({("llama", "0"): seed, ("llama", "1"): 2 * seed + 1}))
    if extra:
        Gauge("loraplex_only_here", "Only on this replica.", ["kind"], registry=registry).labels("x").set(seed)
    return generate_latest(registry).decode("utf-8")


@pytest.fixture(scope="module")
def texts() -> dict[str, str]:
    # given out of id order: the merge sorts by id
    return {"r2": _replica_text(2, extra=True), "r0": _replica_text(0), "r1": _replica_text(1)}


@pytest.fixture(scope="module")
def merged(texts) -> str:
    return merge_replica_metrics(texts)


def _families(text: str):
    return list(text_string_to_metric_families(text))


def _sample_keys(text: str, replica: str | None = None) -> collections.Counter:
    """(family, type, sample name, labels, value) of every sample; with `replica`, that label added."""
    keys: collections.Counter = collections.Counter()
    for family in _families(text):
        for s in family.samples:
            labels = dict(s.labels)
            if replica is not None:
                labels["replica"] = replica
            keys[(family.name, family.type, s.name, frozenset(labels.items()), s.value)] += 1
    return keys


def test_each_family_once_with_one_help_and_one_type_line(texts, merged):
    names = [f.name for f in _families(merged)]
    assert len(names) == len(set(names))
    expected = {f.name for text in texts.values() for f in _families(text)}
    assert set(names) == expected
    helps = re.findall(r"^# HELP (\S+)", merged, re.M)
    types = re.findall(r"^# TYPE (\S+)", merged, re.M)
    assert len(helps) == len(set(helps)) == len(expected)
    assert helps == types


def test_families_keep_their_type_and_help(texts, merged):
    types = {f.name: (f.type, f.documentation) for f in _families(merged)}
    for text in texts.values():
        for f in _families(text):
            assert types[f.name] == (f.type, f.documentation)
    assert {"counter", "gauge", "histogram", "summary", "unknown"} <= {t for t, _ in types.values()}
    assert "\n" in types["loraplex_kv_blocks_free"][1]
    # the text format 0.0.4 names the type "untyped" (the parser reads it as "unknown")
    assert "# TYPE loraplex_build untyped\n" in merged


def test_every_sample_present_with_its_replica_and_labels_and_value(texts, merged):
    expected: collections.Counter = collections.Counter()
    for replica, text in texts.items():
        expected += _sample_keys(text, replica)
    assert _sample_keys(merged) == expected


def test_sample_lines_rendered_as_prometheus_client_with_replica_label_first(texts, merged):
    merged_lines = set(merged.splitlines())
    for replica, text in texts.items():
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            if "{" in line:
                want = line.replace("{", f'{{replica="{replica}",', 1)
            else:
                name, value = line.split(" ", 1)
                want = f'{name}{{replica="{replica}"}} {value}'
            assert want in merged_lines


def test_histogram_buckets_intact_per_replica(texts, merged):
    (hist,) = [f for f in _families(merged) if f.name == "loraplex_latency_seconds"]
    assert hist.type == "histogram"
    per_series: dict[tuple[str, str], dict[str, list]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for s in hist.samples:
        labels = dict(s.labels)
        le = labels.pop("le", None)
        key = (labels["replica"], labels["adapter"])
        per_series[key][s.name].append((le, s.value))
    assert {r for r, _ in per_series} == set(texts)
    for (replica, adapter), series in per_series.items():
        buckets = series["loraplex_latency_seconds_bucket"]
        assert [le for le, _ in buckets] == [str(b) for b in BUCKETS] + ["+Inf"]
        counts = [v for _, v in buckets]
        assert counts == sorted(counts)  # cumulative
        (count,) = [v for _, v in series["loraplex_latency_seconds_count"]]
        assert counts[-1] == count
        assert len(series["loraplex_latency_seconds_sum"]) == 1
        (original,) = [f for f in _families(texts[replica]) if f.name == "loraplex_latency_seconds"]
        assert buckets == [(s.labels["le"], s.value) for s in original.samples
                           if s.name.endswith("_bucket") and s.labels["adapter"] == adapter]


def test_metric_name_with_a_colon_survives(texts, merged):
    (vllm,) = [f for f in _families(merged) if f.name == "vllm:num_requests_running"]
    assert vllm.type == "gauge"
    got = {(s.labels["replica"], s.labels["model_name"], s.labels["engine"]): s.value for s in vllm.samples}
    want = {}
    for replica, text in texts.items():
        (orig,) = [f for f in _families(text) if f.name == "vllm:num_requests_running"]
        want.update({(replica, s.labels["model_name"], s.labels["engine"]): s.value for s in orig.samples})
    assert got == want and len(got) == 6


def test_label_value_with_quote_backslash_newline_round_trips(merged):
    (requests,) = [f for f in _families(merged) if f.name == "loraplex_requests"]
    nasty = [s for s in requests.samples if s.labels["status"] == "500"]
    assert [s.labels["adapter"] for s in nasty] == [NASTY] * 3
    # and a replica id that needs escaping itself
    odd_id = 'r"0\\\n'
    out = merge_replica_metrics({odd_id: _replica_text(0)})
    replicas = {s.labels["replica"] for f in _families(out) for s in f.samples}
    assert replicas == {odd_id}


def test_family_on_one_replica_only(merged):
    (only,) = [f for f in _families(merged) if f.name == "loraplex_only_here"]
    assert [(dict(s.labels), s.value) for s in only.samples] == [({"replica": "r2", "kind": "x"}, 2.0)]


def test_order_families_by_first_appearance_samples_by_replica_id(texts, merged):
    first_seen: list[str] = []
    for replica in sorted(texts):
        for f in _families(texts[replica]):
            if f.name not in first_seen:
                first_seen.append(f.name)
    families = _families(merged)
    assert [f.name for f in families] == first_seen
    for f in families:
        replicas = [s.labels["replica"] for s in f.samples]
        assert replicas == sorted(replicas)
    (requests,) = [f for f in families if f.name == "loraplex_requests"]
    assert [s.labels["replica"] for s in requests.samples] == ["r0", "r0", "r1", "r1", "r2", "r2"]


def test_different_help_keeps_the_first_replicas_by_id():
    def text(doc: str) -> str:
        registry = CollectorRegistry()
        Gauge("loraplex_g", doc, registry=registry).set(1)
        return generate_latest(registry).decode()

    out = merge_replica_metrics({"r1": text("second"), "r0": text("first")})
    (g,) = _families(out)
    assert g.documentation == "first"
    assert len(g.samples) == 2


def test_existing_replica_label_is_refused():
    registry = CollectorRegistry()
    Gauge("loraplex_labelled", "Already labelled.", ["replica"], registry=registry).labels("x").set(1)
    with pytest.raises(ValueError, match="loraplex_labelled"):
        merge_replica_metrics({"r0": _replica_text(0), "r1": generate_latest(registry).decode()})


def test_conflicting_types_are_refused():
    gauge = "# HELP m m\n# TYPE m gauge\nm 1\n"
    summary = "# HELP m m\n# TYPE m summary\nm_sum 1\nm_count 1\n"
    with pytest.raises(ValueError, match="'m'"):
        merge_replica_metrics({"r0": gauge, "r1": summary})


def test_timestamps_kept():
    # 1003 ms parses to 1.003 s, which times 1000 is 1002.9999999999999: truncating would lose a millisecond
    text = "# HELP m m\n# TYPE m gauge\nm{a=\"b\"} 1.5 1700000000123\nm{a=\"c\"} 2 1003\n"
    out = merge_replica_metrics({"r0": text})
    assert 'm{replica="r0",a="b"} 1.5 1700000000123\n' in out
    assert 'm{replica="r0",a="c"} 2.0 1003\n' in out
    (m,) = _families(out)
    assert [s.timestamp for s in m.samples] == [1700000000.123, 1.003]


def test_empty():
    assert merge_replica_metrics({}) == ""
    assert merge_replica_metrics({"r0": "", "r1": ""}) == ""
