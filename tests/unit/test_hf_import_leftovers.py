"""An HF import whose process was killed (OOM, node crash) left its `.work-*` folder beside
the downloads, with the model in it: the node's next import removes it, never a live one's.
A download kept for a retry that never came is removed by a later import once it lay idle
for upload_session_ttl_s, never one an import holds (no Ray: the task's function, against a
local server speaking the Hub's API)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from raydock.artifacts.cache import resumable_folder, work_folder
from raydock.config import Settings
from raydock.modelgen import cached_model_dir
from raydock.platform.jobs import HF_WORK_PREFIX
from tests.hf_hub import FakeHub


class _FakeImport:
    """jobs._ModelImport without the registry or the store."""

    def __init__(self, cfg, model_id, job_id):
        self.registry = SimpleNamespace(update_job=SimpleNamespace(remote=lambda *a, **k: None))

    def mark_validating(self):
        pass

    def finish(self, folder, meta, origin=None):
        return {"status": "READY"}

    def fail(self, reason):
        return {"error": reason}


def _import_in_child(downloads, prefix, started) -> None:
    """An import's work folder as `import_hf_task` holds it, the model moved into it; then
    the process hangs until it is killed."""
    with work_folder(Path(downloads), prefix) as work:
        (work / "model").mkdir()
        (work / "model" / "model.safetensors").write_bytes(os.urandom(30_000))
        started.set()
        time.sleep(600)


def _download_in_child(folder, started) -> None:
    """A download kept for a retry, being resumed as `import_hf_task` holds it; then the
    process hangs until it is killed."""
    with resumable_folder(Path(folder), keep_idle_s=10**9):  # itself sweeps nothing
        started.set()
        time.sleep(600)


def start_import(downloads: Path, prefix: str, target=_import_in_child) -> multiprocessing.Process:
    ctx = multiprocessing.get_context("spawn")  # an import task is a process of its own
    started = ctx.Event()
    args = (str(downloads), prefix, started) if target is _import_in_child else (prefix, started)
    child = ctx.Process(target=target, args=args, daemon=True)  # ends with the tests
    child.start()
    assert started.wait(60)
    return child


def work_folders(downloads: Path) -> list[Path]:
    return sorted(p for p in downloads.iterdir() if p.name.startswith(".work-"))


@pytest.fixture
def hub():
    files = {p.name: p.read_bytes() for p in cached_model_dir("tiny").iterdir() if p.is_file()}
    with FakeHub() as hub:
        hub.add_repo("org/public", files)
        yield hub


def test_the_next_import_removes_a_killed_imports_work_folder_not_a_live_ones(
    hub, tmp_path, monkeypatch, caplog
):
    cfg, downloads, run_import = task(hub, tmp_path, monkeypatch)
    live = start_import(downloads, HF_WORK_PREFIX)
    try:
        dead = start_import(downloads, HF_WORK_PREFIX)
        dead.kill()  # SIGKILL: its finally never runs
        dead.join(60)
        left = work_folders(downloads)
        assert len(left) == 2
        with caplog.at_level(logging.INFO, logger="raydock.artifacts.cache"):
            assert run_import() == {"status": "READY"}
        kept = work_folders(downloads)
        assert len(kept) == 1 and kept[0] in left  # the live import's folder, untouched
        assert (kept[0] / "model" / "model.safetensors").stat().st_size == 30_000
        assert "(30000 bytes) of a task that died" in caplog.text
    finally:
        live.kill()
        live.join(60)


def task(hub, tmp_path, monkeypatch):
    """Settings, the node's downloads folder, and a call of the real import task's function
    for org/public (the registry and the store left out: see _FakeImport)."""
    from raydock.platform import jobs, model_archive

    cfg = Settings(home=str(tmp_path / "home"), hf_endpoint=hub.url)
    downloads = Path(cfg.cache_location) / "downloads"
    downloads.mkdir(parents=True)
    monkeypatch.setattr(jobs, "_ModelImport", _FakeImport)
    monkeypatch.setattr(jobs, "JobProgress", lambda *a: lambda *b: None)
    monkeypatch.setattr(jobs.ray, "get", lambda ref: ref)
    monkeypatch.setattr(model_archive, "inspect_model_dir", lambda *a, **k: None)
    origin = {"repoId": "org/public", "revision": None}
    return (
        cfg,
        downloads,
        lambda: jobs.import_hf_task._function(cfg.to_dict(), "m-1", "j-1", origin, None),
    )


def _partial_download(downloads: Path, name: str, idle_s: float) -> Path:
    """A download that broke off, its files last written idle_s ago."""
    folder = downloads / name
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "model.safetensors").write_bytes(os.urandom(20_000))
    then = time.time() - idle_s
    for p in (folder / "sub" / "model.safetensors", folder / "sub", folder):
        os.utime(p, (then, then))
    return folder


def test_a_later_import_removes_downloads_no_retry_came_for_but_not_a_held_or_recent_one(
    hub, tmp_path, monkeypatch, caplog
):
    cfg, downloads, run_import = task(hub, tmp_path, monkeypatch)
    day = cfg.upload_session_ttl_s
    abandoned = _partial_download(downloads, "org--gone@" + "a" * 40, idle_s=day + 60)
    recent = _partial_download(downloads, "org--later@" + "b" * 40, idle_s=day - 600)
    resumed = _partial_download(downloads, "org--resumed@" + "c" * 40, idle_s=day + 60)
    holder = start_import(downloads, str(resumed), target=_download_in_child)
    try:
        with caplog.at_level(logging.INFO, logger="raydock.artifacts.cache"):
            assert run_import() == {"status": "READY"}
        assert not abandoned.exists()
        assert "(20000 bytes) (idle over 86400 s, no retry came)" in caplog.text
        assert (resumed / "sub" / "model.safetensors").stat().st_size == 20_000  # held
        assert (recent / "sub" / "model.safetensors").stat().st_size == 20_000
        # the import's own download was complete: nothing of it is kept for a retry
        assert sorted(p.name for p in downloads.iterdir() if not p.name.startswith(".")) == [
            recent.name,
            resumed.name,
        ]
    finally:
        holder.kill()
        holder.join(60)
