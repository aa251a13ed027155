"""Hugging Face connections (tokens sealed at rest) and download imports in the registry:
retries, and the deployment that waits for its model's import. A real SQLite file, no Ray."""

from __future__ import annotations

import os
import stat

import pytest
from cryptography.fernet import Fernet

from raydock.client import default_deploy_body
from raydock.platform.registry import Conflict, NotFound, Registry
from raydock.platform.secrets import SecretBox, SecretUnreadable, platform_key

TOKEN = "hf_" + "s3cr3t" * 6


@pytest.fixture
def reg(tmp_path) -> Registry:
    return Registry(f"sqlite:///{tmp_path / 'raydock.db'}", platform_key(tmp_path))


@pytest.fixture
def user(reg) -> dict:
    return reg.authenticate_management(reg.ensure_admin())


def test_the_platform_key_is_made_once_and_only_its_owner_reads_it(tmp_path):
    key = platform_key(tmp_path / "home")
    assert platform_key(tmp_path / "home") == key  # the same on every start
    mode = stat.S_IMODE(os.stat(tmp_path / "home" / "secret.key").st_mode)
    assert mode == 0o600
    assert platform_key(tmp_path / "other", configured="x" * 44) == b"x" * 44


def test_a_token_is_stored_sealed_and_no_view_shows_it(reg, user, tmp_path):
    c = reg.create_connection("team", TOKEN, user["userId"], hf_user="alice")
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("raydock.db*"))  # db + WAL
    assert TOKEN.encode() not in raw
    assert "s3cr3t" not in repr(c) + repr(reg.list_connections()) + repr(
        reg.get_connection(c["connectionId"])
    )
    assert c["hfUser"] == "alice" and c["lastTest"]["ok"] is True
    assert reg.connection_token(c["connectionId"]) == TOKEN


def test_connection_names_are_unique_and_tests_are_recorded(reg, user):
    c = reg.create_connection("team", TOKEN, user["userId"], hf_user=None)
    assert c["lastTest"] is None
    with pytest.raises(Conflict, match="'team' exists"):
        reg.create_connection("team", TOKEN, user["userId"], hf_user=None)
    tested = reg.record_connection_test(c["connectionId"], False, "refused", None)
    assert tested["lastTest"]["ok"] is False and tested["lastTest"]["message"] == "refused"
    reg.delete_connection(c["connectionId"])
    with pytest.raises(NotFound):
        reg.connection_token(c["connectionId"])


def test_a_token_sealed_under_another_key_says_what_happened():
    sealed = SecretBox(Fernet.generate_key()).seal(TOKEN)
    with pytest.raises(SecretUnreadable, match="secret key changed"):
        SecretBox(Fernet.generate_key()).open(sealed)


def _downloading(reg: Registry, user: dict, source: str = "hugging_face") -> tuple[dict, dict]:
    """A model being downloaded with a deployment waiting for it."""
    origin = {"repoId": "org/model"}
    m = reg.create_model("org/model", source, user["userId"], meta={"origin": origin})
    body = default_deploy_body("waits")
    d = reg.create_deployment(m["modelId"], body, user["userId"], awaiting_import=True)
    job = reg.create_job("IMPORT", m["modelId"], user["userId"], d["deploymentId"])
    return m, {"job": job, "deployment": d}


def test_a_deployment_waiting_for_an_import_fails_with_it_and_retries_with_it(reg, user):
    m, made = _downloading(reg, user)
    dep_id = made["deployment"]["deploymentId"]
    assert m["metadata"]["origin"]["repoId"] == "org/model"
    with pytest.raises(Conflict, match="not READY"):  # nobody else deploys it meanwhile
        reg.create_deployment(m["modelId"], default_deploy_body("x"), user["userId"])
    reg.set_model_status(m["modelId"], "IMPORT_FAILED", error="interrupted")
    reg.update_job(made["job"]["dockStatusId"], status="FAILED", message="interrupted")
    dep = reg.get_deployment(dep_id)
    assert dep["status"] == "FAILED"
    assert dep["failureReason"] == "its model's import failed: interrupted"

    retry = reg.begin_retry_import(m["modelId"], user["userId"])
    assert retry["model"]["status"] == "IMPORTING" and retry["model"]["error"] is None
    assert retry["job"]["deploymentId"] == dep_id  # deployed when the retry succeeds
    with pytest.raises(Conflict):  # IMPORTING → IMPORTING: one retry at a time
        reg.begin_retry_import(m["modelId"], user["userId"])


def test_an_import_ended_by_reconciliation_fails_its_waiting_deployment(reg, user):
    m, made = _downloading(reg, user)
    reg.fail_jobs([made["job"]["dockStatusId"]], "interrupted: restart")
    assert reg.get_model(m["modelId"])["status"] == "IMPORT_FAILED"
    dep = reg.get_deployment(made["deployment"]["deploymentId"])
    assert dep["status"] == "FAILED" and "restart" in dep["failureReason"]


def test_a_deployment_whose_import_ended_ready_without_its_deploy_is_found(reg, user):
    """The lifecycle ended between an import's READY and the deploy of the deployment waiting
    for it: reconciliation finds that deployment (Lifecycle.reconcile deploys it)."""
    m, made = _downloading(reg, user)
    job_id, dep_id = made["job"]["dockStatusId"], made["deployment"]["deploymentId"]
    assert reg.stranded_waits([]) == []  # still importing
    reg.set_model_status(m["modelId"], "VALIDATING")
    reg.set_model_status(m["modelId"], "READY", job_id=job_id, artifact_uri="/x", checksum="c")
    assert reg.stranded_waits([job_id]) == []  # its lifecycle is on it
    assert reg.stranded_waits([]) == [job_id]
    reg.begin_deploy(dep_id, None, user["userId"], "DEPLOYING")
    assert reg.stranded_waits([]) == []


def test_an_uploaded_model_is_not_retried(reg, user):
    m = reg.create_model("tiny", "file", user["userId"])
    reg.set_model_status(m["modelId"], "IMPORT_FAILED", error="bad zip")
    with pytest.raises(Conflict, match="upload the file again"):
        reg.begin_retry_import(m["modelId"], user["userId"])
