"""Deploying models as Serve applications and calling them with the OpenAI SDK."""

from __future__ import annotations

import asyncio
import zipfile

import httpx
import openai
import pytest
from ray import serve
from ray.serve.context import _get_global_client

from raydock.client import default_deploy_body
from raydock.optimizers import ctranslate2 as ct2

from .conftest import deploy_and_wait, import_ready, wait_for


@pytest.mark.core
def test_chat_completion_through_openai_sdk(live):
    sdk = openai.OpenAI(base_url=live.base_url, api_key=live.key)
    reply = sdk.chat.completions.create(
        model=live.deployment["deploymentId"],
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello there"},
        ],
        max_tokens=12,
        seed=1,
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens > 5
    if choice.finish_reason == "length":
        assert reply.usage.completion_tokens == 12
    assert reply.model == live.deployment["name"]


def test_deployment_is_a_serve_application_with_autoscaling(platform, live):
    dep_id = live.deployment["deploymentId"]
    app = serve.status().applications[dep_id]
    assert app.status == "RUNNING"
    details = platform.http().get(f"/api/public/deployments/{dep_id}").json()
    assert details["replicas"]["current"] == 1
    assert (details["replicas"]["min"], details["replicas"]["max"]) == (1, 1)
    assert dep_id in details["curl"] and details["endpoint"].endswith("/v2/chat/completions")


def test_hyperparameters_are_the_defaults(platform, ready_model):
    # maxTokens 3 in the deployment caps a request that does not set max_tokens
    dep = deploy_and_wait(
        platform,
        ready_model["modelId"],
        "short-answers",
        hyperParameters={"maxTokens": 3, "temperature": 0},
    )
    key = platform.client.create_key(dep["deploymentId"])
    sdk = openai.OpenAI(
        base_url=f"{platform.url}/deployments/{dep['deploymentId']}/v2", api_key=key
    )
    replies = [
        sdk.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])
        for _ in range(2)
    ]
    assert all(r.usage.completion_tokens <= 3 for r in replies)
    assert replies[0].choices[0].message.content == replies[1].choices[0].message.content
    platform.client.wait_job(
        platform.client.post(f"/deployments/{dep['deploymentId']}/undeploy")["dockStatusId"]
    )


DEPLOY_422 = [
    ("hyperParameters", "temperature", 2.1, "between 0 and 2"),
    ("hyperParameters", "maxTokens", 600, "between 0 and 512"),
    ("hyperParameters", "topP", 1.5, "between 0 and 1"),
    ("hyperParameters", "topK", 101, "between 1 and 100"),
    ("scalingParameters", "maxBatchSize", 0, "between 1 and 256"),
    ("scalingParameters", "minReplicas", 11, "between 1 and 10"),
    ("scalingParameters", "maxReplicas", 51, "between 1 and 50"),
    ("scalingParameters", "scaleUpDelay", 0, "between 1 and 1000"),
    ("scalingParameters", "scaleDownDelay", 2001, "between 1 and 2000"),
]


@pytest.mark.parametrize(("group", "field", "value", "expected"), DEPLOY_422)
def test_out_of_range_deploy_field_gets_422(platform, ready_model, group, field, value, expected):
    body = default_deploy_body("bad", **{group: {field: value}})
    if field == "minReplicas":
        body["scalingParameters"]["maxReplicas"] = 50
    r = platform.http().post(
        f"/api/public/models/{ready_model['modelId']}/deploy",
        params={"modelType": "openSource"},
        json=body,
    )
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["param"] == f"{group}.{field}"
    assert f"{group}.{field} must be {expected}" in err["message"]


def test_other_deploy_refusals(platform, ready_model):
    http = platform.http()
    url = f"/api/public/models/{ready_model['modelId']}/deploy"
    r = http.post(url, json=default_deploy_body("x"))  # modelType missing
    assert r.status_code == 422 and r.json()["error"]["param"] == "modelType"
    r = http.post(url, params={"modelType": "closed"}, json=default_deploy_body("x"))
    assert r.status_code == 422
    r = http.post(
        url, params={"modelType": "openSource"}, json=default_deploy_body("x", "g5.xlarge")
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "deviceType"
    assert "GPU" in r.json()["error"]["message"]
    r = http.post(
        url, params={"modelType": "openSource"}, json=default_deploy_body("x", timeout=200)
    )
    assert r.status_code == 422 and "between 30 and 180" in r.json()["error"]["message"]
    r = http.post(
        "/api/public/models/cm-missing/deploy",
        params={"modelType": "openSource"},
        json=default_deploy_body("x"),
    )
    assert r.status_code == 404
    names = [
        d["name"]
        for d in http.get(f"/api/public/models/{ready_model['modelId']}/deployments").json()[
            "deployments"
        ]
    ]
    assert "x" not in names  # nothing half-created by refused requests


@pytest.mark.core
def test_api_keys_are_per_deployment_and_revocable(platform, ready_model, live):
    other = deploy_and_wait(platform, ready_model["modelId"], "other")
    other_key = platform.client.create_key(other["deploymentId"], "other")
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    url = f"{live.base_url}/chat/completions"
    assert httpx.post(url, json=body).status_code == 401
    assert (
        httpx.post(url, json=body, headers={"Authorization": "Bearer rdk-wrong"}).status_code == 401
    )
    r = httpx.post(url, json=body, headers={"Authorization": f"Bearer {other_key}"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(url, json=body, headers={"X-api-key": live.key}, timeout=60)
    assert r.status_code == 200

    http = platform.http()
    created = http.post(
        f"/api/public/deployments/{other['deploymentId']}/api-keys", json={"name": "temp"}
    ).json()
    keys = http.get(f"/api/public/deployments/{other['deploymentId']}/api-keys").json()["apiKeys"]
    assert {k["name"] for k in keys} == {"other", "temp"}
    assert all("apiKey" not in k for k in keys)  # never shown twice
    other_url = f"{platform.url}/deployments/{other['deploymentId']}/v2/chat/completions"
    auth = {"Authorization": f"Bearer {created['apiKey']}"}
    assert httpx.post(other_url, json=body, headers=auth, timeout=60).status_code == 200
    http.delete(f"/api/public/deployments/{other['deploymentId']}/api-keys/{created['keyId']}")
    # pushed to the replicas: refused within a second
    wait_for(lambda: httpx.post(other_url, json=body, headers=auth).status_code == 401, 1, 0.05)

    job = platform.client.post(f"/deployments/{other['deploymentId']}/undeploy")
    platform.client.wait_job(job["dockStatusId"])
    other_auth = {"Authorization": f"Bearer {other_key}"}
    wait_for(lambda: httpx.post(other_url, json=body, headers=other_auth).status_code == 503, 1)


@pytest.mark.core
def test_redeploy_history_undeploy_retrigger_delete(platform, ready_model):
    http = platform.http()
    dep = deploy_and_wait(platform, ready_model["modelId"], "Flan T5")
    dep_id = dep["deploymentId"]
    scaling = {"maxBatchSize": 4, "maxReplicas": 3, "scaleUpDelay": 7, "scaleDownDelay": 11}
    body = default_deploy_body(
        "ignored", hyperParameters={"temperature": 0.5}, scalingParameters=scaling
    )
    ref = http.post(f"/api/public/deployments/{dep_id}/redeploy", json=body).json()
    assert ref["action"] == "DEPLOY"
    job = platform.client.wait_job(ref["dockStatusId"])
    # a new batch limit: a replica built anew replaced the one that ran
    assert (job["status"], job["message"]) == ("SUCCESS", "deployed: 1 replica started")
    # served with the new settings: Serve's autoscaling config, and the replica's batch limit
    details = _get_global_client().get_serve_details()
    deployed = details["applications"][dep_id]["deployments"]["engine"]["deployment_config"]
    autoscaling = deployed["autoscaling_config"]
    assert (autoscaling["min_replicas"], autoscaling["max_replicas"]) == (1, 3)
    assert (autoscaling["upscale_delay_s"], autoscaling["downscale_delay_s"]) == (7, 11)
    key = platform.client.create_key(dep_id)
    url = f"{platform.url}/deployments/{dep_id}/v2/chat/completions"
    load = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 48, "ignore_eos": True}

    async def burst():
        async with httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {key}"}) as c:
            return await asyncio.gather(*(c.post(url, json=load) for _ in range(8)))

    assert all(r.status_code == 200 for r in asyncio.run(burst()))
    stats = platform.client.get(f"/deployments/{dep_id}/stats")
    assert stats["maxBatchSize"] == 4 and stats["max_batch"] == 4  # 8 at once, 4 decode
    # the seed's way: deploy again by name with isDeployedPreviously
    again = default_deploy_body("Flan T5", isDeployedPreviously=True)
    ref = platform.client.deploy(ready_model["modelId"], again)
    assert ref["deploymentId"] == dep_id
    assert platform.client.wait_job(ref["dockStatusId"])["status"] == "SUCCESS"

    r = http.delete(f"/api/public/deployments/{dep_id}")
    assert r.status_code == 409  # deployed: undeploy first
    r = http.post(f"/api/public/deployments/{dep_id}/retrigger")
    assert r.status_code == 409  # only failed or stopped
    job = platform.client.post(f"/deployments/{dep_id}/undeploy")
    assert platform.client.wait_job(job["dockStatusId"])["status"] == "SUCCESS"
    assert http.get(f"/api/public/deployments/{dep_id}").json()["status"] == "UNDEPLOYED"
    assert dep_id not in serve.status().applications

    versions = http.get(f"/api/public/deployments/{dep_id}/history").json()["versions"]
    assert [v["name"] for v in versions] == ["Flan T5_v1", "Flan T5_v2", "Flan T5_v3"]
    assert all(v["result"] == "SUCCESS" and v["deployedBy"] == "admin" for v in versions)
    assert versions[1]["config"]["hyperParameters"]["temperature"] == 0.5
    assert all(v["durationSeconds"] > 0 for v in versions)
    assert versions[-1]["latest"] and versions[-1]["undeployment"]["undeployedBy"] == "admin"
    assert versions[-1]["undeployment"]["endedAt"]

    ref = http.post(f"/api/public/deployments/{dep_id}/retrigger").json()
    assert platform.client.wait_job(ref["dockStatusId"])["status"] == "SUCCESS"
    assert len(http.get(f"/api/public/deployments/{dep_id}/history").json()["versions"]) == 4
    platform.client.wait_job(
        platform.client.post(f"/deployments/{dep_id}/undeploy")["dockStatusId"]
    )
    assert http.delete(f"/api/public/deployments/{dep_id}").status_code == 200
    assert http.get(f"/api/public/deployments/{dep_id}").status_code == 404


def test_undeploy_cancels_a_deploy_still_starting(platform, ready_model):
    """A deploy whose replicas cannot all be placed (10 × 4 CPUs on the session's 16) waits
    for them until its timeout; undeploying it cancels it there."""
    scaling = {"minReplicas": 10, "maxReplicas": 10}
    body = default_deploy_body("cancelled", "cpu-large", scalingParameters=scaling)
    ref = platform.client.deploy(ready_model["modelId"], body)
    dep_id, deploy_job = ref["deploymentId"], ref["dockStatusId"]
    wait_for(lambda: platform.client.get(f"/dock-status/{deploy_job}")["percentageComplete"] >= 20)
    assert dep_id in serve.status().applications  # Serve is starting what it can place
    dep = platform.client.get(f"/deployments/{dep_id}")
    assert dep["status"] == "DEPLOYING" and dep["actions"]["undeploy"]

    job = platform.client.post(f"/deployments/{dep_id}/undeploy")
    assert platform.client.wait_job(job["dockStatusId"], timeout=180)["status"] == "SUCCESS"
    deploy = platform.client.get(f"/dock-status/{deploy_job}")
    assert deploy["status"] == "FAILED" and deploy["message"] == "cancelled: undeployed by admin"
    assert platform.client.get(f"/deployments/{dep_id}")["status"] == "UNDEPLOYED"
    assert dep_id not in serve.status().applications
    [version] = platform.client.get(f"/deployments/{dep_id}/history")["versions"]
    assert version["result"] == "FAILED" and "cancelled" in version["failureReason"]
    assert platform.http().delete(f"/api/public/deployments/{dep_id}").status_code == 200


def test_a_redeploy_whose_replicas_fail_keeps_the_live_version(platform, ready_model, tmp_path):
    """About a minute: a deploy, then a redeploy whose new replicas fail Serve's tries.

    The redeploy asks for a CTranslate2 int8 conversion of the model, which the test stored
    beforehand, broken (its files are no model): the deploy reuses it, Serve replaces the live
    replicas with new ones, and those fail loading it — an outage, until the lifecycle runs the
    live version again."""
    dep = deploy_and_wait(platform, ready_model["modelId"], "rollback")
    dep_id = dep["deploymentId"]
    key = platform.client.create_key(dep_id)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.bin").write_bytes(b"not a CTranslate2 model")
    (broken / "config.json").write_text("{}")
    prefix = f"optimized/{ct2.artifact_key(ready_model['checksum'], 'int8')}"
    platform.store.put_dir(broken, prefix)
    try:
        optimization = {"optimizationType": "ctranslate2", "quantizationType": "int8"}
        body = default_deploy_body("rollback", optimizationInfo=optimization)
        ref = platform.client.post(f"/deployments/{dep_id}/redeploy", json=body)
        job = platform.client.wait_job(ref["dockStatusId"], timeout=300)
        assert job["status"] == "FAILED", job
        assert "rollback_v1's configuration goes on serving" in job["message"], job
        assert job["response"]["conversion"]["reused"]  # the broken one, as the test meant
        dep = platform.client.get(f"/deployments/{dep_id}")
        assert dep["status"] == "DEPLOYED" and dep["config"]["optimizationInfo"] == {
            "optimizationType": "",
            "quantizationType": "",
        }
        # served by the live version's replicas, started again
        app = serve.status().applications[dep_id]
        assert app.status == "RUNNING"
        r = httpx.post(
            f"{platform.url}/deployments/{dep_id}/v2/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        versions = platform.client.get(f"/deployments/{dep_id}/history")["versions"]
        assert [v["result"] for v in versions] == ["SUCCESS", "FAILED", "SUCCESS"]
        kept = versions[2]["config"]["optimizationInfo"]
        assert kept == versions[0]["config"]["optimizationInfo"]
    finally:
        platform.store.delete(prefix)
    job = platform.client.post(f"/deployments/{dep_id}/undeploy")
    assert platform.client.wait_job(job["dockStatusId"])["status"] == "SUCCESS"
    assert platform.http().delete(f"/api/public/deployments/{dep_id}").status_code == 200


@pytest.mark.core
def test_deployment_list_and_model_counts(platform, ready_model, live):
    http = platform.http()
    deps = http.get(f"/api/public/models/{ready_model['modelId']}/deployments").json()[
        "deployments"
    ]
    row = next(d for d in deps if d["deploymentId"] == live.deployment["deploymentId"])
    assert row["status"] == "DEPLOYED" and row["addedBy"] == "admin" and row["addedOn"]
    assert {"name", "deploymentId", "status", "tags", "addedBy", "addedOn"} <= set(row)
    model = http.get(f"/api/public/models/{ready_model['modelId']}").json()
    assert model["activeDeployments"] == sum(d["status"] == "DEPLOYED" for d in deps)
    r = http.delete(f"/api/public/models/{ready_model['modelId']}")
    assert r.status_code == 409 and "active deployments" in r.json()["error"]["message"]


def test_endpoint_timeout_setting(platform, live):
    http = platform.http()
    url = f"/api/public/deployments/{live.deployment['deploymentId']}"
    assert http.get(url).json()["timeout"] == 60
    r = http.patch(url, json={"timeout": 181})
    assert r.status_code == 422 and "between 30 and 180" in r.json()["error"]["message"]
    r = http.patch(url, json={"timeout": 29})
    assert r.status_code == 422
    assert http.patch(url, json={"timeout": 120, "tags": ["prod"]}).json()["timeout"] == 120
    assert http.get(url).json()["tags"] == ["prod"]
    http.patch(url, json={"timeout": 60})


def test_export_and_reimport_prefills_deploy_form(platform, ready_model, tmp_path):
    http = platform.http()
    dep = deploy_and_wait(
        platform,
        ready_model["modelId"],
        "to-export",
        hyperParameters={"temperature": 0.3, "topK": 7},
        scalingParameters={"maxBatchSize": 3, "scaleUpDelay": 11},
    )
    ref = http.post(
        f"/api/public/models/{ready_model['modelId']}/export",
        params={"deploymentId": dep["deploymentId"]},
    ).json()
    assert ref["action"] == "EXPORT"
    job = platform.client.wait_job(ref["dockStatusId"])
    assert job["status"] == "SUCCESS"
    url = job["response"]["downloadUrl"]
    r = http.get(url)
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    exported = tmp_path / "reimport-me.zip"
    exported.write_bytes(r.content)
    with zipfile.ZipFile(exported) as z:
        assert {"config.json", "model.safetensors", "deployconfig.json"} <= set(z.namelist())
    assert httpx.get(f"{platform.url}{url}").status_code == 401

    model = import_ready(platform, exported)
    assert model["deployConfig"]["hyperParameters"]["topK"] == 7
    form = http.get(f"/api/public/models/{model['modelId']}/deploy-form").json()
    assert form["prefilledFrom"] == "deployconfig.json"
    assert form["form"]["hyperParameters"]["temperature"] == 0.3
    assert form["form"]["scalingParameters"]["maxBatchSize"] == 3
    assert form["form"]["scalingParameters"]["scaleUpDelay"] == 11
    assert form["form"]["deviceType"] == "cpu-small" and form["form"]["name"] == "reimport-me"
    undeployed = platform.client.wait_job(
        platform.client.post(f"/deployments/{dep['deploymentId']}/undeploy")["dockStatusId"]
    )
    # an export goes with its model: its download then says so (404), as it does for a job
    # that is no export
    again = http.post(f"/api/public/models/{model['modelId']}/export").json()["dockStatusId"]
    url = platform.client.wait_job(again)["response"]["downloadUrl"]
    assert http.get(url).status_code == 200
    assert http.delete(f"/api/public/models/{model['modelId']}").status_code == 200
    r = http.get(url)
    assert r.status_code == 404 and "no longer stored (its model was deleted)" in r.text, r.text
    r = http.get(f"/api/public/exports/{undeployed['dockStatusId']}/download")
    assert r.status_code == 404 and "is not an export but UNDEPLOY" in r.text, r.text


def test_openapi_document_describes_every_endpoint(platform):
    doc = httpx.get(f"{platform.url}/openapi.json").json()
    paths = set(doc["paths"])
    for p in [
        "/api/public/models/{modelId}/deploy",
        "/api/public/dock-status/{dockStatusId}",
        "/api/public/files/session/start",
        "/api/public/files/session/{sessionId}/complete",
        "/api/public/models/{modelId}/export",
        "/api/public/deployments/{deploymentId}/api-keys",
        "/api/public/deployments/{deploymentId}/history",
        "/deployments/{deployment_id}/v2/chat/completions",
        "/v1/chat/completions",
        "/v1/models",
    ]:
        assert p in paths, p
    assert httpx.get(f"{platform.url}/docs").status_code == 200
