"""An HF import whose process was killed (OOM, node crash) left its `.work-*` folder beside
the downloads, with the model in it: the node's next import removes it, never a live one's
(no Ray: the task's function, against a local server speaking the Hub's API)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from raydock.artifacts.cache import work_folder
from raydock.config import Settings
from raydock.modelgen import cached_model_dir
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


def start_import(downloads: Path, prefix: str) -> multiprocessing.Process:
    ctx = multiprocessing.get_context("spawn")  # an import task is a process of its own
    started = ctx.Event()
    args = (str(downloads), prefix, started)
    child = ctx.Process(target=_import_in_child, args=args, daemon=True)  # ends with the tests
    child.start()
    assert started.wait(60)
    return child


@pytest.fixture
def hub():
    files = {p.name: p.read_bytes() for p in cached_model_dir("tiny").iterdir() if p.is_file()}
    with FakeHub() as hub:
        hub.add_repo("org/public", files)
        yield hub


def test_the_next_import_removes_a_killed_imports_work_folder_not_a_live_ones(
    hub, tmp_path, monkeypatch, caplog
):
    from raydock.platform import jobs, model_archive

    cfg = Settings(home=str(tmp_path / "home"), hf_endpoint=hub.url)
    downloads = Path(cfg.cache_location) / "downloads"
    downloads.mkdir(parents=True)
    monkeypatch.setattr(jobs, "_ModelImport", _FakeImport)
    monkeypatch.setattr(jobs, "JobProgress", lambda *a: lambda *b: None)
    monkeypatch.setattr(jobs.ray, "get", lambda ref: ref)
    monkeypatch.setattr(model_archive, "inspect_model_dir", lambda *a, **k: None)
    origin = {"repoId": "org/public", "revision": None}
    live = start_import(downloads, jobs.HF_WORK_PREFIX)
    try:
        dead = start_import(downloads, jobs.HF_WORK_PREFIX)
        dead.kill()  # SIGKILL: its finally never runs
        dead.join(60)
        left = sorted(downloads.iterdir())
        assert len(left) == 2
        with caplog.at_level(logging.INFO, logger="raydock.artifacts.cache"):
            result = jobs.import_hf_task._function(cfg.to_dict(), "m-1", "j-1", origin, None)
        assert result == {"status": "READY"}
        kept = sorted(downloads.iterdir())
        assert len(kept) == 1 and kept[0] in left  # the live import's folder, untouched
        assert (kept[0] / "model" / "model.safetensors").stat().st_size == 30_000
        assert "(30000 bytes) of a task that died" in caplog.text
    finally:
        live.kill()
        live.join(60)
