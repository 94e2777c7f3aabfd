"""Decode throughput of a batch of 32 where 0, 8 and 32 sequences are JSON-schema constrained.

    python benchmarks/structured_outputs.py [MODEL_DIR]   # default: the demo model

Each sequence samples 64 tokens (temperature 1, seeded, ignore_eos) from the same prompt; the constrained
ones follow a schema (an array of at least 40 objects) that stays open for all 64 tokens, so every step
fills and applies their token masks. Output tokens per second of the whole batch, median of 3 runs,
after a warm-up that compiles the schema.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

SCHEMA = {"type": "array", "minItems": 40, "items": {
    "type": "object", "properties": {"name": {"type": "string", "pattern": "[a-z]{1,8}"}, "n": {"type": "integer"}},
    "required": ["name", "n"], "additionalProperties": False}}


def main() -> None:
    from loraplex import LLM, SamplingParams
    from loraplex.engine.guided import Guide
    from loraplex.models.demo import write_demo_model

    with tempfile.TemporaryDirectory() as tmp:
        model = sys.argv[1] if len(sys.argv) > 1 else str(write_demo_model(Path(tmp) / "demo", adapters=False))
        llm = LLM(model=model, dtype="float32", device="cpu", max_model_len=512, kv_cache_memory="256MiB")
    guide = Guide.of_schema(SCHEMA, "guided_json")
    llm.generate("warm up", SamplingParams(max_tokens=4, guide=guide))
    prompts = ["List some items as JSON."] * 32
    rates = {}
    for _ in range(3):
        for k in (0, 8, 32):
            params = [SamplingParams(max_tokens=64, temperature=1.0, seed=i, ignore_eos=True,
                                     guide=guide if i < k else None) for i in range(32)]
            start = time.perf_counter()
            outputs = llm.generate(prompts, params)
            elapsed = time.perf_counter() - start
            rates.setdefault(k, []).append(sum(len(o.token_ids) for o in outputs) / elapsed)
    base = statistics.median(rates[0])
    print(f"{Path(model).name}\n| constrained of 32 | output tokens/s | vs none |\n|---|---|---|")
    for k, values in rates.items():
        rate = statistics.median(values)
        print(f"| {k} | {rate:.0f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
