"""A deployment's replica memory as the kernel reports it (/proc), sampled while a test runs."""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from raydock import names

MIB = 2**20


def replica_rss(deployment_id: str) -> int:
    """Resident bytes of the deployment's replica processes and their children (vLLM's engine
    core and worker), from /proc/<pid>/status."""
    tag = f"ServeReplica:{names.engine_app(deployment_id)}:engine"
    total = 0
    for proc in psutil.process_iter(["cmdline"]):
        if not any(tag in part for part in proc.info["cmdline"] or ()):
            continue
        for p in (proc, *proc.children(recursive=True)):
            with contextlib.suppress(OSError):
                status = Path(f"/proc/{p.pid}/status").read_text()
                total += int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024
    return total


@dataclass
class Peak:
    before: int
    peak: int = 0

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.before) / MIB


@contextlib.contextmanager
def peak_rss(deployment_id: str, every_s: float = 0.05) -> Iterator[Peak]:
    """The replica's resident memory before the block and its peak during it."""
    found = Peak(before=replica_rss(deployment_id))
    assert found.before > 0, f"no replica process of {deployment_id} found"
    found.peak = found.before
    done = threading.Event()

    def sample() -> None:
        while not done.wait(every_s):
            found.peak = max(found.peak, replica_rss(deployment_id))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield found
    finally:
        done.set()
        thread.join()
        found.peak = max(found.peak, replica_rss(deployment_id))
