"""The management REST API (`/api/public/*`), a Ray Serve FastAPI application.

Routes are thin: they authenticate, validate with schemas.py, and ask the registry (state)
or the lifecycle actor (work). Nothing here writes the database directly.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.exceptions import RayServeException

from raydock import errors, names
from raydock.config import Settings, hardware_profiles
from raydock.errors import ApiError, describe_validation_error
from raydock.optimizers import ctranslate2 as ct2
from raydock.optimizers import merge
from raydock.platform import (
    api_apply,
    api_backup,
    api_hub,
    api_notify,
    api_session,
    api_uploads,
    api_usage,
    api_web,
    apply,
    deploy_checks,
    openapi_doc,
    pages,
    retention,
    schemas,
)
from raydock.platform.api_deps import User, admin_user, ctx, job_ref, limits_need_metering
from raydock.platform.bootstrap import ensure_platform_actors
from raydock.platform.jobs import EXPORT_URL_TTL_S, deployconfig_from, exports_key, model_key
from raydock.platform.states import RETRIGGERABLE_DEPLOYMENT, JobAction
from raydock.platform.states import DeploymentStatus as D

log = logging.getLogger("raydock.api")


app = FastAPI(
    title="raydock",
    version="0.1.0",
    description="Self-hosted model hub: import, deploy and serve open-source LLMs on Ray.",
    # the one document (management and inference, with the error responses) and its Swagger
    # UI are the gateway's /openapi.json and /docs; FastAPI's own would load from a CDN
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)
router = APIRouter(prefix="/public")

# ------------------------------------------------------------------ errors

errors.install(app, lambda: ctx.settings.max_request_bytes)


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError):
    if getattr(request.scope.get("route"), "name", "") != "apply_documents":
        return await errors.invalid_request(request, exc)
    # "file:line: field ..." per document
    return errors.validation_response(request, apply.describe_errors(exc.errors(), exc.body))


# ------------------------------------------------------------------ platform & users


@router.get("/health", tags=["platform"])
async def health() -> dict[str, Any]:
    await ctx.registry.ping.remote()
    return {"status": "ok"}


@router.get("/me", tags=["platform"])
async def me(user: User) -> dict[str, Any]:
    return user


@router.get("/hardware", tags=["platform"])
async def hardware(_: User) -> dict[str, Any]:
    """deviceType profiles and whether this cluster can run them now."""
    autoscaling = ctx.settings.cluster_autoscaling
    return {
        name: {**p, "available": deploy_checks.device_problem(p, autoscaling) is None}
        for name, p in _profiles()
    }


@router.post("/users", tags=["platform"], status_code=201)
async def create_user(
    body: schemas.UserCreate, admin: Annotated[dict, Depends(admin_user)]
) -> dict[str, Any]:
    """Create a user and their management key (returned once)."""
    return await ctx.registry.create_user.remote(
        body.name, body.email, body.isAdmin, admin["userId"]
    )


@router.get("/users", tags=["platform"])
async def list_users(_: Annotated[dict, Depends(admin_user)]) -> dict[str, Any]:
    """Every user and how many management keys they hold (an admin's view)."""
    users = await ctx.registry.list_users.remote()
    return {"users": users, "total": len(users)}


@router.delete("/users/{userId}", tags=["platform"])
async def delete_user(userId: str, admin: Annotated[dict, Depends(admin_user)]) -> dict[str, Any]:
    """Remove a user: their management keys stop working at once, with every dashboard
    session begun with them, and their webhook goes; what they created stays. Not yourself
    (409): so an admin always remains."""
    return await ctx.registry.delete_user.remote(userId, admin["userId"])


@router.post("/users/{userId}/rotate-key", tags=["platform"])
async def rotate_management_key(userId: str, user: User) -> dict[str, Any]:
    """A new management key (shown once) in place of the user's keys, which stop working at
    once with their dashboard sessions (a leaked key, someone leaving). An admin rotates
    anyone's; every user their own (`me`)."""
    target = user["userId"] if userId == "me" else userId
    if target != user["userId"] and not user["isAdmin"]:
        raise ApiError(403, "only an admin may rotate another user's key")
    return await ctx.registry.rotate_management_key.remote(target, user["userId"])


# ------------------------------------------------------------------ models


@router.get("/models", tags=["models"])
async def list_models(
    _: User, limit: pages.Limit = pages.PAGE_DEFAULT, offset: pages.Offset = 0
) -> dict[str, Any]:
    """A page of the models, newest first (ties by id): `total` counts them all, and
    `nextOffset` is the next page's `offset` (null after the last page)."""
    found = await ctx.registry.models_page.remote(limit, offset)
    return pages.page(found, "models", limit, offset)


@router.get("/models/{modelId}", tags=["models"])
async def get_model(modelId: str, _: User) -> dict[str, Any]:
    model = await ctx.registry.get_model.remote(modelId)
    model.pop("artifactUri", None)
    return model


@router.patch("/models/{modelId}", tags=["models"])
async def update_model(modelId: str, body: schemas.ModelUpdate, _: User) -> dict[str, Any]:
    """Edit description and tags (the name is not editable)."""
    return await ctx.registry.update_model.remote(modelId, body.description, body.tags)


@router.delete("/models/{modelId}", tags=["models"])
async def delete_model(modelId: str, _: User) -> dict[str, Any]:
    """Delete a model without active deployments; its undeployed deployments go with it (the
    answer names them), and its files, exports and conversions (unless another model has the
    same weights)."""
    model = await ctx.registry.delete_model.remote(modelId)
    for job_id in model["endedJobs"]:  # an import's task would go on for nothing
        try:  # ended before the files go: it must not write after their deletion
            await ctx.lifecycle.stop_job_task.remote(job_id)
        except Exception as exc:  # the lifecycle restarting: the task finds the model gone
            log.warning("import %s of deleted model %s not stopped: %r", job_id, modelId, exc)
    done = {"deleted": True, "modelId": modelId, "deletedDeployments": model["deletedDeployments"]}
    try:
        await asyncio.to_thread(_delete_artifacts, model)
    except Exception as exc:  # the model is gone: its files are retention's to delete
        log.warning(
            "model %s deleted; its files stay until retention's next pass: %r", modelId, exc
        )
        return {**done, "filesLeft": retention.FILES_LEFT}
    return done


def _delete_artifacts(model: dict[str, Any]) -> None:
    """Everything the store holds for a deleted model: its files, its exports, its merges
    into a base (an adapter) and its conversions unless another model has the same weights."""
    store = ctx.settings.store()
    if model.get("artifactUri"):
        store.delete(model["artifactUri"])
    # an import that died while storing left part of the model there, and no artifactUri
    store.delete(model_key(model["modelId"]))
    store.delete(exports_key(model["modelId"]))
    if not model.get("checksum") or model["checksumShared"]:
        return
    checksums = [model["checksum"]]
    for name in {k.split("/")[1] for k in store.list("merged")}:
        if merge.is_merge_of(name, model["checksum"]):
            store.delete(f"merged/{name}")
            checksums.append(name)  # a merge's conversions are keyed by its name
    # conversions are keyed by the weights' checksum, which no other model has now
    for key in {k.split("/")[1] for k in store.list("optimized")}:
        if any(ct2.is_artifact_of(key, c) for c in checksums):
            store.delete(f"optimized/{key}")


_FORM_GROUPS: dict[str, type[BaseModel]] = {
    "hyperParameters": schemas.HyperParameters,
    "scalingParameters": schemas.ScalingParameters,
    "optimizationInfo": schemas.OptimizationInfo,
    "adapterParameters": schemas.AdapterParameters,
    "routingParameters": schemas.RoutingParameters,
}


def _prefilled(
    fields: type[BaseModel], defaults: dict[str, Any], given: Any
) -> tuple[dict[str, Any], dict[str, str]]:
    """A form group: its defaults with those of the `given` values that validate; and why
    each other one was left out, by field."""
    if not isinstance(given, dict):
        return defaults, {"": "must be a mapping of its fields"}
    given, why = dict(given), {}
    while True:
        try:
            return fields.model_validate({**defaults, **given}).model_dump(), why
        except ValidationError as exc:
            for err in exc.errors():
                name = str(err["loc"][0]) if err["loc"] else ""
                why[name] = describe_validation_error(err, fields)[1]
                if name not in given:  # a rule across fields: the group's defaults
                    return defaults, why
                given.pop(name)


def _refused_field(form: dict[str, Any], key: str, value: Any) -> str | None:
    """Why the deploy body refuses `value` for its top-level field `key` (a deviceType this
    platform's hardware.yaml lacks, a timeout out of range), if it does."""
    try:
        schemas.DeployRequest.model_validate({**form, key: value})
    except ValidationError as exc:
        for err in exc.errors():
            if err["loc"] and err["loc"][0] == key:
                return describe_validation_error(err, schemas.DeployRequest)[1]
    return None


@router.get("/models/{modelId}/deploy-form", tags=["models"])
async def deploy_form(modelId: str, _: User) -> dict[str, Any]:
    """Deploy-form defaults, pre-filled from the model's deployconfig.json when it has one."""
    model = await ctx.registry.get_model.remote(modelId)
    prefill = model.get("deployConfig") or {}
    form = {
        "name": model["name"],
        **{group: fields().model_dump() for group, fields in _FORM_GROUPS.items()},
        "deviceType": "cpu-small",
        "timeout": schemas.DEFAULT_TIMEOUT_S,
    }
    # the zip's deployconfig.json is the uploader's: what does not validate keeps its default
    ignored: dict[str, str] = {}
    for key, value in prefill.items():
        if key in _FORM_GROUPS:
            form[key], why = _prefilled(_FORM_GROUPS[key], form[key], value)
            ignored |= {".".join(filter(None, (key, name))): text for name, text in why.items()}
        elif key in form:
            why = _refused_field(form, key, value)
            if why is None:
                form[key] = value
            else:
                ignored[key] = why
    fit = deploy_checks.fit_report(
        model, form["optimizationInfo"], form["scalingParameters"]["maxBatchSize"]
    )
    fits_default = fit["deviceTypes"].get(form["deviceType"], {}).get("fits", True)
    chosen = prefill.get("deviceType") and "deviceType" not in ignored
    if not chosen and not fits_default and fit["suggestedDeviceType"]:
        form["deviceType"] = fit["suggestedDeviceType"]
    return {
        "form": form,
        "prefilledFrom": "deployconfig.json" if prefill else None,
        "prefillIgnored": ignored,  # field -> why its deployconfig.json value was not used
        # per deviceType: the memory estimate and whether the model fits; the smallest that does
        "fit": fit,
    }


# ------------------------------------------------------------------ dock status


@router.get("/dock-status/{dockStatusId}", tags=["jobs"])
async def dock_status(dockStatusId: str, _: User) -> dict[str, Any]:
    return await ctx.registry.get_job.remote(dockStatusId)


# ------------------------------------------------------------------ deploy


def _profiles() -> list[tuple[str, dict[str, Any]]]:
    return list(hardware_profiles().items())


async def _check_deployable(body: schemas.DeployRequest, model: dict[str, Any]) -> None:
    """400 when the engine plan of a deploy body is invalid, the deviceType cannot hold the
    model, or the cluster cannot run it."""
    deploy_checks.check_deploy(model, body.model_dump())
    deploy_checks.check_cluster(body.deviceType, ctx.settings.cluster_autoscaling)


async def _start_deploy(deployment_id: str, body: dict | None, user: dict) -> dict[str, Any]:
    """Hand the deploy to the lifecycle, which records it and its job in one step."""
    return job_ref(await ctx.lifecycle.deploy.remote(deployment_id, body, user["userId"]))


@router.post("/models/{modelId}/deploy", tags=["deployments"])
async def deploy_model(
    modelId: str,
    body: schemas.DeployRequest,
    user: User,
    modelType: Annotated[Literal["openSource", "fineTune"], Query()],
) -> dict[str, Any]:
    """Deploy a Ready-to-Deploy model (the seed's Deploy a Model API).

    With `isDeployedPreviously: true` and the name of an existing deployment of this model,
    that deployment is redeployed (a new history version); otherwise a new one is created,
    under a name no other deployment of the model has (409 otherwise).
    """
    await _check_deployable(body, await ctx.registry.get_model.remote(modelId))
    config = body.model_dump()
    existing = None
    if body.isDeployedPreviously:
        existing = await ctx.registry.find_deployment_by_name.remote(modelId, body.name)
    if existing is None:
        existing = await ctx.registry.create_deployment.remote(modelId, config, user["userId"])
    return await _start_deploy(existing["deploymentId"], config, user)


@router.get("/models/{modelId}/deployments", tags=["deployments"])
async def list_deployments(modelId: str, _: User) -> dict[str, Any]:
    deps = await ctx.registry.list_deployments.remote(modelId)
    for dep in deps:  # what the dashboard offers per row
        dep["actions"] = api_web.allowed_actions(dep["status"])
    return {"deployments": deps, "total": len(deps)}


@router.get("/deployments/{deploymentId}", tags=["deployments"])
async def get_deployment(deploymentId: str, request: Request, _: User) -> dict[str, Any]:
    dep = await ctx.registry.get_deployment.remote(deploymentId)
    scaling = dep["config"].get("scalingParameters", {})
    live = await ctx.lifecycle.replicas.remote(deploymentId)
    dep["replicas"] = {
        "current": live["current"],
        "target": live["target"],
        "min": scaling.get("minReplicas"),
        "max": scaling.get("maxReplicas"),
        "byState": live["byState"],
        "applicationStatus": live["applicationStatus"],
        # why replicas are missing (Serve's words: a lost node, no resources to place them)
        "message": live["message"],
        "nodes": live["nodes"],
    }
    dep["curl"] = _curl(dep, _base_url(request))
    dep["actions"] = api_web.allowed_actions(dep["status"])
    return dep


@router.get("/deployments/{deploymentId}/stats", tags=["deployments"])
async def engine_stats(deploymentId: str, _: User) -> dict[str, Any]:
    """Live engine counters of one replica: running/waiting sequences, steps, cancellations."""
    dep = await ctx.registry.get_deployment.remote(deploymentId)
    if dep["status"] != D.DEPLOYED:
        raise ApiError(409, f"deployment is {dep['status']}; stats exist only while DEPLOYED")
    try:  # get_app_handle waits on the Serve controller: off the event loop
        handle = await asyncio.to_thread(serve.get_app_handle, names.engine_app(deploymentId))
        return await asyncio.wait_for(handle.stats.remote(), 10)
    except (RayServeException, TimeoutError) as exc:  # its app is being restored, or busy
        raise ApiError(
            503, f"the deployment's replicas did not answer ({type(exc).__name__}); retry shortly"
        ) from None


@router.post("/deployments/{deploymentId}/redeploy", tags=["deployments"])
async def redeploy(deploymentId: str, body: schemas.DeployRequest, user: User) -> dict[str, Any]:
    """Redeploy with changed parameters; history gains the next `name_vN`."""
    dep = await ctx.registry.get_deployment.remote(deploymentId)
    await _check_deployable(body, await ctx.registry.get_model.remote(dep["modelId"]))
    config = body.model_dump() | {"name": dep["name"]}
    return await _start_deploy(deploymentId, config, user)


@router.post("/deployments/{deploymentId}/retrigger", tags=["deployments"])
async def retrigger(deploymentId: str, user: User) -> dict[str, Any]:
    """Restart a failed or undeployed deployment with its last configuration."""
    dep = await ctx.registry.get_deployment.remote(deploymentId)
    if dep["status"] not in RETRIGGERABLE_DEPLOYMENT:
        raise ApiError(
            409, f"only failed or undeployed deployments can be re-triggered (is {dep['status']})"
        )
    body = schemas.stored_deploy_config(dep["config"])
    if isinstance(body, str):
        raise ApiError(
            409, f"its last configuration is not valid any more: {body}; redeploy it with one"
        )
    await _check_deployable(body, await ctx.registry.get_model.remote(dep["modelId"]))
    return await _start_deploy(deploymentId, None, user)


@router.post("/deployments/{deploymentId}/undeploy", tags=["deployments"])
async def undeploy(deploymentId: str, user: User) -> dict[str, Any]:
    return job_ref(await ctx.lifecycle.undeploy.remote(deploymentId, user["userId"]))


@router.patch("/deployments/{deploymentId}", tags=["deployments"])
async def update_deployment(
    deploymentId: str, body: schemas.DeploymentUpdate, _: User
) -> dict[str, Any]:
    """Edit description, tags and the endpoint timeout (30–180 s)."""
    return await ctx.registry.update_deployment.remote(
        deploymentId, description=body.description, tags=body.tags, timeout=body.timeout
    )


@router.delete("/deployments/{deploymentId}", tags=["deployments"])
async def delete_deployment(deploymentId: str, _: User) -> dict[str, Any]:
    await ctx.registry.delete_deployment.remote(deploymentId)
    return {"deleted": True, "deploymentId": deploymentId}


@router.get("/deployments/{deploymentId}/history", tags=["deployments"])
async def history(
    deploymentId: str, _: User, limit: pages.Limit = pages.PAGE_DEFAULT, offset: pages.Offset = 0
) -> dict[str, Any]:
    """A page of the deployment's history versions, oldest first (the newest is marked
    `latest`): `total` counts them all, `nextOffset` is the next page's `offset`."""
    found = await ctx.registry.history_page.remote(deploymentId, limit, offset)
    return pages.page(found, "versions", limit, offset)


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/").removesuffix("/api")


def _curl(dep: dict[str, Any], base: str) -> str:
    url = f"{base}/deployments/{dep['deploymentId']}/v2/chat/completions"
    return (
        # double quotes: the shell fills in $RAYDOCK_KEY when the command is pasted
        f"curl {url} -H \"Authorization: Bearer $RAYDOCK_KEY\" -H 'Content-Type: application/json' "
        """-d '{"messages": [{"role": "user", "content": "Hello"}]}'"""
    )


# ------------------------------------------------------------------ deployment API keys


@router.post("/deployments/{deploymentId}/api-keys", tags=["api keys"], status_code=201)
async def create_key(deploymentId: str, body: schemas.KeyCreate, user: User) -> dict[str, Any]:
    """Create an inference key for this deployment, with optional rate limits and a daily
    token budget. `apiKey` is shown only in this response."""
    limits = body.limits.model_dump() if body.limits else None
    limits_need_metering(limits)
    return await ctx.registry.create_deployment_key.remote(
        deploymentId, body.name, user["userId"], limits
    )


@router.patch("/deployments/{deploymentId}/api-keys/{keyId}", tags=["api keys"])
async def update_key(
    deploymentId: str, keyId: str, body: schemas.KeyUpdate, _: User
) -> dict[str, Any]:
    """Change a key's limits; every replica applies them within a second."""
    limits = body.limits.model_dump(exclude_unset=True)
    limits_need_metering(limits)
    return await ctx.registry.set_key_limits.remote(deploymentId, keyId, limits)


@router.get("/deployments/{deploymentId}/api-keys", tags=["api keys"])
async def list_keys(deploymentId: str, _: User) -> dict[str, Any]:
    return {"apiKeys": await ctx.registry.list_deployment_keys.remote(deploymentId)}


@router.delete("/deployments/{deploymentId}/api-keys/{keyId}", tags=["api keys"])
async def delete_key(deploymentId: str, keyId: str, _: User) -> dict[str, Any]:
    await ctx.registry.delete_deployment_key.remote(deploymentId, keyId)
    return {"deleted": True, "keyId": keyId}


# ------------------------------------------------------------------ export


@router.post("/models/{modelId}/export", tags=["models"], status_code=202)
async def export_model(
    modelId: str, user: User, deploymentId: Annotated[str | None, Query()] = None
) -> dict[str, Any]:
    """Export the model as a .zip with deployconfig.json (from `deploymentId`, else the latest
    deployment, else the config it was imported with). The dock status carries downloadUrl."""
    model = await ctx.registry.get_model.remote(modelId)
    if model["status"] != "READY":
        raise ApiError(409, f"model is {model['status']}; only READY models can be exported")
    deps = await ctx.registry.list_deployments.remote(modelId)
    if deploymentId:
        deps = [d for d in deps if d["deploymentId"] == deploymentId]
        if not deps:
            raise ApiError(
                404, f"deployment {deploymentId} not found on this model", "deploymentId"
            )
    config = deployconfig_from(deps[-1]["config"]) if deps else model.get("deployConfig")
    job = await ctx.registry.create_job.remote(JobAction.EXPORT, modelId, user["userId"])
    await ctx.lifecycle.submit_export.remote(model, job["dockStatusId"], config)
    return job_ref(job)


@router.get("/exports/{dockStatusId}/download", tags=["models"])
async def download_export(dockStatusId: str, _: User) -> Response:
    job = await ctx.registry.get_job.remote(dockStatusId)
    if job["action"] != JobAction.EXPORT:
        raise ApiError(404, f"{dockStatusId} is not an export but {job['action']}")
    name = (job.get("response") or {}).get("fileName")
    if job["status"] != "SUCCESS" or not name:
        raise ApiError(409, f"export {dockStatusId} is {job['status']}, not ready for download")
    store = ctx.settings.store()
    key = job["response"]["artifactKey"]
    if not await asyncio.to_thread(store.exists, key):
        raise ApiError(
            404,
            f"export {dockStatusId}'s file is no longer stored (its model was deleted)",
        )
    path = store.local_path(key)
    if path is None:  # in S3: a fresh presigned URL
        return RedirectResponse(store.download_url(key, EXPORT_URL_TTL_S), status_code=307)
    return FileResponse(path, media_type="application/zip", filename=name)


app.include_router(router)
app.include_router(api_uploads.router)  # multipart import, chunked upload sessions
app.include_router(api_hub.router)
app.include_router(api_apply.router)  # apply, export, rollback
app.include_router(api_notify.router)  # notifications: webhooks, deliveries
app.include_router(api_usage.router)
app.include_router(api_session.router)  # the web dashboard's sign-in
app.include_router(api_backup.router)  # POST /backup (admins)
app.include_router(api_web.router)  # the dashboard's metrics history and playground


def _literal_segments_win(routes: list[Any]) -> None:
    """A path parameter never takes the value of a literal segment that another route names
    at its place: GET /models/import is the import route refusing GET (405, Allow: POST),
    not a lookup of a model called "import" (Starlette takes the first route that matches)."""
    literal = [r.path for r in routes if isinstance(r, APIRoute) and not r.param_convertors]
    for route in routes:
        if isinstance(route, APIRoute) and route.param_convertors:
            shadowed = [p for p in literal if route.path_regex.match(p)]
            if shadowed:
                avoid = "|".join(re.escape(p) + "$" for p in shadowed)
                route.path_regex = re.compile(f"^(?!{avoid}){route.path_regex.pattern[1:]}")


_literal_segments_win(app.routes)


def configure(settings: dict[str, Any]) -> None:
    ctx.settings = Settings(**settings)
    ctx.registry, ctx.lifecycle = ensure_platform_actors(ctx.settings)


SUPERVISE_INTERVAL_S = 2.0


async def supervise() -> None:
    """Create the registry or lifecycle again whenever one died, and use the new one."""
    while True:
        await asyncio.sleep(SUPERVISE_INTERVAL_S)
        try:
            ctx.registry, ctx.lifecycle = await asyncio.to_thread(
                ensure_platform_actors, ctx.settings
            )
        except Exception as exc:  # the GCS busy or restarting: next round
            log.warning("supervising the platform actors failed: %r", exc)


def asgi_app() -> FastAPI:
    return app


# Serve pickles the deployment class by value; module-level functions are pickled by
# reference, so calling them (not touching `ctx` directly) configures this module's routes.
@serve.deployment(
    name="api", num_replicas=1, ray_actor_options={"num_cpus": 0, "resources": names.ON_HEAD}
)
@serve.ingress(asgi_app)
class ApiServer:
    async def __init__(self, settings: dict[str, Any]):
        configure(settings)
        self.supervisor = asyncio.create_task(supervise())
        self.upload_sweeper = asyncio.create_task(api_uploads.sweep_idle_uploads())
        self.pruner = asyncio.create_task(retention.keep_pruning())

    def openapi_document(self) -> dict[str, Any]:
        """The combined OpenAPI document the gateway serves at /openapi.json."""
        return openapi_doc.combined()
