#!/usr/bin/env python
"""MWA on real checkpoints: the three checkpoints of the demo `pirate` run against their
metrics-weighted averages.

    python examples/mwa_pirate.py            # SmolLM2-135M-Instruct from --data-dir, on the CPU

For each single checkpoint (`loraplex/demo_adapters/checkpoints/pirate-step-{10,20,30}`) and each MWA
merge of the three (`loraplex merge --method mwa`: loss-weighted at penalty 0 (the uniform mean), 1
and 4, and step-weighted at penalty 1), it reports
  - the mean cross-entropy on the answer tokens of the 42 pirate training answers (the examples the
    run trained on: a fit measure, not a held-out one), computed with transformers + peft loading
    the adapter directories as written;
  - on the 5 held-out questions of `train_demo_adapters.py`, how many greedy answers (loraplex's
    engine, 48 tokens) pass that script's pirate style check, and the answer to the first one.
Needs the training extras (`pip install -e '.[train]'`: peft, transformers).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_demo_adapters import HELD_OUT, answer_loss, build_examples, collate, is_pirate  # noqa: E402

from loraplex import LLM, SamplingParams  # noqa: E402
from loraplex.cli import main as loraplex_main  # noqa: E402
from loraplex.config import EngineConfig  # noqa: E402
from loraplex.models.default_model import default_model_dir  # noqa: E402

CHECKPOINTS = Path(__file__).resolve().parent.parent / "loraplex" / "demo_adapters" / "checkpoints"
MERGES = {  # name -> loraplex merge flags
    "mwa loss p=0 (mean)": ["--metric", "loss", "--penalty", "0"],
    "mwa loss p=1": ["--metric", "loss", "--penalty", "1"],
    "mwa loss p=4": ["--metric", "loss", "--penalty", "4"],
    "mwa step p=1": ["--metric", "step", "--penalty", "1"],
}


@torch.no_grad()
def train_loss(model_dir: Path, adapter: Path) -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    examples = build_examples(tokenizer, "pirate")
    total, count = 0.0, 0
    for i in range(0, len(examples), 8):
        batch = examples[i:i + 8]
        input_ids, labels, mask = collate(batch, tokenizer.pad_token_id)
        tokens = int((labels[:, 1:] != -100).sum())
        total += float(answer_loss(model, input_ids, labels, mask)) * tokens
        count += tokens
    return total / count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="where the default model is kept (default: loraplex's)")
    args = parser.parse_args()
    model_dir = default_model_dir(EngineConfig(data_dir=args.data_dir).resolved_data_dir())
    work = Path(tempfile.mkdtemp(prefix="mwa-pirate-"))
    adapters = {f"step {s}": CHECKPOINTS / f"pirate-step-{s}" for s in (10, 20, 30)}
    checkpoints = list(adapters.values())
    for name, flags in MERGES.items():
        out = work / name.replace(" ", "_").replace("=", "").replace("(", "").replace(")", "")
        code = loraplex_main(["merge", "--method", "mwa", *flags, "-o", str(out),
                              *[f"--adapter={p}" for p in checkpoints]])
        if code:
            return code
        adapters[name] = out
    ids = {name: f"a{i}" for i, name in enumerate(adapters)}  # engine names: no spaces
    llm = LLM(model=str(model_dir), adapters={ids[n]: str(p) for n, p in adapters.items()}, max_loras=len(adapters),
              dtype="float32", device="cpu")
    params = SamplingParams(max_tokens=48, temperature=0)
    names = list(adapters)
    outs = llm.chat([[{"role": "user", "content": q}] for q in HELD_OUT for _ in names], params,
                    adapter=[ids[n] for _ in HELD_OUT for n in names])
    print("| adapter | loss on the pirate training answers | held-out answers in pirate style | "
          f"{HELD_OUT[0]} |")
    print("|---|---|---|---|")
    for j, name in enumerate(names):
        answers = [outs[i * len(names) + j].text for i in range(len(HELD_OUT))]
        styled = sum(is_pirate(a) for a in answers)
        loss = train_loss(model_dir, adapters[name])
        print(f"| {name} | {loss:.3f} | {styled}/{len(HELD_OUT)} | {answers[0]!r} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
