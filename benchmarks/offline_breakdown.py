"""Where the offline benchmark's time goes: loraplex's engine split into its parts, and the torch-op
floor of a decode step.

    python benchmarks/offline_breakdown.py [--runs 5]

Runs the workload of offline_throughput.py (the demo model, 64 requests, prompt 128, output 128,
greedy) and times, per run: prompt steps (model forward), decode steps (model forward), logits and
sampling, step preparation, and the rest of the engine step. Then it times the decode-step floor:
the same torch ops a decode step runs on this model (norms, fused projections, rotary, cache
writes, SDPA over a contiguous cache, MLP, logits, argmax) for 127 steps at contexts 129..255, with
no engine, no modules and no Python bookkeeping. Minimum and median over the runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from offline_throughput import make_prompts  # noqa: E402


def engine_parts(model_dir: Path, runs: int) -> list[dict[str, float]]:
    from loraplex import LLM, SamplingParams
    from loraplex.engine import model_runner
    from loraplex.engine.sampling import Sampler
    from loraplex.models.llama import LlamaForCausalLM

    llm = LLM(model=str(model_dir), dtype="float32", device="cpu", max_model_len=256, max_num_seqs=64,
              enable_prefix_caching=False)
    prompts = make_prompts(llm.engine.model.config.vocab_size, 64, 128, 0)
    params = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    times: dict[str, float] = defaultdict(float)

    def timed(owner, name: str, part) -> None:
        """Wrap owner.name so that its time adds to times[part(args)]: the real code runs."""
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            result = original(*args, **kwargs)
            times[part(*args)] += time.perf_counter() - start
            return result

        setattr(owner, name, wrapper)

    timed(model_runner.ModelRunner, "prepare", lambda *a: "prepare")
    timed(LlamaForCausalLM, "forward", lambda _, ids, pos, meta, *a: "decode forward" if meta.max_query_len == 1
          else "prompt forward")
    timed(LlamaForCausalLM, "compute_logits", lambda *a: "logits + sampling")
    timed(Sampler, "__call__", lambda *a: "logits + sampling")
    rows = []
    for _ in range(runs):
        times.clear()
        start = time.perf_counter()
        llm.generate(prompts, params)
        total = time.perf_counter() - start
        rows.append({"total": total, **times, "rest of the engine": total - sum(times.values())})
    return rows


def decode_floor(config: dict, runs: int) -> list[float]:
    """127 decode steps of batch 64 as bare torch ops, on random weights of the model's shapes."""
    g = torch.Generator().manual_seed(0)
    batch, hidden, inter = 64, config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim, vocab, cap = hidden // heads, config["vocab_size"], 320
    q_size, kv_size = heads * head_dim, kv_heads * head_dim

    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.05

    layers = [dict(qkv=w(q_size + 2 * kv_size, hidden), o=w(hidden, q_size), gate_up=w(2 * inter, hidden),
                   down=w(hidden, inter), paged_k=torch.zeros(1 << 18, kv_heads, head_dim),
                   paged_v=torch.zeros(1 << 18, kv_heads, head_dim), k=w(batch, kv_heads, cap, head_dim),
                   v=w(batch, kv_heads, cap, head_dim), norm1=torch.ones(hidden), norm2=torch.ones(hidden))
              for _ in range(config["num_hidden_layers"])]
    embed, cos, sin = w(vocab, hidden), w(batch, 1, head_dim), w(batch, 1, head_dim)
    paged_slots = torch.randperm(1 << 18, generator=g)[:batch]

    def norm(x, weight):
        ms = torch.linalg.vecdot(x, x).unsqueeze_(-1).div_(hidden)
        return (x * ms.add_(1e-5).rsqrt_()).mul_(weight)

    def step(length, ids, slots):
        x = embed[ids]
        for layer in layers:
            qkv = F.linear(norm(x, layer["norm1"]), layer["qkv"])
            qk = qkv[:, : q_size + kv_size].view(batch, heads + kv_heads, head_dim)
            qk = (qk * cos).add_(qk.roll(head_dim // 2, -1).mul_(sin))
            q, k = qk[:, :heads], qk[:, heads:]
            v = qkv[:, q_size + kv_size :].view(batch, kv_heads, head_dim)
            layer["paged_k"].index_copy_(0, paged_slots, k)
            layer["paged_v"].index_copy_(0, paged_slots, v)
            layer["k"].view(-1, head_dim).index_copy_(0, slots, k.reshape(-1, head_dim))
            layer["v"].view(-1, head_dim).index_copy_(0, slots, v.reshape(-1, head_dim))
            out = F.scaled_dot_product_attention(q.view(batch, kv_heads, heads // kv_heads, head_dim),
                                                 layer["k"][:, :, :length], layer["v"][:, :, :length])
            x += F.linear(out.reshape(batch, q_size), layer["o"])
            gate, up = F.linear(norm(x, layer["norm2"]), layer["gate_up"]).chunk(2, -1)
            x.add_(F.linear(F.silu(gate, inplace=True).mul_(up), layer["down"]))
        return F.linear(norm(x, torch.ones(hidden)), embed).max(-1).indices

    times = []
    for _ in range(runs):
        ids = torch.randint(0, vocab, (batch,), generator=g)
        start = time.perf_counter()
        for length in range(129, 256):
            starts = torch.arange(batch) * (kv_heads * cap) + (length - 1)
            slots = (starts.unsqueeze(1) + torch.arange(kv_heads) * cap).flatten()
            ids = step(length, ids, slots)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    import json

    from loraplex.models.demo import write_demo_model

    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        model_dir = write_demo_model(Path(tmp) / "demo", adapters=False)
        config = json.loads((model_dir / "config.json").read_text())
        rows = engine_parts(model_dir, args.runs)
        floor = decode_floor(config, args.runs)
    print(f"demo model, 64 requests, prompt 128, output 128, fp32 CPU, {torch.get_num_threads()} threads, "
          f"{args.runs} runs (seconds: min / median)")
    print("| part | min | median |\n|---|---|---|")
    for key in rows[0]:
        values = [r.get(key, 0.0) for r in rows]
        print(f"| {key} | {min(values):.3f} | {statistics.median(values):.3f} |")
    print(f"| decode-step op floor, 127 steps (no engine) | {min(floor):.3f} | {statistics.median(floor):.3f} |")


if __name__ == "__main__":
    main()
