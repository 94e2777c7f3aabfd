"""Adapter memory: the host LRU cache, the device slot pool and the manager's background disk loads."""

from __future__ import annotations

import errno
import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraplex.adapters_store.formats import LoRAAdapter, load_peft_lora
from loraplex.engine import adapters as adapters_module
from loraplex.engine.adapters import AdapterManager, HostCache, SlotPool
from loraplex.kernels.backend import TorchBackend
from loraplex.models.demo import DEMO_ADAPTERS
from loraplex.models.loader import load_model

MAX_RANK = 16
TIMEOUT_S = 10.0


# -- fixtures and helpers ---------------------------------------------------------------------------


def _model(demo_dir: Path, max_loras: int):
    model = load_model(demo_dir, torch.float32, torch.device("cpu"), TorchBackend())
    model.enable_lora(max_loras, MAX_RANK)
    return model


@pytest.fixture(scope="module")
def parsed(demo_dir) -> dict[str, LoRAAdapter]:
    """The demo adapters, parsed once (read-only: SlotPool copies them into slots)."""
    config = load_model(demo_dir, torch.float32, torch.device("cpu"), TorchBackend()).config
    return {name: load_peft_lora(demo_dir / "adapters" / name, name, config, MAX_RANK) for name in DEMO_ADAPTERS}


def _host(parsed: dict[str, LoRAAdapter], *names: str) -> HostCache:
    host = HostCache(capacity=8, pin_memory=False)
    for name in names:
        host.put(parsed[name])
    return host


def assert_slot_holds(model, slot: int, adapter: LoRAAdapter) -> None:
    """Every adaptable layer's `slot` holds exactly `adapter`: its A/B/rank/scale for the modules it
    targets, zeros beyond its rank, and rank 0 / all zeros for the modules it does not target."""
    for (layer, module), (linear, shard) in model.lora_targets().items():
        w = linear.lora
        lo, hi = w.slice_offsets[shard], w.slice_offsets[shard + 1]
        weights = adapter.modules.get((layer, module))
        where = f"layer {layer} {module} (slot {slot})"
        if weights is None:
            assert w.ranks[slot, shard].item() == 0, where
            assert w.ranks_host[slot][shard] == 0, where
            assert w.scales[slot, shard].item() == 0.0, where
            assert not w.a[slot, shard].any(), f"{where}: stale A left in an untargeted slice"
            assert not w.b[slot, lo:hi].any(), f"{where}: stale B left in an untargeted slice"
            continue
        r = weights.rank
        same_a, same_b = torch.equal(w.a[slot, shard, :r], weights.a), torch.equal(w.b[slot, lo:hi, :r], weights.b)
        assert same_a, f"{where}: A is not the adapter's"
        assert same_b, f"{where}: B is not the adapter's"
        assert not w.a[slot, shard, r:].any(), f"{where}: A beyond rank {r} is not zero"
        assert not w.b[slot, lo:hi, r:].any(), f"{where}: B beyond rank {r} is not zero"
        assert w.ranks[slot, shard].item() == r, where
        assert w.ranks_host[slot][shard] == r, where
        assert w.scales[slot, shard].item() == pytest.approx(weights.scale), where


def _wait_for(condition, timeout: float = TIMEOUT_S) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


@pytest.fixture
def manager(demo_dir):
    managers = []

    def make(max_loras: int = 2, max_cpu_adapters: int = 4, max_rank: int = MAX_RANK) -> AdapterManager:
        model = _model(demo_dir, max_loras)
        mgr = AdapterManager(model, max_loras, max_rank, max_cpu_adapters, torch.device("cpu"))
        mgr.model = model  # for the tests' own checks
        managers.append(mgr)
        return mgr

    yield make
    for mgr in managers:
        mgr.shutdown()


@pytest.fixture
def gated_loads(monkeypatch):
    """Background loads wait for `gate` before reading the disk; `calls` records (name, path)."""
    gate = threading.Event()
    calls: list[tuple[str, Path]] = []
    real = adapters_module.load_peft_lora

    def slow(path, name, *args, **kwargs):
        calls.append((name, Path(path)))
        assert gate.wait(TIMEOUT_S), "the test never opened the gate"
        return real(path, name, *args, **kwargs)

    monkeypatch.setattr(adapters_module, "load_peft_lora", slow)
    yield gate, calls
    gate.set()  # never leave the loader thread blocked


# -- HostCache ---------------------------------------------------------------------------------------


def _fake(name: str) -> LoRAAdapter:
    return LoRAAdapter(name=name, modules={})


def test_host_cache_evicts_least_recently_used_and_get_refreshes():
    host = HostCache(capacity=3, pin_memory=False)
    for name in ("a", "b", "c"):
        host.put(_fake(name))
    assert host.get("a").name == "a"  # a becomes the most recently used: b is now the oldest
    host.put(_fake("d"))
    assert list(host.entries) == ["c", "a", "d"]
    assert "b" not in host and "a" in host
    assert host.evictions == 1
    assert host.get("b") is None
    assert list(host.entries) == ["c", "a", "d"]  # a miss changes nothing


def test_host_cache_counts_capacity_evictions():
    host = HostCache(capacity=2, pin_memory=False)
    for name in ("a", "b", "c", "d", "e"):
        host.put(_fake(name))
    assert list(host.entries) == ["d", "e"]
    assert host.evictions == 3


def test_host_cache_put_of_a_present_name_replaces_and_refreshes_without_evicting():
    host = HostCache(capacity=2, pin_memory=False)
    host.put(_fake("a"))
    host.put(_fake("b"))
    newer = _fake("a")
    host.put(newer)
    assert list(host.entries) == ["b", "a"]
    assert host.get("a") is newer
    assert host.evictions == 0


def test_host_cache_drop():
    host = HostCache(capacity=2, pin_memory=False)
    host.put(_fake("a"))
    host.put(_fake("b"))
    host.drop("a")
    host.drop("missing")  # no error
    assert list(host.entries) == ["b"]
    assert host.evictions == 0  # a drop is not a capacity eviction


# -- SlotPool ----------------------------------------------------------------------------------------


def test_acquire_writes_the_adapter_into_a_free_slot(demo_dir, parsed):
    model = _model(demo_dir, max_loras=2)
    pool = SlotPool(model, max_loras=2)
    slot = pool.acquire("alpha", _host(parsed, "alpha"))
    assert slot in (0, 1)
    assert pool.slot_of == {"alpha": slot} and pool.users == {"alpha": 1} and not pool.idle
    assert pool.loads == 1 and pool.evictions == 0
    assert_slot_holds(model, slot, parsed["alpha"])

    # Independently of lora_targets(): the checkpoint tensors, as the file holds them.
    tensors = load_file(str(demo_dir / "adapters" / "alpha" / "adapter_model.safetensors"))
    spec = DEMO_ADAPTERS["alpha"]
    r, scale = spec["r"], spec["alpha"] / spec["r"]
    attn = model.model.layers[0].self_attn
    prefix = "base_model.model.model.layers.0.self_attn."
    qkv = attn.qkv_proj.lora
    q_rows = slice(qkv.slice_offsets[0], qkv.slice_offsets[1])
    v_rows = slice(qkv.slice_offsets[2], qkv.slice_offsets[3])
    assert torch.equal(qkv.a[slot, 0, :r], tensors[prefix + "q_proj.lora_A.weight"])
    assert torch.equal(qkv.b[slot, q_rows, :r], tensors[prefix + "q_proj.lora_B.weight"])
    assert torch.equal(qkv.a[slot, 2, :r], tensors[prefix + "v_proj.lora_A.weight"])
    assert torch.equal(qkv.b[slot, v_rows, :r], tensors[prefix + "v_proj.lora_B.weight"])
    assert qkv.ranks[slot].tolist() == [r, 0, r]
    assert qkv.scales[slot].tolist() == [scale, 0.0, scale]
    assert attn.o_proj.lora.ranks[slot].tolist() == [0]
    # the other slot was never written
    other = 1 - slot
    for linear, _ in model.lora_targets().values():
        assert not linear.lora.a[other].any() and not linear.lora.ranks[other].any()


@pytest.mark.parametrize("previous", ["beta", "gamma"])
def test_slot_reuse_clears_what_the_new_adapter_does_not_target(demo_dir, parsed, previous):
    """beta targets k/o (rank 8), gamma the MLP (rank 16); alpha (rank 4, q/v) must not inherit any of it."""
    model = _model(demo_dir, max_loras=1)
    pool = SlotPool(model, max_loras=1)
    host = _host(parsed, previous, "alpha")
    slot = pool.acquire(previous, host)
    assert_slot_holds(model, slot, parsed[previous])
    pool.release(previous)
    assert pool.acquire("alpha", host) == slot
    assert pool.evictions == 1 and pool.loads == 2
    assert pool.slot_of == {"alpha": slot}
    assert_slot_holds(model, slot, parsed["alpha"])


def test_resident_adapter_is_reused_without_reloading(demo_dir, parsed):
    model = _model(demo_dir, max_loras=2)
    pool = SlotPool(model, max_loras=2)
    host = _host(parsed, "alpha")
    slot = pool.acquire("alpha", host)
    assert pool.acquire("alpha", host) == slot
    assert pool.loads == 1 and pool.users == {"alpha": 2}
    pool.release("alpha")
    assert pool.users == {"alpha": 1} and not pool.idle  # still in use
    pool.release("alpha")
    assert pool.users == {} and list(pool.idle) == ["alpha"]
    assert pool.resident("alpha")
    # Resident and idle: reused without a copy, even after the host cache dropped it.
    host.drop("alpha")
    assert pool.can_place("alpha")
    assert pool.acquire("alpha", host) == slot
    assert pool.loads == 1 and pool.users == {"alpha": 1} and not pool.idle
    pool.release("alpha")


def test_eviction_takes_the_least_recently_idle_adapter(demo_dir, parsed):
    model = _model(demo_dir, max_loras=2)
    pool = SlotPool(model, max_loras=2)
    host = _host(parsed, "alpha", "beta", "gamma")
    alpha_slot = pool.acquire("alpha", host)
    beta_slot = pool.acquire("beta", host)
    assert alpha_slot != beta_slot
    pool.release("alpha")
    pool.release("beta")
    assert list(pool.idle) == ["alpha", "beta"]
    # Using alpha again makes beta the least recently idle.
    assert pool.acquire("alpha", host) == alpha_slot
    pool.release("alpha")
    assert list(pool.idle) == ["beta", "alpha"]
    assert pool.acquire("gamma", host) == beta_slot
    assert pool.slot_of == {"alpha": alpha_slot, "gamma": beta_slot}
    assert pool.evictions == 1 and pool.loads == 3
    assert list(pool.idle) == ["alpha"]
    assert_slot_holds(model, beta_slot, parsed["gamma"])
    assert_slot_holds(model, alpha_slot, parsed["alpha"])
    pool.release("gamma")


def test_an_adapter_in_use_is_never_evicted(demo_dir, parsed):
    model = _model(demo_dir, max_loras=1)
    pool = SlotPool(model, max_loras=1)
    host = _host(parsed, "alpha", "beta")
    slot = pool.acquire("alpha", host)
    assert not pool.can_place("beta") and pool.can_place("alpha")
    with pytest.raises(RuntimeError, match="every slot is in use"):
        pool.acquire("beta", host)
    assert pool.slot_of == {"alpha": slot} and pool.users == {"alpha": 1}
    assert pool.loads == 1 and pool.evictions == 0
    assert_slot_holds(model, slot, parsed["alpha"])
    assert pool.evict("alpha") is False  # in use: refused
    assert pool.resident("alpha")
    pool.release("alpha")
    assert pool.evict("alpha") is True
    assert not pool.resident("alpha") and not pool.idle and pool.free_slots == [slot]
    assert pool.evict("never-loaded") is True
    assert pool.acquire("beta", host) == slot
    assert pool.evictions == 0  # evict() freed the slot: the next load needed no eviction
    pool.release("beta")


def test_acquire_of_an_adapter_not_in_host_memory_raises_and_changes_nothing(demo_dir, parsed):
    """A slot is never handed out for weights that were not written into it."""
    model = _model(demo_dir, max_loras=1)
    pool = SlotPool(model, max_loras=1)
    with pytest.raises(RuntimeError, match="not in host memory"):
        pool.acquire("alpha", _host(parsed))
    assert pool.slot_of == {} and pool.users == {} and pool.loads == 0 and pool.free_slots == [0]


# -- AdapterManager ----------------------------------------------------------------------------------


def _copy_adapter(demo_dir: Path, name: str, dest: Path) -> Path:
    return Path(shutil.copytree(demo_dir / "adapters" / name, dest))


def test_register_validates_and_keeps_the_adapter_in_host_memory(manager, demo_dir, parsed):
    mgr = manager()
    adapter = mgr.register("a", demo_dir / "adapters" / "alpha")
    key = mgr.key("a")
    assert adapter is not None and adapter.name == key and key.startswith("a#")
    assert adapter.sha256 == parsed["alpha"].sha256
    assert "a" in mgr and key in mgr.host and mgr.is_current(key)
    assert _poll(mgr, key)
    slot = mgr.acquire(key)
    assert_slot_holds(mgr.model, slot, parsed["alpha"])
    mgr.release(key)
    assert not mgr._loads and mgr.disk_loads == 0  # validated at registration: no background load


def _break_rank(path: Path) -> None:
    config_file = path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["r"] = config["r"] * 2
    config_file.write_text(json.dumps(config))


@pytest.mark.parametrize("problem", ["missing", "rank_mismatch", "rank_too_large"])
def test_register_rejects_a_bad_adapter_and_registers_nothing(manager, demo_dir, tmp_path, problem):
    mgr = manager(max_rank=8)
    if problem == "missing":
        path = tmp_path / "nowhere"
    elif problem == "rank_mismatch":
        path = _copy_adapter(demo_dir, "alpha", tmp_path / "alpha")
        _break_rank(path)
    else:
        path = demo_dir / "adapters" / "gamma"  # rank 16 > max_lora_rank 8
    with pytest.raises(ValueError):
        mgr.register("bad", path)
    assert "bad" not in mgr and not mgr.host.entries and not mgr.paths
    # A failed re-registration leaves the earlier registration as it was.
    mgr.register("bad", demo_dir / "adapters" / "alpha")
    key = mgr.key("bad")
    with pytest.raises(ValueError):
        mgr.register("bad", path)
    assert mgr.paths["bad"] == demo_dir / "adapters" / "alpha" and mgr.key("bad") == key and key in mgr.host


def _poll(mgr: AdapterManager, key: str) -> bool:
    """One scheduling round's view of an adapter a waiting request needs: `want` it, then ask `ready`."""
    mgr.want([key])
    return mgr.ready(key)


def test_ready_is_a_query_without_side_effects(manager, demo_dir, gated_loads):
    gate, calls = gated_loads
    gate.set()
    mgr = manager()
    mgr.register("a", demo_dir / "adapters" / "alpha", validate=False)
    key = mgr.key("a")
    for _ in range(3):
        assert mgr.ready(key) is False
    time.sleep(0.05)
    assert calls == [] and mgr.disk_loads == 0 and key not in mgr.host


def test_want_starts_a_background_load_and_ready_turns_true_when_it_lands(manager, demo_dir, parsed, gated_loads):
    gate, calls = gated_loads
    mgr = manager()
    assert mgr.register("a", demo_dir / "adapters" / "alpha", validate=False) is None
    key = mgr.key("a")
    assert "a" in mgr and key not in mgr.host
    assert _poll(mgr, key) is False
    assert _wait_for(lambda: len(calls) == 1)  # the load runs on the loader thread ...
    assert _poll(mgr, key) is False  # ... once: asking again does not start another
    with pytest.raises(RuntimeError, match="not in host memory"):
        mgr.acquire(key)
    time.sleep(0.05)
    assert len(calls) == 1 and mgr.disk_loads == 0
    gate.set()
    assert _wait_for(lambda: _poll(mgr, key)), "the background load never landed"
    assert key in mgr.host and mgr.disk_loads == 1 and len(mgr.load_seconds) == 1
    assert not mgr.errors and len(calls) == 1
    slot = mgr.acquire(key)
    assert_slot_holds(mgr.model, slot, parsed["alpha"])
    mgr.release(key)


def test_ready_of_a_registered_adapter_evicted_from_host_memory_reloads_it(manager, demo_dir):
    mgr = manager(max_loras=1, max_cpu_adapters=1)
    mgr.register("a", demo_dir / "adapters" / "alpha")
    mgr.register("b", demo_dir / "adapters" / "beta")  # capacity 1: pushes a out of host memory
    key = mgr.key("a")
    assert key not in mgr.host and mgr.host.evictions == 1
    assert _poll(mgr, key) is False
    assert _wait_for(lambda: _poll(mgr, key))
    assert mgr.disk_loads == 1


def test_a_failed_background_load_lands_in_errors_until_a_load_succeeds(manager, demo_dir, tmp_path):
    mgr = manager()
    path = _copy_adapter(demo_dir, "alpha", tmp_path / "alpha")
    mgr.register("gone", path, validate=False)
    key = mgr.key("gone")
    shutil.rmtree(path)
    assert _poll(mgr, key) is False
    assert _wait_for(lambda: (_poll(mgr, key), key in mgr.errors)[1]), "the failure was never collected"
    assert "adapter_config.json is missing" in mgr.errors[key]
    assert str(tmp_path) not in mgr.errors[key], "requests must not see server paths"
    assert key not in mgr.host and mgr.disk_loads == 0
    assert _poll(mgr, key) is False
    with pytest.raises(RuntimeError):
        mgr.acquire(key)
    # The files come back: a later load succeeds and clears the error.
    shutil.copytree(demo_dir / "adapters" / "alpha", path)
    assert _wait_for(lambda: _poll(mgr, key))
    assert key not in mgr.errors


def _failing_loads(monkeypatch, failures: int) -> list[int]:
    """The first `failures` loads raise EMFILE (too many open files: a passing condition)."""
    calls: list[int] = []
    real = adapters_module.load_peft_lora

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) <= failures:
            raise OSError(errno.EMFILE, "Too many open files")
        return real(*args, **kwargs)

    monkeypatch.setattr(adapters_module, "load_peft_lora", flaky)
    monkeypatch.setattr(adapters_module, "RETRY_SECONDS", 0.01)
    return calls


def test_a_transient_io_error_is_retried(manager, demo_dir, monkeypatch):
    calls = _failing_loads(monkeypatch, failures=2)
    mgr = manager()
    mgr.register("a", demo_dir / "adapters" / "alpha", validate=False)
    key = mgr.key("a")
    assert _wait_for(lambda: _poll(mgr, key)), "the load was not retried"
    assert len(calls) == 3 and not mgr.errors and mgr.disk_loads == 1


def test_a_lasting_io_error_fails_after_the_retries(manager, demo_dir, monkeypatch):
    calls = _failing_loads(monkeypatch, failures=1000)
    mgr = manager()
    mgr.register("a", demo_dir / "adapters" / "alpha", validate=False)
    key = mgr.key("a")
    assert _wait_for(lambda: (_poll(mgr, key), key in mgr.errors)[1])
    assert len(calls) == adapters_module.MAX_LOAD_RETRIES + 1 and "Too many open files" in mgr.errors[key]


def test_unregister_forgets_the_adapter_everywhere(manager, demo_dir):
    mgr = manager()
    mgr.register("a", demo_dir / "adapters" / "alpha")
    key = mgr.key("a")
    mgr.acquire(key)
    mgr.release(key)
    assert mgr.slots.resident(key)
    mgr.unregister("a")
    assert "a" not in mgr and key not in mgr.host and not mgr.slots.resident(key)
    assert not mgr.is_current(key)
    assert not mgr.slots.idle and len(mgr.slots.free_slots) == 2
    mgr.unregister("never-registered")  # no error


def test_readding_a_name_removed_while_in_use_serves_the_new_weights(manager, demo_dir, parsed):
    mgr = manager()
    mgr.register("x", demo_dir / "adapters" / "alpha")
    old = mgr.key("x")
    old_slot = mgr.acquire(old)  # a running sequence uses it
    mgr.unregister("x")
    assert mgr.slots.resident(old)  # kept for the running sequence ...
    assert_slot_holds(mgr.model, old_slot, parsed["alpha"])
    mgr.release(old)  # ... until it finishes
    assert not mgr.slots.resident(old) and len(mgr.slots.free_slots) == 2
    mgr.register("x", demo_dir / "adapters" / "beta")
    new = mgr.key("x")
    assert new != old
    slot = mgr.acquire(new)
    assert_slot_holds(mgr.model, slot, parsed["beta"])
    mgr.release(new)


def test_reregistering_an_idle_resident_name_serves_the_new_weights(manager, demo_dir, parsed):
    mgr = manager()
    mgr.register("x", demo_dir / "adapters" / "alpha")
    old = mgr.key("x")
    mgr.acquire(old)
    mgr.release(old)
    mgr.register("x", demo_dir / "adapters" / "beta")
    assert not mgr.slots.resident(old)
    slot = mgr.acquire(mgr.key("x"))
    assert_slot_holds(mgr.model, slot, parsed["beta"])
    mgr.release(mgr.key("x"))


def test_a_stale_background_load_does_not_override_a_newer_registration(manager, demo_dir, parsed, gated_loads):
    gate, calls = gated_loads
    mgr = manager()
    mgr.register("x", demo_dir / "adapters" / "alpha", validate=False)
    old = mgr.key("x")
    assert _poll(mgr, old) is False
    assert _wait_for(lambda: len(calls) == 1)  # the alpha load is in flight
    gate.set()
    mgr.register("x", demo_dir / "adapters" / "beta")  # validated now, with the real loader
    new = mgr.key("x")
    assert mgr.host.get(new).sha256 == parsed["beta"].sha256
    assert _wait_for(lambda: (mgr._collect(), not mgr._loads)[1])
    assert mgr.host.get(new).sha256 == parsed["beta"].sha256, "the stale alpha load replaced beta"
    slot = mgr.acquire(new)
    assert_slot_holds(mgr.model, slot, parsed["beta"])
    mgr.release(new)
