"""An import whose READY write committed but whose reply failed (the registry died before
answering) must not delete the model's files: the model is READY and replicas load them
(jobs._ModelImport, on a real registry and a real local store; Ray's call and its reply are
the edge replaced here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from raydock.config import load_settings
from raydock.platform import jobs
from raydock.platform.registry import Registry


class _LostReply:
    """A registry method called as an actor's: it runs, then its reply is lost (`lost`)."""

    def __init__(self, fn, lost: bool):
        self.fn, self.lost = fn, lost

    def remote(self, *args, **kwargs):
        result = self.fn(*args, **kwargs)
        if self.lost:
            raise ConnectionError("the registry died before it answered")
        return result


class _Registry:
    def __init__(self, registry: Registry, lose: set[str]):
        self.registry, self.lose = registry, lose

    def __getattr__(self, name: str) -> _LostReply:
        return _LostReply(getattr(self.registry, name), name in self.lose)


@pytest.fixture
def setup(tmp_path, monkeypatch):
    reg = Registry(f"sqlite:///{tmp_path / 'db.sqlite'}")
    cfg = load_settings(home=str(tmp_path / "home"))
    model = reg.create_model("m", "file", "u")
    job = reg.create_job("IMPORT", model["modelId"], "u")
    monkeypatch.setattr(jobs.ray, "get", lambda value: value)  # calls answer at once here
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    yield reg, cfg, model["modelId"], job["dockStatusId"], folder
    reg.close()


def _import(reg, cfg, model_id, job_id, monkeypatch, lose: set[str]):
    monkeypatch.setattr(jobs, "_registry", lambda: _Registry(reg, lose))
    return jobs._ModelImport(cfg, model_id, job_id)


class _Meta:
    def to_dict(self) -> dict:
        return {"architecture": "test"}


def test_a_ready_model_keeps_its_files_when_the_ready_reply_is_lost(setup, monkeypatch):
    reg, cfg, model_id, job_id, folder = setup
    job = _import(reg, cfg, model_id, job_id, monkeypatch, lose={"set_model_status"})
    job.validating = True  # VALIDATING is recorded apart (its reply is not the one lost)
    reg.set_model_status(model_id, "VALIDATING")
    with pytest.raises(ConnectionError):
        job.finish(Path(folder), _Meta(), checksum="c" * 64)
    assert reg.get_model(model_id)["status"] == "READY"  # committed
    job.fail("import failed: the registry died before it answered")  # the task's except
    assert cfg.store().exists(f"{job.key}/config.json")  # the READY model's files stay
    assert reg.get_model(model_id)["status"] == "READY"


def test_an_import_that_failed_before_ready_leaves_nothing_in_the_store(setup, monkeypatch):
    reg, cfg, model_id, job_id, folder = setup
    job = _import(reg, cfg, model_id, job_id, monkeypatch, lose=set())
    cfg.store().put_dir(folder, job.key)
    job.fail("the archive holds no weights")
    assert not cfg.store().exists(f"{job.key}/config.json")
    assert reg.get_model(model_id)["status"] == "IMPORT_FAILED"
