"""The adapter runtime: where each registered adapter's weights are, disk -> host LRU cache -> device
slots, and what writes them into the model's slot weights.

Disk reads and validation run on a background thread, so a request whose adapter is not resident
never stalls the batch. Moving a host-resident adapter into a slot is a device copy done between
steps. An adapter used by a running sequence is never evicted from its slot. Queries (`ready`,
`can_place`, `resident`) change nothing; loads start only through `prefetch` and `want`.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from loraplex.adapters_store.checksums import file_sha256
from loraplex.adapters_store.formats import DEFAULT_MAX_SPARSE_DENSITY, WEIGHTS_FILE, LoRAAdapter, load_peft_lora
from loraplex.engine.compositions import Compositions
from loraplex.errors import LoraplexError, invalid
from loraplex.models.llama import AdaptableLinear, LlamaForCausalLM
from loraplex.models.lora import dora_row_factors

logger = logging.getLogger(__name__)

MAX_LOAD_RETRIES = 3  # for I/O errors that may pass (too many open files, a busy disk)
RETRY_SECONDS = 0.5  # times the failures so far
_PERMANENT_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM}


class HostCache:
    """Parsed adapters in host memory, least recently used first out."""

    def __init__(self, capacity: int, pin_memory: bool) -> None:
        self.capacity = capacity
        self.pin_memory = pin_memory
        self.entries: OrderedDict[str, LoRAAdapter] = OrderedDict()
        self.sparse_entries: dict[str, int] = {}  # name -> its adapter's nnz, counted once (scheduling reads it)
        self.evictions = 0

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def get(self, name: str) -> LoRAAdapter | None:
        adapter = self.entries.get(name)
        if adapter is not None:
            self.entries.move_to_end(name)
        return adapter

    def put(self, adapter: LoRAAdapter, keep: Collection[str] = ()) -> None:
        """Add an adapter, evicting the least recently used ones beyond capacity, except those in
        `keep` (fetched for waiting requests and not yet in a slot)."""
        if self.pin_memory:
            adapter = pinned(adapter)
        self.entries[adapter.name] = adapter
        self.sparse_entries[adapter.name] = adapter.nnz
        self.entries.move_to_end(adapter.name)
        evictable = [name for name in self.entries if name not in keep and name != adapter.name]
        for name in evictable[: max(len(self.entries) - self.capacity, 0)]:
            del self.entries[name], self.sparse_entries[name]
            self.evictions += 1

    def drop(self, name: str) -> None:
        self.entries.pop(name, None)
        self.sparse_entries.pop(name, None)


def pinned(adapter: LoRAAdapter) -> LoRAAdapter:
    """The adapter in page-locked host memory, which lets the host -> GPU copy run asynchronously
    (tensors pinned already are kept)."""
    for key, module in adapter.modules.items():
        if not (module.a.is_pinned() and module.b.is_pinned()):
            # (the small DoRA and sparse parts stay pageable: their slot writes are few and synchronous)
            adapter.modules[key] = dataclasses.replace(module, a=module.a.pin_memory(), b=module.b.pin_memory())
    return adapter


class SlotPool:
    """`max_loras` slots in the model's adapter layers, and the model's pool for their sparse parts;
    reference-counted by running sequences. An adapter in a slot holds both, and eviction frees both."""

    def __init__(self, model: LlamaForCausalLM, max_loras: int) -> None:
        self.model = model
        self.targets = model.lora_targets()
        self.sparse_pool = model.sparse_pool
        self.slot_of: dict[str, int] = {}
        self.entries: dict[str, int] = {}  # resident adapter -> its sparse entries in the pool
        self.users: dict[str, int] = {}  # adapter -> running sequences using it
        self.idle: OrderedDict[str, None] = OrderedDict()  # resident, unused: evictable, LRU first
        self.retired: set[str] = set()  # evicted while in use: freed when the last user releases it
        self.free_slots = list(range(max_loras - 1, -1, -1))
        self.loads = 0
        self.evictions = 0

    def resident(self, name: str) -> bool:
        return name in self.slot_of

    def can_place(self, name: str, entries: int = 0) -> bool:
        """Whether the adapter, with `entries` sparse entries, can take a slot now (evicting idle ones)."""
        if name in self.slot_of:
            return True
        if not (self.free_slots or self.idle):
            return False
        if entries == 0:
            return True
        idle_entries = sum(self.entries[n] for n in self.idle)
        return self.sparse_pool is not None and entries <= self.sparse_pool.free + idle_entries

    def acquire(self, name: str, host: HostCache) -> int:
        """The adapter's slot, loading it from the host cache (evicting idle adapters, least recently used
        first, until a slot and room in the sparse pool are free) if needed. The caller checks first that it
        can (`can_place`, and the adapter resident or in `host`)."""
        if name not in self.slot_of:
            adapter = host.get(name)
            need = host.sparse_entries.get(name, 0)
            if adapter is None or not self.can_place(name, need):
                where = "every slot is in use" if adapter is not None else "it is not in host memory"
                raise RuntimeError(f"adapter {name} cannot take a slot now: {where}")
            pool = self.sparse_pool
            while not self.free_slots or (need and need > pool.free):
                # room in the pool, with a slot free: only an idle adapter holding entries makes it
                holds_entries = self.free_slots and need > pool.free
                victim = next(n for n in self.idle if not holds_entries or self.entries[n])
                del self.idle[victim]
                self._free(victim)
                self.evictions += 1
            slot = self.free_slots.pop()
            self._write(slot, adapter)
            self.loads += 1
            self.slot_of[name] = slot
            self.entries[name] = need
        self.idle.pop(name, None)
        self.users[name] = self.users.get(name, 0) + 1
        return self.slot_of[name]

    def release(self, name: str) -> None:
        self.users[name] -= 1
        if self.users[name] == 0:
            del self.users[name]
            if name in self.retired:
                self.retired.discard(name)
                self._free(name)
            else:
                self.idle[name] = None

    def evict(self, name: str) -> bool:
        """Drop an adapter from its slot (it was deleted). One in use keeps its slot until its last
        user releases it; returns False then."""
        if name in self.users:
            self.retired.add(name)
            return False
        if name in self.slot_of:
            self.idle.pop(name, None)
            self._free(name)
        return True

    def _free(self, name: str) -> None:
        slot = self.slot_of.pop(name)
        del self.entries[name]
        self.free_slots.append(slot)
        if self.sparse_pool is not None:
            self.sparse_pool.release(slot)

    def _write(self, slot: int, adapter: LoRAAdapter) -> None:
        sparse_parts: dict[int, tuple[AdaptableLinear, list]] = {}  # id(layer) -> (layer, CSR per slice)
        for (layer, module), (linear, shard) in self.targets.items():
            weights = adapter.modules.get((layer, module))
            if linear.lora.sparse is not None:
                csrs = sparse_parts.setdefault(id(linear), (linear, [None] * len(linear.output_sizes)))[1]
                csrs[shard] = None if weights is None or weights.sparse is None else weights.sparse.to_torch()
            if weights is None:
                linear.lora.clear_slice(slot, shard)
                continue
            factors = None
            if weights.magnitude is not None:  # DoRA: the row factors, computed once here, not per step
                factors = dora_row_factors(linear.weight[linear.shard_rows(shard)], weights.a, weights.b,
                                           weights.scale, weights.magnitude)
            linear.lora.write(slot, shard, weights.a, weights.b, weights.scale, factors)
        if self.sparse_pool is not None:
            need = adapter.nnz
            self.sparse_pool.allocate(slot, need)
            offset = 0
            for linear, csrs in sparse_parts.values():
                offset += linear.lora.sparse.write(slot, csrs, offset)
            assert offset == need, f"{adapter.name}: {offset} sparse entries written, {need} counted"


class AdapterManager:
    """Registered adapters, and where each registration's weights currently are.

    Every registration of a name gets its own key (`name#N`): slots, the host cache, background
    loads and prefix-cache salts go by key, so re-registering a name never serves the old weights
    to new requests, nor the new weights to requests that started on the old ones.
    """

    def __init__(self, model: LlamaForCausalLM, max_loras: int, max_lora_rank: int, max_cpu_adapters: int,
                 device: torch.device, max_compositions: int = 64,
                 max_sparse_density: float = DEFAULT_MAX_SPARSE_DENSITY) -> None:
        self.model_config = model.config
        self.max_lora_rank = max_lora_rank
        self.max_sparse_density = max_sparse_density
        self.paths: dict[str, Path] = {}  # registered name -> directory (compositions have none)
        self.keys: dict[str, str] = {}  # registered name -> key of its current registration
        self._key_paths: dict[str, Path] = {}  # every key handed out -> directory, to reload it
        self._builders: dict[str, Callable[[], LoRAAdapter]] = {}  # a composition's key -> what rebuilds it
        self.compositions = Compositions(max_compositions)
        self._checksums: dict[str, dict[str, str]] = {}  # key -> {file name: sha256} checked on every disk load
        self._generation = 0
        self.host = HostCache(max_cpu_adapters, pin_memory=device.type == "cuda")
        self.slots = SlotPool(model, max_loras)
        self.disk_loads = 0
        self.load_seconds: deque[float] = deque()  # disk -> host, per background load (appended by the step thread)
        self._loads: dict[str, tuple[Future, float]] = {}
        self.errors: dict[str, str] = {}  # key -> why its weights could not be loaded (for good)
        self._failures: dict[str, int] = {}  # key -> failed loads in a row
        self._retry_at: dict[str, float] = {}  # key -> when a transient failure may be retried
        # Keys that waiting requests need and no slot holds, in queue order, at most host capacity:
        # only these are fetched from disk, and the host cache never evicts them before they are
        # placed, so more waiting adapters than the host holds cannot make loads evict each other.
        self._wanted: dict[str, None] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-loader")

    def register(self, name: str, path: str | Path, validate: bool = True,
                 checksums: dict[str, str] | None = None, preloaded: LoRAAdapter | None = None) -> LoRAAdapter | None:
        """Make `name` servable (replacing an earlier registration). Validation reads the adapter now
        and keeps it in the host cache, as does giving it `preloaded`. With `checksums` ({file name:
        sha256}), every read of the files from disk first checks them."""
        path = Path(path)
        key = self._new_key(name)
        adapter = None
        if preloaded is not None:
            adapter = self.check_fits(dataclasses.replace(preloaded, name=key))
        elif validate:
            adapter = self._load(path, key, checksums)
        if name in self.keys:
            self.unregister(name)
        if adapter is not None:
            self.host.put(adapter, keep=self._wanted.keys())
        self.paths[name], self.keys[name], self._key_paths[key] = path, key, path
        if checksums:
            self._checksums[key] = dict(checksums)
        return adapter

    def _new_key(self, name: str) -> str:
        self._generation += 1
        return f"{name}#{self._generation}"

    def reader(self, name: str) -> Callable[[], LoRAAdapter]:
        """A function that gives registered adapter `name`'s current registration, safe to call on any
        thread: the parsed adapter the host cache holds now (its tensors are never written), or else a
        read of its files (checksums checked). Call between steps: it looks into the host cache."""
        key = self.keys[name]
        held = self.host.entries.get(key)  # no LRU update: this is a look, not a use
        if held is not None:
            return lambda: held
        path, checksums = self._key_paths[key], self._checksums.get(key)
        return lambda: self._load(path, key, checksums)

    def register_composition(self, name: str, inputs: list[str], build: Callable[[], LoRAAdapter],
                             built: LoRAAdapter) -> None:
        """Serve `built` under `name`; `build` makes it again after the host cache dropped it. It is dropped
        itself when one of `inputs` is unregistered or replaced, or when newer compositions push it out."""
        key = self._new_key(name)
        self.host.put(self.check_fits(dataclasses.replace(built, name=key)), keep=self._wanted.keys())
        self.keys[name], self._builders[key] = key, build
        for evicted in self.compositions.add(name, inputs):
            self.unregister(evicted)

    def _load(self, path: Path, key: str, checksums: dict[str, str] | None) -> LoRAAdapter:
        checksums = checksums or {}
        for file_name, expected in checksums.items():
            found, _ = file_sha256(path / file_name)
            if found != expected:
                raise invalid(file_name, f"sha256 {found} differs from the stored {expected}; the file was "
                              "changed on disk; upload the adapter again")
        return self.check_fits(load_peft_lora(path, key, self.model_config, self.max_lora_rank,
                                         sha256=checksums.get(WEIGHTS_FILE),  # checked just now: not hashed again
                                         max_sparse_density=self.max_sparse_density))

    def check_fits(self, adapter: LoRAAdapter) -> LoRAAdapter:
        """The adapter, if its sparse parts fit the sparse pool when it has the pool to itself."""
        if adapter.nnz == 0:
            return adapter
        pool = self.slots.sparse_pool
        if pool is None:
            raise invalid("max_sparse_memory", "is 0: this server serves no sparse adapters; start it with "
                          "--max-sparse-memory above 0")
        if adapter.nnz > pool.capacity:
            need, have = adapter.nnz * pool.entry_bytes, pool.capacity * pool.entry_bytes
            raise invalid("max_sparse_memory", f"the adapter's sparse parts take {need / 2**20:.1f} MiB "
                          f"({adapter.nnz} entries); the server's sparse pool holds {have / 2**20:.1f} MiB: "
                          "start it with a larger --max-sparse-memory, or sparsify at a lower density")
        return adapter

    def _read(self, key: str) -> LoRAAdapter:
        """A registration's weights, read from its files or built again (a composition)."""
        build = self._builders.get(key)
        if build is not None:
            return dataclasses.replace(build(), name=key)
        return self._load(self._key_paths[key], key, self._checksums.get(key))

    def unregister(self, name: str) -> None:
        """New requests can no longer name it; those running on it keep its weights until they end."""
        self.paths.pop(name, None)
        self.compositions.discard(name)
        key = self.keys.pop(name, None)
        if key is not None and self.slots.evict(key):
            self.host.drop(key)  # in use: kept, so a preempted request can resume on it
            self._builders.pop(key, None)  # (and the builder too, which holds the composition's inputs)
        for composition in self.compositions.using(name):
            self.unregister(composition)

    def __contains__(self, name: str) -> bool:
        return name in self.keys

    def paths_in_use(self, keys: Collection[str]) -> set[Path]:
        """Directories of the registered adapters and of the registrations `keys` name."""
        return set(self.paths.values()) | {self._key_paths[key] for key in keys if key in self._key_paths}

    def key(self, name: str) -> str:
        return self.keys[name]

    def is_current(self, key: str) -> bool:
        return self.keys.get(key.rpartition("#")[0]) == key

    def want(self, keys: list[str]) -> None:
        """Once per scheduling round: move finished background loads into the host cache, then fetch
        the adapters the waiting queue needs, in its order, as many as fit the host cache (the rest
        wait their turn)."""
        self._collect()
        self._wanted = {}
        for key in dict.fromkeys(keys):
            if not self.slots.resident(key) and len(self._wanted) < self.host.capacity:
                self._wanted[key] = None
        for key in self._wanted:
            self.prefetch(key)

    def ready(self, key: str) -> bool:
        """True when the adapter's weights are in a slot or in host memory, so it can take a slot now.
        Loads that finished since the last `want` count from the next one on."""
        return self.slots.resident(key) or key in self.host

    def prefetch(self, key: str) -> None:
        if key in self._loads or key in self.host or self.slots.resident(key):
            return
        if key not in self._key_paths and key not in self._builders:
            return
        if self._retry_at.get(key, 0.0) > time.monotonic():
            return
        if key not in self._wanted:
            if len(self._wanted) >= self.host.capacity:
                return  # the host cache is spoken for by requests ahead of this one
            self._wanted[key] = None
        future = self._executor.submit(self._read, key)
        self._loads[key] = (future, time.perf_counter())

    def _collect(self) -> None:
        """Move finished background loads into the host cache."""
        for key, (future, started) in list(self._loads.items()):
            if not future.done():
                continue
            del self._loads[key]
            try:
                adapter = future.result()
            except Exception as e:  # the files changed or vanished since registration, or an I/O hiccup
                self._load_failed(key, e)
                continue
            self.errors.pop(key, None)
            self._failures.pop(key, None)
            self.host.put(adapter, keep=self._wanted.keys())
            self.disk_loads += 1
            self.load_seconds.append(time.perf_counter() - started)

    def _load_failed(self, key: str, error: Exception) -> None:
        failures = self._failures[key] = self._failures.get(key, 0) + 1
        transient = isinstance(error, OSError) and error.errno not in _PERMANENT_ERRNOS
        if transient and failures <= MAX_LOAD_RETRIES:
            logger.warning("adapter %s: load failed (%s); retry %d of %d", key, error, failures, MAX_LOAD_RETRIES)
            self._retry_at[key] = time.monotonic() + RETRY_SECONDS * failures
            return
        logger.error("adapter %s failed to load: %s", key, error)
        self.errors[key] = _reason_for_requests(error)

    def drain_load_seconds(self) -> list[float]:
        """Load times recorded since the last call (for metrics, which observe each once)."""
        drained = []
        while self.load_seconds:  # deque pops are atomic: safe against the step thread's appends
            drained.append(self.load_seconds.popleft())
        return drained

    def can_place(self, key: str) -> bool:
        """Whether the adapter (resident, or in host memory) can take a slot now."""
        return self.slots.can_place(key, self.host.sparse_entries.get(key, 0))  # a look, not a use

    def acquire(self, key: str) -> int:
        """A slot holding the adapter, for one more running sequence (see `SlotPool.acquire`)."""
        slot = self.slots.acquire(key, self.host)
        self._wanted.pop(key, None)
        return slot

    def release(self, key: str) -> None:
        self.slots.release(key)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _reason_for_requests(error: Exception) -> str:
    """Why a load failed, as requests may see it: never a server path (the log has the whole error)."""
    if isinstance(error, LoraplexError):  # the adapter's files were refused: says which file, not where
        return str(error)
    if isinstance(error, OSError):
        name = Path(error.filename).name if error.filename else "the adapter's files"
        return f"{error.strerror or type(error).__name__} ({name})"
    return f"the adapter could not be loaded ({type(error).__name__}); see the server log"
