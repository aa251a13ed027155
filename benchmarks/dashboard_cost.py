"""What Ray's dashboard (the job server `ray job submit` needs) costs a local cluster: the
time `ray.init` takes and the memory (PSS) of every Ray process, with and without it.

    flock /tmp/ray.lock python -m benchmarks.dashboard_cost --rounds 2

Each measurement runs in a fresh process (one cluster at a time), alternating the two.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import time

SETTLE_S = 8.0  # the dashboard's modules and agents start after ray.init returns


def measure(dashboard: bool) -> tuple[float, float]:
    """(seconds ray.init took, MiB of PSS summed over this cluster's processes)."""
    import psutil
    import ray

    started = time.monotonic()
    ray.init(num_cpus=16, include_dashboard=dashboard)
    init_s = time.monotonic() - started
    time.sleep(SETTLE_S)
    session = ray._private.worker._global_node.get_session_dir_path()
    # the cluster: processes started with this session's dir, and all their children (the
    # workers, the dashboard's module processes, which rename themselves)
    cluster: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        if session in " ".join(proc.info["cmdline"] or []):
            cluster[proc.pid] = proc
            with contextlib.suppress(psutil.NoSuchProcess):
                cluster.update({c.pid: c for c in proc.children(recursive=True)})
    pss = 0
    for proc in cluster.values():
        try:
            pss += proc.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    ray.shutdown()
    return init_s, pss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--one", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        init_s, mib = measure(args.one == "on")
        print(f"{init_s:.2f} {mib:.0f}")
        return
    for _ in range(args.rounds):
        for mode in ("off", "on"):
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.dashboard_cost", "--one", mode],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            print(f"dashboard {mode:3}: ray.init {out[-2]} s, Ray processes {out[-1]} MiB PSS")


if __name__ == "__main__":
    main()
