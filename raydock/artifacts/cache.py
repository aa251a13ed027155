"""Node-local cache of directory artifacts, in front of an ArtifactStore.

Every replica on a node loads its model from here, so a model is downloaded once per node,
not once per replica. Entries are content-addressed (root/<digest>): an entry never changes,
and a complete entry (its marker exists) needs no store call at all. Replicas are separate
processes, so one file lock per digest makes concurrent fetches share one download.

What a process killed mid-way leaves (an OOM kill, a node crash: no `finally` runs) is removed
once a lock says its owner is gone, not by age: a download's or a build's work folder
(root/.tmp-<digest>-*) and an entry without its marker by a later fetch or eviction once the
digest's lock is free; a task's `work_folder` (an HF import's) by the next `work_folder`
beside it once its own lock is free. A `resumable_folder` (an HF download kept for a retry)
is removed by the next one beside it once no task holds it and it lay idle long enough.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from .store import ArtifactStore, Progress, is_sha256, open_store

log = logging.getLogger(__name__)

MARKER_NAME = ".raydock-complete"  # written last in an entry; its mtime is the last use
WORK_LOCK_NAME = ".raydock-work.lock"  # in a work_folder: locked while its process lives
LOCKS_DIR = ".locks"  # lock files, beside what they lock (kept: see remove_abandoned_folders)
WORK_PREFIX = ".tmp-"  # root/.tmp-<digest>-<random>: where an entry is made before its rename
LEGACY_ADAPTERS = "adapters"  # root/adapters: merged adapters before they were entries

#: makes an entry's files inside a fresh work folder: returns their directory there and the
#: facts the marker records ("bytes" at least)
Fill = Callable[[Path], tuple[Path, dict[str, Any]]]


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
        self._locks = self.root / LOCKS_DIR
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
        download = _downloader(store, prefix, digest, progress)
        entry, shared = self._fetch(digest, download, share=hold)
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
        download = _downloader(store, prefix, digest, progress)
        entry, shared = self._fetch(digest, download, share=True)
        try:
            yield entry
        finally:
            os.close(shared)  # releases the shared lock: evictable again

    @contextlib.contextmanager
    def made(self, recipe: str, build: Callable[[Path], Path]) -> Iterator[Path]:
        """An entry made on this node rather than fetched (an adapter merged into its base and
        converted), kept from eviction until the block ends. `recipe` names what is made, all
        its inputs included: its sha256 is the entry's digest. Unless cached, `build(work)`
        makes it inside the fresh folder `work` and returns the directory to keep; one build
        per node at a time, and an evicted entry is built again by the next `made`."""
        digest = hashlib.sha256(recipe.encode()).hexdigest()

        def fill(work: Path) -> tuple[Path, dict[str, Any]]:
            made = build(work)
            return made, {"bytes": _tree_bytes(made), "recipe": recipe}

        entry, shared = self._fetch(digest, fill, share=True)
        try:
            yield entry
        finally:
            os.close(shared)

    def _fetch(self, digest: str, fill: Fill, share: bool) -> tuple[Path, int | None]:
        """root/<digest>, filled with `fill` unless complete; `share`: also return a
        descriptor holding a shared lock on the entry's in-use file (None otherwise), which
        keeps eviction away until it is closed."""
        if not is_sha256(digest):
            raise ValueError(f"cache digest {digest!r}: not a sha256 hex digest")
        entry = self.root / digest
        marker = self._marker(digest)
        shared = None
        with self._lock(digest):
            if not marker.is_file():
                self._fill(digest, fill)
            _touch(marker)
            if share:  # taken with the fetch lock held: no eviction can come in between
                shared = os.open(self._in_use(digest), os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(shared, fcntl.LOCK_SH)
        try:
            self.remove_dead_leftovers()
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

    def _fill(self, digest: str, fill: Fill) -> None:
        """Make root/<digest> with `fill`; called with the digest's lock held."""
        self._remove_leftovers(digest)  # with the lock held, their process is gone
        work = self.root / f"{WORK_PREFIX}{digest}-{uuid.uuid4().hex[:16]}"
        work.mkdir()
        try:
            made, info = fill(work)
            os.rename(made, self.root / digest)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        part = self.root / digest / f"{MARKER_NAME}.tmp"
        part.write_text(json.dumps(info))
        os.replace(part, self._marker(digest))
        log.info("cached %s (%d bytes): %s", digest, info["bytes"], _without_bytes(info))

    def _remove_leftovers(self, digest: str) -> int:
        """Remove the digest's work folders and its entry if incomplete (no marker); called
        with the digest's lock held, so whoever left them has died (or failed). The bytes
        freed."""
        found = list(self.root.glob(f"{WORK_PREFIX}{digest}-*"))
        entry = self.root / digest
        if entry.is_dir() and not self._marker(digest).is_file():
            found.append(entry)  # a crash between rename and marker, or mid-eviction
        return sum(_remove_tree(path, "of a process that died") for path in found)

    def remove_dead_leftovers(self) -> int:
        """Remove what fetches and builds that died left in the cache (work folders,
        entries without their marker): those of digests whose lock is free, as a held lock
        means a live fetch is still writing them; and the merged adapter conversions an
        earlier raydock kept outside the cache (root/adapters: now cache entries). The bytes
        freed."""
        freed = 0
        if (legacy := self.root / LEGACY_ADAPTERS).is_dir():
            freed += _remove_tree(legacy, "(an earlier raydock's merged adapters)")
        for digest in sorted({d for p in self.root.iterdir() if (d := self._leftover_of(p))}):
            lock = self._lock(digest)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue  # being fetched right now
            try:
                freed += self._remove_leftovers(digest)
            finally:
                lock.release()
        return freed

    def _leftover_of(self, path: Path) -> str | None:
        """The digest `path` may be a leftover of: a work folder, or an entry without its
        marker (None: neither)."""
        name = path.name
        if name.startswith(WORK_PREFIX) and is_sha256(digest := name[len(WORK_PREFIX) :][:64]):
            return digest
        if is_sha256(name) and not self._marker(name).is_file():
            return name
        return None

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
                size = _tree_bytes(entry)
            found.append({"digest": entry.name, "bytes": size, "last_used": last_used})
        return sorted(found, key=lambda e: (e["last_used"], e["digest"]))

    def evict(self, max_bytes: int) -> list[str]:
        """Delete least recently used entries until at most max_bytes remain (0 empties the
        cache); entries in use by a fetch are skipped, what dead fetches left is removed.
        Returns the evicted digests."""
        self.remove_dead_leftovers()
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
    with _node_cache(artifact).held(store, artifact["prefix"], artifact["digest"], progress) as p:
        yield p


@contextlib.contextmanager
def made_cached(
    access: Mapping[str, Any], recipe: str, build: Callable[[Path], Path]
) -> Iterator[Path]:
    """`NodeCache.made` in this node's cache (`access`: `Settings.artifact_access()`)."""
    with _node_cache(access).made(recipe, build) as path:
        yield path


def _node_cache(access: Mapping[str, Any]) -> NodeCache:
    return NodeCache(Path(access["cache_dir"]).expanduser(), access["cache_max_bytes"])


def _downloader(store: ArtifactStore, prefix: str, digest: str, progress: Progress | None) -> Fill:
    """A `Fill` that downloads the artifact at prefix, verified against its digest."""

    def download(work: Path) -> tuple[Path, dict[str, Any]]:
        files = work / "files"
        manifest = store.get_dir(prefix, files, digest, progress)
        return files, {"bytes": manifest.total_bytes, "prefix": prefix, "store": store.uri}

    return download


@contextlib.contextmanager
def work_folder(parent: Path, prefix: str) -> Iterator[Path]:
    """A fresh folder parent/<prefix><random> for a task's scratch files, removed when the
    block ends. The process holds a lock on it meanwhile, so that when the process dies
    without cleaning up, a later `work_folder` (of the same parent and prefix) removes it."""
    remove_dead_work_folders(parent, prefix)
    path, fd = _new_locked_folder(parent, prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)  # after the removal: a sweep never sees it unlocked


@contextlib.contextmanager
def resumable_folder(
    path: Path, keep_idle_s: float, waiting: Callable[[], None] | None = None
) -> Iterator[Path]:
    """A download folder that outlives a task that failed, so that a retry resumes it; the
    task holds it alone meanwhile: two imports of one repo on a node downloaded every file
    twice (the Hub's client deletes a finished file it did not write), and the first to end
    removed the folder under the other. `waiting` is called when another task holds it.
    Entering first removes the other resumable folders beside it that no task holds and that
    nothing wrote for keep_idle_s: retries that never came (the model deleted, or imported
    elsewhere)."""
    locks = path.parent / LOCKS_DIR
    locks.mkdir(parents=True, exist_ok=True)
    remove_abandoned_folders(path.parent, keep_idle_s)
    fd = os.open(locks / f"{path.name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting is not None:
                waiting()
            fcntl.flock(fd, fcntl.LOCK_EX)  # another import's, or a sweep deciding on it
        yield path
    finally:
        os.close(fd)


def remove_abandoned_folders(parent: Path, keep_idle_s: float) -> int:
    """Remove parent's resumable folders (not the dot ones: work folders, locks) that no task
    holds and that nothing wrote for keep_idle_s; the bytes freed."""
    freed, now = 0, time.time()
    for path in parent.iterdir():
        if path.name.startswith(".") or not path.is_dir():
            continue
        # never unlinked: a task holding the old file's lock would not keep a sweep away
        fd = os.open(parent / LOCKS_DIR / f"{path.name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # a task is filling it
        try:
            if now - _last_written(path) > keep_idle_s:
                freed += _remove_tree(path, f"(idle over {keep_idle_s:.0f} s, no retry came)")
        finally:
            os.close(fd)
    return freed


def _last_written(path: Path) -> float:
    """The newest mtime in a tree (its folders' too: a file created or removed moves them)."""
    newest = path.stat().st_mtime
    for p in path.rglob("*"):
        with contextlib.suppress(FileNotFoundError):
            newest = max(newest, p.lstat().st_mtime)
    return newest


def _new_locked_folder(parent: Path, prefix: str) -> tuple[Path, int]:
    """A new folder, and a descriptor holding the exclusive lock on its lock file."""
    while True:  # again if a concurrent sweep removed the new folder before it was locked
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        lock = path / WORK_LOCK_NAME
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        except FileNotFoundError:
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits for a sweep holding it to finish
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                return path, fd
        os.close(fd)


def remove_dead_work_folders(parent: Path, prefix: str) -> int:
    """Remove the `work_folder`s in parent whose process has died (their lock is free);
    the bytes freed."""
    freed = 0
    for path in parent.glob(f"{prefix}*"):
        try:
            fd = os.open(path / WORK_LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        except (FileNotFoundError, NotADirectoryError):
            continue  # removed meanwhile, or not a folder
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # its process is alive
        try:
            freed += _remove_tree(path, "of a task that died")
        finally:
            os.close(fd)
    return freed


def _remove_tree(path: Path, why: str) -> int:
    size = _tree_bytes(path)
    shutil.rmtree(path, ignore_errors=True)
    log.info("removed %s (%d bytes) %s", path, size, why)
    return size


def _tree_bytes(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        with contextlib.suppress(FileNotFoundError):
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
    return total


def _without_bytes(info: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in info.items() if k != "bytes"}


def _touch(path: Path) -> None:
    # time.time_ns, not os.utime(path): file timestamps use a coarse clock (ms steps)
    now = time.time_ns()
    os.utime(path, ns=(now, now))
