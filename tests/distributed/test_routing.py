"""The replicas' router ranks replicas by rendezvous hashing of the adapter name: a fixed home per
adapter, adapters spread over the replicas, and a replica leaving moves only the adapters homed on it."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass

import pytest

pytest.importorskip("ray.serve", reason="the ray extra is not installed (pip install -e '.[ray]')")

from loraplex.distributed.routing import AdapterAffinityRouter, rendezvous_order  # noqa: E402


@dataclass(frozen=True)
class ReplicaID:
    unique_id: str


@dataclass(frozen=True)
class Replica:
    replica_id: ReplicaID


REPLICAS = [Replica(ReplicaID(f"r{i}")) for i in range(4)]
ADAPTERS = [f"adapter-{i}" for i in range(2000)]


def home(name: str, replicas=REPLICAS) -> str:
    return rendezvous_order(name, list(replicas))[0].replica_id.unique_id


def test_each_adapter_has_one_home_whatever_the_order_of_the_replicas():
    for name in ADAPTERS[:50]:
        assert home(name) == home(name, reversed(REPLICAS))
        assert sorted(r.replica_id.unique_id for r in rendezvous_order(name, REPLICAS)) == ["r0", "r1", "r2", "r3"]


def test_adapters_spread_over_the_replicas():
    counts = Counter(home(name) for name in ADAPTERS)
    assert set(counts) == {"r0", "r1", "r2", "r3"}
    assert all(400 <= c <= 600 for c in counts.values()), counts  # 500 each expected


def test_a_replica_leaving_moves_only_its_adapters():
    before = {name: home(name) for name in ADAPTERS}
    after = {name: home(name, REPLICAS[:3]) for name in ADAPTERS}
    moved = [name for name in ADAPTERS if before[name] != after[name]]
    assert moved and all(before[name] == "r3" for name in moved)


def test_the_router_ranks_home_first_and_spreads_requests_without_a_model():
    @dataclass
    class Metadata:
        multiplexed_model_id: str

    @dataclass
    class Context:
        should_backoff: bool = False

    @dataclass
    class Pending:
        metadata: Metadata
        routing_context: Context

    router = AdapterAffinityRouter.__new__(AdapterAffinityRouter)  # choose_replicas uses no router state
    pending = Pending(Metadata("adapter-7"), Context())
    ranks = asyncio.run(router.choose_replicas(REPLICAS, pending))
    assert pending.routing_context.should_backoff  # all ranked replicas full: wait, do not spin
    assert [r.replica_id.unique_id for rank in ranks for r in rank] == \
        [r.replica_id.unique_id for r in rendezvous_order("adapter-7", REPLICAS)]
    assert len(ranks[0]) == 1
    drawn = set()
    for _ in range(50):  # no model: two replicas at random first, the others after
        first, rest = asyncio.run(router.choose_replicas(REPLICAS, Pending(Metadata(""), Context())))
        assert len(first) == 2 and sorted(first + rest, key=id) == sorted(REPLICAS, key=id)
        drawn.update(r.replica_id.unique_id for r in first)
    assert drawn == {"r0", "r1", "r2", "r3"}
