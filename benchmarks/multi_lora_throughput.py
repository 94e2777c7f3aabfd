"""Multi-adapter throughput: many distinct LoRA adapters in one batch, side by side in one run.

    python benchmarks/multi_lora_throughput.py                         # demo model, CPU, fp32
    python benchmarks/multi_lora_throughput.py --shape smollm2-135m    # a random model of that shape
    python benchmarks/multi_lora_throughput.py --device cuda --dtype bfloat16   # on a GPU

Every request decodes `--output-len` tokens (greedy, EOS ignored) after a `--prompt-len` prompt;
each loraplex row is the median of `--repeats` runs on one engine.
Rows: loraplex with no adapter (the base line), loraplex with 1 / 8 / 64 / 256 distinct rank-16
adapters spread uniformly or skewed (adapter index = floor(n * u^(1/alpha)) with alpha 0.3, the
S-LoRA power law) over the requests, and peft's mixed-adapter batch inference
(`generate(adapter_names=...)`, one static batch) on the same workload for the adapter counts named
by --peft-adapters. Reported: generated tokens per second, and ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def make_random_model(directory: Path, shape: str) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraplex.models.demo import write_demo_model

    demo = write_demo_model(directory / "demo-tokenizer", adapters=False)  # borrow its tokenizer files
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=2048, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path = directory / shape
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (path / name).write_bytes((demo / name).read_bytes())
    return path


def attention_shapes(model_dir: Path) -> tuple[dict, dict[str, tuple[int, int]]]:
    """The model's config.json, and (out, in) of each attention projection."""
    cfg = json.loads((model_dir / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    hidden = cfg["hidden_size"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    return cfg, {"q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, q)}


def make_adapters(directory: Path, model_dir: Path, count: int, rank: int) -> dict[str, Path]:
    cfg, shapes = attention_shapes(model_dir)
    adapters = {}
    for i in range(count):
        g = torch.Generator().manual_seed(1000 + i)
        tensors = {}
        for layer in range(cfg["num_hidden_layers"]):
            for module in TARGETS:
                out_f, in_f = shapes[module]
                prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
                tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, in_f, generator=g) / in_f**0.5).half()
                tensors[f"{prefix}.lora_B.weight"] = (torch.randn(out_f, rank, generator=g) * 0.01).half()
        path = directory / f"lora-{i}"
        path.mkdir(parents=True)
        save_file(tensors, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
            "target_modules": list(TARGETS), "lora_dropout": 0.0, "bias": "none",
            "base_model_name_or_path": model_dir.name,
        }))
        adapters[f"lora-{i}"] = path
    return adapters


def assign(num_requests: int, num_adapters: int, skewed: bool, seed: int) -> list[int]:
    if not skewed:
        return [i % num_adapters for i in range(num_requests)]
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(num_requests, generator=g)
    return (num_adapters * u.pow(1 / 0.3)).floor().long().clamp(max=num_adapters - 1).tolist()


def run_loraplex(model_dir: Path, prompts, adapters: dict[str, Path], names: list[str | None], args) -> float:
    from loraplex import LLM, SamplingParams

    used = {n for n in names if n is not None}
    llm = LLM(model=str(model_dir), dtype=args.dtype, device=args.device, kernel_backend=args.kernel_backend,
              max_num_seqs=len(prompts),
              max_model_len=args.prompt_len + args.output_len, enable_prefix_caching=False,
              max_loras=max(len(used), 1), max_lora_rank=args.rank, max_cpu_adapters=max(len(used), 1),
              adapters={n: adapters[n] for n in used})
    warm = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    llm.generate(prompts[:4], warm, adapter=names[:4])
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    rates = []
    for _ in range(args.repeats):  # the median of several runs: one run is short and a noisy machine shows
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, adapter=names)
        elapsed = time.perf_counter() - start
        assert all(len(o.token_ids) == args.output_len for o in outputs)
        rates.append(len(prompts) * args.output_len / elapsed)
    return statistics.median(rates)


def run_peft(model_dir: Path, prompts, adapters: dict[str, Path], names: list[str], args) -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    base.generation_config.eos_token_id = None
    used = sorted(set(names))
    model = PeftModel.from_pretrained(base, adapters[used[0]], adapter_name=used[0])
    for name in used[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    ids = torch.tensor(prompts, device=args.device)
    with torch.inference_mode():
        _sync(args.device)
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names,
                             do_sample=False, max_new_tokens=args.output_len, min_new_tokens=args.output_len,
                             pad_token_id=0)
        _sync(args.device)
        elapsed = time.perf_counter() - start
    assert out.shape[1] - ids.shape[1] == args.output_len
    return len(prompts) * args.output_len / elapsed


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), help="a random model of this shape (default: demo)")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="loraplex runs per row; the median is reported")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--adapter-counts", default="1,8,64,256")
    parser.add_argument("--peft-adapters", default="8,64", help="adapter counts to also run with peft")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--kernel-backend", default="auto", choices=["auto", "torch", "triton"])
    args = parser.parse_args()
    counts = [int(c) for c in args.adapter_counts.split(",")]
    peft_counts = [int(c) for c in args.peft_adapters.split(",") if c]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.shape:
            model_dir = make_random_model(tmp, args.shape)
        else:
            from loraplex.models.demo import write_demo_model

            model_dir = write_demo_model(tmp / "demo", adapters=False)
        adapters = make_adapters(tmp / "adapters", model_dir, max(counts), args.rank)
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(16, vocab, (args.num_requests, args.prompt_len), generator=g).tolist()

        base = run_loraplex(model_dir, prompts, adapters, [None] * len(prompts), args)
        rows = [("loraplex, base model (no adapter)", base, None)]
        for count in counts:
            for skewed in (False, True):
                idx = assign(len(prompts), count, skewed, seed=count)
                names = [f"lora-{i}" for i in idx]
                ours = run_loraplex(model_dir, prompts, adapters, names, args)
                label = f"loraplex, {count} adapters {'skewed' if skewed else 'uniform'} ({len(set(idx))} in use)"
                rows.append((label, ours, None))
                if count in peft_counts and not skewed:
                    theirs = run_peft(model_dir, prompts, adapters, names, args)
                    rows.append((f"peft generate(adapter_names=...), {count} adapters uniform", theirs, ours))

    print(f"model {model_dir.name}, {args.num_requests} requests, prompt {args.prompt_len}, output "
          f"{args.output_len}, median of {args.repeats} runs (peft: 1), rank {args.rank} on {', '.join(TARGETS)}, "
          f"{args.dtype} on {_device_name(args.device)} (torch {torch.__version__}, "
          f"kernel backend {args.kernel_backend})")
    print("| run | generated tok/s | vs base | loraplex / this |\n|---|---|---|---|")
    for label, tps, ours in rows:
        versus = f"{ours / tps:.2f}x" if ours is not None else ""
        print(f"| {label} | {tps:.1f} | {tps / base:.2f}x | {versus} |")


if __name__ == "__main__":
    main()
