"""Model routes of the management API over HTTP in process (no Ray), on a real registry and
artifact store."""

from __future__ import annotations

import asyncio
import io
import tarfile
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import text

from raydock.platform import api_deps, backup, db, retention
from raydock.platform.api import app
from raydock.platform.jobs import exports_key, model_key


def test_deleting_a_failed_import_removes_what_it_had_stored(api, tmp_path: Path):
    """An import task killed while storing (OOM, a lost node) leaves part of the model in
    the store and no artifactUri on the model: deleting the model removes those files too."""
    reg, admin_key = api
    model = reg.create_model("half", "file", reg.authenticate_management(admin_key)["userId"])
    store = api_deps.ctx.settings.store()
    part = tmp_path / "model-00001-of-00002.safetensors"
    part.write_bytes(b"\0" * 1024)
    store.put_file(part, f"{model_key(model['modelId'])}/{part.name}")
    reg.set_model_status(model["modelId"], "IMPORT_FAILED", error="the task died")
    assert store.list(model_key(model["modelId"]))

    with TestClient(app) as http:
        r = http.delete(f"/public/models/{model['modelId']}", headers={"X-api-key": admin_key})
    assert r.status_code == 200, r.text
    assert store.list(model_key(model["modelId"])) == []


def test_retention_deletes_an_export_zip_with_its_job(api, tmp_path: Path):
    """An export's zip is a full copy of the weights: when retention deletes its finished
    job (whose download link was the way to it), the zip goes too; a running export's stays."""
    reg, admin_key = api
    uid = reg.authenticate_management(admin_key)["userId"]
    model_id = reg.create_model("m", "file", uid)["modelId"]
    store = api_deps.ctx.settings.store()
    zip_file = tmp_path / "m.zip"
    zip_file.write_bytes(b"PK")
    jobs = [reg.create_job("EXPORT", model_id, uid)["dockStatusId"] for _ in range(2)]
    for job in jobs:
        store.put_file(zip_file, f"{exports_key(model_id)}/{job}/m.zip")
    reg.update_job(jobs[0], status="SUCCESS", percentage=100)
    old = datetime.now(UTC).replace(tzinfo=None) - timedelta(days=365)
    with db.make_engine(f"sqlite:///{tmp_path / 'raydock.db'}").begin() as conn:
        conn.execute(text("UPDATE dock_status SET created_at = :t"), {"t": old})

    gone = asyncio.run(retention.prune_once())
    assert gone["jobs"] == 1 and gone["exports"] == 1
    assert store.list(f"{exports_key(model_id)}/{jobs[0]}") == []
    assert store.list(f"{exports_key(model_id)}/{jobs[1]}")  # still being made


def test_a_backup_download_leaves_no_copy_on_the_server(api, tmp_path: Path, monkeypatch):
    """The archive holds the platform key and every sealed secret: it is staged without a
    name, so nothing stays in the server's temp folder, whether the download ends or not."""
    reg, admin_key = api
    staging = tmp_path / "tmp"
    staging.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))
    with TestClient(app) as http:
        with http.stream("POST", "/public/backup", headers={"X-api-key": admin_key}) as r:
            assert r.status_code == 200, r.read()
            assert list(staging.iterdir()) == []  # while it is being sent
            first = next(r.iter_bytes())  # the client goes away after the first chunk
        assert first
        whole = http.post("/public/backup", headers={"X-api-key": admin_key})
    assert int(whole.headers["content-length"]) == len(whole.content)
    with tarfile.open(fileobj=io.BytesIO(whole.content)) as tar:
        assert backup.MANIFEST in tar.getnames()
    assert list(staging.iterdir()) == []


def test_an_exports_file_name_holds_no_path():
    from raydock.platform.jobs import export_file_stem

    assert export_file_stem("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen_Qwen2.5-0.5B-Instruct"
    assert export_file_stem("../../etc/passwd") == "etc_passwd"
    assert export_file_stem("C:\\models\\llama 3") == "C_models_llama_3"
    assert export_file_stem("/..") == "model" and export_file_stem("modèle") == "modèle"


def test_key_limits_are_refused_when_metering_is_off(api, tmp_path: Path, monkeypatch):
    """Replicas enforce limits from what they meter: without metering a limit was accepted,
    listed, and never applied."""
    from raydock.client import default_deploy_body
    from raydock.config import load_settings

    reg, admin_key = api
    user = reg.authenticate_management(admin_key)["userId"]
    model = reg.create_model("m", "file", user)
    reg.set_model_status(model["modelId"], "VALIDATING")
    reg.set_model_status(model["modelId"], "READY", artifact_uri="/x", checksum="c")
    dep = reg.create_deployment(model["modelId"], default_deploy_body("d"), user)
    off = load_settings(home=str(tmp_path), metering=False)
    monkeypatch.setattr(api_deps.ctx, "settings", off, raising=False)
    url = f"/public/deployments/{dep['deploymentId']}/api-keys"
    with TestClient(app) as http:
        h = {"X-api-key": admin_key}
        r = http.post(url, json={"name": "k", "limits": {"tokensPerDay": 1000}}, headers=h)
        assert r.status_code == 409 and "metering" in r.text and "limits" in r.text, r.text
        r = http.post(url, json={"name": "k"}, headers=h)
        assert r.status_code == 201, r.text
        key_id = r.json()["keyId"]
        r = http.patch(f"{url}/{key_id}", json={"limits": {"tokensPerDay": 5}}, headers=h)
        assert r.status_code == 409, r.text
        r = http.patch(f"{url}/{key_id}", json={"limits": {"tokensPerDay": None}}, headers=h)
        assert r.status_code == 200, r.text


def test_a_chosen_admin_key_must_be_long():
    from raydock.platform import security

    assert security.chosen_key_problem("admin")
    assert security.chosen_key_problem(" " + "k" * 40)
    assert security.chosen_key_problem(security.new_key(security.MANAGEMENT_PREFIX)) is None


def test_raydock_up_refuses_a_short_chosen_admin_key(monkeypatch):
    import pytest

    from raydock.config import SettingsError
    from raydock.platform import bootstrap

    monkeypatch.setenv("RAYDOCK_ADMIN_KEY", "admin")
    with pytest.raises(SettingsError, match="RAYDOCK_ADMIN_KEY must be at least 32"):
        bootstrap.chosen_admin_key()
    monkeypatch.setenv("RAYDOCK_ADMIN_KEY", "rdm-" + "x" * 43)
    assert bootstrap.chosen_admin_key() == "rdm-" + "x" * 43


def test_a_delete_the_store_fails_is_done_and_retention_removes_the_files(
    api, tmp_path: Path, monkeypatch
):
    """The store refused (an S3 503) after the model's row was deleted: the answer was a 500
    for a delete that happened, and nothing ever removed the files."""
    from raydock.artifacts.store import LocalStore

    reg, admin_key = api
    uid = reg.authenticate_management(admin_key)["userId"]
    model_id = reg.create_model("m", "file", uid)["modelId"]
    store = api_deps.ctx.settings.store()
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"\0" * 64)
    store.put_file(weights, f"{model_key(model_id)}/w.safetensors")
    real_delete = LocalStore.delete

    def refuse(self, key):
        raise OSError("the store is unavailable")

    monkeypatch.setattr(LocalStore, "delete", refuse)
    with TestClient(app) as http:
        r = http.delete(f"/public/models/{model_id}", headers={"X-api-key": admin_key})
        assert r.status_code == 200 and r.json()["filesLeft"] == retention.FILES_LEFT, r.text
        assert (
            http.get(f"/public/models/{model_id}", headers={"X-api-key": admin_key}).status_code
            == 404
        )
    assert store.list(model_key(model_id))
    monkeypatch.setattr(LocalStore, "delete", real_delete)
    gone = asyncio.run(retention.prune_once())
    assert gone["deleted models' files"] == 1 and store.list(model_key(model_id)) == []
