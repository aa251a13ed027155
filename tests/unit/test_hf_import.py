"""raydock.platform.hf against a local server speaking the Hub's API (no Ray): which files a
model needs, the reasons a repo is refused, and a download that a retry resumes."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from raydock.config import Settings
from raydock.modelgen import cached_model_dir
from raydock.modelgen.adapters import cached_adapter_dir
from raydock.optimizers.merge import is_merge_of, merged_key
from raydock.platform import hf
from raydock.platform.model_archive import ArchiveLimits
from tests.hf_hub import FakeHub

LIMITS = ArchiveLimits(max_total_bytes=20 * 2**20)
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def sharded(files: dict[str, bytes], index_names: tuple[str, ...] = SHARDS) -> dict[str, bytes]:
    """A repo laid out as Mistral's: the weights in SHARDS, which an index names
    (`index_names`: perhaps one the repo lacks), and a consolidated copy of them beside (for
    another library), as large as the shards."""
    weight_map = {f"layer.{i}.weight": shard for i, shard in enumerate(index_names)}
    index = json.dumps({"metadata": {"total_size": 2 * 2**20}, "weight_map": weight_map})
    return (
        {n: c for n, c in files.items() if n != "model.safetensors"}
        | {"consolidated.safetensors": b"c" * 2 * 2**20, hf.INDEX_FILE: index.encode()}
        | {shard: b"s" * 2**20 for shard in SHARDS}
    )


@pytest.fixture(scope="module")
def hub():
    files = {p.name: p.read_bytes() for p in cached_model_dir("tiny").iterdir() if p.is_file()}
    with FakeHub() as hub:
        hub.add_repo("org/public", files | {"README.md": b"card", "pytorch_model.bin": b"x"})
        hub.add_repo("org/private", files, private=True)
        hub.add_repo("org/gated", files, gated=True)
        hub.add_repo("org/pickled", {**files, "model.safetensors": b""} | {"model.bin": b"x"})
        hub.add_repo("org/flaky", files)
        unsafe = {n: c for n, c in files.items() if not n.endswith(".safetensors")}
        hub.add_repo("org/pickle-only", unsafe | {"pytorch_model.bin": b"x" * 100})
        hub.add_repo("org/sharded", sharded(files))
        hub.add_repo("org/gated-sharded", sharded(files), gated=True)
        hub.add_repo(
            "org/lost-shard", sharded(files, (*SHARDS, "model-00003-of-00002.safetensors"))
        )
        hub.add_repo("org/two-copies", files | {"consolidated.safetensors": b"c" * 2**20})
        adapter = {p.name: p.read_bytes() for p in cached_adapter_dir("tiny", 3).iterdir()}
        hub.add_repo("org/adapter-two-copies", adapter | {"model.safetensors": b"m" * 2**20})
        hub.add_token("hf_good", user="alice")
        yield hub


def files_of(hub, repo: str, token: str | None = None, connection: str | None = None):
    return hf.repo_files(hub.url, repo, None, token, connection, "base", LIMITS)


def test_only_the_files_a_model_serves_are_chosen(hub):
    files = files_of(hub, "org/public")
    assert "README.md" not in files.sizes and "pytorch_model.bin" not in files.sizes
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files.sizes)
    assert len(files.sha) == 40


def test_only_the_shards_the_index_names_are_chosen_and_downloaded(hub, tmp_path):
    files = files_of(hub, "org/sharded")
    weights = {n for n in files.sizes if n.endswith(".safetensors")}
    assert weights == set(SHARDS)
    assert hf.INDEX_FILE in files.sizes and "config.json" in files.sizes
    rest = sum(s for n, s in files.sizes.items() if not n.endswith(".safetensors"))
    # the two 1 MiB shards, not the 2 MiB consolidated copy: the limit and progress count these
    assert files.total == rest + 2 * 2**20
    hf.repo_files(hub.url, "org/sharded", None, None, None, "base", ArchiveLimits(files.total))

    seen: list[tuple[int, int]] = []
    folder = tmp_path / "download"
    hf.download(hub.url, "org/sharded", files, None, None, folder, lambda *a: seen.append(a))
    assert seen[-1] == (files.total, files.total)
    hf.take_model_files(folder, files, tmp_path / "model")
    assert {p.name for p in (tmp_path / "model").glob("*.safetensors")} == set(SHARDS)
    fetched = {r["path"].rsplit("/", 1)[1] for r in hub.requests if "/org/sharded/" in r["path"]}
    assert "consolidated.safetensors" not in fetched

    # the index of a gated repo is read with the connection's token
    assert set(SHARDS) <= set(files_of(hub, "org/gated-sharded", "hf_good", "team").sizes)


def test_an_unsharded_model_gets_model_safetensors_alone(hub):
    files = files_of(hub, "org/two-copies")
    assert "model.safetensors" in files.sizes
    assert "consolidated.safetensors" not in files.sizes
    adapter = hf.repo_files(hub.url, "org/adapter-two-copies", None, None, None, "adapter", LIMITS)
    assert {n for n in adapter.sizes if n.endswith(".safetensors")} == {"adapter_model.safetensors"}


def test_a_shard_the_index_names_and_the_repo_lacks_is_refused(hub):
    with pytest.raises(hf.HubError, match="model-00003-of-00002.safetensors.*repo lacks"):
        files_of(hub, "org/lost-shard")


def test_refusals_say_what_to_do(hub):
    with pytest.raises(hf.HubError, match="private repository needs a connection"):
        files_of(hub, "org/private")
    assert files_of(hub, "org/private", "hf_good", "team").total > 0
    with pytest.raises(hf.HubError, match="gated.*no connection"):
        files_of(hub, "org/gated")
    with pytest.raises(hf.HubError, match="refused the token of connection 'old'"):
        files_of(hub, "org/public", "hf_revoked", "old")
    with pytest.raises(hf.HubError, match="over the import limit"):
        hf.repo_files(hub.url, "org/public", None, None, None, "base", ArchiveLimits(1000))
    with pytest.raises(hf.HubError, match="revision 'nope'"):
        hf.repo_files(hub.url, "org/public", "nope", None, None, "base", LIMITS)


def test_pickle_only_weights_are_refused_before_a_download_even_when_allowed(hub):
    """allow_pickle let the layout check pass, yet only safetensors are fetched: the import
    downloaded config and tokenizer, then failed with "no weights"."""
    allowed = ArchiveLimits(max_total_bytes=20 * 2**20, allow_pickle=True)
    with pytest.raises(hf.HubError, match="pickle weights only.*fetches safetensors weights"):
        hf.repo_files(hub.url, "org/pickle-only", None, None, None, "base", allowed)
    assert not [r for r in hub.requests if "org/pickle-only/resolve/" in r["path"]]


def test_whoami_names_the_account_or_refuses(hub):
    assert hf.whoami(hub.url, "hf_good") == "alice"
    with pytest.raises(hf.HubError, match="refused"):
        hf.whoami(hub.url, "hf_bad")


def test_a_broken_download_fails_then_a_retry_fetches_only_what_is_missing(
    hub, tmp_path, monkeypatch
):
    monkeypatch.setattr(hf, "RETRY_PAUSE_S", 0)
    files = files_of(hub, "org/flaky")
    hub.cut("org/flaky", "model.safetensors", 1000, times=hf.DOWNLOAD_ATTEMPTS, reset=True)
    folder = tmp_path / "download"
    with pytest.raises(hf.HubError, match="interrupted.*retry the import"):
        hf.download(hub.url, "org/flaky", files, None, None, folder, lambda *_: None)
    seen: list[tuple[int, int]] = []
    hf.download(hub.url, "org/flaky", files, None, None, folder, lambda *a: seen.append(a))
    assert seen[-1] == (files.total, files.total)
    hf.take_model_files(folder, files, tmp_path / "model")
    for name, size in files.sizes.items():
        assert (tmp_path / "model" / name).stat().st_size == size
    config_gets = [
        r
        for r in hub.requests
        if r["method"] == "GET"
        and r["path"].endswith("flaky/resolve/" + files.sha + "/config.json")
    ]
    assert len(config_gets) == 1  # kept from the broken attempt


def test_a_full_disk_fails_the_download_at_once_and_says_so(hub, tmp_path, monkeypatch):
    """ENOSPC was retried 3 times and reported as "interrupted": refused up front when the
    disk is short of what is missing, and not retried when it fills meanwhile."""
    import errno
    import shutil

    import huggingface_hub

    monkeypatch.setattr(hf, "RETRY_PAUSE_S", 0)
    files = files_of(hub, "org/public")
    usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(p)._replace(free=1000))
    with pytest.raises(hf.HubError, match="disk cannot hold org/public: .* 0.0 MiB free"):
        hf.download(hub.url, "org/public", files, None, None, tmp_path / "a", lambda *_: None)
    monkeypatch.setattr(shutil, "disk_usage", usage)

    calls = []

    def full(*args, **kwargs):  # the disk fills during the download
        calls.append(args)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", full)
    with pytest.raises(hf.HubError, match="disk cannot hold org/public"):
        hf.download(hub.url, "org/public", files, None, None, tmp_path / "b", lambda *_: None)
    assert len(calls) == 1


class _FakeImport:
    """jobs._ModelImport without the registry or the store: records what the task finished."""

    finished: dict = {}

    def __init__(self, cfg, model_id, job_id):
        self.registry = SimpleNamespace(update_job=SimpleNamespace(remote=lambda *a, **k: None))

    def mark_validating(self):
        pass

    def finish(self, folder, meta, origin=None):
        _FakeImport.finished = {"folder": folder, "files": sorted(p.name for p in folder.iterdir())}
        return {"status": "READY"}

    def fail(self, reason):
        return {"error": reason}


def test_an_import_moves_the_files_within_the_download_folder_filesystem(
    hub, tmp_path, monkeypatch
):
    """The model is moved (renamed) out of the download folder into the task's work folder:
    beside it in the node cache, never under /tmp (often a tmpfs of its own: the rename fails
    with EXDEV after the whole download)."""
    from raydock.platform import jobs, model_archive

    cfg = Settings(home=str(tmp_path / "home"), hf_endpoint=hub.url)
    downloads = Path(cfg.cache_location) / "downloads"
    monkeypatch.setattr(jobs, "_ModelImport", _FakeImport)
    monkeypatch.setattr(jobs, "JobProgress", lambda *a: lambda *b: None)
    monkeypatch.setattr(jobs.ray, "get", lambda ref: ref)
    monkeypatch.setattr(model_archive, "inspect_model_dir", lambda *a, **k: None)
    origin = {"repoId": "org/public", "revision": None}
    result = jobs.import_hf_task._function(cfg.to_dict(), "m-1", "j-1", origin, None)
    assert result == {"status": "READY"}
    model = _FakeImport.finished["folder"]
    assert model.parent.parent == downloads and model.parent.name.startswith(".work-")
    assert "model.safetensors" in _FakeImport.finished["files"]
    # the work folder and the download, removed (only the locks' folder stays)
    assert [p.name for p in downloads.iterdir()] == [".locks"]


def test_two_imports_of_one_repo_on_a_node_both_end_ready(hub, tmp_path, monkeypatch):
    """Both took the download folder: the Hub's client deleted the file the other had
    finished, and the first to end removed the folder under the other ("config.json is
    incomplete after the download"). The second now waits, and says so."""
    import threading

    from raydock.platform import jobs, model_archive

    cfg = Settings(home=str(tmp_path / "home"), hf_endpoint=hub.url)
    messages: list[str] = []
    second_waits = threading.Event()

    class Import(_FakeImport):
        def __init__(self, cfg, model_id, job_id):
            def update_job(job_id, message=None, **_):
                messages.append(message)
                if message and message.startswith("waiting for another import"):
                    second_waits.set()

            self.registry = SimpleNamespace(update_job=SimpleNamespace(remote=update_job))

        def finish(self, folder, meta, origin=None):
            return {"status": "READY", "files": sorted(p.name for p in folder.iterdir())}

    real_download = hf.download

    first_holds = threading.Event()

    def download(*args):  # the first holds the folder until the second is waiting for it
        real_download(*args)
        first_holds.set()
        assert second_waits.wait(30)

    monkeypatch.setattr(jobs, "_ModelImport", Import)
    monkeypatch.setattr(jobs, "JobProgress", lambda *a: lambda *b: None)
    monkeypatch.setattr(jobs.ray, "get", lambda ref: ref)
    monkeypatch.setattr(model_archive, "inspect_model_dir", lambda *a, **k: None)
    monkeypatch.setattr(hf, "download", download)
    origin = {"repoId": "org/public", "revision": None}
    results: dict[str, dict] = {}

    def run(model_id: str) -> None:
        task = jobs.import_hf_task._function
        results[model_id] = task(cfg.to_dict(), model_id, "j", origin, None)

    first = threading.Thread(target=run, args=("m-1",))
    first.start()
    assert first_holds.wait(30)
    second = threading.Thread(target=run, args=("m-2",))
    second.start()
    first.join(60)
    second.join(60)
    assert second_waits.is_set()
    assert results["m-1"] == results["m-2"] and results["m-1"]["status"] == "READY", results
    assert "model.safetensors" in results["m-2"]["files"]


def test_a_merge_is_found_by_its_adapter():
    key = merged_key("base-sum", "adapter-sum")
    assert key.startswith("merged/")
    assert is_merge_of(key.split("/")[1], "adapter-sum")
    assert not is_merge_of(key.split("/")[1], "base-sum")
