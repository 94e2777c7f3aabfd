"""Building and starting the cluster application: the catalog and metrics-board actors, N replicas,
the ingress. `loraplex serve --replicas N` calls `serve_cluster`; a `serve deploy` config names
`loraplex.distributed.cluster:app_builder` with the same options as arguments (docs/scaling.md)."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from loraplex.config import EngineConfig, ServerConfig
from loraplex.distributed.board import METRICS_BOARD_ACTOR, MetricsBoard
from loraplex.distributed.catalog import CATALOG_ACTOR, AdapterCatalog
from loraplex.distributed.ingress import Ingress
from loraplex.distributed.replica import replica_deployment

logger = logging.getLogger(__name__)

NAMESPACE = "loraplex"
APP_NAME = "loraplex"


def engine_config(engine_options: dict[str, Any]) -> EngineConfig:
    """The engine options (as `loraplex serve` passes them, `adapters` aside) as a validated config."""
    return EngineConfig.from_options(**{k: v for k, v in engine_options.items() if k != "adapters"})


def catalog_root(engine_options: dict[str, Any]) -> Path:
    """The catalog's store: beside a single server's stores, in the data dir of the node it runs on."""
    return engine_config(engine_options).resolved_data_dir() / "cluster-catalog"


def shared_actors(engine_options: dict[str, Any]) -> tuple[Any, Any]:
    """The catalog and the metrics board: created once per cluster, found again by name (so an ingress or
    replica restart, or a second deploy, uses the same catalog). Restarted by Ray if their process dies."""
    options = dict(namespace=NAMESPACE, lifetime="detached", get_if_exists=True, max_restarts=-1, num_cpus=0)
    # The catalog's store is on this node's disk: the actor stays on this node, restarts included.
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    catalog = ray.remote(AdapterCatalog).options(name=CATALOG_ACTOR, max_concurrency=1, scheduling_strategy=here,
                                                  **options).remote(str(catalog_root(engine_options)))
    board = ray.remote(MetricsBoard).options(name=METRICS_BOARD_ACTOR, **options).remote()
    return catalog, board


ROUTINGS = ("affinity", "multiplexed", "random")
AFFINITY_ROUTER = "loraplex.distributed.routing:AdapterAffinityRouter"


def application(engine_options: dict[str, Any], config: ServerConfig, replicas: int,
                replica_cpus: float = 1.0, replica_gpus: float | None = None, routing: str = "affinity",
                autoscaling: dict[str, Any] | None = None) -> Any:
    """The Serve application (not yet running). `routing`: affinity (each adapter's requests to its home
    replica by rendezvous hashing, routing.py; the default), multiplexed (Serve's own: a replica that
    loaded the adapter recently), or random (Serve's choice blind to the adapter). Compared in
    benchmarks/cluster_routing.py. `autoscaling`: Serve's autoscaling_config for the replicas
    (min_replicas, max_replicas, target_ongoing_requests, ...) instead of a fixed `replicas`."""
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, got {routing!r}")
    engine = engine_config(engine_options)
    if replica_gpus is None:
        replica_gpus = 1.0 if engine.device.startswith("cuda") else 0.0
    catalog, board = shared_actors(engine_options)
    router = {"request_router_config": RequestRouterConfig(request_router_class=AFFINITY_ROUTER)} \
        if routing == "affinity" else {}
    count = {"autoscaling_config": dict(autoscaling)} if autoscaling else {"num_replicas": replicas}
    replica = replica_deployment(engine.max_cpu_adapters + 1).options(
        **count, ray_actor_options={"num_cpus": replica_cpus, "num_gpus": replica_gpus},
        # in flight per replica: its batch; beyond, the router tries the next replica in the adapter's ranking,
        # then queues up to --max-waiting requests, then the ingress answers 429
        max_ongoing_requests=engine.max_num_seqs, max_queued_requests=config.max_waiting,
        health_check_period_s=2, health_check_timeout_s=30, **router)
    return Ingress.options(ray_actor_options={"num_cpus": 0}).bind(
        replica.bind(engine_options, config, catalog, board), board, config, routing)


def app_builder(args: dict[str, Any]) -> Any:
    """For `serve deploy` / `serve run` config files: `args` holds `engine` (engine options, as
    `loraplex serve`'s flags name them with underscores), `server` (server options), `replicas`,
    and optionally `replica_cpus`, `replica_gpus`, `routing` and `autoscaling` (Serve's autoscaling_config,
    which then sets the number of replicas between its bounds)."""
    server = dict(args.get("server", {}))
    if "allowed_origins" in server:
        server["allowed_origins"] = tuple(server["allowed_origins"])
    return application(dict(args.get("engine", {})), ServerConfig(**server), int(args.get("replicas", 1)),
                       float(args.get("replica_cpus", 1.0)), args.get("replica_gpus"),
                       str(args.get("routing", "affinity")), args.get("autoscaling"))


def serve_cluster(engine_options: dict[str, Any], config: ServerConfig, replicas: int,
                  ray_address: str | None = None, replica_cpus: float = 1.0) -> int:
    """Start (or join, with `ray_address`) a Ray cluster, deploy the application on config.host:port, and
    serve until SIGINT/SIGTERM."""
    # Ray's core installs its own SIGTERM handler (which exits at once, 15): block both signals in every thread
    # (threads inherit the mask) and wait for them here instead, so that a stop is graceful.
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    ray.init(address=ray_address, namespace=NAMESPACE, include_dashboard=False,
             runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(application(engine_options, config, replicas, replica_cpus), name=APP_NAME, route_prefix="/")
        logger.info("ready: %d replica(s); point an OpenAI client at base_url=http://%s:%d/v1", replicas,
                    config.host, config.port)
        received = signal.sigwait(stop_signals)
        logger.info("%s: stopping the cluster application", signal.Signals(received).name)
        serve.delete(APP_NAME)
    finally:
        if ray_address is None:  # our own local cluster: all of it goes (a joined one keeps its other apps)
            serve.shutdown()
        ray.shutdown()
    return 0
