"""Routes the web dashboard needs beyond the seed's API: a deployment's last hour of figures
(the Metrics tab) and the Playground's chat.

The Playground chats as the signed-in user without handing the browser a deployment key: the
API replica creates a key named `playground (<user>)` for that user and deployment, keeps the
secret only in its own memory, and forwards the page's request (a management-authorized one:
session cookie + CSRF token, or a management key) to the deployment's own endpoint with it.
The request therefore takes the path any client takes (key check, limits, metering, timeout,
the pipeline's validation), its usage is visible under that key, and no lasting credential
is ever readable by a script in the page. Deleting the key in the API keys tab stops it;
the next Playground message makes a new one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import ray
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from ray.exceptions import RayError

from raydock import names
from raydock.errors import ApiError, as_api_error, meter_unavailable
from raydock.platform import db
from raydock.platform.api_deps import User, ctx
from raydock.platform.states import (
    DELETABLE_DEPLOYMENT,
    RETRIGGERABLE_DEPLOYMENT,
    UNDEPLOYABLE_DEPLOYMENT,
)

router = APIRouter(prefix="/public")

#: how long the metrics history waits for the meter
METER_WAIT_S = 5.0
#: a new key reaches the replicas within milliseconds; a 401 is retried this long
NEW_KEY_WAIT_S = 5.0

_playground_keys: dict[tuple[str, str], str] = {}  # (deployment, user) -> secret, memory only
_key_locks: dict[tuple[str, str], asyncio.Lock] = {}


@router.get("/deployments/{deploymentId}/metrics/history", tags=["deployments"])
async def metrics_history(deploymentId: str, _: User) -> dict[str, Any]:
    """The last hour of the deployment's figures, one point per interval (10 s): requests,
    errors and tokens per second, TTFT p50/p95 (seconds; null without requests), running and
    target replicas; with the deployment's minimum and maximum replicas.

    Each point's `t` is its interval's end and `requests` the requests counted in that
    interval (a field added beside the earlier ones, which are unchanged): their sum is the
    window's requests. A rate times `intervalSeconds` is not, since intervals differ in length
    (the last, live one runs to now) and the first one's start is not returned."""
    dep = await ctx.registry.get_deployment.remote(deploymentId)
    scaling = dep["config"].get("scalingParameters", {})
    if not ctx.settings.metering:
        raise ApiError(404, "metering is off on this platform (metering: false)")
    try:
        meter = ray.get_actor(names.METER, namespace=names.NAMESPACE)
        series = await asyncio.wait_for(meter.series.remote(deploymentId), METER_WAIT_S)
    except (ValueError, TimeoutError, RayError):  # busy, or being started again (no name yet)
        raise meter_unavailable("the metrics history is") from None
    return {
        "deploymentId": deploymentId,
        "replicasMin": scaling.get("minReplicas"),
        "replicasMax": scaling.get("maxReplicas"),
        **series,
    }


def playground_key_names(user: dict[str, Any]) -> tuple[str, str]:
    """The names a user's playground key may take: a deployment's key names are unique, user
    names are not, so a user whose name another user's playground key already bears gets the
    second, which names their id too. A long user name is cut to keep each within a key
    name's length (the registry would cut it at the end, making both names one)."""
    limit = db.ApiKey.__table__.c.name.type.length

    def named(suffix: str) -> str:
        room = limit - len("playground ()") - len(suffix)
        name = user["name"] if len(user["name"]) <= room else user["name"][: room - 1] + "…"
        return f"playground ({name}{suffix})"

    return named(""), named(f", {user['userId']}")


def is_playground_key(key: dict[str, Any]) -> bool:
    """Whether a key (as the registry lists it) is the Playground's key of the user who made
    it: that user's own, made again on their next message, and no key of the deployment's
    declared state."""
    maker = {"name": key.get("createdBy") or "", "userId": key.get("createdById") or ""}
    return key["name"] in playground_key_names(maker)


async def _playground_key(
    deployment_id: str, user: dict[str, Any], refused: str | None = None
) -> tuple[str, bool]:
    """(the user's playground key for the deployment, whether it may be new to the replicas).
    `refused`: the key a replica refused (deleted in the API keys tab): a new one, unless
    another message made one meanwhile (it deleted the one this message had just made)."""
    slot = (deployment_id, user["userId"])
    async with _key_locks.setdefault(slot, asyncio.Lock()):
        if slot in _playground_keys and _playground_keys[slot] != refused:
            return _playground_keys[slot], refused is not None
        names = playground_key_names(user)
        # the secret of an earlier one is gone (a restart) or refused: that key is of no use
        for k in await ctx.registry.list_deployment_keys.remote(deployment_id):
            if k["name"] in names and k["createdById"] == user["userId"]:
                await ctx.registry.delete_deployment_key.remote(deployment_id, k["keyId"])
        create = ctx.registry.create_deployment_key.remote
        try:
            made = await create(deployment_id, names[0], user["userId"], None)
        except Exception as exc:
            err = as_api_error(exc)
            if err is None or err.code != "duplicate_name":
                raise
            made = await create(deployment_id, names[1], user["userId"], None)
        _playground_keys[slot] = made["apiKey"]
        return made["apiKey"], True


@router.post("/deployments/{deploymentId}/playground/chat/completions", tags=["deployments"])
async def playground_chat(deploymentId: str, request: Request, user: User) -> Response:
    """Chat with the deployment as the signed-in user (the dashboard's Playground): the body
    is an OpenAI chat request, checked and answered exactly as on
    `/deployments/{id}/v2/chat/completions`, streaming included."""
    await ctx.registry.get_deployment.remote(deploymentId)  # 404 for an unknown one
    body = await request.body()
    url = f"{ctx.settings.local_url}/deployments/{deploymentId}/v2/chat/completions"
    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + NEW_KEY_WAIT_S
    key, new = await _playground_key(deploymentId, user)
    while True:
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        try:
            upstream = await client.send(
                client.build_request("POST", url, content=body, headers=headers), stream=True
            )
        except httpx.TransportError as exc:
            await client.aclose()
            raise ApiError(503, f"the deployment's endpoint did not answer: {exc}") from None
        if upstream.status_code != 401 or loop.time() > deadline:
            break
        await upstream.aclose()
        if new:  # the replicas have not heard of it yet (milliseconds)
            await asyncio.sleep(0.1)
        else:  # deleted in the API keys tab: a new one
            key, new = await _playground_key(deploymentId, user, refused=key)

    async def relay() -> AsyncIterator[bytes]:
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        finally:
            await upstream.aclose()
            await client.aclose()

    relayed = {"Cache-Control": "no-cache"}
    if "retry-after" in upstream.headers:  # a 429's: when the key may ask again
        relayed["Retry-After"] = upstream.headers["retry-after"]
    return StreamingResponse(
        relay(),
        status_code=upstream.status_code,
        media_type=upstream.headers.get("content-type", "application/json"),
        headers=relayed,
    )


def allowed_actions(status: str) -> dict[str, bool]:
    """What the dashboard offers for a deployment in `status` (the rules are states.py's)."""
    return {
        "undeploy": status in UNDEPLOYABLE_DEPLOYMENT,
        "delete": status in DELETABLE_DEPLOYMENT,
        "retrigger": status in RETRIGGERABLE_DEPLOYMENT,
    }
