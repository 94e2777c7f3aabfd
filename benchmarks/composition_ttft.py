"""Time to first token of a per-request composition against a single adapter, on a live server.

    python benchmarks/composition_ttft.py                 # SmolLM2-135M-Instruct and its demo adapters
    python benchmarks/composition_ttft.py --model DIR --adapter a=PATH ... --compose a,b,c,d

`loraplex serve` runs in a subprocess (CPU, fp32) with the demo adapters pirate, shout, json and the
pirate run's step-20 checkpoint. For each of: the single adapter `pirate`, and the linear composition
`pirate*0.4+shout*0.3+json*0.2+pirate-step-20*0.1` (exact: the factors concatenated, rank 4+4+8+4), it
sends one streamed chat request cold (the first request naming it: the adapter is read from disk, or the
composition built from its inputs' files) and then --repeats warm ones, one at a time, and reports the
TTFT (request sent -> first content token received) of the cold request and the median of the warm ones.
Cold means different work for the two: `--adapter` registration reads and validates an adapter at
start, so the single adapter's cold request only copies it into a device slot; the composition's cold
request reads its four inputs from disk (checksums, validation), concatenates them, checks the result's
rank and norms, and copies it into a slot.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from live_server import free_port, wait_until_serving

DEMO = Path(__file__).resolve().parent.parent / "loraplex" / "demo_adapters"
QUESTION = "What is the capital of France?"


def ttft(url: str, model: str) -> float:
    body = {"model": model, "stream": True, "temperature": 0, "max_tokens": 8,
            "messages": [{"role": "user", "content": QUESTION}]}
    start = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"]
            if delta.get("content"):
                return time.perf_counter() - start
    raise RuntimeError(f"{model}: no content token")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (default: SmolLM2-135M-Instruct with its demo adapters)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--single", default="pirate")
    parser.add_argument("--composition", default="pirate*0.4+shout*0.3+json*0.2+pirate-step-20*0.1")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    adapters = args.adapter or [f"{n}={DEMO / n}" for n in ("pirate", "shout", "json")] + [
        f"pirate-step-20={DEMO / 'checkpoints' / 'pirate-step-20'}"]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "loraplex.cli", "serve", "--port", str(port), "--device", "cpu",
               "--dtype", "float32", "--max-lora-rank", "32", *[f"--adapter={a}" for a in adapters]]
    if args.model:
        command += ["--model", args.model]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            base = wait_until_serving(url, 600)
            ttft(url, base)  # the first request of the process (not measured)
            rows = []
            for label, model in (("single adapter", args.single), ("composition of 4", args.composition)):
                cold = ttft(url, model)
                warm = [ttft(url, model) for _ in range(args.repeats)]
                rows.append((label, model, cold, statistics.median(warm)))
        finally:
            proc.terminate()
            proc.wait(30)
    print("| request | model | cold TTFT (s) | warm TTFT median (s) |")
    print("|---|---|---|---|")
    for label, model, cold, warm in rows:
        print(f"| {label} | `{model}` | {cold:.3f} | {warm:.3f} |")
    single, composed = rows
    print(f"\ncomposition / single: cold {composed[2] / single[2]:.2f}x, warm {composed[3] / single[3]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
