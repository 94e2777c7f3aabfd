"""Decode throughput by adapter kind, side by side in one run: base only, 32 rank-16 LoRAs, 32 DoRA
adapters (the same LoRA weights plus magnitude vectors) and 32 sparse deltas at 0.5% density.

    python benchmarks/adapter_kinds_throughput.py                         # demo model, CPU, fp32
    python benchmarks/adapter_kinds_throughput.py --shape smollm2-135m    # a random model of that shape

Every adapter adapts q/k/v/o of every layer. Requests spread round-robin over the adapters; each
decodes --output-len tokens (greedy, EOS ignored) after a --prompt-len prompt. One engine per row, all
built first; then --repeats rounds, each timing every row once in turn (so a slow spell of a shared
machine falls on all rows alike); each row reports its median. Reported: generated tokens per second
and the ratio to base only.
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
from multi_lora_throughput import SHAPES, TARGETS, attention_shapes, make_adapters, make_random_model
from safetensors.torch import load_file, save_file

from loraplex.adapters_store.sparse_format import SparseDelta, write_sparse_delta


def make_dora(directory: Path, loras: dict[str, Path]) -> dict[str, Path]:
    """Each LoRA again with use_dora and a magnitude vector of random row norms."""
    adapters = {}
    for i, (name, path) in enumerate(loras.items()):
        tensors = load_file(str(path / "adapter_model.safetensors"))
        g = torch.Generator().manual_seed(3000 + i)
        for key in [k for k in tensors if k.endswith("lora_B.weight")]:
            out_features = tensors[key].shape[0]
            tensors[key.replace("lora_B.weight", "lora_magnitude_vector")] = (
                0.5 + torch.rand(out_features, generator=g)).half()
        out = directory / f"dora-{i}"
        out.mkdir(parents=True)
        save_file(tensors, str(out / "adapter_model.safetensors"))
        config = json.loads((path / "adapter_config.json").read_text())
        (out / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
        adapters[name.replace("lora", "dora")] = out
    return adapters


def make_sparse(directory: Path, model_dir: Path, count: int, density: float) -> dict[str, Path]:
    cfg, shapes = attention_shapes(model_dir)
    adapters = {}
    for i in range(count):
        g = torch.Generator().manual_seed(2000 + i)
        deltas = {}
        for layer in range(cfg["num_hidden_layers"]):
            for module in TARGETS:
                out_f, in_f = shapes[module]
                keep = torch.rand(out_f, in_f, generator=g) < density
                csr = (torch.randn(out_f, in_f, generator=g) * 0.01 * keep).to_sparse_csr()
                deltas[f"model.layers.{layer}.self_attn.{module}"] = SparseDelta(
                    crow=csr.crow_indices(), col=csr.col_indices(), values=csr.values(), shape=(out_f, in_f))
        adapters[f"sparse-{i}"] = write_sparse_delta(deltas, directory / f"sparse-{i}", model_dir.name)
    return adapters


def make_engine(model_dir: Path, adapters: dict[str, Path], args):
    from loraplex import LLM, SamplingParams

    llm = LLM(model=str(model_dir), dtype=args.dtype, device=args.device, kernel_backend=args.kernel_backend,
              max_num_seqs=args.num_requests, max_model_len=args.prompt_len + args.output_len,
              enable_prefix_caching=False, max_loras=max(len(adapters), 1), max_lora_rank=args.rank,
              max_cpu_adapters=max(len(adapters), 1), adapters=adapters)
    names = list(adapters) or [None]
    llm.generate([[5, 6, 7]] * len(names), SamplingParams(max_tokens=2, temperature=0), adapter=names)  # warm
    return llm


def decode_rate(llm, prompts, names, args) -> float:
    from loraplex import SamplingParams

    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, adapter=names)
    elapsed = time.perf_counter() - start
    assert all(len(o.token_ids) == args.output_len for o in outputs)
    return len(prompts) * args.output_len / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), help="a random model of this shape (default: demo)")
    parser.add_argument("--num-requests", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--density", type=float, default=0.005)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--kernel-backend", default="auto", choices=["auto", "torch", "triton"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.shape:
            model_dir = make_random_model(tmp, args.shape)
        else:
            from loraplex.models.demo import write_demo_model

            model_dir = write_demo_model(tmp / "demo", adapters=False)
        loras = make_adapters(tmp / "lora", model_dir, args.adapters, args.rank)
        kinds = {"LoRA rank 16": loras, "DoRA rank 16": make_dora(tmp / "dora", loras),
                 f"sparse {args.density:.1%}": make_sparse(tmp / "sparse", model_dir, args.adapters, args.density)}
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(5, 1000, (args.num_requests, args.prompt_len), generator=g).tolist()
        engines = {"base only": (make_engine(model_dir, {}, args), [None] * len(prompts))}
        for label, adapters in kinds.items():
            names = list(adapters)
            spread = [names[i % len(names)] for i in range(len(prompts))]
            engines[label] = (make_engine(model_dir, adapters, args), spread)
        rates: dict[str, list[float]] = {label: [] for label in engines}
        for _ in range(args.repeats):
            for label, (llm, names) in engines.items():
                rates[label].append(decode_rate(llm, prompts, names, args))
        rows = [(label, statistics.median(r)) for label, r in rates.items()]
    print(f"{args.shape or 'demo'} model, {args.device} ({platform.processor() or platform.machine()}), "
          f"{args.dtype}, {args.num_requests} requests x {args.output_len} tokens, {args.adapters} adapters each")
    print("| adapters | tokens/s | vs base only |")
    print("|---|---|---|")
    for label, rate in rows:
        print(f"| {label} | {rate:.1f} | {rate / rows[0][1]:.2f}x |")


if __name__ == "__main__":
    main()
