"""The catalog routes over HTTP (FastAPI's test client on the API app) with a real registry on
SQLite, without Ray: what the listing says about each entry, the deploys refused before an
import that could only fail starts, and an apply that retries a failed catalog import."""

from __future__ import annotations

import dataclasses

import pytest
from fastapi.testclient import TestClient

from raydock.client import default_deploy_body
from raydock.config import load_settings
from raydock.platform import api_deps
from raydock.platform.api import app
from raydock.platform.registry import Registry
from raydock.platform.secrets import platform_key
from tests.unit.registry_handle import RegistryHandle

GIB = 2**30
LIMIT = 5 * GIB // 2  # max_archive_bytes here: 2.5 GiB
SMALL = "qwen2.5-0.5b-instruct"  # 0.5 B parameters, not gated
MID = "qwen2.5-1.5b-instruct"  # 1.5 B parameters: 2.9 GiB of 16-bit weights, not gated
GATED = "llama-3.2-1b-instruct"  # 1.2 B parameters (2.3 GiB), gated


class _Lifecycle:
    """The lifecycle actor's handle: records the imports the routes start."""

    def __init__(self):
        self.imports: list[str] = []
        outer = self

        class _Submit:
            async def remote(self, model_id: str, job_id: str) -> None:
                outer.imports.append(model_id)

        self.submit_hf_import = _Submit()


@pytest.fixture
def client(tmp_path, monkeypatch):
    monkeypatch.delenv("RAYDOCK_SECRET_KEY", raising=False)
    reg = Registry(f"sqlite:///{tmp_path / 'raydock.db'}", platform_key(tmp_path))
    key = reg.ensure_admin()
    settings = dataclasses.replace(
        load_settings(home=str(tmp_path)), max_archive_bytes=LIMIT, cluster_autoscaling=True
    )
    lifecycle = _Lifecycle()
    monkeypatch.setattr(api_deps.ctx, "settings", settings, raising=False)
    monkeypatch.setattr(api_deps.ctx, "registry", RegistryHandle(reg), raising=False)
    monkeypatch.setattr(api_deps.ctx, "lifecycle", lifecycle, raising=False)
    monkeypatch.setattr(api_deps.ctx, "session_key", None)
    with TestClient(app, base_url="http://raydock.test", headers={"X-api-key": key}) as c:
        c.lifecycle = lifecycle
        yield c
    reg.close()


def listed(client) -> dict[str, dict]:
    return {e["id"]: e for e in client.get("/public/catalog").json()["models"]}


def deploy(client, entry: dict, **extra) -> dict:
    body = default_deploy_body("d", device=entry["suggestedDeviceType"]) | extra
    return client.post(f"/public/catalog/{entry['id']}/deploy", json=body)


def test_the_listing_says_which_entries_are_over_the_import_limit(client):
    entries = listed(client)
    assert entries[SMALL]["importRefusal"] is None
    refusal = entries[MID]["importRefusal"]
    assert "max_archive_bytes" in refusal and "2.9 GiB" in refusal and str(LIMIT) in refusal
    assert client.get(f"/public/catalog/{MID}").json()["importRefusal"] == refusal


def test_a_gated_entry_needs_a_connection(client):
    entry = listed(client)[GATED]
    r = deploy(client, entry)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "connectionId" and "gated" in error["message"]
    assert client.get("/public/models").json()["total"] == 0 and client.lifecycle.imports == []

    made = client.post(
        "/public/connections", json={"name": "team", "token": "hf_x", "verify": False}
    ).json()
    assert deploy(client, entry, connectionId=made["connectionId"]).status_code == 202
    assert deploy(client, listed(client)[SMALL], name="d2").status_code == 202
    assert len(client.lifecycle.imports) == 2


def test_an_unknown_optimization_type_is_refused_with_the_allowed_ones(client):
    r = client.get(f"/public/catalog/{SMALL}", params={"optimizationType": "bogus"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "optimizationType"
    assert "'bogus'" in error["message"] and "'vllm'" in error["message"]
    fit = client.get(f"/public/catalog/{SMALL}", params={"optimizationType": "vllm"}).json()
    assert fit["fit"]["deviceTypes"]


def test_a_quantization_no_device_type_runs_is_refused_not_an_empty_estimate(client):
    def get(**params):
        return client.get(f"/public/catalog/{SMALL}", params=params)

    r = get(quantizationType="bogus")
    assert (r.status_code, r.json()["error"]["param"]) == (422, "quantizationType"), r.text
    assert "int8_float16" in r.json()["error"]["message"]  # the allowed values
    r = get(optimizationType="ctranslate2", quantizationType="awq")
    assert (r.status_code, r.json()["error"]["param"]) == (400, "quantizationType"), r.text
    assert "CTranslate2 quantizationType must be one of" in r.json()["error"]["message"]
    fit = get(optimizationType="ctranslate2", quantizationType="int8").json()["fit"]
    assert fit["deviceTypes"] and fit["suggestedDeviceType"]
    r = get(maxBatchSize=257)
    assert (r.status_code, r.json()["error"]["param"]) == (422, "maxBatchSize")


def test_apply_retries_the_failed_import_its_deployment_waits_for(client):
    """A catalog deploy whose download failed: applying its document again (unchanged)
    retries the import, and the deployment waits for it again."""
    entry = listed(client)[SMALL]
    body = default_deploy_body("d", device=entry["suggestedDeviceType"])
    started = deploy(client, entry).json()
    reg = api_deps.ctx.registry.registry
    reg.fail_jobs([started["dockStatusId"]], "the download broke")
    dep_id = started["deployment"]["deploymentId"]
    reg.set_applied_from(dep_id, "app.yaml")
    doc = {k: v for k, v in body.items() if k != "isDeployedPreviously"}
    doc["model"] = {"catalog": SMALL}
    r = client.post("/public/apply", json={"documents": [{"spec": doc, "source": "app.yaml"}]})
    assert r.status_code == 200, r.text
    (change,) = r.json()["changes"]
    assert change["action"] == "retry-import" and not change.get("error"), change
    assert change["job"]["action"] == "IMPORT" and change["job"]["modelId"] == started["modelId"]
    assert reg.get_model(started["modelId"])["status"] == "IMPORTING"
    assert reg.get_deployment(dep_id)["status"] == "READY_TO_DEPLOY"
    assert client.lifecycle.imports == [started["modelId"]] * 2
