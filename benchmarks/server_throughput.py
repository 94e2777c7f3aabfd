"""The HTTP server against the offline engine on the same work, one run: what the API layer costs.

    python benchmarks/server_throughput.py                 # the tiny demo model and its 3 adapters, CPU
    python benchmarks/server_throughput.py --model DIR --num-requests 64 --output-len 64

The same requests (random token-id prompts, greedy, EOS ignored, spread round-robin over the base
model and the adapters) run twice: through `LLM.generate` in this process, then as concurrent
streaming `/v1/completions` requests to `loraplex serve` running in a subprocess (its own process,
as in production; the client here). Reported: generated tokens/s of each and their ratio, and the
server's time to first token (median, p90) as the client saw it. Both run with OMP_WAIT_POLICY=PASSIVE
(as `loraplex serve` sets it) unless the environment sets another.
"""

from __future__ import annotations

import argparse
import asyncio
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


def run_offline(model_dir: Path, adapters: dict[str, str], jobs, args) -> float:
    from loraplex import LLM, SamplingParams

    llm = LLM(model=str(model_dir), dtype="float32", device="cpu", adapters=adapters, max_loras=max(len(adapters), 1),
              kv_cache_memory="512MiB", enable_prefix_caching=False)
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    llm.generate(jobs[0][1], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm-up
    start = time.perf_counter()
    outputs = llm.generate([p for _, p in jobs], params, adapter=[a for a, _ in jobs])
    elapsed = time.perf_counter() - start
    assert all(len(o.token_ids) == args.output_len for o in outputs)
    return len(jobs) * args.output_len / elapsed


async def run_client(url: str, base: str, jobs, args) -> tuple[float, list[float]]:
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
        start = time.perf_counter()
        results = await asyncio.gather(*(one(client, a, p) for a, p in jobs))
        elapsed = time.perf_counter() - start
    return len(jobs) * args.output_len / elapsed, [ttft for _, ttft in results]



def run_server(model_dir: Path, adapters: dict[str, str], jobs, args, home: Path) -> tuple[float, list[float]]:
    port = free_port()
    command = [sys.executable, "-m", "loraplex.cli", "serve", "--model", str(model_dir), "--port", str(port),
               "--dtype", "float32", "--device", "cpu", "--kv-cache-memory", "512MiB", "--no-prefix-caching",
               "--max-loras", str(max(len(adapters), 1)), "--data-dir", str(home)]
    for name, path in adapters.items():
        command += ["--adapter", f"{name}={path}"]
    log = open(home / "server.log", "wb")  # noqa: SIM115
    wrapper = os.environ.get("LORAPLEX_BENCH_SERVER_WRAPPER", "").split()  # e.g. a profiler
    proc = subprocess.Popen([*wrapper, *command], stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    try:
        base = wait_until_serving(url)
        return asyncio.run(run_client(url, base, jobs, args))
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
        offline = run_offline(model_dir, adapters, jobs, args)
        served, ttfts = run_server(model_dir, adapters, jobs, args, Path(tmp))

    ttfts.sort()
    print(f"model {model_dir.name}, {args.num_requests} requests over base + {len(adapters)} adapters, prompt "
          f"{args.prompt_len}, output {args.output_len}, fp32 CPU, torch {torch.__version__}")
    print("| path | generated tok/s |\n|---|---|")
    print(f"| LLM.generate (offline) | {offline:.1f} |")
    print(f"| loraplex serve, concurrent streaming requests | {served:.1f} |")
    print(f"ratio server / offline: {served / offline:.2f}x; time to first token median "
          f"{statistics.median(ttfts):.3f} s, p90 {ttfts[int(0.9 * (len(ttfts) - 1))]:.3f} s")


if __name__ == "__main__":
    main()
