"""The inference gateway: OpenAI-compatible endpoints in front of every deployment.

Per request it authenticates the deployment key (a read of the database — the control plane
actors are never on this path), validates parameters against the deployment's ranges, applies
the deployment's defaults and timeout, and streams from the engine app's DeploymentHandle.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import ray
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError, RayServeException
from sqlalchemy import select

from raydock.config import Settings
from raydock.errors import ApiError, error_body, error_response
from raydock.platform import db, names, security
from raydock.platform.schemas import DEFAULT_MAX_TOKENS
from raydock.platform.states import DeploymentStatus as D
from raydock.serve_apps import protocol

app = FastAPI(title="raydock inference", docs_url=None, openapi_url=None)


class _Ctx:
    settings: Settings
    sessions: Any
    registry: Any
    handles: dict[str, Any]
    touched: dict[str, float]


ctx = _Ctx()


@app.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError):
    return error_response(exc.status, exc.message, exc.param, exc.code)


# ------------------------------------------------------------------ auth & lookup


def _key_from(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip() or None
    return request.headers.get("x-api-key")


def _authorize(request: Request, deployment_id: str | None) -> db.Deployment:
    """The deployment this request may use; raises 401/404/503 as OpenAI would."""
    key = _key_from(request)
    if not key:
        raise ApiError(
            401, "missing API key: send 'Authorization: Bearer <key>'", None, "invalid_api_key"
        )
    with ctx.sessions() as s:
        row = s.scalar(select(db.ApiKey).where(db.ApiKey.key_hash == security.hash_key(key)))
        if row is None or row.scope != "deployment":
            raise ApiError(401, "invalid API key", None, "invalid_api_key")
        target = deployment_id or row.deployment_id
        dep = s.get(db.Deployment, target)
        if dep is None:
            raise ApiError(404, f"deployment {target} does not exist", "model", "model_not_found")
        if row.deployment_id != dep.id:
            raise ApiError(
                401, "this API key is not valid for this deployment", None, "invalid_api_key"
            )
    _touch(row.id)
    if dep.status != D.DEPLOYED:
        raise ApiError(
            503, f"deployment {dep.id} is {dep.status}, not serving", None, "deployment_not_ready"
        )
    return dep


def _touch(key_id: str) -> None:
    """Record key use, at most once a minute per key, without waiting for the registry."""
    now = time.monotonic()
    if now - ctx.touched.get(key_id, -1e9) > 60:
        ctx.touched[key_id] = now
        ctx.registry.touch_keys.remote([key_id])


def _handle(deployment_id: str):
    handle = ctx.handles.get(deployment_id)
    if handle is None:
        try:
            handle = serve.get_app_handle(names.engine_app(deployment_id))
        except RayServeException:  # DEPLOYED in the database, app not (yet) back after restart
            raise ApiError(
                503,
                f"deployment {deployment_id} is starting; retry shortly",
                None,
                "deployment_not_ready",
            ) from None
        ctx.handles[deployment_id] = handle
    return handle.options(stream=True, method_name="generate")


# ------------------------------------------------------------------ request building


def _engine_request(
    kind: Literal["chat", "completion"], req: protocol._Request, dep: db.Deployment
) -> dict[str, Any]:
    hp = dep.config.get("hyperParameters", {})
    default_max = hp.get("maxTokens") or DEFAULT_MAX_TOKENS
    max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens or default_max
    stops = req.stop_list() or hp.get("stopSequence", [])
    logprobs = bool(req.logprobs) if kind == "chat" else req.logprobs is not None
    top = (req.top_logprobs or 0) if kind == "chat" else (req.logprobs or 0)
    params = {
        "max_tokens": max_tokens,
        "temperature": req.temperature
        if req.temperature is not None
        else hp.get("temperature", 1.0),
        "top_p": req.top_p if req.top_p is not None else hp.get("topP", 1.0),
        "top_k": req.top_k if req.top_k is not None else hp.get("topK", 0),
        "seed": req.seed,
        "stop": tuple(stops),
        "logprobs": logprobs,
        "top_logprobs": top,
        "ignore_eos": req.ignore_eos,
    }
    out: dict[str, Any] = {"params": params, "n": req.n}
    if kind == "chat":
        out["messages"] = [{"role": m.role, "content": m.text()} for m in req.messages]
    else:
        if isinstance(req.prompt, list):
            if len(req.prompt) != 1:
                raise ApiError(400, "prompt lists must hold exactly one prompt", "prompt")
            out["prompt"] = req.prompt[0]
        else:
            out["prompt"] = req.prompt
    return out


def _check_unsupported(kind: str, req: protocol._Request) -> None:
    if kind == "chat":
        fmt = (req.response_format or {}).get("type", "text")
        if fmt != "text":
            raise ApiError(
                400, f"response_format type {fmt!r} is not supported yet", "response_format"
            )
        if req.tools:
            raise ApiError(400, "tools are not supported yet", "tools")


# ------------------------------------------------------------------ running a request


def _cancel_quietly(gen) -> None:
    with contextlib.suppress(Exception):  # it may have failed or finished meanwhile
        gen.cancel()


async def _events(dep: db.Deployment, payload: dict, deadline: float) -> AsyncIterator[dict]:
    """Engine events with the deployment's timeout applied to the whole request."""
    gen = None
    settled = False  # finished or failed: nothing left to cancel
    try:
        gen = _handle(dep.id).remote(payload)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            try:
                ev = await asyncio.wait_for(gen.__anext__(), remaining)
            except StopAsyncIteration:
                settled = True
                return
            if "error" in ev:
                raise ApiError(400, ev["error"], ev.get("param"), "context_length_exceeded")
            yield ev
    except TimeoutError:
        raise ApiError(
            504,
            f"the request did not complete within the deployment's {dep.timeout_s} s timeout",
            None,
            "timeout",
        ) from None
    except BackPressureError:
        settled = True
        raise ApiError(
            429, "the deployment's request queue is full; retry later", None, "queue_full"
        ) from None
    finally:
        if gen is not None and not settled:
            # timeout or client gone: stop the engine. cancel() may wait for the router to
            # place the request, so it runs off the event loop.
            await asyncio.to_thread(_cancel_quietly, gen)


async def _complete(kind, request: Request, deployment_id: str | None):
    started = time.monotonic()
    dep = _authorize(request, deployment_id)
    try:
        body = await request.json()
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", "body") from None
    try:
        model = protocol.ChatRequest if kind == "chat" else protocol.CompletionRequest
        req = protocol.parse(model, body)
    except protocol.BadParam as exc:
        raise ApiError(400, str(exc), exc.param, "invalid_parameter") from None
    if deployment_id is None and req.model not in (dep.id, dep.name):
        raise ApiError(
            404,
            f"model {req.model!r} is not the deployment of this API key ({dep.id}, {dep.name!r})",
            "model",
            "model_not_found",
        )
    _check_unsupported(kind, req)
    payload = _engine_request(kind, req, dep)
    deadline = started + dep.timeout_s
    fmt = protocol.Formatter(kind, dep.name)
    events = _events(dep, payload, deadline)
    if req.stream:
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        first = await _first_or_error(events)
        return StreamingResponse(
            _sse(fmt, first, events, include_usage, req.n), media_type="text/event-stream"
        )
    return JSONResponse(await _collect(fmt, events, req.n))


async def _first_or_error(events: AsyncIterator[dict]) -> dict | None:
    """Read the first event before answering, so early errors get a real HTTP status."""
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return None


async def _collect(fmt: protocol.Formatter, events: AsyncIterator[dict], n: int) -> dict:
    choices = [{"index": i, "text": "", "logprobs": [], "finish_reason": None} for i in range(n)]
    prompt = completion = 0
    done: set[int] = set()
    async for ev in events:
        c = choices[ev["index"]]
        c["text"] += ev["text"]
        c["logprobs"] += ev["logprobs"]
        if ev["finish_reason"]:
            c["finish_reason"] = ev["finish_reason"]
            if ev["index"] not in done:
                done.add(ev["index"])
                prompt = ev["prompt_tokens"]
                completion += ev["completion_tokens"]
    return fmt.final(choices, prompt, completion)


def _sse_line(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _sse(fmt, first, events, include_usage: bool, n: int) -> AsyncIterator[str]:
    started: set[int] = set()
    prompt = completion = 0

    def render(ev: dict) -> str:
        nonlocal prompt, completion
        i = ev["index"]
        if ev["finish_reason"]:
            prompt = ev["prompt_tokens"]
            completion += ev["completion_tokens"]
        chunk = fmt.chunk(i, ev["text"], ev["logprobs"], ev["finish_reason"], i not in started)
        started.add(i)
        return _sse_line(chunk)

    try:
        if first is not None:
            yield render(first)
        async for ev in events:
            yield render(ev)
        if include_usage:
            yield _sse_line(fmt.usage_chunk(prompt, completion))
        yield "data: [DONE]\n\n"
    except ApiError as exc:  # headers are sent: report in-band, as OpenAI does
        yield _sse_line(error_body(exc.status, exc.message, exc.param, exc.code))
        yield "data: [DONE]\n\n"
    finally:  # a client that went away cancels the engine stream at once
        await events.aclose()


# ------------------------------------------------------------------ routes


@app.post("/deployments/{deployment_id}/v2/chat/completions", tags=["inference"])
async def chat_v2(deployment_id: str, request: Request):
    """Chat completion on one deployment (OpenAI chat schema)."""
    return await _complete("chat", request, deployment_id)


@app.post("/deployments/{deployment_id}/v1/completions", tags=["inference"])
async def completions_v1_deployment(deployment_id: str, request: Request):
    """Legacy text completion on one deployment."""
    return await _complete("completion", request, deployment_id)


@app.post("/v1/chat/completions", tags=["inference"])
async def chat_openai(request: Request):
    """OpenAI-standard chat completions; `model` names the key's deployment (id or name)."""
    return await _complete("chat", request, None)


@app.post("/v1/completions", tags=["inference"])
async def completions_openai(request: Request):
    return await _complete("completion", request, None)


@app.get("/v1/models", tags=["inference"])
async def list_models(request: Request):
    dep = _authorize(request, None)
    created = int(dep.added_on.timestamp())
    return {
        "object": "list",
        "data": [{"id": dep.id, "object": "model", "created": created, "owned_by": dep.name}],
    }


# ------------------------------------------------------------------ docs: one document for all


@app.get("/", include_in_schema=False)
async def root():
    return RedirectResponse("/docs")


def combined_openapi() -> dict[str, Any]:
    """The management API (under /api) and inference endpoints in one OpenAPI document."""
    from raydock.platform.api import app as api_app

    routes = list(app.routes)
    doc = get_openapi(
        title="raydock",
        version="0.1.0",
        routes=routes,
        description="Management API (/api/public/*) and OpenAI-compatible "
        "inference (/v1/*, /deployments/{id}/*).",
    )
    mgmt = get_openapi(title="raydock", version="0.1.0", routes=api_app.routes)
    for path, item in mgmt["paths"].items():
        doc["paths"]["/api" + path] = item
    doc.setdefault("components", {}).setdefault("schemas", {}).update(
        mgmt.get("components", {}).get("schemas", {})
    )
    return doc


@app.get("/openapi.json", include_in_schema=False)
async def openapi_json():
    return JSONResponse(combined_openapi())


@app.get("/docs", include_in_schema=False)
async def docs():
    from fastapi.openapi.docs import get_swagger_ui_html

    return get_swagger_ui_html(openapi_url="/openapi.json", title="raydock API")


def configure(settings: dict[str, Any]) -> None:
    ctx.settings = Settings(**settings)
    ctx.sessions = db.make_sessionmaker(ctx.settings.db_url)
    ctx.registry = ray.get_actor(names.REGISTRY, namespace=names.NAMESPACE)
    ctx.handles = {}
    ctx.touched = {}


def asgi_app() -> FastAPI:
    return app


# See platform/api.py: module-level functions are pickled by reference, the class by value.
@serve.deployment(
    name="gateway", num_replicas=1, ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=1000
)
@serve.ingress(asgi_app)
class Gateway:
    def __init__(self, settings: dict[str, Any]):
        configure(settings)
