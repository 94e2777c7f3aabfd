"""Decode speed against the memory-bandwidth floor, on a model of a real shape with random weights.

    python benchmarks/shaped_model.py /tmp/l8b && python benchmarks/decode_floor.py /tmp/l8b --device cuda

For each batch size, the time of one decode step is measured as (time of a run generating 1 + N
tokens − time of a run generating 1) / N, both after a warm-up; the floor is the bytes one step must
read (every weight once, except the embedding, of which one row per sequence; and the KV cache of
every sequence at the mean context of the decode) over the copy bandwidth measured first (a device
copy of 2 GiB, bytes read plus written). Reported: tokens/s, step time, floor, floor / step (the
share of the floor reached). Then the same batch with every sequence on one of --adapters distinct
rank-16 adapters (all copies of the shaped model's `adapters/r16`), against the same batch on the base.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30, repeats: int = 20) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read and written."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * nbytes / statistics.median(times)


def step_bytes(model, batch: int, context: float, dtype_bytes: int) -> float:
    config = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.model.embed_tokens.weight
    weights -= embed.numel() * embed.element_size() - batch * embed.shape[1] * embed.element_size()
    kv_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * dtype_bytes
    return weights + batch * context * kv_per_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a directory from benchmarks/shaped_model.py")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batches", default="1,32,128")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=16, help="distinct adapters for the adapter rows (0: none)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    from loraplex import LLM, SamplingParams

    device = torch.device(args.device)
    bandwidth = copy_bandwidth(device)
    batches = [int(b) for b in args.batches.split(",")]
    adapters = {f"a{i}": str(args.model / "adapters" / "r16") for i in range(args.adapters)}
    llm = LLM(model=str(args.model), load_format="dummy", dtype=args.dtype, device=args.device,
              max_num_seqs=max(batches), max_model_len=args.prompt_len + args.decode_tokens + 8,
              enable_prefix_caching=False, max_loras=max(args.adapters, 1), max_cpu_adapters=max(args.adapters, 1),
              max_lora_rank=16, adapters=adapters)
    model = llm.engine.model
    dtype_bytes = torch.finfo(model.model.embed_tokens.weight.dtype).bits // 8
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)

    def timed(prompts, tokens: int, names) -> float:
        params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, adapter=names)
        torch.cuda.synchronize(device)
        assert all(len(o.token_ids) == tokens for o in outputs)
        return time.perf_counter() - start

    rows = []
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + written); {torch.cuda.get_device_name(device)}")
    print(f"{'batch':>5} {'adapters':>8} {'tok/s':>9} {'step ms':>8} {'floor ms':>8} {'of floor':>8}")
    for batch in batches:
        for n_adapters in sorted({0, args.adapters} if args.adapters else {0}):
            prompts = torch.randint(3, vocab, (batch, args.prompt_len), generator=g).tolist()
            names = None if n_adapters == 0 else [f"a{i % n_adapters}" for i in range(batch)]
            timed(prompts, 4, names)  # warm-up: compiles this batch's kernels, loads the adapters
            steps = []
            for _ in range(args.repeats):
                short = timed(prompts, 1, names)
                long = timed(prompts, 1 + args.decode_tokens, names)
                steps.append((long - short) / args.decode_tokens)
            step = statistics.median(steps)
            floor = step_bytes(model, batch, args.prompt_len + args.decode_tokens / 2, dtype_bytes) / bandwidth
            row = {"batch": batch, "adapters": n_adapters, "tokens_per_s": batch / step, "step_ms": step * 1e3,
                   "floor_ms": floor * 1e3, "of_floor": floor / step}
            rows.append(row)
            print(f"{batch:>5} {n_adapters:>8} {row['tokens_per_s']:>9.1f} {row['step_ms']:>8.2f} "
                  f"{row['floor_ms']:>8.2f} {row['of_floor']:>8.0%}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"bandwidth_bytes_per_s": bandwidth, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
