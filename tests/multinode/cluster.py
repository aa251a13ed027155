"""A multi-node Ray cluster on one host, for end-to-end tests of what only several nodes show.

Each node is its own `ray start --block` (its own raylet, object store, agents and workers), so
the head's GCS sees real nodes join, host replicas and die. Every node runs in its own mount
namespace (`unshare --mount`): on a worker, a tmpfs is mounted over each hidden path (raydock's
home: its SQLite database, uploads, artifacts), so that node's processes, Ray workers included
(they inherit the raylet's namespace), see an empty directory there, as on a second machine.
The head's namespace mounts nothing.

Every process of a node carries the environment variable `RAYDOCK_TEST_NODE=<cluster>/<node>`
(Ray workers inherit their raylet's environment): stopping a node kills exactly the processes
that carry its mark, never anything else on the host (no `ray stop`: it kills every Ray process
on the machine, other people's clusters included). Should the test process die without its
teardown, each `ray start` gets SIGKILL (`setpriv --pdeathsig`), Ray's fate sharing takes the
raylets and workers along, and the agents notice their raylet's death and exit within a minute.

    cluster = LocalCluster(hidden=[home])
    cluster.start_head(num_cpus=0)
    worker = cluster.add_worker(num_cpus=2)
    ray.init(address=cluster.address)  # or raydock's settings.ray_address
    ...
    cluster.remove_worker(worker)  # the machine dies
    cluster.wait_node_dead(worker)  # ~3 s
    cluster.shutdown()

Node death: the GCS declares a raylet dead after `health_check_failure_threshold` failed health
checks `health_check_period_ms` apart (defaults 5 x 3 s after a 5 s initial delay: ~15 s for a
killed raylet). `FAST_NODE_DEATH`, given to the head as `--system-config` (the GCS hands it on
to every raylet that joins), makes that ~3 s.

Serve: each node's proxy binds `http_options.port`; on one host those would share the port
through SO_REUSEPORT (the kernel spreads connections over all proxies), so each worker's proxy
gets its own port (RAY_SERVE_WORKER_PROXY_HTTP_PORT, read by the proxy on that node) and the
head's port reaches the head's proxy alone, as `<head ip>:<port>` would on separate machines.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray._private.authentication.authentication_token_setup import (
    maybe_enable_token_auth_if_token_available,
)

MARK = "RAYDOCK_TEST_NODE"

# A SIGKILLed raylet fails each health check at once (connection refused), so it is declared
# dead after threshold x period. The timeout stays long: a raylet on a loaded 2-core host may
# answer late, and a node wrongly declared dead kills itself.
FAST_NODE_DEATH: dict[str, int] = {
    "health_check_initial_delay_ms": 1000,
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 5000,
    "health_check_failure_threshold": 3,
}

# Ray's minimum is 75 MiB; each node's store is a file in /dev/shm, and tests move small objects
OBJECT_STORE_BYTES = 80 * 2**20


def free_port() -> int:
    """A TCP port nothing listens on right now (on any interface: some agents bind 0.0.0.0)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@dataclass
class NodeHandle:
    """One `ray start --block` process and the node it runs."""

    name: str
    proc: subprocess.Popen
    temp_dir: Path  # its Ray logs: temp_dir/session_latest/logs
    log_path: Path  # what `ray start` printed
    mark: str  # RAYDOCK_TEST_NODE of every process of this node
    hidden: tuple[Path, ...] = ()
    resources: dict[str, float] = field(default_factory=dict)
    serve_http_port: int | None = None  # this node's Serve proxy (None: http_options.port)
    node_id: str = ""  # hex, known once the node registered with the GCS
    removed: bool = False


WorkerHandle = NodeHandle


class LocalCluster:
    """A head and any number of workers, each a separate raylet on this host.

    `hidden`: paths every worker sees as an empty tmpfs (created here if missing).
    `env`: extra environment for every node. Ray workers (so Serve's controller, proxies and
    replicas) take their environment from their raylet, never from the driver: what a driver
    sets in `os.environ` after the nodes started does not reach them.
    """

    def __init__(
        self,
        hidden: Sequence[str | os.PathLike[str]] = (),
        env: Mapping[str, str] | None = None,
        system_config: Mapping[str, object] | None = None,
        object_store_bytes: int = OBJECT_STORE_BYTES,
    ) -> None:
        self.token = uuid.uuid4().hex[:8]
        # Each node's --temp-dir is a folder here (one shared by all works too, but then the
        # logs of all nodes mix in one session dir). Private and short: the session's Unix
        # socket paths must stay under 108 bytes, and `ray start` writes `ray_current_cluster`
        # there; in the default /tmp/ray that would make anyone else's `ray.init("auto")` on
        # this host join this cluster
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rdmn-", dir="/tmp"))
        self.hidden = tuple(Path(p).resolve() for p in hidden)
        self.env = dict(env or {})
        self.system_config = {**FAST_NODE_DEATH, **(system_config or {})}
        self.object_store_bytes = object_store_bytes
        # `ray start` turns 127.0.0.1 into the host's address (`resolve_ip_for_localhost`):
        # every node, and the driver, is on that one
        self.host: str = ray.util.get_node_ip_address()
        self.gcs_port = 0
        self.head: NodeHandle | None = None
        self.workers: list[NodeHandle] = []
        self._gcs_client = None
        # Ray authenticates with a token when ~/.ray/auth_token exists (a local `ray.init()`
        # writes one): `ray start --head` and a connecting `ray.init` then both set
        # RAY_AUTH_MODE=token in their environment. Same here, before any node starts, so the
        # nodes (environment inherited) and this process's GCS client agree
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)

    # -- public API ---------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """The GCS address, for `ray.init(address=...)` or raydock's `ray_address`."""
        assert self.gcs_port, "start_head() first"
        return f"{self.host}:{self.gcs_port}"

    @property
    def alive_workers(self) -> list[NodeHandle]:
        return [w for w in self.workers if not w.removed]

    def start_head(
        self, num_cpus: int = 0, resources: Mapping[str, float] | None = None, timeout: float = 60
    ) -> NodeHandle:
        """The head: GCS and a raylet, with 0 CPUs by default (nothing CPU-bound lands there;
        Serve's controller and proxy need none)."""
        assert self.head is None, "one head per cluster"
        self.gcs_port = free_port()
        args = [
            "--head",
            f"--port={self.gcs_port}",
            f"--ray-client-server-port={free_port()}",  # 10001 by default
            "--include-dashboard=false",
            f"--system-config={json.dumps(self.system_config)}",
        ]
        self.head = self._start("head", args, num_cpus, resources, (), {}, timeout)
        return self.head

    def add_worker(
        self,
        num_cpus: int = 2,
        resources: Mapping[str, float] | None = None,
        hidden: Sequence[str | os.PathLike[str]] | None = None,
        timeout: float = 60,
    ) -> WorkerHandle:
        """A node that joins the head; `hidden` replaces the cluster's hidden paths for it."""
        assert self.head is not None, "start_head() first"
        paths = self.hidden if hidden is None else tuple(Path(p).resolve() for p in hidden)
        name = f"worker{len(self.workers) + 1}"  # unique: removed workers keep their number
        serve_port = free_port()
        env = {
            "RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(serve_port),
            "RAY_SERVE_WORKER_PROXY_GRPC_PORT": str(free_port()),
        }
        args = [f"--address={self.address}"]
        node = self._start(name, args, num_cpus, resources, paths, env, timeout)
        node.serve_http_port = serve_port
        self.workers.append(node)
        return node

    def remove_worker(self, node: WorkerHandle, graceful: bool = False) -> None:
        """Lose a node: SIGKILL its raylet and every other process of it at once (no goodbye to
        the GCS, as when a machine dies: it is declared dead by health checks), or, `graceful`,
        SIGTERM `ray start` first (the raylet unregisters: the GCS knows at once)."""
        if node.removed:
            return
        if graceful:
            self._terminate([node], timeout=15)
        self._kill(node)
        node.removed = True

    def alive_node_ids(self) -> set[str]:
        return {node_id for node_id, _ in self._alive_nodes()}

    def wait_node_dead(self, node: NodeHandle, timeout: float = 60) -> float:
        """Seconds until the GCS no longer lists `node` as alive."""
        start = time.monotonic()
        while node.node_id in self.alive_node_ids():
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"{node.name} still alive after {timeout} s")
            time.sleep(0.1)
        return time.monotonic() - start

    def connect(self, **init_kwargs: object) -> None:
        """Join this cluster from this process (a driver here attaches to the head's raylet:
        several raylets share this host's address, and Ray then prefers the head)."""
        ray.init(address=self.address, **init_kwargs)

    def leftover_pids(self) -> list[int]:
        """Processes of any node of this cluster still running (none, after `shutdown`)."""
        return [pid for pid, _ in _marked_pids(f"{self.token}/")]

    def pss_bytes(self) -> dict[str, int]:
        """Proportional set size (shared pages split between their users) of each live node's
        processes: what the cluster costs in memory."""
        totals: dict[str, int] = {}
        for pid, mark in _marked_pids(f"{self.token}/"):
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        name = mark.split("/", 1)[1]
                        totals[name] = totals.get(name, 0) + int(line.split()[1]) * 1024
        return totals

    def shutdown(self, keep_temp: bool = False) -> None:
        """SIGTERM every node (raylets stop their workers), SIGKILL what is left of them, and
        remove the temp dir (session logs) unless `keep_temp`."""
        nodes = [n for n in [*self.workers, self.head] if n is not None and not n.removed]
        self._terminate(nodes, timeout=15)
        for node in nodes:
            self._kill(node)
            node.removed = True
        for pid, _ in _marked_pids(f"{self.token}/"):  # an orphan of a removed node, if any
            _signal(pid, signal.SIGKILL)
        if not keep_temp:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    # -- internals ----------------------------------------------------------------------------

    def _alive_nodes(self) -> list[tuple[str, str]]:
        """(node id hex, node name) of each node the GCS lists as alive."""
        from ray._raylet import GcsClient
        from ray.core.generated import gcs_pb2

        if self._gcs_client is None:
            self._gcs_client = GcsClient(address=self.address)
        infos = self._gcs_client.get_all_node_info(timeout=10)
        return [
            (node_id.hex(), info.node_name)
            for node_id, info in infos.items()
            if info.state == gcs_pb2.GcsNodeInfo.ALIVE
        ]

    def _start(
        self,
        name: str,
        role_args: list[str],
        num_cpus: int,
        resources: Mapping[str, float] | None,
        hidden: tuple[Path, ...],
        node_env: Mapping[str, str],
        timeout: float,
    ) -> NodeHandle:
        mark = f"{self.token}/{name}"
        temp_dir = self.temp_dir / name  # its logs: session_latest/logs
        temp_dir.mkdir()
        ray_cmd = [
            str(Path(sys.executable).with_name("ray")),
            "start",
            "--block",
            *role_args,
            f"--node-ip-address={self.host}",
            f"--node-name={name}",
            f"--num-cpus={num_cpus}",
            f"--resources={json.dumps(dict(resources or {}))}",
            f"--object-store-memory={self.object_store_bytes}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
            # Every port a second raylet on this host would fight for: the agent's HTTP port
            # defaults to a fixed 52365 and worker ports to the same 10002-19999 range for all
            # (0: each worker binds a port the kernel picks); the others default to random
            # ports Ray picks itself, chosen here so that no two nodes can pick the same one
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            "--min-worker-port=0",
            "--max-worker-port=0",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
        ]
        for path in hidden:
            path.mkdir(parents=True, exist_ok=True)  # a mount point must exist
        mounts = "".join(
            f"mount -t tmpfs -o size=256m,mode=0755 raydock-hidden {shlex.quote(str(p))} && "
            for p in hidden
        )
        # private: the tmpfs stays inside this node; slave (the head): mounts made on the host
        # later still show there
        propagation = "private" if hidden else "slave"
        # pdeathsig: should this process die without its teardown, `ray start` gets SIGKILL,
        # and Ray's own fate sharing (with --block) takes the node's other processes along
        cmd = ["setpriv", "--pdeathsig=KILL", "unshare", "--mount", f"--propagation={propagation}"]
        cmd += ["sh", "-c", f"{mounts}exec {shlex.join(ray_cmd)}"]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env |= self.env | dict(node_env) | {MARK: mark}
        log_path = self.temp_dir / f"{name}.log"
        with open(log_path, "wb") as log:
            # own session: a Ctrl-C at the terminal stops pytest, whose teardown stops nodes
            proc = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        node = NodeHandle(name, proc, temp_dir, log_path, mark, hidden, dict(resources or {}))
        try:
            node.node_id = self._wait_registered(node, timeout)
        except BaseException:
            self._kill(node)
            node.removed = True
            raise
        return node

    def _wait_registered(self, node: NodeHandle, timeout: float) -> str:
        """The node's id, once the GCS lists a live node of its name."""
        deadline = time.monotonic() + timeout
        while True:
            if node.proc.poll() is not None:
                raise RuntimeError(f"{node.name} exited:\n{_tail(node.log_path)}")
            if node.name != "head" or _listening(self.host, self.gcs_port):
                with contextlib.suppress(Exception):  # the GCS is not answering yet
                    for node_id, name in self._alive_nodes():
                        if name == node.name:
                            return node_id
            if time.monotonic() > deadline:
                raise TimeoutError(f"{node.name} not up in {timeout} s:\n{_tail(node.log_path)}")
            time.sleep(0.2)

    def _terminate(self, nodes: Iterable[NodeHandle], timeout: float) -> None:
        """SIGTERM each `ray start` (it stops its raylet, which stops its workers) and wait
        until no process of these nodes is left, or `timeout`."""
        nodes = list(nodes)
        for node in nodes:
            if node.proc.poll() is None:
                _signal(node.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(_marked_pids(n.mark, exact=True) for n in nodes):
            time.sleep(0.2)

    def _kill(self, node: NodeHandle) -> None:
        """SIGKILL every process of `node` until none is left (a raylet may spawn a worker
        between one sweep and the next), then reap `ray start`."""
        for _ in range(50):
            pids = [pid for pid, _ in _marked_pids(node.mark, exact=True)]
            if not pids:
                break
            for pid in pids:
                _signal(pid, signal.SIGKILL)
            time.sleep(0.1)
        else:
            raise RuntimeError(f"{node.name}: processes survive SIGKILL: {pids}")
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.proc.wait(timeout=10)


def _marked_pids(mark: str, exact: bool = False) -> list[tuple[int, str]]:
    """(pid, mark) of each process whose environment (as it was at exec) holds
    RAYDOCK_TEST_NODE equal to `mark` (`exact`) or starting with it."""
    found = []
    own = os.getpid()
    needle = f"{MARK}=".encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == own:
            continue
        try:
            environ = Path(entry.path, "environ").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        for var in environ.split(b"\0"):
            if var.startswith(needle):
                value = var[len(needle) :].decode(errors="replace")
                if value == mark or (not exact and value.startswith(mark)):
                    found.append((int(entry.name), value))
                break
    return found


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
