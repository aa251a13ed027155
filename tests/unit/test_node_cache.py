"""The node cache: one download per artifact per node, from threads and processes alike."""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from filelock import FileLock

from raydock.artifacts import ArtifactCorrupt, ArtifactMissing, LocalStore, NodeCache
from raydock.artifacts.cache import MARKER_NAME, held_cached

PREFIX = "models/m1"


class CountingStore(LocalStore):
    """A LocalStore that records the calls a cache makes (and can make downloads slow)."""

    def __init__(self, root: Path, delay: float = 0.0, count_file: Path | None = None) -> None:
        super().__init__(root)
        self.delay = delay
        self.count_file = count_file
        self.calls: list[str] = []

    def get_dir(self, prefix, local_dir, digest, progress=None):
        self.calls.append("get_dir")
        if self.count_file:  # one line per download, from any process
            with open(self.count_file, "a") as f:
                f.write(f"{os.getpid()}\n")
        time.sleep(self.delay)  # others arrive while this download runs
        return super().get_dir(prefix, local_dir, digest, progress)

    def read_manifest(self, prefix):
        self.calls.append("read_manifest")
        return super().read_manifest(prefix)

    def get_file(self, key, local, progress=None):
        self.calls.append("get_file")
        return super().get_file(key, local, progress)

    def exists(self, key):
        self.calls.append("exists")
        return super().exists(key)

    def list(self, prefix=""):
        self.calls.append("list")
        return super().list(prefix)


def put_model(store: LocalStore, tmp_path: Path, prefix: str = PREFIX, size: int = 50_000) -> str:
    """Store a small model at prefix; returns its digest."""
    src = tmp_path / f"src-{prefix.replace('/', '-')}"
    (src / "weights").mkdir(parents=True)
    (src / "config.json").write_text('{"model_type": "llama"}')
    (src / "weights" / "model.safetensors").write_bytes(os.urandom(size))
    return store.put_dir(src, prefix).digest


@pytest.fixture
def store(tmp_path):
    return CountingStore(tmp_path / "store")


def leftovers(cache: NodeCache) -> list[str]:
    """Names in the cache root that are neither entries nor the lock folder."""
    return sorted(p.name for p in cache.root.iterdir() if p.name != ".locks" and len(p.name) != 64)


def test_a_fetch_downloads_once_and_then_serves_locally(store, tmp_path):
    digest = put_model(store, tmp_path)
    cache = NodeCache(tmp_path / "cache")
    got = []
    path = cache.fetch(store, PREFIX, digest, progress=lambda d, t: got.append((d, t)))
    assert path == tmp_path / "cache" / digest
    assert (path / "weights" / "model.safetensors").stat().st_size == 50_000
    assert (path / MARKER_NAME).is_file()
    assert got[-1][0] == got[-1][1] > 50_000
    assert store.calls.count("get_dir") == 1

    store.calls.clear()
    assert cache.fetch(store, PREFIX, digest) == path
    assert store.calls == []  # warm: the store is not asked anything
    assert [e["digest"] for e in cache.entries()] == [digest]
    assert leftovers(cache) == []


def test_threads_share_one_download(tmp_path):
    store = CountingStore(tmp_path / "store", delay=0.3)
    digest = put_model(store, tmp_path)
    cache = NodeCache(tmp_path / "cache")
    start = threading.Barrier(8)

    def fetch(_):
        start.wait()
        return cache.fetch(store, PREFIX, digest)

    with ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(fetch, range(8)))
    assert store.calls.count("get_dir") == 1
    assert set(paths) == {tmp_path / "cache" / digest}


def _fetch_in_child(cache_root, store_root, count_file, digest, start, out) -> None:
    store = CountingStore(Path(store_root), delay=0.5, count_file=Path(count_file))
    start.wait()
    out.put(str(NodeCache(Path(cache_root)).fetch(store, PREFIX, digest)))


def test_processes_share_one_download(tmp_path):
    store = CountingStore(tmp_path / "store")
    digest = put_model(store, tmp_path)
    count_file = tmp_path / "downloads.txt"
    ctx = multiprocessing.get_context("spawn")  # replicas are separate processes
    start, out = ctx.Event(), ctx.Queue()
    args = (str(tmp_path / "cache"), str(tmp_path / "store"), str(count_file), digest, start, out)
    children = [ctx.Process(target=_fetch_in_child, args=args) for _ in range(2)]
    for child in children:
        child.start()
    start.set()
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    paths = [out.get(timeout=5) for _ in children]
    assert len(count_file.read_text().splitlines()) == 1
    assert set(paths) == {str(tmp_path / "cache" / digest)}


def test_a_corrupt_artifact_leaves_nothing(store, tmp_path):
    digest = put_model(store, tmp_path)
    store.local_path(f"{PREFIX}/weights/model.safetensors").write_bytes(b"tampered")
    cache = NodeCache(tmp_path / "cache")
    with pytest.raises(ArtifactCorrupt, match="weights/model.safetensors"):
        cache.fetch(store, PREFIX, digest)
    assert not (tmp_path / "cache" / digest).exists()
    assert leftovers(cache) == []  # no .tmp-* directory
    assert cache.entries() == []

    with pytest.raises(ArtifactMissing, match="models/none"):
        cache.fetch(store, "models/none", digest)
    assert leftovers(cache) == [] and cache.entries() == []


def test_an_incomplete_entry_is_fetched_again(store, tmp_path):
    digest = put_model(store, tmp_path)
    cache = NodeCache(tmp_path / "cache")
    path = cache.fetch(store, PREFIX, digest)
    (path / MARKER_NAME).unlink()  # as if the process died before writing the marker
    (path / "config.json").unlink()  # (not written in place: it is a hard link to the store's)

    assert cache.fetch(store, PREFIX, digest) == path
    assert store.calls.count("get_dir") == 2
    assert (path / "config.json").read_text() == '{"model_type": "llama"}'


def test_a_dead_download_is_cleaned_up(store, tmp_path):
    """Laid out as killed fetches leave them: removed by the next fetch, unless a live fetch
    holds the digest's lock."""
    digest = put_model(store, tmp_path)
    cache = NodeCache(tmp_path / "cache")
    stale = tmp_path / "cache" / f".tmp-{digest}-0123456789abcdef"  # its process was killed
    (stale / "weights").mkdir(parents=True)
    (stale / "weights" / "model.safetensors").write_bytes(b"half")
    unmarked = tmp_path / "cache" / ("e" * 64)  # killed between its rename and its marker
    unmarked.mkdir()
    (unmarked / "config.json").write_text("{}")
    other = tmp_path / "cache" / f".tmp-{'f' * 64}-0123456789abcdef"  # still running
    other.mkdir()
    legacy = tmp_path / "cache" / "adapters" / "0123-4567-int8"  # an earlier raydock's merge
    legacy.mkdir(parents=True)
    (legacy / "model.bin").write_bytes(b"merged")

    with FileLock(str(tmp_path / "cache" / ".locks" / f"{'f' * 64}.lock")):  # its fetch's
        cache.fetch(store, PREFIX, digest)
    assert not stale.exists() and not unmarked.exists() and not legacy.parent.exists()
    assert other.exists()

    cache.evict(0)  # its fetch has ended, without a trace: an eviction pass removes it
    assert leftovers(cache) == [] and cache.entries() == []


def disk_bytes(root: Path) -> int:
    """What the cache folder takes on disk (file sizes)."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


class HangingStore(LocalStore):
    """A download that writes part of the artifact, then hangs until its process is killed."""

    def __init__(self, root: Path, started) -> None:
        super().__init__(root)
        self.started = started

    def get_dir(self, prefix, local_dir, digest, progress=None):
        (local_dir / "weights").mkdir(parents=True)
        (local_dir / "weights" / "model.safetensors").write_bytes(os.urandom(30_000))
        self.started.set()
        time.sleep(600)


def _hang_in_child(kind, cache_root, store_root, prefix, digest, started) -> None:
    """A replica killed mid-way: downloading a model, or building a merged conversion."""
    cache = NodeCache(Path(cache_root))
    if kind == "download":
        cache.fetch(HangingStore(Path(store_root), started), prefix, digest)
        return

    def build(work: Path) -> Path:
        (work / "merged").mkdir()
        (work / "merged" / "model.safetensors").write_bytes(os.urandom(30_000))
        started.set()
        time.sleep(600)
        return work / "merged"

    with cache.made(f"merged {digest}", build):
        pass


def start_hanging(kind: str, store: LocalStore, cache_root: Path, prefix: str, digest: str):
    ctx = multiprocessing.get_context("spawn")  # replicas are separate processes
    started = ctx.Event()
    args = (kind, str(cache_root), str(store.root), prefix, digest, started)
    child = ctx.Process(target=_hang_in_child, args=args, daemon=True)  # ends with the tests
    child.start()
    assert started.wait(60)
    return child


@pytest.mark.parametrize("kind", ["download", "build"])
def test_what_a_killed_process_left_goes_with_the_next_fetch_but_a_live_ones_stays(
    kind, store, tmp_path, caplog
):
    """A process killed mid-download (or mid-merge) left its work folder, of a model no one
    fetches again: the cache grew past its bound for good. Now the next fetch of anything
    removes it, unless its process still runs (it holds the digest's lock)."""
    a, b, c = three_models(store, tmp_path)
    root = tmp_path / "cache"
    NodeCache(tmp_path / "probe").fetch(store, "models/m1", b)
    size = disk_bytes(tmp_path / "probe")  # of one model
    dead = start_hanging(kind, store, root, "models/m0", a)
    dead.kill()  # SIGKILL: no finally, no cleanup
    dead.join(60)
    live = start_hanging(kind, store, root, "models/m2", c)
    try:
        assert disk_bytes(root) >= 60_000  # two work folders of 30,000 bytes
        cache = NodeCache(root, max_bytes=size + size // 2)  # room for one model
        with caplog.at_level(logging.INFO, logger="raydock.artifacts.cache"):
            cache.fetch(store, "models/m1", b)
        work = [p.name for p in root.glob(".tmp-*")]
        assert len(work) == 1 and not work[0].startswith(f".tmp-{a}")  # the live one stays
        assert "(30000 bytes) of a process that died" in caplog.text
    finally:
        live.kill()
        live.join(60)
    cache.evict(cache.max_bytes)  # its process has died now: the next pass removes it
    assert leftovers(cache) == []
    assert [e["digest"] for e in cache.entries()] == [b]
    assert disk_bytes(root) <= cache.max_bytes


def test_entries_made_on_the_node_are_evicted_like_fetched_ones_unless_held(store, tmp_path):
    """A merged adapter conversion is an entry too: within the bound, kept while held, made
    again once evicted."""
    a = put_model(store, tmp_path, "models/m0")
    cache = NodeCache(tmp_path / "cache")
    builds = []

    def build(work: Path) -> Path:
        builds.append(work)
        (work / "out").mkdir()
        (work / "out" / "model.bin").write_bytes(os.urandom(40_000))
        return work / "out"

    with cache.made("merged adapter x into y", build) as made:
        cache.max_bytes = 1000  # smaller than any entry
        cache.fetch(store, "models/m0", a)
        assert (made / "model.bin").stat().st_size == 40_000  # held: not evicted
        with cache.made("merged adapter x into y", build) as again:  # another replica
            assert again == made and len(builds) == 1
    cache.fetch(store, "models/m0", a)
    assert not made.exists() and [e["digest"] for e in cache.entries()] == [a]
    with cache.made("merged adapter x into y", build) as made:  # evicted: made again
        assert (made / "model.bin").stat().st_size == 40_000 and len(builds) == 2
    assert leftovers(cache) == []


def test_a_digest_is_a_sha256(store, tmp_path):
    cache = NodeCache(tmp_path / "cache")
    for bad in ("../../etc", "A" * 64, "0" * 63):
        with pytest.raises(ValueError, match="digest"):
            cache.fetch(store, PREFIX, bad)
    assert store.calls == []


def three_models(store, tmp_path) -> tuple[str, str, str]:
    return tuple(put_model(store, tmp_path, f"models/m{i}") for i in range(3))


def test_the_least_recently_used_entry_goes(store, tmp_path):
    a, b, c = three_models(store, tmp_path)
    probe = NodeCache(tmp_path / "probe")
    probe.fetch(store, "models/m0", a)
    size = probe.entries()[0]["bytes"]

    cache = NodeCache(tmp_path / "cache", max_bytes=2 * size + size // 2)  # two of three fit
    cache.fetch(store, "models/m0", a)
    cache.fetch(store, "models/m1", b)
    cache.fetch(store, "models/m0", a)  # a is now used more recently than b
    cache.fetch(store, "models/m2", c)
    assert {e["digest"] for e in cache.entries()} == {a, c}
    assert not (tmp_path / "cache" / b).exists()
    assert [e["digest"] for e in cache.entries()] == [a, c]  # least recently used first
    assert all(e["bytes"] == size for e in cache.entries())


def test_the_entry_just_fetched_stays_even_when_too_big(store, tmp_path):
    a, b, c = three_models(store, tmp_path)
    cache = NodeCache(tmp_path / "cache", max_bytes=1000)  # smaller than any entry
    for prefix, digest in (("models/m0", a), ("models/m1", b), ("models/m2", c)):
        path = cache.fetch(store, prefix, digest)
        assert [e["digest"] for e in cache.entries()] == [digest]
        assert (path / "config.json").is_file()


def test_an_entry_in_use_is_not_evicted(store, tmp_path):
    a, b, c = three_models(store, tmp_path)
    cache = NodeCache(tmp_path / "cache")
    cache.fetch(store, "models/m0", a)
    cache.fetch(store, "models/m1", b)
    size = cache.entries()[0]["bytes"]
    cache.max_bytes = 2 * size + size // 2

    # a is the least recently used, but someone (another replica's fetch) holds its lock
    with FileLock(str(tmp_path / "cache" / ".locks" / f"{a}.lock")):
        cache.fetch(store, "models/m2", c)
    assert {e["digest"] for e in cache.entries()} == {a, c}

    assert cache.evict(0) == [a, c]  # nothing held now: evict(0) empties the cache
    assert cache.entries() == []
    assert leftovers(cache) == []


def _serve_in_child(cache_root, store_root, digest, served, done) -> None:
    """A replica: fetches its model holding it, then serves until told to stop."""
    NodeCache(Path(cache_root)).fetch(LocalStore(Path(store_root)), "models/m0", digest, hold=True)
    served.set()
    done.wait(60)


def test_a_model_a_replica_serves_is_not_evicted_while_it_runs(store, tmp_path):
    """Another replica on the node fetching other models (room for one) evicted the model a
    running replica loads from; now the serving process holds it until it ends."""
    a, b, c = three_models(store, tmp_path)
    ctx = multiprocessing.get_context("spawn")  # replicas are separate processes
    served, done = ctx.Event(), ctx.Event()
    replica = ctx.Process(
        target=_serve_in_child, args=(str(tmp_path / "cache"), str(store.root), a, served, done)
    )
    replica.start()
    try:
        assert served.wait(60)
        cache = NodeCache(tmp_path / "cache", max_bytes=1000)  # smaller than any entry
        cache.fetch(store, "models/m1", b)
        cache.fetch(store, "models/m2", c)
        assert (tmp_path / "cache" / a / "config.json").is_file()  # a is in use: kept
        assert {e["digest"] for e in cache.entries()} == {a, c}
    finally:
        done.set()
        replica.join(timeout=60)
    assert cache.evict(0) == [a, c]  # its replica has ended: it may go now


def test_what_a_task_reads_is_not_evicted_until_its_block_ends(store, tmp_path):
    """A merge fetches its base, then its adapter: with room for one of them (8,000 bytes for
    6,000 and 3,000), the adapter's fetch evicted the base the merge was about to read."""
    base = put_model(store, tmp_path, "models/base", size=6000)
    adapter = put_model(store, tmp_path, "models/adapter", size=3000)
    cache = NodeCache(tmp_path / "cache", max_bytes=8000)

    with cache.held(store, "models/base", base) as base_dir:
        with cache.held(store, "models/adapter", adapter) as adapter_dir:
            assert (base_dir / "weights" / "model.safetensors").stat().st_size == 6000
            assert (adapter_dir / "weights" / "model.safetensors").stat().st_size == 3000
        # a conversion's source: another fetch on the node, by another task, does not take it
        NodeCache(tmp_path / "cache", max_bytes=8000).fetch(store, "models/adapter", adapter)
        assert (base_dir / "config.json").read_text() == '{"model_type": "llama"}'
        assert {e["digest"] for e in cache.entries()} == {base, adapter}

    # the block has ended: the next fetch evicts the least recently used entry again
    cache.fetch(store, "models/adapter", adapter)
    assert not (tmp_path / "cache" / base).exists()
    assert [e["digest"] for e in cache.entries()] == [adapter]


def test_held_cached_fetches_through_the_node_cache(store, tmp_path):
    base = put_model(store, tmp_path, "models/base", size=6000)
    adapter = put_model(store, tmp_path, "models/adapter", size=3000)
    access = {"store": store.uri, "endpoint": None, "cache_dir": str(tmp_path / "cache")}
    access["cache_max_bytes"] = 8000
    with (
        held_cached({**access, "prefix": "models/base", "digest": base}) as base_dir,
        held_cached({**access, "prefix": "models/adapter", "digest": adapter}),
    ):
        assert (base_dir / "weights" / "model.safetensors").stat().st_size == 6000
    assert base_dir == tmp_path / "cache" / base
    assert NodeCache(tmp_path / "cache").evict(8000) == [base]  # released: evictable
