"""Sustained load grows a deployment from minReplicas to maxReplicas; idleness shrinks it."""

from __future__ import annotations

import threading
import time

import httpx

from .conftest import deploy_and_wait, wait_for


def test_load_scales_1_to_2_to_1(platform, ready_model):
    # up after 1 s of load, down after 2 s of quiet
    dep = deploy_and_wait(
        platform,
        ready_model["modelId"],
        "elastic",
        scalingParameters={
            "maxBatchSize": 2,
            "minReplicas": 1,
            "maxReplicas": 2,
            "scaleUpDelay": 1,
            "scaleDownDelay": 2,
        },
    )
    dep_id = dep["deploymentId"]
    key = platform.client.create_key(dep_id)
    url = f"{platform.url}/deployments/{dep_id}/v2/chat/completions"
    body = {
        "messages": [{"role": "user", "content": "more"}],
        "max_tokens": 128,
        "ignore_eos": True,
    }
    stop = threading.Event()

    def load():
        with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {key}"}) as c:
            while not stop.is_set():
                c.post(url, json=body)

    def replicas() -> dict:
        return platform.http().get(f"/api/public/deployments/{dep_id}").json()["replicas"]

    seen = [replicas()["current"]]
    workers = [threading.Thread(target=load, daemon=True) for _ in range(8)]
    for w in workers:
        w.start()
    try:
        up = wait_for(lambda: (r := replicas())["current"] == 2 and r, timeout=90, interval=1)
        seen.append(up["current"])
        assert up["target"] == 2 and (up["min"], up["max"]) == (1, 2)
    finally:
        stop.set()
        for w in workers:
            w.join()
    idle_since = time.monotonic()
    down = wait_for(
        lambda: (r := replicas())["current"] == 1 and r["target"] == 1 and r,
        timeout=60,
        interval=0.5,
    )
    seen.append(down["current"])
    assert seen == [1, 2, 1]
    assert time.monotonic() - idle_since >= 2  # not before scaleDownDelay
    platform.client.wait_job(
        platform.client.post(f"/deployments/{dep_id}/undeploy")["dockStatusId"]
    )
