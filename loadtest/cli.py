"""The command line: `python -m loadtest --base-url http://127.0.0.1:8000/v1 ...` (`--help` lists it all).

Exit status: 0 when the run (or every run of a sweep) completed with at least one successful request,
1 when none succeeded or the server could not be used (unreachable, an adapter upload refused), 2 for a
bad command line (including a non-loopback --base-url without --allow-remote), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from loadtest import plots, report
from loadtest.adapters import AdapterError, AdapterSource, base_model_name
from loadtest.client import RequestOptions, Runner, execute
from loadtest.metrics import summarize
from loadtest.workload import (
    ARRIVALS,
    Lengths,
    Popularity,
    Workload,
    WorkloadError,
    make_schedule,
    read_trace,
)

SWEEP_KEYS = ("adapters", "rate", "concurrency", "cv")
DEFAULT_DURATION = 60.0


class UsageError(ValueError):
    pass


def check_base_url(url: str, allow_remote: bool) -> str:
    """The base URL, if it may be used: http(s), a host, and that host a loopback address (127.0.0.0/8,
    ::1, `localhost`) unless allow_remote. Nothing is resolved: a name other than localhost is remote."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--base-url must be an http(s) URL with a host, like http://127.0.0.1:8000/v1; got {url!r}")
    if parts.query or parts.fragment:
        raise UsageError("--base-url takes no query or fragment")
    host = parts.hostname
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host.lower() == "localhost"
    if not loopback and not allow_remote:
        raise UsageError(f"--base-url {url} is not a loopback address: loadtest sends to 127.0.0.1, ::1 or "
                         "localhost only, unless --allow-remote is given (load a server only with its owner's "
                         "consent)")
    return url.rstrip("/")


class HelpFormatter(argparse.HelpFormatter):
    """Each option's default in its help, unless the help says it or there is none (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest",
        description="Load generator for OpenAI-compatible servers with many LoRA adapters (loraplex, vLLM, "
                    "SGLang, llama.cpp's server). See docs/loadtest.md.",
        formatter_class=HelpFormatter)
    g = p.add_argument_group("server")
    g.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the API's base URL, up to /v1")
    g.add_argument("--api-key", default=None,
                   help="bearer key for inference; when not given, $OPENAI_API_KEY, and without it no header")
    g.add_argument("--admin-key", default=None, help="bearer key for adapter changes (default: the API key)")
    g.add_argument("--allow-remote", action="store_true", help="allow a --base-url that is not a loopback address")
    g.add_argument("--model", default=None,
                   help="the base model's served name, for requests without an adapter (default: from GET /models)")
    g.add_argument("--timeout", type=float, default=300.0, help="per-request limit, seconds (a timeout error past it)")
    g.add_argument("--max-connections", type=int, default=256,
                   help="most connections open at once (at least --concurrency)")

    g = p.add_argument_group("adapters")
    g.add_argument("--num-adapters", type=int, default=None,
                   help="adapters to spread requests over (default: as many as --adapter-names, 1 with "
                        "--adapters-from, else 0: the base model)")
    g.add_argument("--adapters-from", type=Path, default=None, metavar="DIR",
                   help="a PEFT adapter directory, put on the server N times under N names")
    g.add_argument("--register", choices=("upload", "vllm"), default="upload",
                   help="how --adapters-from goes to the server: upload (loraplex's POST /v1/adapters) or vllm "
                        "(POST /v1/load_lora_adapter with the directory's path, read by the server)")
    g.add_argument("--adapter-prefix", default="lt-", help="names of the adapters put in place: PREFIX0, PREFIX1, ...")
    g.add_argument("--adapter-names", default=None, help="comma-separated names the server already serves")
    g.add_argument("--keep-adapters", action="store_true", help="leave the adapters it put in place on the server")
    g.add_argument("--popularity", default="uniform",
                   help="adapter popularity: uniform, zipf[:S] (P(rank k) ~ k^-S) or slora[:ALPHA] (S-LoRA's "
                        "power law, index floor(n * X), X ~ Power(ALPHA))")

    g = p.add_argument_group("workload")
    g.add_argument("--arrival", choices=ARRIVALS, default="poisson",
                   help="poisson or gamma arrivals at --rate (open loop), or --concurrency clients (closed loop)")
    g.add_argument("--rate", type=float, default=1.0, help="requests/s (poisson, gamma)")
    g.add_argument("--cv", type=float, default=1.0, help="gamma arrivals' coefficient of variation")
    g.add_argument("--concurrency", type=int, default=1, help="clients of the closed loop")
    g.add_argument("--prompt-len", default="128", help="prompt tokens: N, or LO-HI (uniform, both included)")
    g.add_argument("--output-len", default="128", help="output tokens (max_tokens): N, or LO-HI")
    g.add_argument("--lengths-trace", type=Path, default=None, metavar="FILE",
                   help="JSON lines of {prompt_tokens, output_tokens}, replayed in order (overrides the lengths)")
    g.add_argument("--endpoint", choices=("completions", "chat"), default="completions",
                   help="/v1/completions or /v1/chat/completions")
    g.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="stream the answers (TTFT and ITL need it)")
    g.add_argument("--ignore-eos", action="store_true",
                   help="send ignore_eos: true (vLLM / loraplex / SGLang; not OpenAI's), so outputs run to max_tokens")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--duration", type=float, default=None,
                   help=f"seconds of sending (default {DEFAULT_DURATION:g} without --max-requests)")
    g.add_argument("--max-requests", type=int, default=None, help="most requests to send")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--sweep", default=None, metavar="KEY=V1,V2,...",
                   help=f"one run per value of KEY ({', '.join(SWEEP_KEYS)}), results in one JSON")

    g = p.add_argument_group("results")
    g.add_argument("--slo-ttft", type=float, default=None, metavar="SECONDS",
                   help="SLO on TTFT: report its attainment and the goodput")
    g.add_argument("--output", type=Path, default=None, help="JSON result file")
    g.add_argument("--plots", type=Path, default=None, metavar="DIR", help="PNG figures into DIR (needs matplotlib)")
    g.add_argument("--no-request-records", action="store_true",
                   help="leave the per-request records out of the JSON (smaller; --plots then needs none)")
    g.add_argument("--quiet", action="store_true", help="no progress line")
    return p


@dataclasses.dataclass
class Plan:
    base_url: str
    workloads: list[tuple[float | None, Workload]]  # (sweep value, workload)
    sweep_key: str | None
    source: AdapterSource | None
    options: RequestOptions
    args: argparse.Namespace


def _number(text: str, integer: bool) -> float:
    try:
        v = float(text)
    except ValueError:
        raise UsageError(f"--sweep values must be numbers, got {text!r}") from None
    if integer and v != int(v):
        raise UsageError(f"--sweep values must be integers here, got {text!r}")
    return int(v) if integer else v


def make_plan(args: argparse.Namespace) -> Plan:
    base_url = check_base_url(args.base_url, args.allow_remote)
    if args.timeout <= 0:
        raise UsageError("--timeout must be > 0")
    if args.adapters_from is not None and args.adapter_names:
        raise UsageError("give --adapters-from or --adapter-names, not both")
    source = None
    if args.adapter_names:
        names = tuple(n.strip() for n in args.adapter_names.split(",") if n.strip())
        source = AdapterSource("names", names=names)
    elif args.adapters_from is not None:
        if not args.adapter_prefix or "/" in args.adapter_prefix:
            raise UsageError("--adapter-prefix must be a non-empty name without '/'")
        source = AdapterSource(args.register, directory=args.adapters_from, prefix=args.adapter_prefix)
    num = args.num_adapters
    if num is None:
        num = 0 if source is None else (source.capacity or 1)

    trace = read_trace(args.lengths_trace) if args.lengths_trace else None
    prompt_len = Lengths("trace") if trace else Lengths.parse(args.prompt_len)
    output_len = Lengths("trace") if trace else Lengths.parse(args.output_len)
    duration = args.duration
    if duration is None and args.max_requests is None:
        duration = DEFAULT_DURATION
    base = Workload(num_adapters=num, popularity=Popularity.parse(args.popularity), arrival=args.arrival,
                    rate=args.rate, cv=args.cv, concurrency=args.concurrency, prompt_len=prompt_len,
                    output_len=output_len, trace=trace, duration=duration, max_requests=args.max_requests,
                    seed=args.seed)

    sweep_key, workloads = None, [(None, base)]
    if args.sweep:
        sweep_key, _, values_text = args.sweep.partition("=")
        sweep_key = sweep_key.strip()
        if sweep_key not in SWEEP_KEYS or not values_text:
            raise UsageError(f"--sweep is KEY=V1,V2,... with KEY one of {', '.join(SWEEP_KEYS)}; got {args.sweep!r}")
        values = [_number(v.strip(), sweep_key in ("adapters", "concurrency")) for v in values_text.split(",")]
        field = {"adapters": "num_adapters"}.get(sweep_key, sweep_key)
        if sweep_key == "rate" and args.arrival == "concurrency":
            raise UsageError("--sweep rate needs --arrival poisson or gamma")
        if sweep_key == "concurrency" and args.arrival != "concurrency":
            raise UsageError("--sweep concurrency needs --arrival concurrency")
        if sweep_key == "cv" and args.arrival != "gamma":
            raise UsageError("--sweep cv needs --arrival gamma")
        workloads = [(v, dataclasses.replace(base, **{field: v})) for v in values]

    for _, w in workloads:
        if w.num_adapters > 0 and source is None:
            raise UsageError("requests on adapters need --adapters-from DIR or --adapter-names (or --num-adapters 0)")
        if source is not None and source.capacity is not None and w.num_adapters > source.capacity:
            raise UsageError(f"{w.num_adapters} adapters wanted, but --adapter-names gives {source.capacity}")
    options = RequestOptions(model_names=(), base_model=args.model, endpoint=args.endpoint, stream=args.stream,
                             ignore_eos=args.ignore_eos, temperature=args.temperature, seed=args.seed)
    return Plan(base_url, workloads, sweep_key, source, options, args)


async def run_plan(plan: Plan) -> dict:
    args = plan.args
    api_key = args.api_key
    admin_key = args.admin_key or api_key
    connections = max(args.max_connections, args.concurrency if args.arrival == "concurrency" else 1)
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    timeout = httpx.Timeout(args.timeout, connect=min(10.0, args.timeout))
    result = report.header(plan.base_url, getattr(args, "argv", None))
    if plan.sweep_key:
        result["sweep"] = {"param": plan.sweep_key, "values": [v for v, _ in plan.workloads]}
    result["runs"] = []
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False, follow_redirects=False) as client:
        try:
            base_model = args.model or await base_model_name(client, plan.base_url, api_key)
        except httpx.HTTPError as e:
            raise AdapterError(f"cannot reach {plan.base_url}: {type(e).__name__}: {e}") from None
        if plan.source is not None and plan.source.mode == "names":
            listed = {m["id"] for m in (await client.get(
                f"{plan.base_url}/models",
                headers={"Authorization": f"Bearer {api_key}"} if api_key else {})).json().get("data") or []}
            unknown = [n for n in plan.source.names if n not in listed]
            if unknown:
                print(f"loadtest: warning: GET /models does not list {', '.join(unknown)}", file=sys.stderr)
        for value, workload in plan.workloads:
            schedule = make_schedule(workload)
            if not schedule:
                label = f" ({plan.sweep_key} = {value:g})" if plan.sweep_key else ""
                print(f"loadtest: warning: no request arrives within the duration{label}: raise --duration or "
                      "--rate", file=sys.stderr)
            used = sorted({p.adapter for p in schedule if p.adapter >= 0})
            source = plan.source
            names = tuple(source.name(i) for i in range(workload.num_adapters)) if source else ()
            options = dataclasses.replace(plan.options, model_names=names, base_model=base_model)
            label = f"[{plan.sweep_key}={value:g}] " if plan.sweep_key else ""
            try:
                if source is not None:
                    todo = [i for i in used if source.name(i) not in source.placed]
                    if todo and source.mode != "names" and not args.quiet:
                        print(f"loadtest: {label}putting {len(todo)} adapter(s) on the server ({source.mode})",
                              file=sys.stderr)
                    await source.place(client, plan.base_url, admin_key, todo)
                runner = Runner(client, plan.base_url, api_key, options, args.timeout)
                progress = None if args.quiet else report.ProgressLine(sys.stderr, label)
                closed = workload.arrival == "concurrency"
                total = None if closed and workload.max_requests is None else len(schedule)
                records, elapsed = await execute(runner, schedule, concurrency=workload.concurrency if closed else None,
                                                 duration=workload.duration, on_progress=progress, total=total)
                if progress is not None:
                    progress.close()
            finally:
                if source is not None and not args.keep_adapters and source.placed:
                    problems = await source.remove(client, plan.base_url, admin_key)
                    for problem in problems:
                        print(f"loadtest: warning: could not remove adapter {problem}", file=sys.stderr)
            run = {
                "server": plan.base_url,
                "workload": workload.describe(),
                "options": {"endpoint": options.endpoint, "stream": options.stream, "ignore_eos": options.ignore_eos,
                            "temperature": options.temperature, "timeout_s": args.timeout,
                            "max_connections": connections, "slo_ttft_s": args.slo_ttft},
                "base_model": base_model,
                "adapters": {**(source.describe() if source else {"mode": None}),
                             "used": [names[i] for i in used]},
                "summary": summarize(records, elapsed, args.slo_ttft),
            }
            if plan.sweep_key:
                run["sweep_value"] = value
            if not args.no_request_records:
                run["requests"] = [dataclasses.asdict(r) for r in records]
            result["runs"].append(run)
    if not plan.sweep_key:
        result["workload"] = result["runs"][0]["workload"]
        result["summary"] = result["runs"][0]["summary"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.api_key is None:
        args.api_key = os.environ.get("OPENAI_API_KEY") or None
    try:
        plan = make_plan(args)
        if args.plots is not None:
            if args.no_request_records:
                raise UsageError("--plots draws from the request records: drop --no-request-records")
            plots.ensure_available()
    except (UsageError, WorkloadError, AdapterError, plots.PlotError, OSError) as e:
        print(f"loadtest: error: {e}", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(run_plan(plan))
    except KeyboardInterrupt:
        print("\nloadtest: interrupted", file=sys.stderr)
        return 130
    except (AdapterError, WorkloadError, httpx.HTTPError) as e:
        print(f"loadtest: error: {e}", file=sys.stderr)
        return 1
    if plan.sweep_key:
        for run in result["runs"]:
            print(f"--- {plan.sweep_key} = {run['sweep_value']:g}")
            print(report.table(run))
        print(f"--- sweep over {plan.sweep_key}")
        print(report.sweep_table(result))
    else:
        print(report.table(result["runs"][0]))
    if args.output is not None:
        report.write_json(args.output, result)
        print(f"result: {args.output}")
    if args.plots is not None:
        for path in plots.draw(result, args.plots):
            print(f"plot: {path}")
    return 0 if all(run["summary"]["ok"] > 0 for run in result["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
