"""The deployment's endpoint timeout ends a request with an OpenAI-style 504."""

from __future__ import annotations

import asyncio
import time

import httpx

from .conftest import deploy_and_wait


def test_request_over_the_timeout_gets_504(platform, ready_model):
    # one replica decoding one request at a time; the shortest allowed timeout (30 s)
    dep = deploy_and_wait(
        platform,
        ready_model["modelId"],
        "slow-lane",
        timeout=30,
        scalingParameters={"maxBatchSize": 1, "maxReplicas": 1},
    )
    key = platform.client.create_key(dep["deploymentId"])
    url = f"{platform.url}/deployments/{dep['deploymentId']}/v2/chat/completions"
    body = {
        "messages": [{"role": "user", "content": "go on"}],
        "max_tokens": 512,
        "n": 8,
        "ignore_eos": True,
    }

    async def one(client: httpx.AsyncClient) -> tuple[int, float, dict]:
        t = time.monotonic()
        r = await client.post(url, json=body, headers={"Authorization": f"Bearer {key}"})
        return r.status_code, time.monotonic() - t, r.json()

    async def burst():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client) for _ in range(8)))

    results = asyncio.run(burst())
    timed_out = [(t, body) for status, t, body in results if status == 504]
    assert timed_out, [(s, t) for s, t, _ in results]
    for elapsed, err in timed_out:
        assert 29 <= elapsed < 45
        assert err["error"]["type"] == "timeout_error"
        assert "30 s timeout" in err["error"]["message"]
    assert all(status in (200, 504) for status, _, _ in results)
    platform.client.wait_job(
        platform.client.post(f"/deployments/{dep['deploymentId']}/undeploy")["dockStatusId"]
    )
