"""PNG figures of a result (matplotlib, the `loadtest` extra: `pip install -e '.[loadtest]'`).

- `latency_cdf.png`: the empirical CDFs of TTFT, ITL and e2e latency (one panel each; a sweep draws one
  curve per value).
- for a sweep, `sweep_throughput.png` (requests/s and output tokens/s against the swept value) and
  `sweep_ttft.png` (TTFT p50 / p90 / p99 against it).

The figures are drawn from the per-request records the result keeps (`requests` of each run).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class PlotError(RuntimeError):
    pass


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotError("--plots needs matplotlib: pip install matplotlib (or the loadtest extra, "
                        "pip install -e '.[loadtest]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def ensure_available() -> None:
    """Raises PlotError before a run when the plots could not be drawn after it."""
    _pyplot()


def _latencies(run: dict) -> dict[str, np.ndarray]:
    ok = [r for r in run["requests"] if r["ok"]]
    return {
        "TTFT": np.array([r["ttft"] for r in ok if r["ttft"] is not None]) * 1000,
        "ITL": np.array([g for r in ok for g in r["itl"]]) * 1000,
        "e2e": np.array([r["e2e"] for r in ok if r["e2e"] is not None]) * 1000,
    }


def latency_cdfs(runs: list[tuple[str, dict]], path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for label, run in runs:
        for ax, values in zip(axes, _latencies(run).values(), strict=True):
            if values.size:
                x = np.sort(values)
                ax.step(x, np.arange(1, x.size + 1) / x.size, where="post", label=label)
    for ax, name in zip(axes, ("TTFT", "ITL", "e2e"), strict=True):
        ax.set_title(f"{name} CDF")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests" if name != "ITL" else "fraction of gaps")
        ax.set_ylim(0, 1.01)
        ax.grid(alpha=0.3)
        if len(runs) > 1 or runs[0][0]:
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sweep_figures(result: dict, out: Path) -> list[Path]:
    plt = _pyplot()
    key = result["sweep"]["param"]
    x = [run["sweep_value"] for run in result["runs"]]
    s = [run["summary"] for run in result["runs"]]
    paths = []

    fig, ax1 = plt.subplots(figsize=(7, 4.2))
    ax1.plot(x, [v["request_throughput"] for v in s], "o-", color="tab:blue", label="requests/s")
    ax1.set_xlabel(key)
    ax1.set_ylabel("requests/s", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(x, [v["output_throughput"] for v in s], "s--", color="tab:orange", label="output tokens/s")
    ax2.set_ylabel("output tokens/s", color="tab:orange")
    if any("slo" in v for v in s):
        ax1.plot(x, [v.get("slo", {}).get("goodput", np.nan) for v in s], "^:", color="tab:green", label="goodput")
        ax1.legend(loc="upper left", fontsize="small")
    if key == "adapters" and min(x) > 0 and max(x) / min(x) >= 16:
        ax1.set_xscale("log", base=2)
    ax1.set_title(f"throughput against {key}")
    ax1.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "sweep_throughput.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for p, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
        ax.plot(x, [np.nan if v["ttft_ms"][p] is None else v["ttft_ms"][p] for v in s], style, label=f"TTFT {p}")
    if key == "adapters" and min(x) > 0 and max(x) / min(x) >= 16:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(key)
    ax.set_ylabel("TTFT (ms)")
    ax.set_title(f"TTFT against {key}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    paths.append(out / "sweep_ttft.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def draw(result: dict, out: str | Path) -> list[Path]:
    """Every figure of a result (a single run, or a sweep) into the folder `out`; returns the files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if "sweep" in result:
        key = result["sweep"]["param"]
        runs = [(f"{key}={run['sweep_value']:g}", run) for run in result["runs"]]
        return [latency_cdfs(runs, out / "latency_cdf.png"), *sweep_figures(result, out)]
    return [latency_cdfs([("", result["runs"][0])], out / "latency_cdf.png")]
