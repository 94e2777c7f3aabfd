"""A load generator for OpenAI-compatible inference servers with many LoRA adapters.

It speaks the OpenAI HTTP API only (plus, to put adapters in place, loraplex's `POST /v1/adapters` or
vLLM's `POST /v1/load_lora_adapter`), so the same run drives loraplex, vLLM, SGLang or llama.cpp's
server:

    python -m loadtest --base-url http://127.0.0.1:8000/v1 --api-key KEY \\
        --adapters-from DIR --num-adapters 16 --popularity zipf:1.1 --rate 4 --duration 60

The modules, each usable alone:

- `workload`: the schedule (arrival times, adapter, prompt and output lengths), a pure function of the
  workload parameters and the seed.
- `client`: executes a schedule over HTTP (asyncio, one httpx client) into per-request records.
- `adapters`: uploads / registers the adapters a run needs, and removes them afterwards.
- `metrics`: throughput, latency percentiles, SLO attainment and goodput from the records.
- `report`: the progress line, the table, the JSON result; `plots`: the PNG figures.
- `cli`: the command line (`python -m loadtest --help`).

docs/loadtest.md describes the workloads, the measures and their definitions.
"""

__version__ = "0.1.0"
