"""What the cluster adds per request and per adapter copy, for docs/scaling.md's extrapolations.

    python benchmarks/cluster_overheads.py

On a local Ray cluster: (1) the catalog actor's generation() call a replica makes before every request
(median of 300); (2) copying an adapter through the catalog (publish, then fetch + sha256 check) for 1 MB
and 32 MB of files; (3) the latency of a 1-token completion on the tiny demo model through the cluster's
ingress (2 replicas) against the same request to one `loraplex serve` (median of 50 each, alternating).
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import ray
from ray import serve

from loraplex.config import ServerConfig
from loraplex.distributed.catalog import AdapterCatalog
from loraplex.distributed.cluster import APP_NAME, NAMESPACE, application
from loraplex.models.demo import write_demo_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


async def catalog_figures(root: Path) -> None:
    catalog = ray.remote(AdapterCatalog).options(num_cpus=0).remote(str(root))
    await catalog.generation.remote()
    times = []
    for _ in range(300):
        start = time.perf_counter()
        await catalog.generation.remote()
        times.append(time.perf_counter() - start)
    print(f"catalog generation() call: median {median_ms(times):.2f} ms, p90 "
          f"{sorted(times)[int(0.9 * len(times))] * 1e3:.2f} ms")
    for megabytes in (1, 32):
        files = {"adapter_model.safetensors": os.urandom(megabytes << 20), "adapter_config.json": b"{}"}
        start = time.perf_counter()
        await catalog.publish.remote(f"blob{megabytes}", "peft-lora", {"sha256": "x"}, files)
        published = time.perf_counter() - start
        start = time.perf_counter()
        entry = await catalog.fetch.remote(f"blob{megabytes}")
        entry.verify()
        fetched = time.perf_counter() - start
        print(f"{megabytes} MB adapter: publish {published * 1e3:.0f} ms, fetch + sha256 {fetched * 1e3:.0f} ms "
              f"({megabytes / fetched:.0f} MB/s)")


def latency(url: str, model: str, n: int) -> list[float]:
    times = []
    with httpx.Client(timeout=60) as client:
        for _ in range(n):
            start = time.perf_counter()
            r = client.post(f"{url}/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 1,
                                                           "temperature": 0})
            assert r.status_code == 200, r.text
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        demo = write_demo_model(Path(tmp) / "demo")
        ray.init(namespace=NAMESPACE, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})
        try:
            asyncio.run(catalog_figures(Path(tmp) / "catalog"))
            cluster_port, single_port = free_port(), free_port()
            options = {"model": str(demo), "dtype": "float32", "device": "cpu", "max_model_len": 128,
                       "kv_cache_memory": "16MiB", "data_dir": str(Path(tmp) / "home"), "threads": 1}
            serve.start(http_options={"host": "127.0.0.1", "port": cluster_port})
            serve.run(application(options, ServerConfig(), 2, replica_cpus=0.5), name=APP_NAME, route_prefix="/")
            single = subprocess.Popen([sys.executable, "-m", "loraplex.cli", "serve", "--model", str(demo),
                                       "--port", str(single_port), "--device", "cpu", "--dtype", "float32",
                                       "--max-model-len", "128", "--kv-cache-memory", "16MiB", "--threads", "1",
                                       "--data-dir", str(Path(tmp) / "single")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                for _ in range(240):
                    try:
                        if httpx.get(f"http://127.0.0.1:{single_port}/health", timeout=1).status_code == 200:
                            break
                    except httpx.HTTPError:
                        time.sleep(0.5)
                cluster_url, single_url = f"http://127.0.0.1:{cluster_port}", f"http://127.0.0.1:{single_port}"
                latency(cluster_url, "demo", 10), latency(single_url, "demo", 10)  # warm-up
                cluster, one = [], []
                for _ in range(5):
                    cluster += latency(cluster_url, "demo", 10)
                    one += latency(single_url, "demo", 10)
                print(f"1-token completion: one server {median_ms(one):.1f} ms, through the cluster's ingress "
                      f"{median_ms(cluster):.1f} ms (median of {len(one)} each): the cluster adds "
                      f"{median_ms(cluster) - median_ms(one):.1f} ms")
            finally:
                single.terminate()
                single.wait(60)
        finally:
            serve.shutdown()
            ray.shutdown()


if __name__ == "__main__":
    main()
