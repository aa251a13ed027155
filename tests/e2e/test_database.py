"""The database under a running platform: the registry the supervisor creates after a kill
takes the lease over from the dead one, and a second platform on the same database (a real
`raydock up` process) is refused in one line before it starts Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import ray

from raydock import names
from raydock.platform import migrations
from raydock.platform.bootstrap import free_port

from .conftest import wait_for


def lease_holder(platform) -> dict:
    return json.loads((platform.settings.home_path / "raydock.db.lock").read_text() or "{}")


def test_a_killed_registry_is_replaced_and_its_successor_holds_the_lease(platform):
    before = lease_holder(platform)
    assert before["platform"].startswith("Ray session session_")
    ray.kill(ray.get_actor(names.REGISTRY, namespace=names.NAMESPACE), no_restart=True)
    killed = time.monotonic()

    def answers_with_a_new_holder() -> bool:
        holder = lease_holder(platform)
        if not holder or holder["pid"] == before["pid"]:
            return False
        with platform.http() as http:
            return http.get("/api/public/models", timeout=10).status_code == 200

    wait_for(answers_with_a_new_holder, timeout=40, interval=0.5)
    after = lease_holder(platform)
    print(f"a new registry holds the lease {time.monotonic() - killed:.1f} s after the kill")
    assert after["platform"] == before["platform"]  # the same platform, a new process
    registry = ray.get_actor(names.REGISTRY, namespace=names.NAMESPACE)
    assert ray.get(registry.ping.remote())


def test_a_port_in_use_is_refused_in_one_line_before_anything_starts(platform, tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "RAYDOCK_HOME": str(home), "RAYDOCK_PORT": str(platform.settings.port)}
    up = subprocess.run(
        [sys.executable, "-m", "raydock.cli", "up"], env=env, capture_output=True, text=True
    )
    assert up.returncode == 1, (up.stdout, up.stderr)
    (line,) = up.stderr.strip().splitlines()
    assert f"port {platform.settings.port}" in line and "in use" in line
    assert not home.exists()  # nothing made


def test_a_second_platform_on_the_same_database_is_refused_in_one_line(platform):
    holder = lease_holder(platform)
    env = {
        **os.environ,
        "RAYDOCK_HOME": str(platform.settings.home_path),
        "RAYDOCK_PORT": str(free_port()),
    }
    started = time.monotonic()
    up = subprocess.run(
        [sys.executable, "-m", "raydock.cli", "up"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    took = time.monotonic() - started
    assert up.returncode == 1, (up.stdout, up.stderr)
    err = up.stderr.strip().splitlines()
    assert len(err) == 1, up.stderr
    assert "in use by another raydock platform" in err[0]
    assert f"pid {holder['pid']} on host" in err[0] and holder["platform"] in err[0]
    assert took < 30, took  # refused before starting Ray
    current = subprocess.run(
        [sys.executable, "-m", "raydock.cli", "db", "current"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert current.returncode == 0, current.stderr
    assert f"revision: {migrations.head()} (head)" in current.stdout
    assert f"lease: held by pid {holder['pid']}" in current.stdout
    # the running platform went on as if nothing happened
    with httpx.Client(base_url=platform.url, headers={"X-api-key": platform.admin_key}) as http:
        assert http.get("/api/public/models", timeout=10).status_code == 200
