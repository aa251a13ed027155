"""Backup while the platform runs, then a lost data dir restored: the deployment serves again.

Runs after every other test (the `restarts_cluster` marker, see conftest): it stops the
session's cluster, deletes the data dir, restores it with `raydock restore` and boots the
platform again on it, as test_restart does.
"""

from __future__ import annotations

import shutil

import httpx
import pytest
import ray

from .conftest import boot, wait_for
from .test_cli import raydock


@pytest.mark.restarts_cluster
def test_backup_then_a_lost_data_dir_restored_serves_the_deployment_again(
    platform, ready_model, live, tmp_path
):
    archive = tmp_path / "raydock-backup.tar"
    opts = ["--url", platform.url, "--key", platform.admin_key]
    # only an admin may take one: it holds every secret
    user = platform.client.post("/users", json={"name": "not-admin", "isAdmin": False})
    refused = raydock("backup", str(archive), "--url", platform.url, "--key", user["apiKey"])
    assert refused.returncode == 1 and "admin" in refused.stderr and not archive.exists()

    done = raydock("backup", str(archive), *opts)
    assert done.returncode == 0, done.stderr
    assert f"backup written to {archive}" in done.stdout and "backup raydock-backup" in done.stderr
    assert archive.stat().st_mode & 0o077 == 0  # owner only: it holds the platform key
    history_before = platform.client.get(f"/deployments/{live.deployment['deploymentId']}/history")

    ray.shutdown()  # the platform stops; then its data dir is lost
    home = platform.settings.home_path

    def deleted() -> bool:  # Ray's processes may still be leaving it
        shutil.rmtree(home, ignore_errors=True)
        return not home.exists()

    wait_for(deleted, timeout=30, interval=0.5)
    env = {"RAYDOCK_DATABASE_URL": platform.settings.database_url}
    force = ["--force"] if platform.settings.database_url else []  # a server's database stays
    restored = raydock("restore", str(archive), "--home", str(home), *force, **env)
    assert restored.returncode == 0, restored.stderr
    assert "restored" in restored.stdout and "artifact files" in restored.stdout
    # once restored, the data dir is not fresh: a second restore is refused in one line
    again = raydock("restore", str(archive), "--home", str(home), **env)
    assert again.returncode == 1 and "--force" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1, again.stderr

    info = boot(platform.settings)
    assert info["admin_key"] is None  # the restored admin key is the one in use
    assert platform.client.get(f"/models/{ready_model['modelId']}")["status"] == "READY"
    assert (
        platform.client.get(f"/deployments/{live.deployment['deploymentId']}/history")
        == history_before
    )

    # the deployment that was DEPLOYED serves again, with its old key
    body = {"messages": [{"role": "user", "content": "restored?"}], "max_tokens": 3}
    auth = {"Authorization": f"Bearer {live.key}"}

    def answered() -> bool:
        r = httpx.post(f"{live.base_url}/chat/completions", json=body, headers=auth, timeout=60)
        assert r.status_code in (200, 503), r.text
        return r.status_code == 200

    wait_for(answered, timeout=180, interval=1)
