"""Offline throughput on a CPU that other programs share: torch's thread settings, idle and beside a hog.

Each configuration runs in a fresh process (OpenMP reads its wait policy once, when torch loads it):
the engine generates the same greedy batch, and the child reports decoded tokens per second (the model
load excluded). "hog" runs one busy Python process per available core beside it, as other programs on a
shared machine would. Configurations and conditions are interleaved, round after round, and the median
of the rounds is reported, so that drifting load on the machine touches every row alike.

    python benchmarks/shared_cpu.py                      # SmolLM2 (the default model), 8 prompts x 32 tokens
    python benchmarks/shared_cpu.py --model tiny --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

CHILD = r"""
import json, os, sys, time
from loraplex import LLM, SamplingParams
options = json.loads(sys.argv[1])
model = options.pop("model")
llm = LLM(model=model, **options) if model != "tiny" else None
if llm is None:
    from loraplex.llm import tiny_demo_model
    from loraplex.config import EngineConfig
    llm = LLM(model=str(tiny_demo_model(EngineConfig()).path), **options)
prompts = [f"Story {i}: once upon a time, in a town by the sea," for i in range(int(os.environ["BENCH_PROMPTS"]))]
params = SamplingParams(max_tokens=int(os.environ["BENCH_TOKENS"]), temperature=0, ignore_eos=True)
llm.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0))  # warm-up
start = time.perf_counter()
outputs = llm.generate(prompts, params)
elapsed = time.perf_counter() - start
import torch
print(json.dumps({"tokens_per_s": sum(len(o.token_ids) for o in outputs) / elapsed,
                  "threads": torch.get_num_threads()}))
"""

HOG = "while True: pass"


def configurations(cores: int) -> dict[str, tuple[dict, dict]]:
    """name -> (engine options, environment)."""
    configs = {
        "torch default (old)": ({"threads_unset": True}, {}),
        f"threads={cores}, passive wait": ({"threads": cores}, {"OMP_WAIT_POLICY": "PASSIVE"}),
        "threads=1": ({"threads": 1}, {}),
    }
    if cores > 2:
        configs[f"threads={cores - 1}, passive wait"] = ({"threads": cores - 1}, {"OMP_WAIT_POLICY": "PASSIVE"})
    if cores > 1:
        configs[f"threads={cores}, active wait"] = ({"threads": cores}, {"OMP_WAIT_POLICY": "ACTIVE"})
    return configs


def run_child(model: str, options: dict, env: dict, prompts: int, tokens: int, timeout: float) -> dict:
    options = {k: v for k, v in options.items() if k != "threads_unset"}
    child_env = {**os.environ, **env, "BENCH_PROMPTS": str(prompts), "BENCH_TOKENS": str(tokens)}
    for name in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY"):  # only what the configuration sets
        if name not in env:
            child_env.pop(name, None)
    result = subprocess.run([sys.executable, "-c", CHILD, json.dumps({"model": model, **options})],
                            env=child_env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a checkpoint dir, or 'tiny' (default: the default model)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one child may take")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    configs = configurations(cores)
    results: dict[tuple[str, str], list[float]] = {}
    threads: dict[str, int] = {}
    for round_index in range(args.rounds):
        for condition in ("idle", "hog"):
            hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(cores)] if condition == "hog" else []
            try:
                time.sleep(0.5 if hogs else 0)
                for name, (options, env) in configs.items():
                    out = run_child(args.model, options, env, args.prompts, args.tokens, args.timeout)
                    results.setdefault((name, condition), []).append(out["tokens_per_s"])
                    threads[name] = out["threads"]
                    print(f"round {round_index + 1} {condition:4} {name:28} {out['tokens_per_s']:8.1f} tok/s",
                          file=sys.stderr, flush=True)
            finally:
                for hog in hogs:
                    hog.kill()
                    hog.wait()
    print(f"{args.model or 'default model'}, {platform.machine()}, {cores} cores available, {args.prompts} prompts "
          f"x {args.tokens} tokens, median of {args.rounds} rounds")
    print("| configuration | torch threads | idle tok/s | with a hog tok/s | hog / idle |")
    print("|---|---|---|---|---|")
    for name in configs:
        idle = statistics.median(results[(name, "idle")])
        hog = statistics.median(results[(name, "hog")])
        print(f"| {name} | {threads[name]} | {idle:.1f} | {hog:.1f} | {hog / idle:.2f}x |")


if __name__ == "__main__":
    main()
