"""`gorgon serve --replicas N`: start (or join, with --address) a Ray cluster, one replica actor per
engine, each running `gorgon serve` with this command's engine and server options, and the front on this
process's --host and --port."""

from __future__ import annotations

import argparse
import os
import sys

from fastapi import FastAPI

from cluster.front import build_front
from cluster.replicas import Replicas
from cluster.replica import replica_actor
from cluster.routing import PrefixRouter, RoundRobinRouter, RoutingPolicy

# The options the front keeps for itself; every other option of `gorgon serve` goes to each replica.
FRONT_ONLY = ("--replicas", "--address", "--replica-host", "--routing", "--balance-abs", "--balance-rel",
              "--cache-threshold", "--host", "--port", "--threads")
LOOPBACK = "127.0.0.1"


def replica_args(serve_argv: list[str]) -> list[str]:
    """`gorgon serve`'s arguments (after the word serve) as each replica gets them."""
    front_only = argparse.ArgumentParser(add_help=False)
    for flag in FRONT_ONLY:
        front_only.add_argument(flag)
    _, rest = front_only.parse_known_args(serve_argv)
    return rest


def start_replicas(num_replicas: int, threads: int, serve_args: list[str], num_gpus: float = 0.0,
                   address: str | None = None, replica_host: str | None = None) -> Replicas:
    """Ray up (a local cluster on loopback, or the one at `address`), the replicas started and answering
    on `replica_host` (default: loopback for a local cluster, each node's address otherwise). A replica
    that cannot start raises, with the end of its log."""
    if not address:
        # A one-machine cluster listens on loopback only: Ray's own servers too. Ray does so where it
        # supports no multi-machine cluster (macOS, Windows), by this switch, read when ray is imported.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        node = ray.nodes()[0]["NodeManagerAddress"] if not address else LOOPBACK
        if node != LOOPBACK:
            print(f"gorgon: warning: the local Ray cluster listens on {node}, not only on loopback (ray was "
                  "imported before the cluster started)", file=sys.stderr, flush=True)
    if replica_host is None and not address:
        replica_host = LOOPBACK
    actor = replica_actor(threads, num_gpus)
    actors = [actor.remote(index, serve_args, threads, replica_host) for index in range(num_replicas)]
    endpoints, errors = [], []
    for pending in [a.endpoint.remote() for a in actors]:       # every answer read: none reported twice
        try:
            endpoints.append(ray.get(pending))
        except ray.exceptions.RayError as err:
            errors.append(err)
    if errors:
        for started in actors:
            ray.kill(started, no_restart=True)
        raise errors[0]
    return Replicas(actors, endpoints)


def stop_replicas(replicas: Replicas) -> None:
    import ray

    ray.get([actor.stop.remote() for actor in replicas.actors])
    for actor in replicas.actors:
        ray.kill(actor, no_restart=True)


def _cause(err: BaseException) -> str:
    """The replica's own error under Ray's wrapping (a failed actor creation), else Ray's message."""
    while getattr(err, "cause", None) is not None and err.cause is not err:
        err = err.cause
    return str(err).strip()


def cluster_app(replicas: Replicas, routing: str = "prefix", policy: RoutingPolicy = RoutingPolicy(),
                **front_options) -> FastAPI:
    """The front over `replicas`; `front_options`: build_front's keys and body limit."""
    count = len(replicas.actors)
    router = RoundRobinRouter(count) if routing == "round-robin" else PrefixRouter(count, policy)
    return build_front(replicas, router, **front_options)


def serve_cluster(args: argparse.Namespace, serve_argv: list[str]) -> int:
    """The command: replicas up, the front serving until SIGINT or SIGTERM, then everything stopped."""
    import ray
    import uvicorn

    threads = args.threads or max(1, (os.cpu_count() or 1) // args.replicas)
    num_gpus = 1.0 if args.device.startswith("cuda") else 0.0
    try:
        policy = RoutingPolicy(cache_threshold=args.cache_threshold, balance_abs=args.balance_abs,
                               balance_rel=args.balance_rel)
    except ValueError as err:
        print(f"gorgon: error: {err}", file=sys.stderr)
        return 2
    try:
        replicas = start_replicas(args.replicas, threads, replica_args(serve_argv), num_gpus, args.address,
                                  args.replica_host)
    except (ray.exceptions.RayError, ConnectionError, ValueError) as err:
        print(f"gorgon: error: the replicas did not start: {_cause(err)}", file=sys.stderr)
        return 2
    each = f"{threads} thread{'s' if threads > 1 else ''}{', 1 GPU' if num_gpus else ''} each"
    print(f"Gorgon serving {args.replicas} replicas ({each}) on "
          f"http://{args.host}:{args.port} (OpenAI-compatible, /v1), routing by {args.routing}", flush=True)
    app = cluster_app(replicas, args.routing, policy, admin_key=args.admin_key, api_key=args.api_key,
                      max_body_bytes=int(args.max_body_mb * 2**20))
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        stop_replicas(replicas)
        ray.shutdown()
    return 0
