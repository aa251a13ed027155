"""Node-local cache of directory artifacts, in front of an ArtifactStore.

Every replica on a node loads its model from here, so a model is downloaded once per node,
not once per replica. Entries are content-addressed (root/<digest>): an entry never changes,
and a complete entry (its marker exists) needs no store call at all. Replicas are separate
processes, so one file lock per digest makes concurrent fetches share one download.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from .store import ArtifactStore, Progress, is_sha256, open_store

log = logging.getLogger(__name__)

MARKER_NAME = ".raydock-complete"  # written last in an entry; its mtime is the last use


#: the in-use locks this process holds, by file: open for as long as the process lives
_HELD: dict[str, int] = {}


class NodeCache:
    """Fetches artifacts into root/<digest> once per node and evicts the least recently used.

    max_bytes (0 = unlimited) bounds the total size of complete entries; an entry being
    fetched by anyone (its lock held), or held by a process that serves it (`hold`: a shared
    lock on .locks/<digest>.use for that process's life), is never evicted.
    """

    def __init__(self, root: Path | str, max_bytes: int = 0) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._locks = self.root / ".locks"
        self._locks.mkdir(parents=True, exist_ok=True)

    def _lock(self, digest: str) -> FileLock:
        # a new FileLock per use: separate descriptors exclude each other across threads too
        return FileLock(str(self._locks / f"{digest}.lock"))

    def _marker(self, digest: str) -> Path:
        return self.root / digest / MARKER_NAME

    def _in_use(self, digest: str) -> Path:
        return self._locks / f"{digest}.use"

    def fetch(
        self,
        store: ArtifactStore,
        prefix: str,
        digest: str,
        progress: Progress | None = None,
        hold: bool = False,
    ) -> Path:
        """The local directory of the artifact at prefix, downloading it unless cached;
        `hold`: this process uses it from now on (a replica loading its model), so no
        eviction removes it while the process lives.

        ArtifactError from the store propagates unchanged, leaving no entry behind.
        """
        if not is_sha256(digest):
            raise ValueError(f"cache digest {digest!r}: not a sha256 hex digest")
        entry = self.root / digest
        marker = self._marker(digest)
        with self._lock(digest):
            if not marker.is_file():
                self._download(store, prefix, digest, progress)
            _touch(marker)
            if hold:  # taken with the fetch lock held: no eviction can come in between
                self._hold(digest)
        if self.max_bytes > 0:
            self._evict(self.max_bytes, keep=digest)
        return entry

    def _hold(self, digest: str) -> None:
        path = str(self._in_use(digest))
        if path not in _HELD:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_SH)
            _HELD[path] = fd

    def _unused(self, digest: str) -> int | None:
        """An exclusive lock on the entry's in-use file (None: a process holds it)."""
        fd = os.open(self._in_use(digest), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def _download(
        self, store: ArtifactStore, prefix: str, digest: str, progress: Progress | None
    ) -> None:
        """Fill root/<digest>; called with the digest's lock held."""
        entry = self.root / digest
        if entry.exists():  # left by a crash between rename and marker, or a failed eviction
            shutil.rmtree(entry)
        # a download of this digest that died (OOM, kill) left its temp dir; with the lock
        # held, no live one can be running
        for stale in self.root.glob(f".tmp-{digest}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.root / f".tmp-{digest}-{uuid.uuid4().hex[:16]}"
        try:
            manifest = store.get_dir(prefix, tmp, digest, progress)
            os.rename(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        info = {"bytes": manifest.total_bytes, "prefix": prefix, "store": store.uri}
        part = entry / f"{MARKER_NAME}.tmp"
        part.write_text(json.dumps(info))
        os.replace(part, entry / MARKER_NAME)
        log.info("cached %s (%d bytes) from %s/%s", digest, info["bytes"], store.uri, prefix)

    def entries(self) -> list[dict[str, Any]]:
        """Complete entries, least recently used first: {digest, bytes, last_used (epoch s)}."""
        found = []
        for entry in self.root.iterdir():
            if not is_sha256(entry.name):
                continue
            marker = entry / MARKER_NAME
            try:
                last_used = marker.stat().st_mtime
                size = int(json.loads(marker.read_text())["bytes"])
            except FileNotFoundError:
                continue  # incomplete, or evicted meanwhile
            except (OSError, ValueError, KeyError, TypeError):
                size = sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())
            found.append({"digest": entry.name, "bytes": size, "last_used": last_used})
        return sorted(found, key=lambda e: (e["last_used"], e["digest"]))

    def evict(self, max_bytes: int) -> list[str]:
        """Delete least recently used entries until at most max_bytes remain (0 empties the
        cache); entries in use by a fetch are skipped. Returns the evicted digests."""
        return self._evict(max_bytes, keep=None)

    def _evict(self, max_bytes: int, keep: str | None) -> list[str]:
        entries = self.entries()
        total = sum(e["bytes"] for e in entries)
        evicted = []
        for e in entries:
            if total <= max_bytes:
                break
            if e["digest"] == keep:
                continue
            lock = self._lock(e["digest"])
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue  # someone is fetching (or evicting) it
            unused = self._unused(e["digest"])
            if unused is None:  # a replica serves it
                lock.release()
                continue
            try:
                marker = self._marker(e["digest"])
                if marker.is_file():  # else another process evicted it meanwhile
                    marker.unlink()  # first: a half-deleted entry is incomplete, not corrupt
                    shutil.rmtree(self.root / e["digest"], ignore_errors=True)
                    evicted.append(e["digest"])
                    log.info("evicted %s (%d bytes) from %s", e["digest"], e["bytes"], self.root)
            finally:
                os.close(unused)
                lock.release()
            total -= e["bytes"]
        if total > max_bytes:
            log.warning(
                "node cache %s holds %d bytes, over its %d limit: the rest is in use or new",
                self.root,
                total,
                max_bytes,
            )
        return evicted


def fetch_cached(
    artifact: Mapping[str, Any], progress: Progress | None = None, hold: bool = False
) -> Path:
    """An artifact's directory on this node, fetched through this node's cache.

    `artifact` is plain data: the store and cache settings (`Settings.artifact_access()`:
    "store", "endpoint", "cache_dir", "cache_max_bytes") plus the artifact's "prefix" and
    "digest". Replicas and conversion tasks on any node fetch with it; a replica `hold`s
    what it serves (NodeCache.fetch).
    """
    store = open_store(artifact["store"], artifact["endpoint"] or None)
    cache = NodeCache(Path(artifact["cache_dir"]).expanduser(), artifact["cache_max_bytes"])
    return cache.fetch(store, artifact["prefix"], artifact["digest"], progress, hold)


def _touch(path: Path) -> None:
    # time.time_ns, not os.utime(path): file timestamps use a coarse clock (ms steps)
    now = time.time_ns()
    os.utime(path, ns=(now, now))
