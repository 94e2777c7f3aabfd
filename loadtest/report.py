"""What a run shows: the live progress line (stderr), the final table (stdout) and the JSON result."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import sys
from pathlib import Path
from typing import TextIO

from loadtest import __version__
from loadtest.client import Progress


class ProgressLine:
    """`[  12s] 45/120 done, 3.7 req/s, 212 tok/s, 0 errors, 5 running` on stderr, at most once a second.
    On a terminal the line is rewritten in place; elsewhere (a log file) one line every 10 s."""

    def __init__(self, stream: TextIO = sys.stderr, label: str = "") -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.label = label
        self.last_print = -1e9
        self.width = 0

    def __call__(self, p: Progress, t: float, final: bool = False) -> None:
        if not final and t - self.last_print < (1.0 if self.tty else 10.0):
            return
        self.last_print = t
        rate = p.done / t if t > 0 else 0.0
        tok = p.output_tokens / t if t > 0 else 0.0
        total = "?" if p.total is None else p.total
        text = (f"{self.label}[{t:5.0f}s] {p.done}/{total} done, {rate:.2f} req/s, {tok:.0f} tok/s, "
                f"{p.failed} errors, {p.sent - p.done} running")
        if self.tty:
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.width:
            self.stream.write("\n")
            self.stream.flush()
        self.width = 0


def machine() -> dict:
    return {"hostname": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count()}


def header(base_url: str, argv: list[str] | None) -> dict:
    """What every result file starts with: the tool, the date, the machine, the server, the command line
    (with the keys' values masked)."""
    return {"tool": "loadtest", "version": __version__,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), "server": base_url, "command": mask_keys(argv or [])}


def mask_keys(argv: list[str]) -> list[str]:
    out, hide = [], False
    for arg in argv:
        if hide:
            out.append("***")
            hide = False
        elif arg in ("--api-key", "--admin-key"):
            out.append(arg)
            hide = True
        elif arg.startswith(("--api-key=", "--admin-key=")):
            out.append(arg.split("=", 1)[0] + "=***")
        else:
            out.append(arg)
    return out


def write_json(path: str | Path, result: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f}"


def table(run: dict) -> str:
    """One run's figures as text."""
    s, w = run["summary"], run["workload"]
    arrival = {"poisson": f"poisson {w['rate']:g} req/s", "gamma": f"gamma {w['rate']:g} req/s cv {w['cv']:g}",
               "concurrency": f"concurrency {w['concurrency']}"}[w["arrival"]]
    lines = [
        f"server      {run['server']}  ({run['options']['endpoint']}, "
        f"{'streaming' if run['options']['stream'] else 'not streaming'})",
        f"workload    {arrival}, {w['num_adapters']} adapter(s) {w['popularity']}, prompt {w['prompt_len']} "
        f"output {w['output_len']} tokens, seed {w['seed']}",
        f"requests    {s['requests']} sent, {s['ok']} ok, {s['failed']} failed"
        + (" (" + ", ".join(f"{k}: {v}" for k, v in s["errors"].items()) + ")" if s["errors"] else ""),
        f"elapsed     {s['elapsed_s']:.2f} s",
        f"throughput  {s['request_throughput']:.3f} req/s, {s['output_throughput']:.1f} output tok/s, "
        f"{s['prompt_throughput']:.1f} prompt tok/s ({s['output_tokens']} output tokens)",
    ]
    if s["usage_missing"]:
        lines.append(f"note        {s['usage_missing']} answer(s) had no usage: their output tokens are counted "
                     "as content chunks (streaming) or 0")
    lines.append(f"{'(ms)':<12}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}{'max':>10}{'count':>8}")
    for key, label in (("ttft_ms", "TTFT"), ("itl_ms", "ITL"), ("tpot_ms", "TPOT"), ("e2e_ms", "e2e"),
                       ("lag_ms", "send lag")):
        d = s[key]
        lines.append(f"{label:<12}" + "".join(f"{_ms(d[k]):>10}" for k in ("mean", "p50", "p90", "p99", "max"))
                     + f"{d['count']:>8}")
    if "slo" in s:
        slo = s["slo"]
        lines.append(f"SLO         TTFT <= {slo['ttft_s'] * 1000:g} ms: {slo['met']}/{s['requests']} "
                     f"({slo['attainment']:.1%}), goodput {slo['goodput']:.3f} req/s")
    return "\n".join(lines)


def sweep_table(result: dict) -> str:
    key = result["sweep"]["param"]
    rows = [f"{key:>12}{'ok':>7}{'failed':>7}{'req/s':>9}{'tok/s':>10}{'TTFT p50':>10}{'p90':>9}{'p99':>9}"
            f"{'e2e p50':>9}" + (f"{'SLO':>8}{'goodput':>9}" if any("slo" in r["summary"] for r in result["runs"])
                                 else "")]
    for run in result["runs"]:
        s = run["summary"]
        t = s["ttft_ms"]
        row = (f"{run['sweep_value']:>12g}{s['ok']:>7}{s['failed']:>7}{s['request_throughput']:>9.3f}"
               f"{s['output_throughput']:>10.1f}{_ms(t['p50']):>10}{_ms(t['p90']):>9}{_ms(t['p99']):>9}"
               f"{_ms(s['e2e_ms']['p50']):>9}")
        if "slo" in s:
            row += f"{s['slo']['attainment']:>8.1%}{s['slo']['goodput']:>9.3f}"
        rows.append(row)
    return "\n".join(rows)
