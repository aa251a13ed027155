"""Restart recovery: kill the whole Ray cluster, start again, everything is back.

Runs last (the `restarts_cluster` marker, see conftest): it replaces the session's cluster
with a fresh one.
"""

from __future__ import annotations

import httpx
import pytest
import ray

from raydock.client import default_deploy_body

from .conftest import boot, wait_for


@pytest.mark.core
@pytest.mark.restarts_cluster
def test_state_survives_and_deployments_serve_again(platform, ready_model, live):
    http = platform.http()
    models_before = {m["modelId"] for m in http.get("/api/public/models").json()["models"]}
    history_before = http.get(
        f"/api/public/deployments/{live.deployment['deploymentId']}/history"
    ).json()
    # a job in flight when the cluster dies
    ref = platform.client.deploy(ready_model["modelId"], default_deploy_body("interrupted"))
    assert platform.client.get(f"/dock-status/{ref['dockStatusId']}")["status"] == "IN_PROGRESS"

    ray.shutdown()  # this driver started the cluster: every Ray process dies with it
    info = boot(platform.settings)
    assert info["admin_key"] is None  # the first admin key is never printed again

    # the lifecycle's reconciliation ends the job nobody runs any more, with a reason
    job = platform.client.wait_job(ref["dockStatusId"], timeout=60)
    assert job["status"] == "FAILED" and "interrupted" in job["message"]
    interrupted = platform.client.get(f"/deployments/{ref['deploymentId']}")
    assert interrupted["status"] == "FAILED" and "interrupted" in interrupted["failureReason"]

    assert {m["modelId"] for m in http.get("/api/public/models").json()["models"]} == models_before
    assert (
        http.get(f"/api/public/deployments/{live.deployment['deploymentId']}/history").json()
        == history_before
    )

    # the deployment that was DEPLOYED serves again, with its old key
    body = {"messages": [{"role": "user", "content": "back?"}], "max_tokens": 3}
    auth = {"Authorization": f"Bearer {live.key}"}

    def answered():
        r = httpx.post(f"{live.base_url}/chat/completions", json=body, headers=auth, timeout=60)
        assert r.status_code in (200, 503), r.text
        return r.status_code == 200

    wait_for(answered, timeout=180, interval=1)
    dep = platform.client.get(f"/deployments/{live.deployment['deploymentId']}")
    assert dep["status"] == "DEPLOYED" and dep["replicas"]["current"] == 1

    # the interrupted one can be re-triggered
    ref = platform.client.post(f"/deployments/{ref['deploymentId']}/retrigger")
    assert platform.client.wait_job(ref["dockStatusId"])["status"] == "SUCCESS"
