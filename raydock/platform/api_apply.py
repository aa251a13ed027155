"""Routes for declarative deployments (`POST /apply`, `GET /apply/export`) and rolling a
deployment back to a history version. platform/apply.py decides what changes; these
routes gather the platform's state, run the deploy checks on every change before any is
made, and carry the changes out through the registry and the lifecycle."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Query

from raydock.errors import ApiError, Conflict, NotFound, as_api_error
from raydock.platform import api_hub, api_web, apply, catalog, deploy_checks, schemas
from raydock.platform.api_deps import User, ctx, job_ref, limits_need_metering
from raydock.platform.states import DeploymentStatus as D

log = logging.getLogger("raydock.apply")

router = APIRouter(prefix="/public")

#: actions that start a deploy (a new history version)
DEPLOYS = ("create", "import-and-create", "upload-and-create", "deploy", "redeploy")
#: what a change carries for the executor only (`document`: the index of its document)
INTERNAL = ("config", "origin", "appliedFrom", "mark", "document")


async def _state(declared: list[apply.Declared], prune: bool) -> apply.State:
    deployments, models = await asyncio.gather(
        ctx.registry.list_deployments.remote(), ctx.registry.list_models.remote()
    )
    names = {d.spec.name for d in declared}
    mine = [d for d in deployments if d["name"] in names]
    keys = await asyncio.gather(
        *(ctx.registry.list_deployment_keys.remote(d["deploymentId"]) for d in mine)
    )
    connections = []
    sources = [d.spec.model for d in declared]
    if any(m.connection or (m.huggingFace and m.huggingFace.connection) for m in sources):
        connections = await ctx.registry.list_connections.remote()
    return apply.State(
        deployments,
        models,
        {d["deploymentId"]: k for d, k in zip(mine, keys, strict=True)},
        connections,
    )


async def _check(change: dict[str, Any], declared: apply.Declared) -> None:
    """The deploy checks (engine plan, fit, cluster) a deploy of this change must pass."""
    config = change["config"]
    if change["modelId"]:
        model = await ctx.registry.get_model.remote(change["modelId"])
    elif declared.spec.model.catalog:
        model = catalog.as_model(catalog.get(declared.spec.model.catalog))
    else:  # a zip to upload, a repo to download: the fit is checked once it is known
        model = {}
    deploy_checks.check_deploy(model, config)
    deploy_checks.check_cluster(config["deviceType"], ctx.settings.cluster_autoscaling)


async def _check_all(changes: list[dict[str, Any]], declared: list[apply.Declared]) -> None:
    problems = []
    for c in changes:
        try:
            if c["kind"] == "deployment" and (c["action"] in DEPLOYS or c.get("after")):
                await _check(c, declared[c["document"]])
            elif c["kind"] == "apiKey" and c["action"] in ("create", "update"):
                limits_need_metering(c.get("limits"))  # not after its deployment was made
        except ApiError as exc:
            where = f"{c['source']}: {exc.message}"
            problems.append(ApiError(exc.status, where, exc.param, exc.code))
    if problems:
        first = problems[0]
        raise ApiError(
            first.status, "; ".join(p.message for p in problems), first.param, first.code
        )


async def _version_name(deployment_id: str) -> str | None:
    versions = await ctx.registry.history.remote(deployment_id)
    return versions[-1]["name"] if versions else None


async def _carry_out(change: dict[str, Any], spec: apply.DeploymentSpec | None, user: dict) -> None:
    """Make one deployment change; its ids, job and new history version go into `change`."""
    uid, action, dep_id = user["userId"], change["action"], change["deploymentId"]
    if action == "create":
        dep = await ctx.registry.create_deployment.remote(change["modelId"], change["config"], uid)
        dep_id = change["deploymentId"] = dep["deploymentId"]
    if action == "import-and-create":
        assert spec is not None
        if spec.model.catalog:
            entry = catalog.get(spec.model.catalog)
            name, source = entry["name"], "platform_hosted"
        else:
            name, source = change["origin"]["repoId"], "hugging_face"
        started = await api_hub._start_download(
            name,
            source,
            change["origin"],
            user,
            spec.description,
            spec.tags,
            change["config"],
        )
        dep_id = change["deploymentId"] = started["deployment"]["deploymentId"]
        change["modelId"] = started["modelId"]
        change["model"] = apply.model_label({"modelId": started["modelId"], "name": name})
        change["job"] = job_ref(started)
    if action == "retry-import":  # its deployment deploys once the import is READY
        started = await api_hub.retry_model_import(change["modelId"], user)
        change["job"] = job_ref(started["job"])
    # apply manages it from now on (adopted), or from where its file is now
    if dep_id and (change.get("mark") or action in ("create", "import-and-create")):
        await ctx.registry.set_applied_from.remote(dep_id, change["appliedFrom"])
    if action in ("create", "deploy", "redeploy"):
        job = await ctx.lifecycle.deploy.remote(dep_id, change["config"], uid)
        change["job"] = job_ref(job)
        change["version"] = await _version_name(dep_id)
    elif action == "update":
        cfg = change["config"]
        await ctx.registry.update_deployment.remote(
            dep_id, description=cfg["description"], tags=cfg["tags"], timeout=cfg["timeout"]
        )
    elif action == "undeploy":
        change["job"] = job_ref(await ctx.lifecycle.undeploy.remote(dep_id, uid))


async def _carry_out_key(change: dict[str, Any], deployment_id: str, user: dict) -> None:
    limits = change.get("limits") or {}  # that they need metering: checked by _check_all
    if change["action"] == "create":
        created = await ctx.registry.create_deployment_key.remote(
            deployment_id, change["name"], user["userId"], limits or None
        )
        change["keyId"] = created["keyId"]
        change["apiKey"] = created["apiKey"]  # shown in this answer only
    elif change["action"] == "update":
        full = {name: limits.get(name) for name in schemas.KeyLimits.model_fields}
        await ctx.registry.set_key_limits.remote(deployment_id, change["keyId"], full)


@router.post("/apply", tags=["apply"])
async def apply_documents(body: apply.ApplyRequest, user: User) -> dict[str, Any]:
    """Make the platform match deployment documents (`raydock apply -f`; the same files
    `GET /apply/export` writes). A document means the deployment of its name on its model
    (two models may each have a "chat"; one model's twice is a 409). Idempotent: an
    unchanged document changes nothing; a changed one redeploys (a new history version) or,
    for description, tags and timeout only, updates; `prune` undeploys the deployments apply
    manages that no document names. Every document is validated (errors name its file, line
    and field) and every deploy checked before anything changes. A zip source the platform
    lacks is listed in `uploads` (upload it, then apply again). Keys a document names are
    created once; their secret is in this answer only. With `dryRun` nothing changes."""
    declared = apply.declare(body.documents)
    state = await _state(declared, body.prune)
    changes = apply.plan(declared, state, body.prune)
    await _check_all(changes, declared)
    uploads = apply.uploads_needed(changes, declared)
    if not body.dryRun and uploads:
        names = ", ".join(f"{u['zip']} ({u['source']})" for u in uploads)
        raise ApiError(
            409,
            f"upload these zips first (raydock apply does): {names}",
            "model.zip",
            "upload_required",
        )
    if not body.dryRun:
        owners: dict[int, dict[str, Any]] = {}  # a document's deployment change, for its keys
        for c in changes:
            try:
                if c["kind"] == "deployment":
                    doc = c.get("document")  # none for what --prune undeploys
                    if doc is not None:  # an existing one's keys follow the file whatever happens
                        owners[doc] = c
                    await _carry_out(c, declared[doc].spec if doc is not None else None, user)
                elif c["action"] == "wait":  # its deployment is created by a later apply
                    continue
                elif owners.get(c["document"], {}).get("deploymentId"):
                    owner = owners[c["document"]]  # a created one's ids are known now
                    c |= {k: owner[k] for k in apply.OWNER_FIELDS}
                    await _carry_out_key(c, owner["deploymentId"], user)
                else:
                    c["error"] = "its deployment was not created"
            except Exception as exc:  # one change refused (e.g. a race): the others go on
                err = as_api_error(exc)
                if err is None:
                    log.error("apply: %s %s failed", c["kind"], c["name"], exc_info=exc)
                c["error"] = err.message if err else f"internal error: {type(exc).__name__}"
    public = [{k: v for k, v in c.items() if k not in INTERNAL} for c in changes]
    return {"dryRun": body.dryRun, "prune": body.prune, "changes": public, "uploads": uploads}


@router.get("/apply/export", tags=["apply"])
async def export_documents(_: User) -> dict[str, Any]:
    """Every deployment that is not UNDEPLOYED as the document that declares it (`raydock
    get deployments -o yaml`): applying them back changes nothing. A model uploaded as a zip
    is named by its id (so is one whose source another model of a deployment of the same name
    shares); keys by name and limits (never their secrets), but not the Playground's keys."""
    deployments, models = await asyncio.gather(
        ctx.registry.list_deployments.remote(), ctx.registry.list_models.remote()
    )
    live = [d for d in deployments if d["status"] != D.UNDEPLOYED]
    keys = await asyncio.gather(
        *(ctx.registry.list_deployment_keys.remote(d["deploymentId"]) for d in live)
    )
    declared = [[k for k in ks if not api_web.is_playground_key(k)] for ks in keys]
    docs = apply.export_all(live, models, declared)
    return {"documents": docs, "total": len(docs)}


@router.post("/deployments/{deploymentId}/rollback", tags=["deployments"])
async def rollback(
    deploymentId: str,
    user: User,
    version: Annotated[
        int, Query(ge=1, description="The history version to go back to (its N, from 1).")
    ],
) -> dict[str, Any]:
    """Redeploy history version N's configuration; the history gains a new version (the
    rolled-back-to one stays as it was)."""
    dep = await ctx.registry.get_deployment.remote(deploymentId)
    versions = await ctx.registry.history.remote(deploymentId)
    if not versions:
        raise NotFound(f"version: deployment {dep['name']} has no history versions yet", "version")
    last = versions[-1]["version"]
    chosen = next((v for v in versions if v["version"] == version), None)
    if chosen is None:
        raise NotFound(
            f"version {version} not found: deployment {dep['name']} has versions 1 to {last}",
            "version",
        )
    body = schemas.stored_deploy_config(chosen["config"] | {"name": dep["name"]})
    if isinstance(body, str):
        raise ApiError(
            422, f"version {version}'s configuration is not valid any more: {body}", "version"
        )
    config = body.model_dump()
    model = await ctx.registry.get_model.remote(dep["modelId"])
    deploy_checks.check_deploy(model, config)
    deploy_checks.check_cluster(config["deviceType"], ctx.settings.cluster_autoscaling)
    if dep["status"] in (D.OPTIMIZING, D.DEPLOYING):
        raise Conflict(f"deployment is {dep['status']}; roll back when that ends")
    ref = job_ref(await ctx.lifecycle.deploy.remote(deploymentId, config, user["userId"]))
    return {**ref, "rolledBackTo": chosen["name"], "version": await _version_name(deploymentId)}
