"""The replicas' request router: each adapter has a home replica, found by rendezvous hashing of its name
with the replicas' ids, so that its requests meet its weights in that replica's host cache and slots.

Serve's own multiplexing prefers a replica that *recently* loaded the adapter, which with a skewed
workload soon means every replica for the popular ones and any replica for the rest. Here the ranking
is fixed by the name: the home replica first, then the next replica in the adapter's hash order (its
second home, when the first is full: Serve moves down a rank when a replica has max_ongoing_requests),
then the rest. A replica added or removed moves only the adapters homed on it. Requests for the base
model, or with no model, go to the less loaded of two replicas drawn at random (power of two choices).
"""

from __future__ import annotations

import hashlib
import random

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


def rendezvous_order(key: str, replicas: list[RunningReplica]) -> list[RunningReplica]:
    """The replicas by descending hash of (key, replica id): a fixed order for each key."""
    def weight(replica: RunningReplica) -> bytes:
        return hashlib.blake2b(f"{key}\0{replica.replica_id.unique_id}".encode(), digest_size=8).digest()

    return sorted(replicas, key=weight, reverse=True)


class AdapterAffinityRouter(RequestRouter):
    """(No FIFO mixin: a replica chosen for a request goes to that request, not to the oldest waiting one,
    whose adapter may be homed elsewhere.)"""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:  # every ranked replica full: wait before probing again
            pending_request.routing_context.should_backoff = True
        model = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if not model or not candidate_replicas:  # power of two choices: two at random, the shorter queue first
            pair = random.sample(candidate_replicas, min(2, len(candidate_replicas)))
            rest = [r for r in candidate_replicas if r not in pair]
            return [pair, rest] if rest else [pair]
        order = rendezvous_order(model, candidate_replicas)
        return [[order[0]], order[1:2], order[2:]] if len(order) > 2 else [[r] for r in order]
