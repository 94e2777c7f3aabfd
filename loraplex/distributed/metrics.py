"""Merging the replicas' Prometheus metrics into one exposition.

The cluster's ingress exports one ``/metrics`` for all of its replicas: it scrapes each replica's text exposition
(format 0.0.4, as ``prometheus_client.generate_latest`` writes it) and serves :func:`merge_replica_metrics` of them,
in which every sample carries a ``replica`` label naming the replica it came from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

__all__ = ["merge_replica_metrics"]

REPLICA_LABEL = "replica"

_METRIC_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# the parser calls an untyped family "unknown" (the OpenMetrics word); format 0.0.4 calls it "untyped"
_TEXT_TYPES = {"counter": "counter", "gauge": "gauge", "histogram": "histogram", "summary": "summary",
               "unknown": "untyped", "untyped": "untyped"}


@dataclass
class _Family:
    name: str  # as written in the exposition's HELP and TYPE lines (a counter's with its `_total`)
    type: str  # as written in the TYPE line
    help: str
    lines: list[str] = field(default_factory=list)


def _escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _sample_line(sample: Sample, replica: str) -> str:
    if not _METRIC_NAME_RE.fullmatch(sample.name):
        raise ValueError(f"metric name {sample.name!r} is not valid in the text format 0.0.4")
    labels = [f'{REPLICA_LABEL}="{_escape_label_value(replica)}"']
    for name, value in sample.labels.items():
        if not _LABEL_NAME_RE.fullmatch(name):
            raise ValueError(f"label name {name!r} of {sample.name} is not valid in the text format 0.0.4")
        labels.append(f'{name}="{_escape_label_value(value)}"')
    timestamp = "" if sample.timestamp is None else f" {round(float(sample.timestamp) * 1000):d}"
    return f"{sample.name}{{{','.join(labels)}}} {floatToGoString(sample.value)}{timestamp}\n"


def merge_replica_metrics(texts: dict[str, str]) -> str:
    """Merge the replicas' text expositions into one, each sample labelled with its replica.

    ``texts`` maps a replica id to the Prometheus text exposition (format 0.0.4) scraped from it. The result is
    one exposition in the same format in which:

    - every sample of every replica appears with the label ``replica="<id>"`` added *first* among its labels, the
      sample's own labels following in their original order;
    - each metric family appears once, a ``# HELP`` and a ``# TYPE`` line then all the replicas' samples of it,
      keeping its type (counter, gauge, histogram, summary, untyped); a histogram's ``_bucket``/``_sum``/``_count``
      samples stay in their family;
    - families come in the order they first appear, reading the replicas sorted by id (plain string order), and a
      family's samples are grouped by replica in that order, each replica's in its own order;
    - when replicas give one family different HELP texts, the first replica's (by sorted id) is kept;
    - a family that only some replicas have is fine; values are written as prometheus_client writes them
      (``floatToGoString``), timestamps (milliseconds) are kept.

    A counter is written under its name with ``_total``, as prometheus_client exposes counters (a counter scraped
    as ``foo`` without the suffix comes out as ``foo_total``, which is how the parser reads it). prometheus_client
    exposes a counter's or histogram's ``_created`` samples as a gauge family of their own; they stay so.

    Raises ValueError when a sample already has a ``replica`` label (the family is named; nothing is overwritten),
    when replicas give one family different types, or when a name cannot be written in format 0.0.4. An empty
    ``texts`` (or only empty expositions) gives the empty string.
    """
    families: dict[str, _Family] = {}
    for replica in sorted(texts):
        for metric in text_string_to_metric_families(texts[replica]):
            text_type = _TEXT_TYPES.get(metric.type)
            if text_type is None:
                raise ValueError(f"metric family {metric.name!r} from replica {replica!r} has type {metric.type!r}, "
                                 "which the text format 0.0.4 does not have")
            name = metric.name + "_total" if metric.type == "counter" else metric.name
            family = families.get(name)
            if family is None:
                family = families[name] = _Family(name, text_type, metric.documentation)
            elif family.type != text_type:
                raise ValueError(f"metric family {name!r} is a {family.type} on one replica and a {text_type} "
                                 f"on replica {replica!r}")
            for sample in metric.samples:
                if REPLICA_LABEL in sample.labels:
                    raise ValueError(f"metric family {name!r} from replica {replica!r} already has a "
                                     f"{REPLICA_LABEL!r} label (sample {sample.name})")
                family.lines.append(_sample_line(sample, replica))
    out: list[str] = []
    for family in families.values():
        out.append(f"# HELP {family.name} {_escape_help(family.help)}\n")
        out.append(f"# TYPE {family.name} {family.type}\n")
        out.extend(family.lines)
    return "".join(out)
