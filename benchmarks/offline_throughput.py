"""Offline throughput: loraplex's engine against `transformers.generate` on the same model, one run.

    python benchmarks/offline_throughput.py                      # the demo model, CPU, fp32
    python benchmarks/offline_throughput.py --model DIR --num-requests 64 --prompt-len 128 --output-len 128

Both sides get the same random prompts (token ids, fixed seed), greedy decoding, EOS ignored, so
both produce exactly num_requests * output_len tokens. Both engines are loaded and warmed up in one
process, then run alternately --repeats times; reported are each engine's median rate and the
median of the per-pair ratios.
transformers runs static batches of --hf-batch-size prompts (default: all of them); loraplex gets
all requests at once and batches them continuously. Reported: generated tokens per second, and the ratio.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch


def make_prompts(vocab_size: int, num: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # Skip the lowest ids, where the demo tokenizer keeps its special tokens.
    return torch.randint(16, vocab_size, (num, length), generator=g).tolist()


def loraplex_runner(model_dir: Path, prompts, output_len: int, args):
    """A warmed-up callable that generates every prompt once and returns the tokens it produced."""
    from loraplex import LLM, SamplingParams

    llm = LLM(model=str(model_dir), dtype=args.dtype, device=args.device,
              max_model_len=len(prompts[0]) + output_len, max_num_seqs=max(len(prompts), 1),
              enable_prefix_caching=False)
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm-up

    def run() -> int:
        outputs = llm.generate(prompts, params)
        assert all(len(o.token_ids) == output_len for o in outputs)
        return sum(len(o.token_ids) for o in outputs)

    return run


def transformers_runner(model_dir: Path, prompts, output_len: int, args):
    from transformers import AutoModelForCausalLM

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(args.device).eval()
    batch = args.hf_batch_size or len(prompts)

    def generate(ids: torch.Tensor, n: int) -> torch.Tensor:
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, min_new_tokens=n,
            eos_token_id=None, pad_token_id=0,
        )

    with torch.inference_mode():
        generate(torch.tensor(prompts[:2], device=args.device), 4)  # warm-up

    def run() -> int:
        produced = 0
        with torch.inference_mode():
            for i in range(0, len(prompts), batch):
                ids = torch.tensor(prompts[i : i + batch], device=args.device)
                produced += (generate(ids, output_len).shape[1] - ids.shape[1]) * ids.shape[0]
        assert produced == len(prompts) * output_len
        return produced

    return run


def timed(run) -> float:
    start = time.perf_counter()
    produced = run()
    return produced / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: a fresh demo model)")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--hf-batch-size", type=int, default=0, help="static batch size (0 = all at once)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="runs per engine; the median is reported")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            from loraplex.models.demo import write_demo_model

            model_dir = write_demo_model(Path(tmp) / "demo", adapters=False)
        import json

        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        prompts = make_prompts(vocab, args.num_requests, args.prompt_len, args.seed)
        runners = (loraplex_runner(model_dir, prompts, args.output_len, args),
                   transformers_runner(model_dir, prompts, args.output_len, args))
        # Alternate the engines, so that both meet the same machine (a shared one drifts by 10%
        # and more from minute to minute); each pair gives one ratio.
        rates = [[timed(run) for run in runners] for _ in range(args.repeats)]
        ours = statistics.median(r[0] for r in rates)
        theirs = statistics.median(r[1] for r in rates)
        ratio = statistics.median(r[0] / r[1] for r in rates)

    print(f"model {model_dir.name}, {args.num_requests} requests, prompt {args.prompt_len}, median of {args.repeats}, "
          f"output {args.output_len}, {args.dtype} on {args.device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__})")
    print("| engine | generated tok/s |\n|---|---|")
    static = args.hf_batch_size or args.num_requests
    print(f"| loraplex | {ours:.1f} |\n| transformers.generate (static batch {static}) | {theirs:.1f} |")
    print(f"ratio loraplex / transformers (median of the {args.repeats} side-by-side pairs): {ratio:.2f}x; "
          f"per pair: {', '.join(f'{a / b:.2f}' for a, b in rates)}")


if __name__ == "__main__":
    main()
