"""Workloads: the whole schedule of a run (arrival times, adapter, prompt and output lengths), made up front.

`make_schedule(workload)` is a pure function of a `Workload` (its `seed` included): the same workload gives
the same schedule, on any machine (numpy's PCG64 generator), and nothing in it depends on the server.

Random streams. Arrivals, adapters, prompt lengths and output lengths each draw from their own child of
the seed (`numpy.random.SeedSequence(seed).spawn(4)`), as standard variates then transformed: arrival
gaps as Exp(1) or Gamma(k, 1) scaled by the rate, adapters as uniforms mapped through the popularity's
inverse CDF. So a sweep over the rate keeps the same adapters and lengths and scales the
same arrival pattern, and a sweep over the number of adapters keeps the arrival times.

Popularity of the adapters (index 0 .. n-1; a request's adapter is the name at its index):

- `uniform`: each adapter 1/n.
- `zipf:S`: P(rank k) = k^-S / H(n, S), k = 1..n (index k-1), S >= 0; S = 0 is uniform.
- `slora:ALPHA`: S-LoRA's power law (Sheng et al., 2023, "S-LoRA: Serving Thousands of Concurrent LoRA
  Adapters", its benchmarks/trace.py): index = floor(n * X) with X ~ Power(ALPHA), the density
  ALPHA * x^(ALPHA-1) on [0, 1] (numpy's `random.power`), so
  P(index i) = ((i+1)/n)^ALPHA - (i/n)^ALPHA. ALPHA = 1 is uniform; the smaller ALPHA, the more the
  requests crowd onto the first adapters (the paper sweeps ALPHA from 0.1 to 1).

Arrivals:

- `poisson` at `rate` requests/s: exponential gaps of mean 1/rate (coefficient of variation 1).
- `gamma` at `rate` with coefficient of variation `cv`: Gamma gaps of shape 1/cv^2 and scale cv^2/rate
  (mean 1/rate, CV cv; S-LoRA's bursty arrivals; cv = 1 is Poisson).
- `concurrency`: a closed loop of `concurrency` clients, each sending its next request when its previous
  one has finished; the schedule has no times (`time` is None), only the order.

Lengths: `fixed` (N), `uniform` (lo..hi, both included, integers), or `trace` (a JSON-lines file of
`{"prompt_tokens": P, "output_tokens": O}`, replayed in the file's order, from the top again when the
run needs more requests than it has lines).

Size: with `duration`, open-loop arrivals stop at the first one past it; `max_requests` caps the count.
A closed loop bounded by its duration only gets `CLOSED_LOOP_CAP` entries, of which it sends what the
duration allows.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ARRIVALS = ("poisson", "gamma", "concurrency")
POPULARITIES = ("uniform", "zipf", "slora")
CLOSED_LOOP_CAP = 100_000
MAX_SCHEDULE = 10_000_000


class WorkloadError(ValueError):
    """A workload parameter that cannot be used (the message names it)."""


@dataclass(frozen=True)
class Lengths:
    """A token-length distribution: fixed, uniform lo..hi (inclusive), or replayed from a trace."""

    kind: str = "fixed"  # fixed | uniform | trace
    lo: int = 128
    hi: int = 128

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "uniform", "trace"):
            raise WorkloadError(f"unknown length distribution {self.kind!r}")
        if self.kind != "trace" and not (1 <= self.lo <= self.hi):
            raise WorkloadError(f"lengths need 1 <= lo <= hi, got {self.lo}..{self.hi}")

    @classmethod
    def parse(cls, spec: str) -> Lengths:
        """`128` (fixed) or `64-256` (uniform, both ends included)."""
        text = spec.strip()
        try:
            if "-" in text:
                lo, hi = (int(part) for part in text.split("-", 1))
                return cls("uniform", lo, hi)
            n = int(text)
        except ValueError:
            raise WorkloadError(f"a length is N or LO-HI (tokens), got {spec!r}") from None
        return cls("fixed", n, n)

    @property
    def mean(self) -> float:
        return (self.lo + self.hi) / 2

    def describe(self) -> str:
        return {"fixed": f"{self.lo}", "uniform": f"{self.lo}-{self.hi}", "trace": "trace"}[self.kind]


@dataclass(frozen=True)
class Popularity:
    kind: str = "uniform"  # uniform | zipf | slora
    param: float = 1.0  # Zipf's exponent S, or S-LoRA's alpha

    def __post_init__(self) -> None:
        if self.kind not in POPULARITIES:
            raise WorkloadError(f"popularity is one of {', '.join(POPULARITIES)}, got {self.kind!r}")
        if not math.isfinite(self.param):
            raise WorkloadError("the popularity's parameter must be finite")
        if self.kind == "zipf" and self.param < 0:
            raise WorkloadError(f"Zipf's exponent must be >= 0, got {self.param}")
        if self.kind == "slora" and self.param <= 0:
            raise WorkloadError(f"S-LoRA's alpha must be > 0, got {self.param}")

    @classmethod
    def parse(cls, spec: str) -> Popularity:
        """`uniform`, `zipf` or `zipf:S` (default S = 1), `slora` or `slora:ALPHA` (default 1)."""
        kind, _, value = spec.strip().partition(":")
        kind = kind.lower()
        if kind not in POPULARITIES:
            raise WorkloadError(f"popularity is uniform, zipf[:S] or slora[:ALPHA], got {spec!r}")
        if kind == "uniform":
            if value:
                raise WorkloadError("uniform popularity takes no parameter")
            return cls("uniform", 1.0)
        try:
            param = float(value) if value else 1.0
        except ValueError:
            raise WorkloadError(f"the popularity's parameter must be a number, got {value!r}") from None
        return cls(kind, param)

    def pmf(self, n: int) -> np.ndarray:
        """P(index i), i = 0..n-1."""
        if n <= 0:
            return np.zeros(0)
        if self.kind == "uniform":
            return np.full(n, 1.0 / n)
        if self.kind == "zipf":
            w = np.arange(1, n + 1, dtype=np.float64) ** -self.param
            return w / w.sum()
        edges = (np.arange(n + 1, dtype=np.float64) / n) ** self.param
        return np.diff(edges)

    def sample(self, n: int, u: np.ndarray) -> np.ndarray:
        """Indices from uniforms u in [0, 1) through the inverse CDF."""
        if n <= 0:
            return np.full(len(u), -1, dtype=np.int64)
        if self.kind == "uniform":
            idx = np.floor(u * n)
        elif self.kind == "slora":
            idx = np.floor(n * u ** (1.0 / self.param))  # X = U^(1/alpha) has the density alpha x^(alpha-1)
        else:
            cdf = np.cumsum(self.pmf(n))
            cdf[-1] = 1.0
            idx = np.searchsorted(cdf, u, side="right")
        return np.minimum(idx.astype(np.int64), n - 1)

    def describe(self) -> str:
        return "uniform" if self.kind == "uniform" else f"{self.kind}:{self.param:g}"


@dataclass(frozen=True)
class Workload:
    num_adapters: int = 0  # 0: every request on the base model
    popularity: Popularity = field(default_factory=Popularity)
    arrival: str = "poisson"
    rate: float = 1.0  # requests/s (poisson, gamma)
    cv: float = 1.0  # gamma's coefficient of variation
    concurrency: int = 1  # closed loop
    prompt_len: Lengths = field(default_factory=Lengths)
    output_len: Lengths = field(default_factory=Lengths)
    trace: tuple[tuple[int, int], ...] | None = None  # (prompt_tokens, output_tokens) lines
    duration: float | None = None
    max_requests: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arrival not in ARRIVALS:
            raise WorkloadError(f"arrival is one of {', '.join(ARRIVALS)}, got {self.arrival!r}")
        if self.num_adapters < 0:
            raise WorkloadError("the number of adapters must be >= 0")
        if self.arrival != "concurrency" and not (math.isfinite(self.rate) and self.rate > 0):
            raise WorkloadError(f"the request rate must be > 0, got {self.rate}")
        if self.arrival == "gamma" and not (math.isfinite(self.cv) and self.cv > 0):
            raise WorkloadError(f"the coefficient of variation must be > 0, got {self.cv}")
        if self.arrival == "concurrency" and self.concurrency < 1:
            raise WorkloadError("the concurrency must be >= 1")
        if self.duration is None and self.max_requests is None:
            raise WorkloadError("a workload needs a duration or a request count")
        if self.duration is not None and not (math.isfinite(self.duration) and self.duration > 0):
            raise WorkloadError(f"the duration must be > 0, got {self.duration}")
        if self.max_requests is not None and self.max_requests < 1:
            raise WorkloadError("the request count must be >= 1")
        if (self.prompt_len.kind == "trace" or self.output_len.kind == "trace") and not self.trace:
            raise WorkloadError("trace lengths need the trace's lines")
        if self.seed < 0:
            raise WorkloadError("the seed must be >= 0")

    def describe(self) -> dict:
        """The parameters as plain JSON values (the trace as its length)."""
        d = asdict(self)
        d["popularity"] = self.popularity.describe()
        d["prompt_len"] = self.prompt_len.describe()
        d["output_len"] = self.output_len.describe()
        d["trace"] = None if self.trace is None else {"lines": len(self.trace)}
        return d


@dataclass(frozen=True)
class Planned:
    """One request of the schedule."""

    index: int
    time: float | None  # seconds after the start (None in a closed loop: sent when a client is free)
    adapter: int  # index into the adapter names; -1 for the base model
    prompt_tokens: int
    output_tokens: int


def read_trace(path: str | Path) -> tuple[tuple[int, int], ...]:
    """JSON lines of {"prompt_tokens": P, "output_tokens": O} (other keys ignored; blank lines skipped)."""
    lines = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            p, o = obj["prompt_tokens"], obj["output_tokens"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise WorkloadError(f"{path}:{lineno}: not a JSON object with prompt_tokens and output_tokens") from None
        if not (isinstance(p, int) and isinstance(o, int)) or isinstance(p, bool) or isinstance(o, bool) \
                or p < 1 or o < 1:
            raise WorkloadError(f"{path}:{lineno}: prompt_tokens and output_tokens must be integers >= 1")
        lines.append((p, o))
    if not lines:
        raise WorkloadError(f"{path}: the trace has no lines")
    return tuple(lines)


def _arrival_times(w: Workload, rng: np.random.Generator) -> np.ndarray | None:
    if w.arrival == "concurrency":
        return None
    shape = 1.0 if w.arrival == "poisson" else 1.0 / (w.cv * w.cv)
    scale = 1.0 / (shape * w.rate)  # mean shape*scale = 1/rate; CV 1/sqrt(shape)

    def gaps(k: int) -> np.ndarray:
        return rng.standard_exponential(k) * scale if w.arrival == "poisson" else rng.standard_gamma(shape, k) * scale

    if w.duration is None:
        if w.max_requests > MAX_SCHEDULE:
            raise WorkloadError(f"over {MAX_SCHEDULE} requests: lower the request count")
        return np.cumsum(gaps(w.max_requests))
    # with a duration: draw in blocks until past the end (one stream: the first k gaps are the same whatever
    # the block size), then keep the arrivals within it, up to max_requests
    parts, total, t = [], 0, 0.0
    block = max(64, int(w.rate * w.duration * 1.2) + 64)
    if w.max_requests is not None:
        block = min(block, w.max_requests + 1)
    while t <= w.duration and (w.max_requests is None or total < w.max_requests):
        part = t + np.cumsum(gaps(block))
        parts.append(part)
        total += block
        t = float(part[-1])
        if total > MAX_SCHEDULE:
            raise WorkloadError(f"over {MAX_SCHEDULE} requests: lower the rate or the duration")
    times = np.concatenate(parts)
    return times[times <= w.duration][: w.max_requests]


def _lengths(spec: Lengths, count: int, rng: np.random.Generator, trace_column: np.ndarray | None) -> np.ndarray:
    if spec.kind == "trace":
        return trace_column[np.arange(count) % len(trace_column)]
    if spec.kind == "fixed":
        return np.full(count, spec.lo, dtype=np.int64)
    return rng.integers(spec.lo, spec.hi + 1, count)


def make_schedule(w: Workload) -> list[Planned]:
    """The requests of a run, in sending order (a pure function of `w`)."""
    arrivals_rng, adapters_rng, prompt_rng, output_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(w.seed).spawn(4))
    times = _arrival_times(w, arrivals_rng)
    count = len(times) if times is not None else (w.max_requests or CLOSED_LOOP_CAP)
    adapters = w.popularity.sample(w.num_adapters, adapters_rng.random(count))
    trace = np.asarray(w.trace, dtype=np.int64) if w.trace else None
    prompts = _lengths(w.prompt_len, count, prompt_rng, None if trace is None else trace[:, 0])
    outputs = _lengths(w.output_len, count, output_rng, None if trace is None else trace[:, 1])
    return [Planned(i, None if times is None else float(times[i]), int(adapters[i]), int(prompts[i]), int(outputs[i]))
            for i in range(count)]


# Synthetic prompts. Common short English words: with the usual large-vocabulary BPE tokenizers (Llama 3,
# Qwen2, Mistral, GPT-2 style) each is one token when preceded by a space, so N words are about N tokens; a
# small tokenizer splits some words, and a chat template adds its own tokens. The server's usage.prompt_tokens
# is what was really sent, and the result reports it.
_WORDS_TEXT = (
    "the of and to in is was for on that with as by at from his her an this had not are but which be they "
    "one all were we their has been would there what so can if out up about into who them more some time "
    "only new may like other these than two first any its over such very how well back many even most "
    "after also made way just where before here through those down should because each much then good "
    "day man work life year same still own see world last long great old small under never high place "
    "hand part right school house set country point water home end left side light room food city road "
    "tree fire sea book song game land wind rain stone gold milk bird fish ship door table paper music"
)
WORDS = tuple(_WORDS_TEXT.split())


def synthetic_prompt(tokens: int, seed: int, index: int) -> str:
    """About `tokens` tokens of text (one word each), a pure function of (seed, index): every request of a
    run has its own text, so a prefix cache cannot serve one request's prompt from another's."""
    rng = np.random.default_rng([seed, index, 0x5EED])
    picks = rng.integers(0, len(WORDS), max(tokens, 1))
    return " ".join(WORDS[i] for i in picks)
