"""The HTTP server against the offline engine on the same work: what the API layer costs.

    python benchmarks/server_throughput.py                 # the tiny demo model and its 3 adapters, CPU
    python benchmarks/server_throughput.py --model DIR --num-requests 64 --output-len 64 --repeats 5

The same requests (random token-id prompts, greedy, EOS ignored, spread round-robin over the base
model and the adapters) run through `LLM.generate` in this process, and as concurrent streaming
`/v1/completions` requests to `loraplex serve` in a subprocess (its own process, as in production;
the client here), alternately --repeats times, so that a slow spell of a shared machine hits both
sides. Reported per pair: generated tokens/s of each and their ratio, the server's time to first
token (median, p90) as the client saw it, and the CPU seconds the server and the client used while
the requests ran; then the median ratio. Both sides run with their defaults (the server's engine on
every core but one, the offline engine on every core) and OMP_WAIT_POLICY=PASSIVE (as `loraplex
serve` sets it) unless the environment sets another; LORAPLEX_BENCH_SERVER_ARGS adds server options
(e.g. "--threads 2").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Both sides with the OpenMP wait policy that `loraplex serve` sets (cli.py), before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import httpx  # noqa: E402
import torch  # noqa: E402
from live_server import free_port, wait_until_serving  # noqa: E402


def make_prompts(vocab_size: int, num: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(16, vocab_size, (num, length), generator=g).tolist()


def offline_runner(model_dir: Path, adapters: dict[str, str], jobs, args):
    """A warmed-up callable: the jobs through `LLM.generate`, returning generated tokens/s."""
    from loraplex import LLM, SamplingParams

    llm = LLM(model=str(model_dir), dtype="float32", device="cpu", adapters=adapters, max_loras=max(len(adapters), 1),
              kv_cache_memory="512MiB", enable_prefix_caching=False)
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    llm.generate(jobs[0][1], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm-up

    def run() -> float:
        start = time.perf_counter()
        outputs = llm.generate([p for _, p in jobs], params, adapter=[a for a, _ in jobs])
        elapsed = time.perf_counter() - start
        assert all(len(o.token_ids) == args.output_len for o in outputs)
        return len(jobs) * args.output_len / elapsed

    return run


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_client(url: str, base: str, jobs, args, server_pid: int | None) -> dict:
    """The jobs as concurrent streaming requests; tokens/s, TTFTs, and the CPU each side used meanwhile."""
    async def one(client: httpx.AsyncClient, adapter: str | None, prompt: list[int]) -> tuple[int, float]:
        body = {"model": adapter or base, "prompt": prompt, "max_tokens": args.output_len, "temperature": 0,
                "ignore_eos": True, "stream": True}
        sent, first, text_chunks = time.perf_counter(), None, 0
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            resp.raise_for_status()
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    first = first or time.perf_counter()
                    text_chunks += 1
        return text_chunks, first - sent

    limits = httpx.Limits(max_connections=len(jobs) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await one(client, *jobs[0])  # warm-up
        server_before = process_cpu_seconds(server_pid) if server_pid else 0.0
        start, client_start = time.perf_counter(), time.process_time()
        results = await asyncio.gather(*(one(client, a, p) for a, p in jobs))
        elapsed, client_cpu = time.perf_counter() - start, time.process_time() - client_start
        server_cpu = process_cpu_seconds(server_pid) - server_before if server_pid else float("nan")
    return {"tok_s": len(jobs) * args.output_len / elapsed, "ttfts": sorted(ttft for _, ttft in results),
            "seconds": elapsed, "client_cpu": client_cpu, "server_cpu": server_cpu}


@contextlib.contextmanager
def live_server(model_dir: Path, adapters: dict[str, str], home: Path):
    """`loraplex serve` in a subprocess: yields (url, base model name, pid)."""
    port = free_port()
    command = [sys.executable, "-m", "loraplex.cli", "serve", "--model", str(model_dir), "--port", str(port),
               "--dtype", "float32", "--device", "cpu", "--kv-cache-memory", "512MiB", "--no-prefix-caching",
               "--max-loras", str(max(len(adapters), 1)), "--data-dir", str(home)]
    for name, path in adapters.items():
        command += ["--adapter", f"{name}={path}"]
    command += os.environ.get("LORAPLEX_BENCH_SERVER_ARGS", "").split()  # e.g. --threads 1
    log = open(home / "server.log", "wb")  # noqa: SIM115
    wrapper = os.environ.get("LORAPLEX_BENCH_SERVER_WRAPPER", "").split()  # e.g. a profiler
    proc = subprocess.Popen([*wrapper, *command], stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    try:
        yield url, wait_until_serving(url), (proc.pid if not wrapper else None)
    finally:
        proc.send_signal(signal.SIGINT)  # a graceful stop (and a profiler wrapping it writes its report)
        proc.wait(60)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: a fresh demo model + adapters)")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5, help="offline/server pairs, alternating")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, adapters = args.model, {}
        if model_dir is None:
            from loraplex.models.demo import DEMO_ADAPTERS, write_demo_model

            model_dir = write_demo_model(Path(tmp) / "demo")
            adapters = {name: str(model_dir / "adapters" / name) for name in DEMO_ADAPTERS}
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        prompts = make_prompts(vocab, args.num_requests, args.prompt_len, args.seed)
        names = [None, *adapters]
        jobs = [(names[i % len(names)], prompt) for i, prompt in enumerate(prompts)]
        offline = offline_runner(model_dir, adapters, jobs, args)
        pairs = []
        with live_server(model_dir, adapters, Path(tmp)) as (url, base, pid):
            for _ in range(args.repeats):  # alternating, so a slow spell of a shared machine hits both
                rate = offline()
                pairs.append((rate, asyncio.run(run_client(url, base, jobs, args, pid))))

    print(f"model {model_dir.name}, {args.num_requests} requests over base + {len(adapters)} adapters, prompt "
          f"{args.prompt_len}, output {args.output_len}, fp32 CPU, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    print("| pair | offline tok/s | server tok/s | server / offline | TTFT median / p90 | CPU s: server, client |")
    print("|---|---|---|---|---|---|")
    for i, (rate, served) in enumerate(pairs, 1):
        ttfts = served["ttfts"]
        print(f"| {i} | {rate:.1f} | {served['tok_s']:.1f} | {served['tok_s'] / rate:.2f}x | "
              f"{statistics.median(ttfts):.3f} / {ttfts[int(0.9 * (len(ttfts) - 1))]:.3f} s | "
              f"{served['server_cpu']:.2f}, {served['client_cpu']:.2f} of {served['seconds']:.2f} s |")
    ratios = sorted(served["tok_s"] / rate for rate, served in pairs)
    print(f"ratio server / offline, median of {len(pairs)} pairs: {statistics.median(ratios):.2f}x "
          f"(range {ratios[0]:.2f}-{ratios[-1]:.2f})")


if __name__ == "__main__":
    main()
