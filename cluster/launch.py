"""`gorgon serve --replicas N`: start (or join, with --address) a Ray cluster, one replica actor per
engine, and the front on this process's port."""

from __future__ import annotations

from cluster.front import Replicas, build_front
from cluster.replica import replica_actor
from cluster.routing import PrefixRouter


def start_replicas(num_replicas: int, threads: int, model: str | None, engine_options: dict, server_options: dict,
                   address: str | None = None) -> Replicas:
    """Ray up (a local cluster, or the one at `address`), the replicas started and answering."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    actor = replica_actor(threads)
    actors = [actor.remote(model, engine_options, server_options, threads) for _ in range(num_replicas)]
    return Replicas(actors, ray.get([a.url.remote() for a in actors]))


def cluster_app(replicas: Replicas):
    return build_front(replicas, PrefixRouter(len(replicas.actors)))
