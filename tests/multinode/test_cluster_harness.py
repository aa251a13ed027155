"""The multi-node harness itself: nodes, the hidden home, head pinning, Serve across nodes and
the loss of a worker."""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from tests.multinode.cluster import LocalCluster, NodeHandle, free_port

# raydock pins its control plane (registry and lifecycle actors, API and gateway replicas, all
# num_cpus=0) to the head with a sliver of this resource, which only the head has
HEAD = {"node:__internal_head__": 0.001}


def on(node: NodeHandle) -> NodeAffinitySchedulingStrategy:
    return NodeAffinitySchedulingStrategy(node_id=node.node_id, soft=False)


@ray.remote(num_cpus=0)
def listdir(path: str) -> tuple[str, list[str]]:
    return ray.get_runtime_context().get_node_id(), sorted(os.listdir(path))


def listdir_on(node: NodeHandle, path: Path) -> tuple[str, list[str]]:
    return ray.get(listdir.options(scheduling_strategy=on(node)).remote(str(path)))


@ray.remote(num_cpus=0)
class Probe:
    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


def test_a_head_and_two_workers_are_alive(driver: LocalCluster) -> None:
    alive = [n for n in ray.nodes() if n["Alive"]]
    assert len(alive) == 3
    assert {n["NodeID"] for n in alive} == {driver.head.node_id} | {
        w.node_id for w in driver.alive_workers
    }
    head = next(n for n in alive if n["NodeID"] == driver.head.node_id)
    assert head["Resources"].get("CPU", 0) == 0  # engine replicas can never land there


def test_workers_see_an_empty_home_and_the_head_sees_it(
    driver: LocalCluster, mn_home: Path
) -> None:
    marker = f"written-by-driver-{uuid.uuid4().hex[:6]}"
    (mn_home / marker).write_text("on the head's side only")
    node_id, files = listdir_on(driver.head, mn_home)
    assert node_id == driver.head.node_id and marker in files
    for worker in driver.alive_workers:
        node_id, files = listdir_on(worker, mn_home)
        assert node_id == worker.node_id
        assert files == [], f"{worker.name} sees the head's home: {files}"


def test_the_head_resource_places_an_actor_on_the_head(driver: LocalCluster) -> None:
    probes = [Probe.options(resources=HEAD).remote() for _ in range(3)]
    assert set(ray.get([p.node_id.remote() for p in probes])) == {driver.head.node_id}
    for p in probes:
        ray.kill(p)


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 1})
class Where:
    def __call__(self, request) -> dict:
        return {"node": ray.get_runtime_context().get_node_id()}


@dataclass
class App:
    url: str  # the head's proxy

    def get(self, timeout: float = 10) -> httpx.Response:
        return httpx.get(self.url, timeout=timeout)


def serve_details() -> dict:
    """Serve's own view (what the dashboard shows): replicas and proxies with their nodes."""
    from ray.serve.context import _get_global_client

    return _get_global_client().get_serve_details()


def replicas() -> list[tuple[str, str]]:
    """(node id, state name) of each replica of `Where`."""
    deployment = serve_details()["applications"]["where"]["deployments"]["Where"]
    return [
        (r.get("node_id") or "", getattr(r["state"], "value", str(r["state"])))
        for r in deployment["replicas"]
    ]


@pytest.fixture(scope="module")
def app(driver: LocalCluster) -> App:
    port = free_port()
    # proxy_location stays Serve's default (a proxy on every node with replicas), as raydock
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(Where.bind(), name="where", route_prefix="/")
    return App(f"http://127.0.0.1:{port}/")


def test_serve_replicas_run_on_the_workers_and_the_head_ingress_answers(
    driver: LocalCluster, app: App
) -> None:
    nodes = {node for node, state in replicas() if state == "RUNNING"}
    assert len(replicas()) == 2 and nodes <= {w.node_id for w in driver.alive_workers}, nodes
    # the controller and every proxy are happy on a 0-CPU head (they take 0 CPUs)
    details = serve_details()
    assert details["controller_info"]["node_id"] == driver.head.node_id
    assert str(details["proxies"][driver.head.node_id]["status"]).endswith("HEALTHY")
    served_by = {app.get().json()["node"] for _ in range(20)}
    assert served_by == nodes  # both replicas answer through the head's proxy


def test_losing_a_worker_moves_its_replica_to_the_other(
    driver: LocalCluster, app: App, capsys: pytest.CaptureFixture[str]
) -> None:
    """Requests keep succeeding through the other replica; the lost one comes back on the
    surviving worker. Prints the timeline (seconds after the kill)."""
    victim = next(w for w in driver.alive_workers if w.node_id in dict(replicas()))
    survivor = next(w for w in driver.alive_workers if w is not victim)
    start = time.monotonic()
    driver.remove_worker(victim)
    times: dict[str, float] = {"killed": time.monotonic() - start}
    failures = 0
    try:
        while time.monotonic() - start < 90:
            now = time.monotonic() - start
            try:
                ok = app.get(timeout=5).status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                times.setdefault("first_ok", now)
            else:
                failures += 1
                times["last_failure"] = now
            if "node_dead" not in times and victim.node_id not in driver.alive_node_ids():
                times["node_dead"] = now
            current = replicas()
            if (victim.node_id, "RUNNING") not in current:
                times.setdefault("replica_lost", now)  # Serve stopped counting on it
            if current and all(r == (survivor.node_id, "RUNNING") for r in current):
                times.setdefault("replaced", now)
            if {"node_dead", "replica_lost", "replaced", "first_ok"} <= times.keys():
                break
            time.sleep(0.2)
        with capsys.disabled():
            shown = ", ".join(f"{k} {v:.1f} s" for k, v in times.items())
            print(f"\nworker loss: {shown}; {failures} failed requests")
        assert times.get("node_dead", 99) < 10, times  # ~15-20 s without FAST_NODE_DEATH
        assert "replaced" in times, replicas()
        assert len(replicas()) == 2
        assert all(app.get().status_code == 200 for _ in range(5))
    finally:
        driver.add_worker(num_cpus=2)  # the session's cluster has two workers again
