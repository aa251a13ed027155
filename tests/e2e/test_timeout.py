"""The deployment's endpoint timeout ends a request with an OpenAI-style 504, and the engine
stops working on it: in the HTTP status before the first token, as an SSE error event after."""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from raydock.modelgen import build_model_zip

from .conftest import deploy_and_wait, import_ready, wait_for

TIMEOUT_S = 30  # the shortest timeout a deployment accepts
NEW_TIMEOUT_S = 50  # what the deployment's timeout is changed to
#: a heavy request: a long prompt, 8 choices that never stop early; its length is sized below
LONG = {
    "messages": [{"role": "user", "content": "go on and on " * 250}],
    "n": 8,
    "ignore_eos": True,
}
#: how long one request should take, so that a handful queued behind each other outlast
#: the timeout whatever this machine's speed today: 2.5 requests per timeout, so the cut
#: falls mid-request (at TIMEOUT_S / 3 a request could end just as the time ran out, and no
#: stream was cut after its tokens: seen in CI), and mid-request for NEW_TIMEOUT_S too
TARGET_REQUEST_S = TIMEOUT_S / 2.5


async def _stream(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """A streamed request as the user sees it: status, content chunks, the error event."""
    started = time.monotonic()
    out = {"status": 0, "chunks": 0, "error": None, "done": False}
    async with client.stream("POST", url, json=body | {"stream": True}) as r:
        out["status"] = r.status_code
        if r.status_code != 200:
            out["error"] = json.loads(await r.aread())["error"]
        else:
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    out["done"] = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    if "error" in event:
                        out["error"] = event["error"]
                    else:
                        out["chunks"] += 1
    out["elapsed"] = time.monotonic() - started
    return out


async def _post(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    started = time.monotonic()
    r = await client.post(url, json=body)
    return {
        "status": r.status_code,
        "error": r.json().get("error"),
        "elapsed": time.monotonic() - started,
        "retry": r.headers.get("x-should-retry"),
    }


def test_timeout_ends_requests_and_stops_their_decoding(platform, zips):
    # a model slow per token, on one replica decoding one sequence at a time, so requests
    # queue behind each other
    model = import_ready(platform, build_model_zip(zips / "deep.zip", size="deep"))
    dep = deploy_and_wait(
        platform,
        model["modelId"],
        "slow-lane",
        timeout=TIMEOUT_S,
        scalingParameters={"maxBatchSize": 1, "maxReplicas": 1},
    )
    dep_id = dep["deploymentId"]
    key = platform.client.create_key(dep_id)
    url = f"{platform.url}/deployments/{dep_id}/v2/chat/completions"
    stats_url = f"/api/public/deployments/{dep_id}/stats"
    headers = {"Authorization": f"Bearer {key}"}

    # size the requests by this machine's speed now (shared cores vary twofold): two short
    # probes give the prompt's fixed cost and the time per token, LONG then takes about
    # TARGET_REQUEST_S
    def timed(tokens: int) -> float:
        t0 = time.monotonic()
        r = httpx.post(url, json=LONG | {"max_tokens": tokens}, headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        return time.monotonic() - t0

    short, long_ = timed(16), timed(64)
    per_token = max((long_ - short) / 48, 1e-3)
    fixed = max(short - 16 * per_token, 0.0)
    tokens = int((TARGET_REQUEST_S - fixed) / per_token)
    body = LONG | {"max_tokens": max(16, min(768, tokens))}

    # the replica holds 9 requests (1 decoding, 8 waiting): 7 streams, then 2 plain requests,
    # are together well over the timeout's worth of work
    streams = 7

    async def burst():
        async with httpx.AsyncClient(timeout=120, headers=headers) as client:
            streamed = [asyncio.create_task(_stream(client, url, body)) for _ in range(streams)]
            await asyncio.sleep(1)  # these two queue behind every stream
            posted = [asyncio.create_task(_post(client, url, body)) for _ in range(2)]
            return await asyncio.gather(*streamed), await asyncio.gather(*posted)

    streamed, posted = asyncio.run(burst())
    summary = [body["max_tokens"]] + [
        (s["status"], s["chunks"], s["done"], round(s["elapsed"], 1), s["error"]) for s in streamed
    ]

    # the stream decoding when its time ran out: tokens, then the 504 as an SSE event
    cut = [s for s in streamed if s["status"] == 200 and s["error"]]
    assert len(cut) == 1, summary
    assert cut[0]["chunks"] > 0
    # the streams and requests still waiting for the engine: a 504 status, no tokens
    queued = [s for s in streamed if s["status"] == 504] + posted
    assert len(queued) >= 3, (summary, posted)
    for s in cut + queued:
        assert TIMEOUT_S - 1 <= s["elapsed"] < TIMEOUT_S + 15, (summary, posted)
        assert s["error"]["type"] == "timeout_error"
        assert s["error"]["code"] == "timeout"
        assert f"{TIMEOUT_S} s timeout" in s["error"]["message"]
    assert all(s["status"] == 504 for s in posted), posted
    # OpenAI's clients retry a 5xx (twice by default) unless told not to: a retry would run
    # the same request out again
    assert all(s["retry"] == "false" for s in posted), posted
    # every stream either finished, was cut, or never started
    assert all(s["done"] or s["error"] for s in streamed), summary

    # nothing keeps decoding in the background once the 504s are sent: within a few steps
    # (those already under way) the engine is idle, where a live request would keep it busy
    # for seconds more
    http = platform.http()
    last: list[dict] = []

    def idle() -> bool:
        last.append(http.get(stats_url).json())
        quiet = len(last) > 1 and last[-1]["steps"] == last[-2]["steps"]
        return quiet and last[-1]["running"] == 0 and last[-1]["waiting"] == 0

    wait_for(idle, timeout=5, interval=1)

    # a changed endpoint timeout (PATCH, no redeploy) changes when requests are cut: 7 queued
    # requests of about TARGET_REQUEST_S each, one at a time, run well past the old 30 s and
    # past the new one; those still running at the new time end 504 there, naming it
    r = http.patch(f"/api/public/deployments/{dep_id}", json={"timeout": NEW_TIMEOUT_S})
    assert r.status_code == 200 and r.json()["timeout"] == NEW_TIMEOUT_S, r.text

    async def queue():
        async with httpx.AsyncClient(timeout=120, headers=headers) as client:
            return await asyncio.gather(*(_post(client, url, body) for _ in range(7)))

    posted = asyncio.run(queue())
    summary = [(p["status"], round(p["elapsed"], 1)) for p in posted]
    assert {p["status"] for p in posted} == {200, 504}, summary
    # served past the old timeout: the old value no longer cuts
    assert any(p["status"] == 200 and p["elapsed"] > TIMEOUT_S + 2 for p in posted), summary
    for p in posted:
        if p["status"] == 504:
            assert NEW_TIMEOUT_S - 1 <= p["elapsed"] < NEW_TIMEOUT_S + 15, summary
            assert f"{NEW_TIMEOUT_S} s timeout" in p["error"]["message"]
    wait_for(idle, timeout=5, interval=1)

    platform.client.wait_job(
        platform.client.post(f"/deployments/{dep_id}/undeploy")["dockStatusId"]
    )
