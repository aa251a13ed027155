"""The `raydock` command as a user runs it: a separate process, its exit status and output.

`raydock import` talks to the session's platform. `raydock up` starts a cluster of its own,
and only one fits on the test machine: that test replaces the session's cluster for the
time it runs (the `restarts_cluster` marker runs it after every other test, last of all) and
leaves it stopped: a test after it boots it again (conftest's `_session_cluster_up`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import httpx
import pytest
import ray
import yaml

from raydock.modelgen import build_model_zip
from raydock.platform.bootstrap import free_port

from .conftest import wait_for

RAYDOCK = str(Path(sys.executable).with_name("raydock"))  # the installed console script


def raydock(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RAYDOCK, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env},
    )


def test_raydock_import_uploads_a_zip_and_prints_the_ready_model(platform, zips):
    archive = build_model_zip(zips / "cli-tiny.zip", size="tiny", seed=0)
    auth = ["--url", platform.url]
    done = raydock("import", str(archive), *auth, RAYDOCK_API_KEY=platform.admin_key)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed["status"] == "READY" and printed["modelId"], printed
    assert "upload cli-tiny.zip" in done.stderr  # the progress bars
    # the platform holds it, with the checksum of the file uploaded
    model = platform.client.get(f"/models/{printed['modelId']}")
    assert model["status"] == "READY" and model["checksum"] == printed["checksum"]

    # a file that is no model archive: exit 1 with the platform's reason, no traceback
    junk = zips / "junk.zip"
    junk.write_bytes(b"not a zip")
    failed = raydock("import", str(junk), *auth, "--key", platform.admin_key)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr
    # no such file, and no key: one line each, exit 1, no traceback
    missing = raydock("import", str(zips / "nope.zip"), *auth, "--key", platform.admin_key)
    assert missing.returncode == 1 and "nope.zip" in missing.stderr
    assert "Traceback" not in missing.stderr
    env = {k: v for k, v in os.environ.items() if k != "RAYDOCK_API_KEY"}
    nokey = subprocess.run(
        [RAYDOCK, "import", str(archive), *auth], capture_output=True, text=True, env=env
    )
    assert nokey.returncode == 1 and "management key" in nokey.stderr


def cli_json(*args: str, ok: bool = True, **env: str):
    """Run `raydock ARGS -o json`; its exit status must be 0 (or 1 when not `ok`), and a
    success prints JSON, returned parsed."""
    done = raydock(*args, "-o", "json", **env)
    assert done.returncode == (0 if ok else 1), (args, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    return json.loads(done.stdout) if ok else done.stderr.strip().splitlines()[-1]


@pytest.mark.core
def test_resource_commands_drive_the_api_with_table_json_and_yaml_output(
    platform, ready_model, live
):
    """Every resource command once, on the live deployment and one deployment of its own
    (deploy, redeploy, undeploy, re-trigger, delete: about a minute of deploys)."""
    opts = ["--url", platform.url, "--key", platform.admin_key]
    env = {"RAYDOCK_URL": platform.url, "RAYDOCK_API_KEY": platform.admin_key}
    model_id, live_id = ready_model["modelId"], live.deployment["deploymentId"]

    # models: -o json / yaml / table; --url/--key or the environment
    listed = cli_json("models", *opts)
    assert model_id in {m["modelId"] for m in listed["models"]}
    as_yaml = yaml.safe_load(raydock("models", "list", "-o", "yaml", **env).stdout)
    assert as_yaml["models"] == listed["models"]
    table = raydock("models", **env)
    assert table.returncode == 0 and table.stdout.startswith("ID") and model_id in table.stdout
    assert cli_json("models", "show", model_id, **env)["status"] == "READY"

    # deployments and history
    deps = cli_json("deployments", "list", "--model", model_id, **env)["deployments"]
    assert live_id in {d["deploymentId"] for d in deps}
    assert cli_json("deployments", "show", live_id, **env)["status"] == "DEPLOYED"
    versions = cli_json("history", live_id, **env)["versions"]
    assert versions[0]["name"] == "chat-main_v1"

    # a deployment's whole life, with progress on stderr while it waits
    name = "cli-life"
    deploy = raydock("deployments", "deploy", model_id, "--name", name, "-o", "json", **env)
    assert deploy.returncode == 0, deploy.stderr
    dep = json.loads(deploy.stdout)
    assert dep["status"] == "DEPLOYED" and "deploy" in deploy.stderr and "%" in deploy.stderr
    dep_id = dep["deploymentId"]
    redeployed = cli_json(
        "deployments", "redeploy", dep_id, "--set", "hyperParameters.topK=40", **env
    )
    assert redeployed["status"] == "DEPLOYED"
    assert redeployed["config"]["hyperParameters"]["topK"] == 40
    # a value out of range: the API's message, one line, exit 1, nothing changed
    refused = cli_json(
        "deployments",
        "redeploy",
        dep_id,
        "--set",
        "scalingParameters.maxBatchSize=999",
        ok=False,
        **env,
    )
    assert "maxBatchSize" in refused and "256" in refused and refused.startswith("raydock:")
    assert cli_json("deployments", "undeploy", dep_id, **env)["status"] == "UNDEPLOYED"
    assert cli_json("deployments", "retrigger", dep_id, **env)["status"] == "DEPLOYED"
    history = cli_json("deployments", "history", dep_id, **env)["versions"]
    assert [v["name"] for v in history] == [f"{name}_v1", f"{name}_v2", f"{name}_v3"]
    # --no-wait prints the job; `jobs show --wait` follows it to its end
    ref = cli_json("deployments", "undeploy", dep_id, "--no-wait", **env)
    job = cli_json("jobs", "show", ref["dockStatusId"], "--wait", **env)
    assert (job["status"], job["action"]) == ("SUCCESS", "UNDEPLOY")
    assert cli_json("deployments", "delete", dep_id, **env)["deleted"] is True
    gone = cli_json("deployments", "show", dep_id, ok=False, **env)
    assert "HTTP 404" in gone and dep_id in gone

    # keys: created once (shown once), listed without the secret, deleted
    key = cli_json("keys", "create", live_id, "--name", "cli", "--tokens-per-day", "1000", **env)
    assert key["apiKey"] and key["limits"]["tokensPerDay"] == 1000
    keys = cli_json("keys", "list", live_id, **env)["apiKeys"]
    assert key["keyId"] in {k["keyId"] for k in keys} and all("apiKey" not in k for k in keys)
    answered = httpx.post(
        f"{live.base_url}/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        headers={"Authorization": f"Bearer {key['apiKey']}"},
        timeout=60,
    )
    assert answered.status_code == 200
    assert cli_json("keys", "delete", live_id, key["keyId"], **env)["deleted"] is True
    assert key["keyId"] not in {
        k["keyId"] for k in cli_json("keys", "list", live_id, **env)["apiKeys"]
    }

    # usage: that key's request, counted (replicas report to the meter within a second)
    def counted() -> bool:
        usage = cli_json("usage", "--deployment", live_id, "--key-id", key["keyId"], **env)
        return usage["totals"]["requests"] == 1

    wait_for(counted, timeout=30, interval=1)

    # a wrong key: the API's refusal in one line, exit 1
    wrong = cli_json("models", "--url", platform.url, "--key", "rdm-wrong", ok=False)
    assert "HTTP 401" in wrong


def test_names_key_limits_export_and_uploads_from_the_command_line(
    platform, ready_model, live, tmp_path
):
    """A deployment by its name, a key's limits set and cleared, a model exported and
    downloaded, an upload session shown and cancelled: on the session's live deployment
    (no deploy; the export of the tiny model takes seconds)."""
    env = {"RAYDOCK_URL": platform.url, "RAYDOCK_API_KEY": platform.admin_key}
    name, live_id = live.deployment["name"], live.deployment["deploymentId"]

    # a name or an id: the same deployment; a name no deployment has: one line, exit 1
    assert cli_json("deployments", "show", name, **env)["deploymentId"] == live_id
    by_name = cli_json("usage", "--deployment", name, "--group-by", "total", **env)
    by_id = cli_json("usage", "--deployment", live_id, "--group-by", "total", **env)
    assert by_name["totals"] == by_id["totals"]
    unknown = raydock("usage", "--deployment", "no-such-deployment", **env)
    assert unknown.returncode == 1 and unknown.stderr.strip().splitlines() == [
        "raydock: --deployment 'no-such-deployment': no deployment has this id or name"
    ]

    # keys limits: set, one cleared, the rest kept; the key by its name
    key = cli_json("keys", "create", name, "--name", "cli-limits", **env)
    limits = ["--requests-per-minute", "100", "--tokens-per-day", "5000"]
    set_ = cli_json("keys", "limits", name, "cli-limits", *limits, **env)["limits"]
    assert set_ == {"requestsPerMinute": 100, "tokensPerMinute": None, "tokensPerDay": 5000}
    cleared = cli_json("keys", "limits", live_id, key["keyId"], "--clear", "tokensPerDay", **env)
    assert cleared["limits"]["tokensPerDay"] is None
    assert cleared["limits"]["requestsPerMinute"] == 100
    assert cli_json("keys", "delete", name, "cli-limits", **env)["deleted"] is True

    # models export: follows the job, says where the zip is, downloads it with --out
    model_id = ready_model["modelId"]
    shown = cli_json(
        "models", "export", model_id, "--deployment", name, "--out", str(tmp_path), **env
    )
    assert shown["downloadUrl"].startswith(("http://", "https://")), shown
    saved = Path(shown["savedTo"])
    assert saved.parent == tmp_path and saved.name == shown["fileName"]
    with zipfile.ZipFile(saved) as zf:
        assert "config.json" in zf.namelist()
        config = json.loads(zf.read("deployconfig.json"))
    live_config = platform.client.get(f"/deployments/{live_id}")["config"]
    assert config["scalingParameters"] == live_config["scalingParameters"]

    # uploads: a chunked session shown, then cancelled (its chunks deleted)
    started = platform.client.post(
        "/files/session/start",
        json={"fileName": "later.zip", "totalSize": 10, "totalChunks": 1},
    )
    sid = started["sessionId"]
    assert cli_json("uploads", "show", sid, **env)["fileName"] == "later.zip"
    assert cli_json("uploads", "cancel", sid, **env) == {"deleted": True, "sessionId": sid}
    assert "HTTP 404" in cli_json("uploads", "show", sid, ok=False, **env)


@pytest.mark.restarts_cluster(leaves_it_down=True)
def test_raydock_up_serves_and_raydock_down_stops_it(platform, tmp_path):
    ray.shutdown()  # the session's cluster: only one fits beside `raydock up`'s
    home, port = tmp_path / "home", free_port()
    log = tmp_path / "up.log"  # a file, not a pipe: Ray's logs would fill a pipe nobody reads
    with log.open("w") as sink:
        # a fresh environment for its ports: this process's environment holds the session
        # cluster's HAProxy ports (bootstrap._use_haproxy_ingress), which may still be bound
        own_ports = ("FALLBACK_PROXY_HTTP_PORT", "HAPROXY_STATS_PORT", "HAPROXY_METRICS_PORT")
        env = {k: v for k, v in os.environ.items() if k.removeprefix("RAY_SERVE_") not in own_ports}
        up = subprocess.Popen(
            [RAYDOCK, "up", "--home", str(home), "--port", str(port)],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
        )
    # reap it as soon as it exits, as a shell would: a zombie still answers `kill -0`, and
    # `raydock down` would wait for it forever
    threading.Thread(target=up.wait, daemon=True).start()
    try:

        def printed() -> list[str]:
            lines = log.read_text().splitlines()
            assert up.poll() is None, lines  # `raydock up` exited
            heading = [i for i, ln in enumerate(lines) if "first admin management key" in ln]
            return lines if heading and len(lines) > heading[0] + 1 else []

        lines = wait_for(printed, timeout=240, interval=1)
        url = next(ln.split()[4] for ln in lines if ln.startswith("raydock is up at"))
        assert url.endswith(f":{port}"), lines
        heading = next(i for i, ln in enumerate(lines) if "first admin management key" in ln)
        key = lines[heading + 1].strip()  # printed once, on the line after
        assert (home / "raydock.pid").read_text().split()[0] == str(up.pid)

        # the platform it started answers, with the admin key it printed
        me = httpx.get(f"{url}/api/public/me", headers={"X-api-key": key}, timeout=30)
        assert me.status_code == 200 and me.json()["isAdmin"], me.text
        assert httpx.get(f"{url}/api/public/me", timeout=30).status_code == 401
        # the data dir and the database in it are the owner's only
        assert (home.stat().st_mode & 0o777, (home / "raydock.db").stat().st_mode & 0o777) == (
            0o700,
            0o600,
        )

        down = raydock("down", "--home", str(home), timeout=240)
        assert down.returncode == 0 and "raydock stopped" in down.stdout, down
        assert up.wait(timeout=10) == 0
        assert "raydock: shutting down" in log.read_text()
        assert not (home / "raydock.pid").exists()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/api/public/health", timeout=5)
        # nothing left to stop
        assert "not running" in raydock("down", "--home", str(home)).stdout
    finally:
        if up.poll() is None:  # SIGTERM: it takes its Ray cluster down with it
            up.terminate()
            try:
                up.wait(timeout=120)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait()
