"""One multi-node cluster for the session: a 0-CPU head and two 2-CPU workers on this host,
where the workers cannot see raydock's home (see cluster.py)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from ray import serve

from tests.multinode.cluster import LocalCluster
from tests.s3_server import S3Server, s3_server

# What raydock.platform.bootstrap.connect puts in the environment before it starts a cluster of
# its own. On a cluster it joins (settings.ray_address), setting them in the driver reaches
# nothing: the controller, proxies and replicas take their environment from their node's
# raylet, and worker_niceness is the raylet's own setting. So every node starts with them.
NODE_ENV = {
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    "RAY_worker_niceness": "0",
    # Tests only: THROUGHPUT_OPTIMIZED turns on Serve's direct ingress, which holds every
    # stopping ingress replica open 30 s "so load balancers can deregister it" (none here), so
    # each serve.shutdown, scale-down or undeploy would take 30 s
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/multinode/" in item.nodeid:
            item.add_marker(pytest.mark.multinode)


def _can_unshare() -> bool:
    """Mount namespaces need root (CAP_SYS_ADMIN) and util-linux's unshare (and setpriv)."""
    if not (shutil.which("unshare") and shutil.which("setpriv")):
        return False
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.fixture(scope="session")
def mn_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """raydock's home on the head's side: workers see an empty tmpfs here."""
    return tmp_path_factory.mktemp("raydock-home")


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """An S3-compatible server on 127.0.0.1 (moto), reachable from every node."""
    with s3_server() as server:
        yield server


@pytest.fixture(scope="session")
def cluster(mn_home: Path, s3: S3Server) -> Iterator[LocalCluster]:
    """Head + 2 workers for the whole session. A test that removes a worker adds one back.
    Every node gets the S3 server's credentials (boto3's standard chain reads them)."""
    if not _can_unshare():
        pytest.skip("needs root and unshare --mount")
    c = LocalCluster(hidden=[mn_home], env={**NODE_ENV, **s3.env})
    try:
        c.start_head(num_cpus=0)
        c.add_worker(num_cpus=2)
        c.add_worker(num_cpus=2)
        yield c
    finally:
        # a driver left connected to it would outlive the cluster (another one is not ours)
        if ray.is_initialized() and ray.get_runtime_context().gcs_address == c.address:
            ray.shutdown()
        c.shutdown()
        assert not c.leftover_pids(), "processes of the test cluster survived its shutdown"


@pytest.fixture(scope="module")
def driver(cluster: LocalCluster) -> Iterator[LocalCluster]:
    """This process connected to `cluster` as a driver (on the head's side: it sees the home);
    Serve and the connection go at the end of the module."""
    if ray.is_initialized():  # e.g. tests/e2e's local cluster, in the same pytest process
        pytest.skip("this process is connected to another Ray cluster: run tests/multinode alone")
    cluster.connect(namespace="raydock-multinode-tests")
    yield cluster
    serve.shutdown()
    ray.shutdown()
