"""The `raydock` command as a user runs it: a separate process, its exit status and output.

`raydock import` talks to the session's platform. `raydock up` starts a cluster of its own,
and only one fits on the test machine: that test replaces the session's cluster for the
time it runs (the `restarts_cluster` marker runs it after every other test) and boots it
again after.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import ray

from raydock.modelgen import build_model_zip
from raydock.platform.bootstrap import free_port

from .conftest import boot, wait_for

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


@pytest.mark.restarts_cluster
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
        assert (home / "raydock.pid").read_text() == str(up.pid)

        # the platform it started answers, with the admin key it printed
        me = httpx.get(f"{url}/api/public/me", headers={"X-api-key": key}, timeout=30)
        assert me.status_code == 200 and me.json()["isAdmin"], me.text
        assert httpx.get(f"{url}/api/public/me", timeout=30).status_code == 401

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
        boot(platform.settings)  # the session's cluster again, for the tests after this one
