"""Per-request records and what a run's figures are made of.

Definitions (every time on the client's clock, `time.perf_counter`, in seconds in the records and in
milliseconds in the summary):

- start: when the request was handed to the HTTP client; `lag` = start - its scheduled arrival (the
  load generator falling behind its own schedule shows here, not in the server's latencies).
- TTFT: start to the first chunk carrying content (`choices[].text`, or `delta.content` of a chat chunk;
  the chat role chunk does not count). Without streaming the answer comes whole, so TTFT = e2e.
- ITL: the gaps between successive content chunks (one chunk is usually one token; a server that packs
  several tokens into a chunk shows longer, fewer gaps). Pooled over all successful requests.
- TPOT: per request, (e2e - TTFT) / (output tokens - 1), for streamed requests with at least 2 output
  tokens.
- e2e: start to the end of the answer (the `[DONE]` line of a stream).
- output tokens: `usage.completion_tokens` of the answer (streams ask for `stream_options.include_usage`);
  a stream without usage counts its content chunks instead, and the summary says how many did.
- elapsed: from the run's start to the last request's end; throughput = successful requests / elapsed,
  output tokens of successful requests / elapsed.
- SLO attainment (with an SLO on TTFT): the share of all requests sent (failed ones included, as misses)
  that succeeded with TTFT <= the bound; goodput = those requests / elapsed.
- Percentiles: numpy's default (linear interpolation between order statistics), over successful requests.
- Errors by kind: `http_<status>`, `timeout` (the per-request timeout), `connection` (refused, reset,
  closed early), `stream_error` (an error event inside a stream), `protocol` (an answer that is not the
  API's shape).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    index: int
    adapter: str
    scheduled: float | None  # planned arrival, seconds after the run's start (None in a closed loop)
    prompt_tokens_planned: int
    output_tokens_planned: int
    start: float = 0.0  # seconds after the run's start
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None  # from usage
    output_tokens: int = 0
    usage_reported: bool = False
    streamed: bool = True
    finish_reason: str | None = None
    ok: bool = False
    error: str | None = None  # the kind, see the module's docstring
    error_detail: str | None = None

    @property
    def lag(self) -> float:
        return 0.0 if self.scheduled is None else max(0.0, self.start - self.scheduled)

    @property
    def end(self) -> float:
        return self.start + (self.e2e or 0.0)

    @property
    def tpot(self) -> float | None:
        if not self.ok or not self.streamed or self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def meets(self, slo_ttft: float) -> bool:
        return self.ok and self.ttft is not None and self.ttft <= slo_ttft


def distribution(values_s: list[float] | np.ndarray) -> dict[str, float | int | None]:
    """count, mean, p50/p90/p99 and max of a list of seconds, in milliseconds."""
    a = np.asarray(values_s, dtype=np.float64)
    out: dict[str, float | int | None] = {"count": int(a.size)}
    if a.size == 0:
        out.update({"mean": None, **{f"p{p}": None for p in PERCENTILES}, "max": None})
        return out
    out["mean"] = float(a.mean() * 1000)
    for p, v in zip(PERCENTILES, np.percentile(a, PERCENTILES), strict=True):
        out[f"p{p}"] = float(v * 1000)
    out["max"] = float(a.max() * 1000)
    return out


def elapsed_of(records: list[RequestRecord]) -> float:
    """From the run's start (0) to the end of the last request."""
    return max((r.end for r in records), default=0.0)


def summarize(records: list[RequestRecord], elapsed: float | None = None, slo_ttft: float | None = None) -> dict:
    """A run's figures (see the module's docstring for each definition)."""
    elapsed = elapsed_of(records) if elapsed is None else elapsed
    ok = [r for r in records if r.ok]
    errors = Counter(r.error for r in records if not r.ok)
    output_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens or 0 for r in ok)
    per_s = (lambda x: x / elapsed) if elapsed > 0 else (lambda x: 0.0)
    summary = {
        "requests": len(records),
        "ok": len(ok),
        "failed": len(records) - len(ok),
        "errors": dict(sorted(errors.items())),
        "elapsed_s": elapsed,
        "output_tokens": output_tokens,
        "prompt_tokens": prompt_tokens,
        "output_tokens_planned": sum(r.output_tokens_planned for r in ok),
        "usage_missing": sum(1 for r in ok if not r.usage_reported),
        "request_throughput": per_s(len(ok)),
        "output_throughput": per_s(output_tokens),
        "prompt_throughput": per_s(prompt_tokens),
        "ttft_ms": distribution([r.ttft for r in ok if r.ttft is not None]),
        "itl_ms": distribution([gap for r in ok for gap in r.itl]),
        "tpot_ms": distribution([t for r in ok if (t := r.tpot) is not None]),
        "e2e_ms": distribution([r.e2e for r in ok if r.e2e is not None]),
        "lag_ms": distribution([r.lag for r in records]),
        "finish_reasons": dict(sorted(Counter(r.finish_reason or "none" for r in ok).items())),
        "per_adapter": {name: n for name, n in sorted(Counter(r.adapter for r in records).items())},
    }
    if slo_ttft is not None:
        met = sum(1 for r in records if r.meets(slo_ttft))
        summary["slo"] = {
            "ttft_s": slo_ttft,
            "met": met,
            "attainment": met / len(records) if records else 0.0,
            "goodput": per_s(met),
        }
    return summary
