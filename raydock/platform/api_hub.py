"""Management routes for models that come from the Hugging Face Hub: connections (stored
tokens), imports by repo id, the one-request "deploy from Hugging Face", and the
platform-hosted catalog."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query

from raydock import params
from raydock.errors import ApiError, Conflict
from raydock.optimizers import plan
from raydock.platform import catalog, deploy_checks, hf, schemas
from raydock.platform.api_deps import User, ctx, job_ref
from raydock.platform.states import ModelStatus

router = APIRouter(prefix="/public")

# ------------------------------------------------------------------ connections


async def _whoami(token: str) -> str:
    return await asyncio.to_thread(hf.whoami, ctx.settings.hf_endpoint or None, token)


@router.post("/connections", tags=["connections"], status_code=201)
async def create_connection(body: schemas.ConnectionCreate, user: User) -> dict[str, Any]:
    """Store a Hugging Face token (encrypted; no API returns it). With `verify` (default)
    the token must authenticate with the Hub first."""
    hf_user = None
    if body.verify:
        try:
            hf_user = await _whoami(body.token)
        except hf.HubError as exc:
            raise ApiError(400, f"token: {exc}", "token", "invalid_token") from None
    return await ctx.registry.create_connection.remote(
        body.name, body.token, user["userId"], hf_user
    )


@router.get("/connections", tags=["connections"])
async def list_connections(_: User) -> dict[str, Any]:
    found = await ctx.registry.list_connections.remote()
    return {"connections": found, "total": len(found)}


@router.get("/connections/{connectionId}", tags=["connections"])
async def get_connection(connectionId: str, _: User) -> dict[str, Any]:
    return await ctx.registry.get_connection.remote(connectionId)


@router.post("/connections/{connectionId}/test", tags=["connections"])
async def test_connection(connectionId: str, _: User) -> dict[str, Any]:
    """Does the stored token still authenticate? The answer is kept as `lastTest`."""
    token = await ctx.registry.connection_token.remote(connectionId)
    try:
        hf_user, ok, message = await _whoami(token), True, "authenticated"
    except hf.HubError as exc:
        hf_user, ok, message = None, False, str(exc)
    return await ctx.registry.record_connection_test.remote(connectionId, ok, message, hf_user)


@router.delete("/connections/{connectionId}", tags=["connections"])
async def delete_connection(connectionId: str, _: User) -> dict[str, Any]:
    await ctx.registry.delete_connection.remote(connectionId)
    return {"deleted": True, "connectionId": connectionId}


# ------------------------------------------------------------------ imports by download


async def _start_download(
    name: str,
    source: str,
    origin: dict[str, Any],
    user: dict[str, Any],
    description: str = "",
    tags: list[str] | None = None,
    deploy: dict[str, Any] | None = None,
    base_model_id: str | None = None,
) -> dict[str, Any]:
    """Create the model (IMPORTING, its origin recorded), the deployment that waits for it
    when `deploy` is given, and the import job; the lifecycle downloads, then deploys."""
    if origin.get("connectionId"):  # 404 now rather than an import failing later
        connection = await ctx.registry.get_connection.remote(origin["connectionId"])
        origin = {**origin, "connection": connection["name"]}
    kind = "adapter" if base_model_id else "base"
    begun = await ctx.registry.begin_import.remote(
        name,
        source,
        user["userId"],
        kind,
        base_model_id,
        description,
        tags or [],
        {"origin": origin},
        deploy,
    )
    model, job = begun["model"], begun["job"]
    await ctx.lifecycle.submit_hf_import.remote(model["modelId"], job["dockStatusId"])
    return {**job_ref(job), "model": model, "deployment": begun["deployment"]}


def _hf_origin(body: schemas.HuggingFaceSource) -> dict[str, Any]:
    return {"repoId": body.repoId, "revision": body.revision, "connectionId": body.connectionId}


def _deploy_body(body: schemas.DeployRequest) -> dict[str, Any]:
    """The deploy body a deployment keeps, without the import's own fields."""
    return body.model_dump(include=set(schemas.DeployRequest.model_fields))


@router.post("/models/import/huggingface", tags=["models"], status_code=202)
async def import_from_hf(body: schemas.HuggingFaceImport, user: User) -> dict[str, Any]:
    """Import a model from the Hugging Face Hub by repo id (only its config, tokenizer and
    safetensors files are downloaded), or a LoRA adapter onto a base model (`kind: adapter`,
    `baseModelId`; checked against the base). The dock status shows the bytes downloaded."""
    base = body.baseModelId or None
    return await _start_download(
        body.repoId,
        "hugging_face",
        _hf_origin(body),
        user,
        body.description,
        body.tags,
        base_model_id=base,
    )


@router.post("/deployments/huggingface", tags=["deployments"], status_code=202)
async def deploy_from_hf(body: schemas.HuggingFaceDeploy, user: User) -> dict[str, Any]:
    """The seed's "Deploy a model from Hugging Face" in one request: imports the repo, then
    deploys it with these parameters and hardware. The deployment exists at once
    (READY_TO_DEPLOY), deploys when the import ends READY, or fails with its reason."""
    config = _deploy_body(body)
    deploy_checks.check_deploy({}, config)  # the engine plan; the fit once the config is known
    deploy_checks.check_cluster(body.deviceType, ctx.settings.cluster_autoscaling)
    return await _start_download(
        body.repoId, "hugging_face", _hf_origin(body), user, body.description, body.tags, config
    )


@router.post("/models/{modelId}/retry-import", tags=["models"], status_code=202)
async def retry_import(modelId: str, user: User) -> dict[str, Any]:
    """Import a model that failed to download again: the files finished on the node that had
    them are kept (a partial one starts over); a deployment that waited for it deploys after."""
    started = await retry_model_import(modelId, user)
    return {**job_ref(started["job"]), "model": started["model"]}


async def retry_model_import(model_id: str, user: dict[str, Any]) -> dict[str, Any]:
    """Start a failed download import again; {"model", "job"}."""
    started = await ctx.registry.begin_retry_import.remote(model_id, user["userId"])
    await ctx.lifecycle.submit_hf_import.remote(model_id, started["job"]["dockStatusId"])
    return started


# ------------------------------------------------------------------ catalog


@router.get("/catalog", tags=["catalog"])
async def list_catalog(
    _: User,
    name: Annotated[str | None, Query(max_length=200)] = None,
    family: Annotated[str | None, Query(max_length=50)] = None,
) -> dict[str, Any]:
    """Platform-hosted models, with the deviceTypes each fits (unoptimized, default batch
    size) and the smallest of them, and `importRefusal`: why one cannot be imported here
    (its weights are over max_archive_bytes), else null. Filters: a name substring, a family."""
    found = catalog.listing(ctx.settings.max_archive_bytes, name, family)
    return {"models": found, "total": len(found)}


@router.get("/catalog/{entryId}", tags=["catalog"])
async def catalog_entry(
    entryId: str,
    _: User,
    optimizationType: Annotated[str, Query(max_length=20)] = "",
    quantizationType: Literal[plan.QUANTIZATION_TYPES] = "",
    maxBatchSize: Annotated[
        int, Query(ge=params.MAX_BATCH_SIZE.lo, le=params.MAX_BATCH_SIZE.hi)
    ] = params.MAX_BATCH_SIZE.default,
) -> dict[str, Any]:
    """One entry with its memory estimate on every deviceType for an optimization (one of
    those its architecture supports, with a quantization some deviceType runs), and
    `importRefusal` as in the listing."""
    entry = catalog.get(entryId)
    optimization = {"optimizationType": optimizationType, "quantizationType": quantizationType}
    model = catalog.as_model(entry)
    catalog.check_optimization(model, optimization, param="optimizationType")
    try:
        deploy_checks.check_runs_somewhere(model, optimization)
    except ApiError as exc:  # the query's own names for the deploy body's fields
        exc.param = (exc.param or "").removeprefix("optimizationInfo.") or None
        raise
    fit = deploy_checks.fit_report(model, optimization, maxBatchSize)
    refusal = catalog.import_refusal(entry, ctx.settings.max_archive_bytes)
    return {**entry, "importRefusal": refusal, "fit": fit}


async def _catalog_model(entry: dict[str, Any]) -> dict[str, Any] | None:
    """The model imported from this entry, if any; 409 while it is importing."""
    for model in await ctx.registry.list_models.remote():
        origin = (model["metadata"] or {}).get("origin") or {}
        if origin.get("catalogId") != entry["id"]:
            continue
        if model["status"] == ModelStatus.READY:
            return model
        if model["status"] != ModelStatus.IMPORT_FAILED:
            raise Conflict(
                f"{entry['name']} is being imported ({model['modelId']}); deploy it when the "
                "import is READY"
            )
    return None


@router.post("/catalog/{entryId}/deploy", tags=["catalog"], status_code=202)
async def deploy_catalog(entryId: str, body: schemas.CatalogDeploy, user: User) -> dict[str, Any]:
    """Deploy a platform-hosted model: imported from its repo on first use (source Platform
    Hosted), then deployed; later deploys reuse the imported model. Refused with a 400 that
    gives the estimate when the deviceType cannot hold it, and before an import that could
    only fail: a gated repo without `connectionId`."""
    entry = catalog.get(entryId)
    config = _deploy_body(body)
    deploy_checks.check_deploy(catalog.as_model(entry), config)
    deploy_checks.check_cluster(body.deviceType, ctx.settings.cluster_autoscaling)
    model = await _catalog_model(entry)
    if model is None:
        catalog.check_import(entry, body.connectionId)
        origin = {**catalog.origin(entry), "connectionId": body.connectionId}
        return await _start_download(
            entry["name"], "platform_hosted", origin, user, body.description, body.tags, config
        )
    dep = await ctx.registry.create_deployment.remote(model["modelId"], config, user["userId"])
    job = await ctx.lifecycle.deploy.remote(dep["deploymentId"], config, user["userId"])
    return {**job_ref(job), "model": model, "deployment": dep}
