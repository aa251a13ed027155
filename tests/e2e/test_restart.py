"""Restart recovery: kill the whole Ray cluster, start again, everything is back.

Runs last (the `restarts_cluster` marker, see conftest): it replaces the session's cluster
with a fresh one.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

import httpx
import pytest
import ray
import sqlalchemy as sa

from raydock.client import default_deploy_body
from raydock.platform import db

from .conftest import boot, wait_for


@pytest.mark.core
@pytest.mark.restarts_cluster
def test_state_survives_and_deployments_serve_again(platform, ready_model, live):
    http = platform.http()
    models_before = {m["modelId"] for m in http.get("/api/public/models").json()["models"]}
    history_before = http.get(
        f"/api/public/deployments/{live.deployment['deploymentId']}/history"
    ).json()
    # an upload abandoned a day ago, and a chunk folder no session names (a crash's leftover)
    idle = platform.client.post(
        "/files/session/start", json={"fileName": "gone.zip", "totalSize": 10, "totalChunks": 2}
    )["sessionId"]
    assert http.put(f"/api/public/files/session/{idle}/chunks/1", content=b"12345").is_success
    uploads = platform.settings.uploads_path
    orphan = uploads / "up-orphan"
    orphan.mkdir()
    (orphan / "000001.part").write_bytes(b"x")
    _age_upload(platform.settings, idle, days=2)
    two_days_ago = time.time() - 2 * 86_400
    os.utime(orphan, (two_days_ago, two_days_ago))
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

    # the API's sweep (at its start, then every 10 minutes) removed the idle upload's chunks
    def swept():
        return not (uploads / idle).exists() and not orphan.exists()

    wait_for(swept, timeout=60, interval=1)
    r = http.get(f"/api/public/files/session/{idle}")
    assert r.status_code == 404, r.text

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


def _age_upload(settings, session_id: str, days: int) -> None:
    """Make an upload session look idle for `days`: its start in the database and its chunk
    folder's mtime (what the sweep reads)."""
    then = db.utcnow() - timedelta(days=days)
    engine = sa.create_engine(settings.db_url)
    with engine.begin() as conn:
        conn.execute(
            sa.update(db.UploadSession)
            .where(db.UploadSession.id == session_id)
            .values(created_at=then)
        )
    engine.dispose()
    old = time.time() - days * 86_400
    os.utime(settings.uploads_path / session_id, (old, old))
