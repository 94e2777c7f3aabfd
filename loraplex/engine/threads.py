"""How many CPU threads torch runs the engine's operators on (`--threads`)."""

from __future__ import annotations

import contextlib
import os

import torch

from loraplex.errors import invalid


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity; cgroup quotas aside)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def omp_num_threads() -> int | None:
    """$OMP_NUM_THREADS when it is a positive integer (the usual way to give each of several processes on
    one machine its share), else None."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def default_threads() -> int:
    """The default of --threads: $OMP_NUM_THREADS when set, else every core the process may use. With
    OpenMP's passive wait policy (which the CLI sets) the latter holds up when other programs share the
    cores; see BENCHMARKS.md, "A shared CPU"."""
    return omp_num_threads() or available_cores()


def serving_threads() -> int:
    """The default of --threads for `loraplex serve`: $OMP_NUM_THREADS when set, else every core but one.
    The server's HTTP thread (and, on one machine, its clients) needs a core while the engine steps: with
    torch's threads on every core, each of their parallel operators waits for the thread whose core the
    HTTP work took. On 2 cores, the server with one engine thread ran at 0.91x of the offline engine
    (at its two), against 0.80x with two (BENCHMARKS.md, "The server against the engine")."""
    return omp_num_threads() or max(1, available_cores() - 1)


def configure_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (None: `default_threads()`), and one inter-op thread (the engine runs
    no parallel graph), when torch still allows it. Returns the intra-op count in force."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise invalid("threads", f"must be a positive integer, got {threads!r}")
    count = threads or default_threads()
    torch.set_num_threads(count)
    with contextlib.suppress(RuntimeError):  # only allowed before the process's first inter-op parallel work
        torch.set_num_interop_threads(1)
    return torch.get_num_threads()
