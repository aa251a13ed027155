"""A model's deployment names and a deployment's key names are unique (apply and `raydock
get` know them by name): refused with a 409 naming the field and the value, in the registry
(SQLite and PostgreSQL) and over HTTP."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from raydock.client import default_deploy_body
from raydock.errors import Conflict
from raydock.platform import deploy_checks
from raydock.platform.api import app
from raydock.platform.registry import Registry


@pytest.fixture
def reg(db_url) -> Registry:
    registry = Registry(db_url)
    yield registry
    registry.close()


def ready_model(reg: Registry, user_id: str, name: str = "tiny") -> dict:
    m = reg.create_model(name, "file", user_id)
    reg.set_model_status(m["modelId"], "VALIDATING")
    return reg.set_model_status(m["modelId"], "READY", artifact_uri="/x", checksum="c")


def test_a_models_deployment_names_are_unique_whatever_their_status(reg):
    uid = reg.authenticate_management(reg.ensure_admin())["userId"]
    model, other = ready_model(reg, uid)["modelId"], ready_model(reg, uid, "other")["modelId"]
    chat = reg.create_deployment(model, default_deploy_body("chat"), uid)["deploymentId"]
    with pytest.raises(Conflict) as refused:
        reg.create_deployment(model, default_deploy_body("chat"), uid)
    err = refused.value
    assert (err.status, err.param, err.code) == (409, "name", "duplicate_name")
    assert f'name: model {model} already has a deployment named "chat"' in err.message
    # a deployment that does not serve keeps its name: apply and rollback still find it
    reg.begin_deploy(chat, None, uid, "DEPLOYING")
    reg.set_deployment_status(chat, "FAILED", reason="x")
    with pytest.raises(Conflict, match="FAILED"):
        reg.create_deployment(model, default_deploy_body("chat"), uid)
    # another model's deployment may have it; a deleted one gives it back
    reg.create_deployment(other, default_deploy_body("chat"), uid)
    reg.delete_deployment(chat)
    assert reg.create_deployment(model, default_deploy_body("chat"), uid)["name"] == "chat"


def test_a_deployment_waiting_for_its_import_is_held_to_it_too(reg):
    uid = reg.authenticate_management(reg.ensure_admin())["userId"]
    begun = reg.begin_import("acme/tiny", "hugging_face", uid, deploy=default_deploy_body("c"))
    model = begun["model"]["modelId"]
    with pytest.raises(Conflict, match='already has a deployment named "c"'):
        reg.create_deployment(model, default_deploy_body("c"), uid, awaiting_import=True)


def test_a_rename_to_a_taken_name_is_refused(reg):
    uid = reg.authenticate_management(reg.ensure_admin())["userId"]
    model = ready_model(reg, uid)["modelId"]
    reg.create_deployment(model, default_deploy_body("chat"), uid)
    other = reg.create_deployment(model, default_deploy_body("other"), uid)["deploymentId"]
    with pytest.raises(Conflict, match='named "chat"'):
        reg.update_deployment(other, name="chat")
    assert reg.update_deployment(other, name="other", description="same name")["name"] == "other"
    renamed = reg.update_deployment(other, name="free")
    assert renamed["name"] == renamed["config"]["name"] == "free"


def test_a_deployments_key_names_are_unique(reg):
    uid = reg.authenticate_management(reg.ensure_admin())["userId"]
    model = ready_model(reg, uid)["modelId"]
    a, b = (
        reg.create_deployment(model, default_deploy_body(n), uid)["deploymentId"]
        for n in ("a", "b")
    )
    first = reg.create_deployment_key(a, "ci", uid)
    with pytest.raises(Conflict) as refused:
        reg.create_deployment_key(a, "ci", uid)
    err = refused.value
    assert (err.status, err.param, err.code) == (409, "name", "duplicate_name")
    assert f'name: deployment {a} already has an API key named "ci"' in err.message
    assert [k["name"] for k in reg.list_deployment_keys(a)] == ["ci"]  # nothing was added
    reg.create_deployment_key(b, "ci", uid)  # another deployment's key may have it
    reg.delete_deployment_key(a, first["keyId"])
    assert reg.create_deployment_key(a, "ci", uid)["name"] == "ci"


def test_a_duplicate_is_a_409_over_http(api, monkeypatch):
    """The deploy route and the key route: the registry's refusal reaches the client whole
    (the CLI prints its message: `raydock: HTTP 409: name: ...`)."""
    reg, admin_key = api
    uid = reg.authenticate_management(admin_key)["userId"]
    model = ready_model(reg, uid)["modelId"]
    dep = reg.create_deployment(model, default_deploy_body("chat"), uid)["deploymentId"]
    monkeypatch.setattr(deploy_checks, "check_cluster", lambda *_: None)  # no Ray here
    h = {"X-api-key": admin_key}
    with TestClient(app) as http:
        r = http.post(
            f"/public/models/{model}/deploy",
            params={"modelType": "openSource"},
            json=default_deploy_body("chat"),
            headers=h,
        )
        assert r.status_code == 409, r.text
        error = r.json()["error"]
        assert (error["param"], error["code"], error["type"]) == (
            "name",
            "duplicate_name",
            "conflict_error",
        )
        assert f'model {model} already has a deployment named "chat"' in error["message"]

        url = f"/public/deployments/{dep}/api-keys"
        assert http.post(url, json={"name": "ci"}, headers=h).status_code == 201
        r = http.post(url, json={"name": "ci"}, headers=h)
        assert r.status_code == 409, r.text
        assert f'deployment {dep} already has an API key named "ci"' in r.json()["error"]["message"]
    assert len(reg.list_deployments(model)) == 1 and len(reg.list_deployment_keys(dep)) == 1
