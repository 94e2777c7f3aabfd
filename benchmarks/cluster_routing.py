"""Routing on a cluster, on the same workload, alternately: each adapter to its home replica (affinity, the
default), Serve's model multiplexing (a replica that loaded it recently), and routing blind to the
adapter (Serve's random choice).

    python benchmarks/cluster_routing.py                     # tiny demo model, 2 replicas, CPU
    python benchmarks/cluster_routing.py --rounds 2 --duration 20 --adapters 64

A local Ray cluster runs the cluster application (loraplex/distributed) with 2 replicas of the tiny demo
model, each with --max-loras 4 device slots and --max-cpu-adapters 32 in host memory (together, the
replicas' host memory holds every adapter once), so adapters load while serving. The load generator
(python -m loadtest) puts --adapters copies of the demo's `alpha` adapter on the cluster and sends a
Zipf(1.0)-skewed closed-loop workload for --duration seconds. Reported per run: requests, adapter loads
into device slots and into host memory per request (summed over the replicas' /metrics), TTFT p50/p90,
output tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import ray
from ray import serve

from loraplex.config import ServerConfig
from loraplex.distributed.cluster import APP_NAME, NAMESPACE, application
from loraplex.models.demo import write_demo_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loads(url: str) -> dict[str, dict[str, float]]:
    """Adapter loads by replica and tier, from the ingress's merged /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    by_replica: dict[str, dict[str, float]] = {}
    for replica, tier, value in re.findall(
            r'^loraplex_adapter_loads_total\{replica="([^"]+)",[^}]*tier="(\w+)"[^}]*\} (\S+)$', text, re.M):
        by_replica.setdefault(replica, {"device": 0.0, "host": 0.0})[tier] = float(value)
    return by_replica


def new_loads(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]], old: set[str]) -> dict:
    """Loads between two readings, over this deployment's replicas (not those of earlier runs, whose last
    reports the board may still hold)."""
    totals = {"device": 0.0, "host": 0.0}
    for replica, tiers in after.items():
        if replica in old:
            continue
        for tier, value in tiers.items():
            totals[tier] += value - before.get(replica, {}).get(tier, 0.0)
    return totals


def wait_reported(url: str, replicas: int, old: set[str]) -> None:
    """Until every replica of this deployment has reported its metrics."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = httpx.get(f"{url}/metrics", timeout=30).text
        if len(set(re.findall(r'^loraplex_kv_cache_blocks\{replica="([^"]+)"', text, re.M)) - old) >= replicas:
            return
        time.sleep(0.5)
    raise RuntimeError("the replicas did not report their metrics")


def run(routing: str, demo: Path, home: Path, args, index: int, old: set[str]) -> dict:
    options = {"model": str(demo), "dtype": "float32", "device": "cpu", "max_model_len": 256,
               "kv_cache_memory": "64MiB", "data_dir": str(home), "max_loras": args.max_loras,
               "max_cpu_adapters": args.max_cpu_adapters,
               "threads": 1}
    serve.run(application(options, ServerConfig(), args.replicas, replica_cpus=0.5, routing=routing),
              name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{args.port}"
    try:
        wait_reported(url, args.replicas, old)
        before = loads(url)
        with tempfile.TemporaryDirectory() as out:
            result_path = Path(out) / "result.json"
            subprocess.run([sys.executable, "-m", "loadtest", "--base-url", f"{url}/v1",
                            "--adapters-from", str(demo / "adapters" / "alpha"), "--num-adapters", str(args.adapters),
                            "--adapter-prefix", f"r{index}-", "--popularity", "zipf:1.0", "--arrival", "concurrency",
                            "--concurrency", str(args.concurrency), "--prompt-len", "32", "--output-len", "16",
                            "--ignore-eos", "--duration", str(args.duration), "--seed", str(args.seed),
                            "--output", str(result_path), "--quiet", "--no-request-records"], check=True)
            summary = json.loads(result_path.read_text())["runs"][0]["summary"]
        time.sleep(3)  # the replicas' last reports (every 2 s)
        after = loads(url)
    finally:
        serve.delete(APP_NAME)
    requests = max(summary["ok"], 1)
    counted = new_loads(before, after, old)
    old.update(after)
    return {"routing": routing, "requests": summary["ok"], "failed": summary["failed"],
            "device_loads_per_request": counted["device"] / requests,
            "host_loads_per_request": counted["host"] / requests,
            "ttft_p50_ms": summary["ttft_ms"]["p50"], "ttft_p90_ms": summary["ttft_ms"]["p90"],
            "output_tok_s": summary["output_throughput"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--max-loras", type=int, default=4, help="device slots per replica")
    parser.add_argument("--max-cpu-adapters", type=int, default=32, help="host cache per replica: with the default,"
                        " the replicas' host memory together holds every adapter once")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration", type=float, default=20)
    parser.add_argument("--rounds", type=int, default=2, help="multiplexed/random pairs, alternating")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--routings", default="affinity,multiplexed,random", help="the routings compared, in turn")
    args = parser.parse_args()
    args.port = free_port()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        demo = write_demo_model(Path(tmp) / "demo")
        ray.init(num_cpus=os.cpu_count(), namespace=NAMESPACE, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": args.port})
            index, old = 0, set()
            for _ in range(args.rounds):
                for routing in args.routings.split(","):
                    rows.append(run(routing, demo, Path(tmp) / "home", args, index, old))
                    index += 1
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        finally:
            serve.shutdown()
            ray.shutdown()
    print(f"{args.replicas} replicas x ({args.max_loras} slots, {args.max_cpu_adapters} host entries), "
          f"{args.adapters} adapters, Zipf(1.0), "
          f"{args.concurrency} clients, {args.duration:.0f} s per run; {platform.machine()}, {os.cpu_count()} CPUs")
    print("| run | routing | requests | device loads / request | host loads / request | TTFT p50 / p90 ms | "
          "output tok/s |")
    print("|---|---|---|---|---|---|---|")
    for i, r in enumerate(rows, 1):
        print(f"| {i} | {r['routing']} | {r['requests']} ({r['failed']} failed) | {r['device_loads_per_request']:.3f} "
              f"| {r['host_loads_per_request']:.3f} | {r['ttft_p50_ms']:.0f} / {r['ttft_p90_ms']:.0f} | "
              f"{r['output_tok_s']:.0f} |")
    per = {name: [r for r in rows if r["routing"] == name] for name in args.routings.split(",")}
    for tier in ("device", "host"):
        mean = {name: sum(r[f"{tier}_loads_per_request"] for r in rs) / len(rs) for name, rs in per.items() if rs}
        if "random" in mean:
            print(f"{tier} loads per request, random over each: " + ", ".join(
                f"{name} {mean['random'] / value:.2f}x" for name, value in mean.items() if name != "random" and value))


if __name__ == "__main__":
    main()
