"""What one streamed output costs the engine, by how long the request has run.

    python benchmarks/streamed_output_cost.py

Every step, the engine makes an output for each running request it streams (`OutputState.make_output`).
This times that call for a request that has already produced N tokens (with logprobs), on the demo
model: it should not grow with N.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path


def main() -> None:
    from loraplex import LLM, SamplingParams
    from loraplex.engine.output import TokenLogprob
    from loraplex.models.demo import write_demo_model

    with tempfile.TemporaryDirectory() as tmp:
        llm = LLM(model=str(write_demo_model(Path(tmp) / "demo", adapters=False)), device="cpu")
    engine = llm.engine
    state = engine._requests[engine.add_request("hello", SamplingParams(max_tokens=8, logprobs=1))]
    seq = state.seq
    print("| output tokens so far | µs per streamed output |\n|---|---|")
    for n in (1000, 8000, 32000):
        # The request's state after n tokens: ids, logprobs and text as the engine keeps them.
        del seq.token_ids[seq.num_prompt_tokens :]
        seq.token_ids += [5] * n
        state.logprobs[:] = [TokenLogprob(5, -1.0, [(5, -1.0)])] * n
        state.text = "word" * n
        calls = 2000
        start = time.perf_counter()
        for _ in range(calls):
            state.make_output()
        print(f"| {n} | {(time.perf_counter() - start) / calls * 1e6:.1f} |")


if __name__ == "__main__":
    main()
