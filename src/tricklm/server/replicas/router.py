"""Ray Serve's request-router hook, deciding by prompt prefix (the policy itself is in `routing.py`)."""

from __future__ import annotations

import random
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from tricklm.server.replicas.routing import PrefixIndex, rank_replicas


class PrefixAffinityRouter(RequestRouter):  # type: ignore[misc]  # ray is untyped here
    """Sends a request to the replica that has seen the most of its prompt's prefix, unless that replica
    already runs `busy_at` requests (a full batch); else to the least loaded replica.

    The gateway passes the prompt's chunk hashes as the `prefix` keyword of each call.
    """

    def initialize_state(self, busy_at: int = 16, **kwargs: Any) -> None:
        self.busy_at = busy_at
        self.index = PrefixIndex()

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        prefix = _prefix(pending_request)
        if not prefix:
            return [_shuffled(candidate_replicas)]  # the router takes the least loaded of them
        by_name = {r.replica_id.unique_id: r for r in candidate_replicas}
        depth = self.index.matches(prefix, by_name)
        cache = self.replica_queue_len_cache
        load = {name: cache.get(r.replica_id) for name, r in by_name.items()}
        return [_shuffled([by_name[name] for name in rank]) for rank in rank_replicas(depth, load, self.busy_at)]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        prefix = _prefix(pending_request)
        if prefix:
            self.index.record(prefix, replica_id.unique_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        self.index.forget(replica_id.unique_id)
        super().on_replica_actor_died(replica_id)


def _shuffled(replicas: list[RunningReplica]) -> list[RunningReplica]:
    """In random order: the router takes the first of equally loaded replicas, and a burst of requests
    sees them all equally loaded (its own requests have not landed yet)."""
    return random.sample(replicas, len(replicas))


def _prefix(pending_request: PendingRequest | None) -> list[int]:
    if pending_request is None:
        return []
    prefix = pending_request.kwargs.get("prefix")
    return list(prefix) if isinstance(prefix, list | tuple) else []
