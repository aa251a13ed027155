"""Node-local cache of directory artifacts, in front of an ArtifactStore.

Every replica on a node loads its model from here, so a model is downloaded once per node,
not once per replica. Entries are content-addressed (root/<digest>): an entry never changes,
and a complete entry (its marker exists) needs no store call at all. Replicas are separate
processes, so one file lock per digest makes concurrent fetches share one download.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
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
    fetched by anyone (its lock held), or held (a shared lock on .locks/<digest>.use: for a
    serving process's life with `fetch(hold=True)`, for a task's reading with `held`), is
    never evicted.
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
        entry, shared = self._fetch(store, prefix, digest, progress, share=hold)
        if shared is not None:
            path = str(self._in_use(digest))
            if path in _HELD:  # one lock per entry is enough for the process's life
                os.close(shared)
            else:
                _HELD[path] = shared
        return entry

    @contextlib.contextmanager
    def held(
        self,
        store: ArtifactStore,
        prefix: str,
        digest: str,
        progress: Progress | None = None,
    ) -> Iterator[Path]:
        """`fetch`, and keep the entry from eviction until the block ends: for a task that
        reads it while other fetches on the node run (a merge fetches the adapter after its
        base; other tasks and replicas fetch beside a conversion)."""
        entry, shared = self._fetch(store, prefix, digest, progress, share=True)
        try:
            yield entry
        finally:
            os.close(shared)  # releases the shared lock: evictable again

    def _fetch(
        self,
        store: ArtifactStore,
        prefix: str,
        digest: str,
        progress: Progress | None,
        share: bool,
    ) -> tuple[Path, int | None]:
        """`fetch`; `share`: also return a descriptor holding a shared lock on the entry's
        in-use file (None otherwise), which keeps eviction away until it is closed."""
        if not is_sha256(digest):
            raise ValueError(f"cache digest {digest!r}: not a sha256 hex digest")
        entry = self.root / digest
        marker = self._marker(digest)
        shared = None
        with self._lock(digest):
            if not marker.is_file():
                self._download(store, prefix, digest, progress)
            _touch(marker)
            if share:  # taken with the fetch lock held: no eviction can come in between
                shared = os.open(self._in_use(digest), os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(shared, fcntl.LOCK_SH)
        try:
            if self.max_bytes > 0:
                self._evict(self.max_bytes, keep=digest)
        except BaseException:
            if shared is not None:
                os.close(shared)
            raise
        return entry, shared

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
            if unused is None:  # a replica serves it, or a task reads it (held)
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
    "digest". Replicas and tasks on any node fetch with it; a replica `hold`s what it
    serves (NodeCache.fetch), a task reads in a `held_cached` block.
    """
    store = open_store(artifact["store"], artifact["endpoint"] or None)
    cache = NodeCache(Path(artifact["cache_dir"]).expanduser(), artifact["cache_max_bytes"])
    return cache.fetch(store, artifact["prefix"], artifact["digest"], progress, hold)


@contextlib.contextmanager
def held_cached(artifact: Mapping[str, Any], progress: Progress | None = None) -> Iterator[Path]:
    """`fetch_cached` for a task: the directory is not evicted while the block runs
    (NodeCache.held), so later fetches on the node cannot remove what the task reads."""
    store = open_store(artifact["store"], artifact["endpoint"] or None)
    cache = NodeCache(Path(artifact["cache_dir"]).expanduser(), artifact["cache_max_bytes"])
    with cache.held(store, artifact["prefix"], artifact["digest"], progress) as path:
        yield path


def _touch(path: Path) -> None:
    # time.time_ns, not os.utime(path): file timestamps use a coarse clock (ms steps)
    now = time.time_ns()
    os.utime(path, ns=(now, now))
