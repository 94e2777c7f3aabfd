"""LLMEngine: add_request / step / abort over the scheduler, the model runner and the tokenizer."""

from __future__ import annotations

import itertools
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from loraplex.adapters_store.formats import LoRAAdapter, load_peft_lora
from loraplex.config import EngineConfig
from loraplex.engine.adapters import AdapterManager, pinned
from loraplex.engine.block_manager import BlockManager
from loraplex.engine.compositions import Recipe, builder
from loraplex.engine.detokenizer import IncrementalDetokenizer
from loraplex.engine.guided import Grammars
from loraplex.engine.model_runner import ModelRunner, kv_cache_block_bytes
from loraplex.engine.output import OutputState, RequestOutput, TokenLogprob
from loraplex.engine.sampling import SamplingParams
from loraplex.engine.scheduler import Scheduler
from loraplex.engine.sequence import Sequence
from loraplex.engine.threads import configure_threads
from loraplex.errors import conflict, invalid, not_found
from loraplex.models.loader import load_model
from loraplex.models.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics: read between steps, or racily (each field alone) during one."""

    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_used: int  # held by a sequence (free blocks that keep a cached prefix are not used)
    adapters_on_device: int
    adapters_in_host: int
    adapter_disk_loads: int  # disk -> host reads, in the background
    adapter_device_loads: int  # host -> device slot copies
    adapter_device_evictions: int
    adapter_host_evictions: int
    compositions: int = 0  # per-request compositions registered now
    composition_builds: int = 0
    composition_hits: int = 0  # requests served by a composition built before
    compositions_dropped: int = 0  # because an input was deleted or replaced
    sparse_bytes_used: int = 0  # the sparse pool's entries held by adapters in slots
    sparse_bytes_capacity: int = 0  # 0: no pool (--max-sparse-memory 0, or no adapters)
    sparse_compactions: int = 0


class LLMEngine:
    def __init__(self, config: EngineConfig, model_dir: Path) -> None:
        self.config = config
        self.model_dir = model_dir
        self.threads = configure_threads(config.threads)
        self.device = config.resolved_device()
        self.dtype = config.resolved_dtype(self.device)
        self.model = load_model(model_dir, self.dtype, self.device, config.kernel_backend, config.load_format)
        backend = self.model.backend
        model_config = self.model.config
        self.tokenizer = Tokenizer.from_path(model_dir, model_config.eos_token_ids)
        if config.chat_template is not None:  # the file replaces the model's template
            self.tokenizer.chat_template = Path(config.chat_template).expanduser().read_text()
        self.max_model_len = self._max_model_len(model_config.max_position_embeddings)
        if self.max_model_len != model_config.max_position_embeddings:  # the loader built them for that length
            self.model.build_rope(self.device, self.max_model_len)  # (which decides LongRoPE's factors)
        self.adapters: AdapterManager | None = None
        if config.max_loras > 0:  # before sizing the KV cache, which takes a share of what is left
            self.model.enable_lora(config.max_loras, config.max_lora_rank, config.sparse_memory_bytes())
            self.adapters = AdapterManager(self.model, config.max_loras, config.max_lora_rank,
                                           config.max_cpu_adapters, self.device, config.max_compositions,
                                           config.max_sparse_density)
        num_blocks = self._num_kv_blocks()
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.adapters)
        self.runner = ModelRunner(self.model, self.block_manager, self.dtype, self.device, config.seed,
                                  config.max_num_batched_tokens, config.max_loras)
        self._requests: dict[str, OutputState] = {}  # unfinished, by request id
        self._serials = itertools.count()  # Sequence.serial
        self._next_id = 0
        self._grammars: Grammars | None = None  # structured outputs: made at first use
        self._grammars_lock = threading.Lock()
        logger.info("loaded %s (%s, %s, %s backend): %d KV blocks of %d tokens, max_model_len %d",
                    model_dir, model_config.architecture, self.dtype, backend.name, num_blocks,
                    config.block_size, self.max_model_len)

    def _max_model_len(self, max_positions: int) -> int:
        # Sliding-window layers attend to their window only, through a mask over the sequence's whole cache
        # (one block table serves every layer, so their KV is not bounded), and do not cap the length.
        requested = self.config.max_model_len
        if requested is None:
            return max_positions
        if requested > max_positions:
            raise invalid("max_model_len", f"{requested} exceeds the model's limit of {max_positions} tokens "
                          "(max_position_embeddings); lower it")
        return requested

    def _num_kv_blocks(self) -> int:
        block_bytes = kv_cache_block_bytes(self.model, self.config.block_size, self.dtype)
        num_blocks = self.config.kv_cache_bytes(self.device) // block_bytes - 1  # one pads block tables
        needed = -(-self.max_model_len // self.config.block_size)
        if self.config.kv_cache_is_share(self.device):
            # A share of a large GPU would give a small model millions of blocks (seconds to set up, memory
            # nothing can use): no more than every sequence running at max_model_len can hold at once.
            num_blocks = min(num_blocks, self.config.max_num_seqs * needed)
        if num_blocks < needed:
            raise invalid(
                "kv_cache_memory", f"{num_blocks * block_bytes} bytes hold {num_blocks} blocks of "
                f"{self.config.block_size} tokens, but one sequence of max_model_len {self.max_model_len} "
                f"needs {needed} ({(needed + 1) * block_bytes} bytes with the block that pads block tables); "
                "raise kv_cache_memory or lower max_model_len"
            )
        return num_blocks

    # -- adapters ------------------------------------------------------------------------------

    def add_adapter(self, name: str, path: str | Path, validate: bool = True, checksums: dict[str, str] | None = None,
                    preloaded: LoRAAdapter | None = None) -> LoRAAdapter | None:
        """Register a PEFT LoRA directory under `name`, replacing an earlier registration of the name.
        With `validate` it is read and checked now (and returned); otherwise at its first use, unless
        its weights come `preloaded` (from `inspect_adapter` on the same files). `checksums`
        ({file name: sha256}) are checked on every read from disk."""
        if self.adapters is None:
            raise invalid("max_loras", "is 0: this engine serves no adapters; start it with max_loras >= 1")
        validate_adapter_name(name)
        return self.adapters.register(name, path, validate=validate, checksums=checksums, preloaded=preloaded)

    def inspect_adapter(self, path: str | Path) -> LoRAAdapter:
        """Read and validate an adapter directory against this model without registering it. Touches
        no engine state, so it may run in another thread while the engine steps."""
        if self.adapters is None:
            raise invalid("max_loras", "is 0: this engine serves no adapters; start it with max_loras >= 1")
        adapter = load_peft_lora(Path(path), "inspect", self.model.config, self.config.max_lora_rank,
                                 max_sparse_density=self.config.max_sparse_density)
        self.adapters.check_fits(adapter)  # (reads only the pool's fixed capacity)
        return pinned(adapter) if self.adapters.host.pin_memory else adapter  # here, not between steps

    def remove_adapter(self, name: str) -> None:
        """Unregister an adapter: requests already running on it finish, new ones are refused."""
        if self.adapters is None or name not in self.adapters:
            raise not_found("adapter", f"{name!r} is not registered")
        self.adapters.unregister(name)

    def adapter_paths_in_use(self) -> set[Path]:
        """Directories of registered adapters, and of deleted ones that unfinished requests still use."""
        if self.adapters is None:
            return set()
        keys = {state.seq.adapter_key for state in self._requests.values() if state.seq.adapter_key}
        return self.adapters.paths_in_use(keys)

    def prepare_composition(self, recipe: Recipe) -> tuple[str, Callable[[], LoRAAdapter] | None]:
        """The name a composition is served under, and a function that builds it (safe on any thread), or
        None when it is registered already. An input that is not registered is a NOT_FOUND on the recipe's
        field."""
        if self.adapters is None:
            raise invalid("max_loras", "is 0: this engine serves no adapters; start it with max_loras >= 1")
        names = [name for name, _ in recipe.inputs]
        missing = [name for name in names if name not in self.adapters.paths]
        if missing:
            raise not_found(recipe.field, f"adapter {missing[0]!r} does not exist", code="model_not_found")
        name = recipe.name([self.adapters.key(n) for n in names])
        if self.adapters.compositions.touch(name):
            return name, None
        paths = [self.adapters.paths[n] for n in names]
        return name, builder(recipe, [self.adapters.reader(n) for n in names], paths, self.config.max_lora_rank)

    def add_composition(self, name: str, recipe: Recipe, build: Callable[[], LoRAAdapter],
                        built: LoRAAdapter) -> None:
        """Serve a composition that `prepare_composition` named and `build` built. If an input changed
        meanwhile, it is refused (the request may retry: it then composes the new inputs)."""
        if name in self.adapters:
            return  # another request built it at the same time
        names = [n for n, _ in recipe.inputs]
        if any(n not in self.adapters.paths for n in names) or \
                recipe.name([self.adapters.key(n) for n in names]) != name:
            raise conflict(recipe.field, "an input adapter was deleted or replaced while the composition was built; "
                           "send the request again")
        self.adapters.register_composition(name, names, build, built)

    def adapter_path(self, name: str) -> Path:
        """The directory a registered adapter is read from."""
        if self.adapters is None or name not in self.adapters:
            raise not_found("adapter", f"{name!r} is not registered")
        return self.adapters.paths[name]

    def adapter_names(self) -> list[str]:
        return sorted(self.adapters.paths) if self.adapters is not None else []

    # -- requests ------------------------------------------------------------------------------

    @property
    def grammars(self) -> Grammars:
        """Compiled structured-output grammars for this model's tokenizer (a bounded cache); safe from any
        thread, so that the API compiles a request's grammar (and refuses a bad one) before queueing it."""
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = Grammars(self.tokenizer, self.model.config.vocab_size)
            return self._grammars

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        adapter: str | None = None,
    ) -> str:
        """Queue a prompt (text, or token ids), on an adapter or the base model (None); returns its
        request id. Raises LoraplexError at once for a request that could never run."""
        params = params or SamplingParams()
        if adapter is not None and (self.adapters is None or adapter not in self.adapters):
            known = ", ".join(self.adapter_names()) or "none"
            raise not_found("adapter", f"{adapter!r} is not registered (registered: {known})")
        if request_id is None:
            request_id = f"req-{self._next_id}"
            self._next_id += 1
        if request_id in self._requests:
            raise conflict("request_id", f"{request_id!r} is already in use")
        if params.logit_bias:
            vocab = self.model.config.vocab_size
            bad = [t for t in params.logit_bias if not 0 <= t < vocab]
            if bad:
                raise invalid("logit_bias", f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if not isinstance(prompt, str):
            self._check_fits(len(prompt), params)  # before looking at every id of a huge list
        text, token_ids = self._tokenize(prompt)
        self._check_fits(len(token_ids), params)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        seq = Sequence(request_id, token_ids, params, params.stop_token_set(self.tokenizer.eos_token_ids), generator,
                       serial=next(self._serials))
        if params.guide is not None:  # compiled once per distinct guide, then from the cache
            seq.matcher = self.grammars.matcher(params.guide)
        if adapter is not None:
            seq.adapter = adapter
            # The key also salts the prefix cache: KV computed under one registration is never
            # reused under another, even of the same name.
            seq.adapter_key = self.adapters.key(adapter)
            self.adapters.prefetch(seq.adapter_key)
        detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens)
        self._requests[request_id] = OutputState(seq, text, detokenizer)
        self.scheduler.add(seq)
        return request_id

    def _tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt)
            text = prompt
        else:
            token_ids, text = list(prompt), None
            vocab = self.model.config.vocab_size
            bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise invalid("prompt", f"token id {bad[0]!r} is outside the vocabulary [0, {vocab})")
        if not token_ids:
            raise invalid("prompt", "must not be empty")
        return text, token_ids

    def _check_fits(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        total = num_prompt_tokens + params.max_tokens
        if total > self.max_model_len:
            raise invalid(
                "max_tokens", f"prompt ({num_prompt_tokens} tokens) + max_tokens ({params.max_tokens}) = {total} "
                f"exceeds max_model_len ({self.max_model_len}); shorten the prompt or lower max_tokens"
            )

    def abort_request(self, request_id: str) -> bool:
        """Stop a request and free its KV blocks; returns False if it was not running or waiting."""
        seq = self.scheduler.abort(request_id)
        self._requests.pop(request_id, None)
        return seq is not None

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        blocks = self.block_manager
        adapters = self.adapters
        pool = self.model.sparse_pool
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_blocks_total=blocks.num_blocks,
            kv_blocks_used=blocks.num_blocks - blocks.num_free_blocks,
            adapters_on_device=len(adapters.slots.slot_of) if adapters else 0,
            adapters_in_host=len(adapters.host.entries) if adapters else 0,
            adapter_disk_loads=adapters.disk_loads if adapters else 0,
            adapter_device_loads=adapters.slots.loads if adapters else 0,
            adapter_device_evictions=adapters.slots.evictions if adapters else 0,
            adapter_host_evictions=adapters.host.evictions if adapters else 0,
            compositions=len(adapters.compositions.inputs) if adapters else 0,
            composition_builds=adapters.compositions.builds if adapters else 0,
            composition_hits=adapters.compositions.hits if adapters else 0,
            compositions_dropped=adapters.compositions.dropped if adapters else 0,
            sparse_bytes_used=pool.used * pool.entry_bytes if pool else 0,
            sparse_bytes_capacity=pool.capacity * pool.entry_bytes if pool else 0,
            sparse_compactions=pool.compactions if pool else 0,
        )

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._requests)

    # -- stepping ------------------------------------------------------------------------------

    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """Run one batch: prefill chunks and decodes together. Returns an output for every request
        that produced a token (with `finished_only`, for every request that finished: offline use
        needs no per-token outputs)."""
        batch = self.scheduler.schedule()
        outputs = []
        for seq in batch.failed:
            state = self._requests.pop(seq.request_id)
            state.flush()  # (offline text may have been deferred)
            outputs.append(state.make_output())
        if not batch.scheduled:
            if self.has_unfinished_requests():
                time.sleep(0.001)  # only adapter loads are pending: let them progress
            return outputs
        step = self.runner.execute(batch)
        result = step.sample
        commit = self.block_manager.commit if self.block_manager.enable_prefix_caching else None
        for seq, num_new in batch.scheduled:
            seq.num_computed_tokens += num_new
            if commit is not None:
                commit(seq)
        for row, seq in enumerate(step.sampled_seqs):
            if row in step.nonfinite_rows:
                outputs.append(self._fail_nonfinite(seq))
                continue
            token = result.token_ids[row]
            seq.token_ids.append(token)
            logprob = None
            if result.logprobs is not None and seq.params.logprobs is not None:
                logprob = TokenLogprob(token, result.logprobs[row], result.top_logprobs[row])
            state = self._requests[seq.request_id]
            # Offline, text is only read at the end: without stop strings to watch for, the whole
            # output is decoded once when the sequence finishes instead of token by token.
            state.append(token, logprob, self.max_model_len, defer_text=finished_only and not seq.params.stop)
            if seq.matcher is not None and not seq.is_finished:
                self._advance_grammar(seq, token)
            if seq.is_finished or not finished_only:
                outputs.append(state.make_output())
            if seq.is_finished:
                self.scheduler.finish(seq)
                del self._requests[seq.request_id]
        return outputs


    @staticmethod
    def _advance_grammar(seq: Sequence, token: int) -> None:
        """Structured outputs: move the sequence's grammar past `token`; a grammar that took a stop token
        (the document is complete) ends the sequence with "stop"."""
        matcher = seq.matcher
        if not matcher.accept_token(token):  # only when every token was masked (min_tokens against EOS)
            seq.finish("error", error=invalid("response_format", f"token {token} does not follow the "
                       "requested structure: the grammar and the other sampling fields allow no token here"))
        elif matcher.is_terminated():
            seq.finish("stop", token)

    def _fail_nonfinite(self, seq: Sequence) -> RequestOutput:
        """End a sequence whose logits turned NaN or infinite: its output so far stands, its KV is not
        kept for reuse, and the rest of the batch goes on untouched."""
        where = f"adapter {seq.adapter!r}" if seq.adapter else "the base model"
        logger.warning("request %s: non-finite logits on %s; finished with an error", seq.request_id, where)
        seq.finish("error", error=invalid(
            "model", f"{where} produced non-finite values (NaN or infinity) for this request; its weights "
            "or scale overflow: check the adapter, or use another model", code="non_finite_output"))
        self.block_manager.uncache(seq)
        state = self._requests.pop(seq.request_id)
        state.flush()
        self.scheduler.finish(seq)
        return state.make_output()


def validate_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name):
        raise invalid("name", f"{name!r} is not a valid adapter name: use 1-64 letters, digits, '.', '_' or '-', "
                               "starting with a letter or digit", code="invalid_name")
