"""Merging adapters: loraplex against PEFT's `add_weighted_adapter`, time and peak memory, side by side.

    python benchmarks/merge_vs_peft.py                    # 8 rank-16 adapters, Llama-3-8B layer shapes, 2 layers
    python benchmarks/merge_vs_peft.py --layers 1 --adapters 4

A random `LlamaForCausalLM` with Llama-3-8B's layer shapes (hidden 4096, intermediate 14336, 32 heads /
8 KV heads of 128; --layers layers, vocabulary 256) gets --adapters random LoRA adapters of rank --rank
(lora_alpha = r) on all seven projections, made by PEFT (`init_lora_weights=False`). Both sides merge the
same tensors with equal weights 1/n:
  - `svd` to rank --rank: PEFT forms each dense ΔW sum and runs `torch.linalg.svd` on it (given
    `svd_full_matrices=False`, its faster setting; its default is True); loraplex computes the same
    truncation from the factors (QR of the stacked B's and A's, SVD of the small core);
  - `ties` at density 0.5 (parameter space, on A and B: the same maths on both sides).
Each (side, method) runs in a fresh subprocess that builds the inputs, then times the merge alone;
peak memory is the highest RSS a sampling thread (every 2 ms) sees during the merge, minus the RSS
just before it. The results are checked against each other (svd: relative Frobenius difference of
ΔW; ties: max difference of A and B) on every module.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

SHAPES = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
              head_dim=128)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class PeakRSS:
    def __enter__(self) -> PeakRSS:
        self.before = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def build_peft(args):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(num_hidden_layers=args.layers, vocab_size=256, **SHAPES)
    model = LlamaForCausalLM(config).eval()
    lora = LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=TARGETS, init_lora_weights=False)
    model = get_peft_model(model, lora, adapter_name="a0")
    for i in range(1, args.adapters):
        model.add_adapter(f"a{i}", lora)
    return model


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def loraplex_inputs(model, n: int):
    from loraplex.adapters_store.formats import LoRAAdapter, LoRAModule

    adapters = [LoRAAdapter(name=f"a{i}", modules={}) for i in range(n)]
    for name, layer in lora_layers(model).items():
        parts = name.split(".")
        key = (int(parts[parts.index("layers") + 1]), parts[-1])
        for i, adapter in enumerate(adapters):
            adapter.modules[key] = LoRAModule(a=layer.lora_A[f"a{i}"].weight.detach().clone(),
                                              b=layer.lora_B[f"a{i}"].weight.detach().clone(),
                                              scale=layer.scaling[f"a{i}"])
    return adapters


def run_side(args) -> dict:
    """One (side, method) in this process: build, merge (timed), return the figures and the result."""
    torch.set_num_threads(args.threads)
    model = build_peft(args)
    n = args.adapters
    weights = [1.0 / n] * n
    if args.side == "loraplex":
        from loraplex.arithmetic import MergeParams, merge

        adapters = loraplex_inputs(model, n)
        del model
        params = MergeParams("svd", rank=args.rank) if args.method == "svd" else MergeParams("ties", density=0.5)
        with PeakRSS() as mem:
            start = time.perf_counter()
            merged = merge(adapters, weights, params, "merged")
            seconds = time.perf_counter() - start
        result = {f"{k[0]}.{k[1]}": (m.a, m.b, m.scale) for k, m in merged.modules.items()}
    else:
        kwargs = dict(svd_rank=args.rank, svd_full_matrices=False) if args.method == "svd" else dict(density=0.5)
        with PeakRSS() as mem:
            start = time.perf_counter()
            model.add_weighted_adapter([f"a{i}" for i in range(n)], weights, "merged", combination_type=args.method,
                                       **kwargs)
            seconds = time.perf_counter() - start
        result = {}
        for name, layer in lora_layers(model).items():
            parts = name.split(".")
            key = f"{parts[parts.index('layers') + 1]}.{parts[-1]}"
            result[key] = (layer.lora_A["merged"].weight.detach(), layer.lora_B["merged"].weight.detach(),
                           layer.scaling["merged"])
    torch.save(result, args.out)
    return {"seconds": seconds, "peak_extra_mib": (mem.peak - mem.before) / 2**20}


def compare(method: str, ours: dict, peft: dict) -> str:
    worst = 0.0
    for key, (a, b, s) in ours.items():
        pa, pb, ps = peft[key]
        if method == "svd":
            d, pd = s * b @ a, ps * pb @ pa
            worst = max(worst, float((d - pd).norm() / pd.norm()))
        else:
            worst = max(worst, float((a - pa).abs().max()), float((b - pb).abs().max()))
    what = "max relative Frobenius difference of ΔW" if method == "svd" else "max |difference| of A and B"
    return f"{method}: {what} over {len(ours)} modules: {worst:.2e}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--methods", default="svd,ties")
    parser.add_argument("--side", choices=["loraplex", "peft"], help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_side(args)))
        return 0
    rows, checks = [], []
    with __import__("tempfile").TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            figures = {}
            for side in ("loraplex", "peft"):
                out = f"{tmp}/{side}-{method}.pt"
                command = [sys.executable, __file__, "--side", side, "--method", method, "--out", out,
                           "--layers", str(args.layers), "--adapters", str(args.adapters), "--rank", str(args.rank),
                           "--seed", str(args.seed), "--threads", str(args.threads)]
                done = subprocess.run(command, capture_output=True, text=True, check=True)
                figures[side] = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"{method} {side}: {figures[side]}", file=sys.stderr, flush=True)
            ours, theirs = (torch.load(f"{tmp}/{side}-{method}.pt") for side in ("loraplex", "peft"))
            checks.append(compare(method, ours, theirs))
            rows.append((method, figures["loraplex"], figures["peft"]))
    print(f"{args.adapters} adapters of rank {args.rank}, {args.layers} layers of Llama-3-8B shapes, "
          f"{args.threads} threads")
    print("| method | loraplex s | PEFT s | speed-up | loraplex peak MiB | PEFT peak MiB | memory PEFT / loraplex |")
    print("|---|---|---|---|---|---|---|")
    for method, ours, peft in rows:
        print(f"| {method} | {ours['seconds']:.2f} | {peft['seconds']:.2f} | {peft['seconds'] / ours['seconds']:.1f}x "
              f"| {ours['peak_extra_mib']:.0f} | {peft['peak_extra_mib']:.0f} | "
              f"{peft['peak_extra_mib'] / max(ours['peak_extra_mib'], 1e-9):.1f}x |")
    for line in checks:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
