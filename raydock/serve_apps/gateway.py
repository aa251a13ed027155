"""The inference gateway: the OpenAI-standard `/v1/*` endpoints, the docs, and the web
dashboard's page and files (raydock/web/app; its API is the management API's).

`/v1/*` names the deployment in `model` (or by the key), so the gateway authenticates, then
streams from that deployment's engine app through a DeploymentHandle. Requests to
`/deployments/{id}/…` go straight to the engine replicas, which serve them themselves (one
hop fewer); they reach the gateway only when no engine app has that route — an unknown,
undeployed or not yet started deployment — and get the fitting 401/404/503 here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayError
from ray.serve.exceptions import BackPressureError, RayServeException

from raydock import errors, names
from raydock.config import Settings
from raydock.errors import ApiError
from raydock.metering import exposition
from raydock.serve_apps import docs_page, responses_api
from raydock.serve_apps.access import Auth, DeploymentAccess, NotServing, bearer_token
from raydock.serve_apps.metering import ReplicaMeter, is_prompt_taken
from raydock.serve_apps.openai_service import adapter_part, complete, unknown_model

app = FastAPI(title="raydock inference", docs_url=None, openapi_url=None)


class _Ctx:
    auth: Auth
    meter: ReplicaMeter
    metrics_token: str
    handles: dict[str, Any]
    stream_interval_s: float
    max_request_bytes: int
    openapi: dict[str, Any] | None = None


ctx = _Ctx()


errors.install(app, lambda: ctx.max_request_bytes)


async def _handle(deployment_id: str, adapter_id: str | None = None):
    handle = ctx.handles.get(deployment_id)
    if handle is None:
        try:  # a blocking call to Serve's controller: off the loop every /v1 request shares
            handle = await asyncio.to_thread(serve.get_app_handle, names.engine_app(deployment_id))
        except RayServeException:  # DEPLOYED in the database, app not (yet) back after restart
            raise ApiError(
                503,
                f"deployment {deployment_id} is starting; retry shortly",
                None,
                "deployment_not_ready",
            ) from None
        ctx.handles[deployment_id] = handle
    options: dict[str, Any] = {"stream": True, "method_name": "generate"}
    if adapter_id:  # Serve routes it to a replica that holds the adapter, if one does
        options["multiplexed_model_id"] = adapter_id
    return handle.options(**options)


def _cancel_quietly(gen) -> None:
    with contextlib.suppress(Exception):  # it may have failed or finished meanwhile
        gen.cancel()


#: A replica that dies before a request's first token: the request goes to another one, this
#: many times at most (Serve routes around the dead replica)
REPLICA_RETRIES = 2


def _via_handle(deployment_id: str):
    async def attempt(payload: dict) -> AsyncIterator[list[dict]]:
        gen = None
        settled = False  # finished or refused: nothing left to cancel
        try:
            adapter = (payload.get("adapter") or {}).get("id")
            handle = await _handle(deployment_id, adapter)
            gen = handle.remote(payload)  # a full queue may refuse here
            async for batch in gen:
                yield batch
            settled = True
        except BackPressureError:
            settled = True
            raise ApiError(
                429, "the deployment's request queue is full; retry later", None, "queue_full"
            ) from None
        finally:
            if gen is not None and not settled:
                # cancel() may wait for the router to place the request: off the event loop
                await asyncio.to_thread(_cancel_quietly, gen)

    async def run(payload: dict) -> AsyncIterator[list[dict]]:
        for tries_left in range(REPLICA_RETRIES, -1, -1):
            produced = False
            try:
                async for batch in attempt(payload):
                    # the replica's prompt_taken is no answer yet: the request may move on
                    produced = produced or not is_prompt_taken(batch)
                    yield batch
                return
            except (RayActorError, ActorUnavailableError) as exc:
                if produced or not tries_left:
                    raise ApiError(
                        503,
                        "the replica serving this request stopped; retry the request",
                        None,
                        "replica_failed",
                    ) from exc

    return run


async def _authorize(request: Request, deployment_id: str | None):
    """The request's deployment access and key id; a refusal is counted, then raised."""
    try:
        return await ctx.auth.authorize(request, deployment_id)
    except ApiError as exc:
        named = exc.deployment_id if isinstance(exc, NotServing) else None
        ctx.meter.refused(named or ctx.auth.known(deployment_id), exc.status)
        raise


async def _serve(kind, request: Request, deployment_id: str | None, body_of=None):
    dep, key_id = await _authorize(request, deployment_id)
    return await complete(
        kind,
        request,
        dep,
        key_id,
        _via_handle(dep.deployment_id),
        ctx.meter,
        by_model=deployment_id is None,
        stream_interval_s=ctx.stream_interval_s,
        body_of=body_of,
    )


async def _serve_responses(request: Request, deployment_id: str | None):
    """A Responses API request, answered on the chat path (responses_api)."""
    return await responses_api.respond(
        lambda body_of: _serve("chat", request, deployment_id, body_of),
        errors.request_id(request),
    )


# ------------------------------------------------------------------ routes


@app.post("/deployments/{deployment_id}/v2/chat/completions", tags=["inference"])
async def chat_v2(deployment_id: str, request: Request):
    """Chat completion on one deployment (OpenAI chat schema; served by its replicas)."""
    return await _serve("chat", request, deployment_id)


@app.post("/deployments/{deployment_id}/v1/completions", tags=["inference"])
async def completions_v1_deployment(deployment_id: str, request: Request):
    """Legacy text completion on one deployment (served by its replicas)."""
    return await _serve("completion", request, deployment_id)


@app.post("/deployments/{deployment_id}/v1/responses", tags=["inference"])
async def responses_deployment(deployment_id: str, request: Request):
    """OpenAI Responses API on one deployment (served by its replicas)."""
    return await _serve_responses(request, deployment_id)


@app.post("/v1/chat/completions", tags=["inference"])
async def chat_openai(request: Request):
    """OpenAI-standard chat completions; `model` names the key's deployment (id or name)."""
    return await _serve("chat", request, None)


@app.post("/v1/completions", tags=["inference"])
async def completions_openai(request: Request):
    return await _serve("completion", request, None)


@app.post("/v1/responses", tags=["inference"])
async def responses_openai(request: Request):
    """OpenAI Responses API (`client.responses.create`), on the chat path: `model` names the
    key's deployment (id or name). raydock stores no responses (README "Responses API")."""
    return await _serve_responses(request, None)


# not in the document: it only tells a client that retrieves (client.responses.retrieve) why not
@app.get("/v1/responses/{response_id}", include_in_schema=False)
async def retrieve_response(response_id: str, request: Request):
    """Always 404 after the key is checked: raydock stores no responses to retrieve."""
    await _authorize(request, None)
    raise responses_api.not_stored(response_id)


def _models(dep: DeploymentAccess) -> list[dict[str, Any]]:
    """The key's deployment, then the adapters it serves by request (`<deployment>:<name>`,
    or `<deployment>:<adapter id>` for a name two adapters share: the one a request can use)."""
    return [_entry(dep)] + [_entry(dep, label) for label in _adapter_labels(dep).values()]


def _adapter_labels(dep: DeploymentAccess) -> dict[str, str]:
    """Each adapter's id -> how /v1/models names it: its name, or its id when shared."""
    names = Counter(a["name"] for a in dep.adapters.values())
    return {a_id: a_id if names[a["name"]] > 1 else a["name"] for a_id, a in dep.adapters.items()}


def _entry(dep: DeploymentAccess, adapter: str | None = None) -> dict[str, Any]:
    base = {"object": "model", "created": dep.created, "owned_by": dep.name}
    if adapter is None:
        return base | {"id": dep.deployment_id}
    return base | {"id": f"{dep.deployment_id}:{adapter}", "parent": dep.deployment_id}


@app.get("/v1/models", tags=["inference"])
async def list_models(request: Request):
    """The key's deployment, then the adapters it serves by request (`<deployment>:<name>`)."""
    dep, _ = await ctx.auth.authorize(request, None)
    return {"object": "list", "data": _models(dep)}


@app.get("/v1/models/{model:path}", tags=["inference"])  # names may hold "/"
async def retrieve_model(model: str, request: Request):
    """One entry of /v1/models, by its id or with the deployment's name in place of its id."""
    dep, _ = await ctx.auth.authorize(request, None)
    if model in (dep.deployment_id, dep.name):
        return _entry(dep)
    named = adapter_part(model, dep)
    if not named:
        raise unknown_model(model, dep)
    found = dep.adapter(named, "model")  # by its name or id, as a request names it; 404/400
    return _entry(dep, _adapter_labels(dep)[found["id"]])  # as /v1/models lists it


# ------------------------------------------------------------------ metrics


#: how long /metrics waits for the meter
METER_WAIT_S = 10.0


@app.get("/metrics", include_in_schema=False)
async def metrics(request: Request):
    """Every raydock metric in Prometheus' text format, summed over all replicas and nodes
    (README "Metrics"); with `metrics_token` set, only for `Authorization: Bearer <token>`."""
    if ctx.metrics_token:
        given = bearer_token(request.headers.get("authorization")) or ""
        if not hmac.compare_digest(given.encode(), ctx.metrics_token.encode()):
            raise ApiError(401, "metrics need 'Authorization: Bearer <metrics_token>'")
    if ctx.meter.meter is None:
        raise ApiError(404, "metering is off on this platform (metering: false)")
    try:
        meter = ray.get_actor(*ctx.meter.meter)
        text = await asyncio.wait_for(meter.exposition.remote(), METER_WAIT_S)
    except (ValueError, TimeoutError, RayError):  # busy, or being started again (no name yet)
        raise errors.meter_unavailable("metrics are") from None
    return Response(text, media_type=exposition.CONTENT_TYPE)


# ------------------------------------------------------------------ docs: one document for all


# ------------------------------------------------------------------ the web dashboard

WEB_DIR = Path(__file__).resolve().parent.parent / "web" / "app"
#: everything the dashboard loads comes from this server (it may run offline)
WEB_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@app.get("/", include_in_schema=False)
async def root():
    """The web dashboard (a single page: raydock/web/app; its routes are in the fragment)."""
    return FileResponse(WEB_DIR / "index.html", media_type="text/html", headers=WEB_HEADERS)


class _WebFiles(StaticFiles):
    async def get_response(self, path, scope):
        response = await super().get_response(path, scope)
        response.headers.update(WEB_HEADERS)
        return response


app.mount("/ui", _WebFiles(directory=WEB_DIR), name="web")


@app.get("/openapi.json", include_in_schema=False)
async def openapi_json():
    """The combined document, built by the management API's replica (it reads both planes'
    routes) and kept: it changes only with the code, which a restart redeploys."""
    if ctx.openapi is None:
        try:
            api = await asyncio.to_thread(serve.get_app_handle, names.API_APP)
            ctx.openapi = await api.openapi_document.remote()
        except (RayError, RayServeException) as exc:
            raise ApiError(503, "the management API is restarting; retry shortly") from exc
    return JSONResponse(ctx.openapi)


@app.get("/docs", include_in_schema=False)
async def docs():
    return docs_page.swagger_ui("/openapi.json", "raydock API")


app.mount(docs_page.ASSETS_URL, StaticFiles(directory=docs_page.ASSETS_DIR), name="docs-assets")


def configure(settings: dict[str, Any], control_plane: dict[str, tuple[str, str]]) -> None:
    parsed = Settings(**settings)
    ctx.auth = Auth(control_plane["access_hub"], control_plane["registry"])
    meter = control_plane["meter"]
    ctx.meter = ReplicaMeter(meter, enabled=meter is not None)
    ctx.metrics_token = parsed.metrics_token
    ctx.handles = {}
    ctx.stream_interval_s = parsed.stream_interval_ms / 1000
    ctx.max_request_bytes = parsed.max_request_bytes


def asgi_app() -> FastAPI:
    return app


# See platform/api.py: module-level functions are pickled by reference, the class by value.
@serve.deployment(
    name="gateway",
    num_replicas=1,
    ray_actor_options={"num_cpus": 0, "resources": names.ON_HEAD},
    max_ongoing_requests=1000,
)
@serve.ingress(asgi_app)
class Gateway:
    def __init__(self, settings: dict[str, Any], control_plane: dict[str, tuple[str, str]]):
        configure(settings, control_plane)
