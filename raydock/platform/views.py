"""How database rows look in API responses (camelCase, as the seed's API)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from raydock.metering.limits import LIMITS
from raydock.platform import db
from raydock.platform.states import DeploymentStatus as D


def iso(ts: datetime | None) -> str | None:
    return ts.isoformat() + "Z" if ts else None


SOURCE_LABELS = {
    "file": "File",
    "platform_hosted": "Platform Hosted",
    "hugging_face": "Hugging Face",
}
STATUS_LABELS = {
    "IMPORTING": "Importing",
    "VALIDATING": "Validating",
    "READY": "Ready to Deploy",
    "IMPORT_FAILED": "Import Failed",
}


def stored_artifact(model_view: dict[str, Any]) -> dict[str, str]:
    """Where a model's own files are in the artifact store ({"prefix", "digest"}), from its
    view: what the node cache fetches with."""
    return {"prefix": model_view["artifactUri"], "digest": model_view["metadata"]["artifactDigest"]}


def model(m: db.Model, deployments: list[db.Deployment] | None = None) -> dict[str, Any]:
    deps = deployments or []
    count = lambda *states: sum(1 for d in deps if d.status in states)  # noqa: E731
    return {
        "modelId": m.id,
        "name": m.name,
        "source": m.source,
        "sourceLabel": SOURCE_LABELS.get(m.source, m.source),
        "kind": m.kind,
        "baseModelId": m.base_model_id,
        "modelType": m.model_type,
        "status": m.status,
        "statusLabel": STATUS_LABELS.get(m.status, m.status),
        "error": m.error,
        "description": m.description,
        "tags": m.tags or [],
        "checksum": m.checksum,
        "metadata": m.meta or {},
        "deployConfig": m.deployconfig,
        "createdBy": m.created_by,
        "createdAt": iso(m.created_at),
        "activeDeployments": count(D.DEPLOYED),
        "deploymentFailed": count(D.FAILED),
        "readyToDeploy": count(D.READY_TO_DEPLOY, D.UNDEPLOYED),
    }


def deployment(d: db.Deployment, users: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "deploymentId": d.id,
        "modelId": d.model_id,
        "name": d.name,
        "status": d.status,
        "description": d.description,
        "tags": d.tags or [],
        "timeout": d.timeout_s,
        "failureReason": d.failure_reason,
        "config": d.config,
        "addedBy": (users or {}).get(d.added_by or "", d.added_by),
        "addedOn": iso(d.added_on),
        "endpoint": f"/deployments/{d.id}/v2/chat/completions",
        "appliedFrom": d.applied_from,  # the file `raydock apply` manages it from, or None
    }


def version(v: db.DeploymentVersion, users: dict[str, str] | None = None) -> dict[str, Any]:
    users = users or {}
    duration = (v.ended_at - v.started_at).total_seconds() if v.ended_at else None
    out = {
        "version": v.version,
        "name": v.name,
        "config": v.config,
        "deployedBy": users.get(v.deployed_by or "", v.deployed_by),
        "startedAt": iso(v.started_at),
        "endedAt": iso(v.ended_at),
        "durationSeconds": duration,
        "result": v.result,
        "failureReason": v.failure_reason,
        "undeployment": None,
    }
    if v.undeploy_started_at:
        out["undeployment"] = {
            "undeployedBy": users.get(v.undeployed_by or "", v.undeployed_by),
            "startedAt": iso(v.undeploy_started_at),
            "endedAt": iso(v.undeploy_ended_at),
        }
    return out


def api_key(
    k: db.ApiKey,
    users: dict[str, str] | None = None,
    limits: dict[str, dict[str, int]] | None = None,
) -> dict[str, Any]:
    view = {
        "keyId": k.id,
        "name": k.name,
        "prefix": k.prefix,
        "scope": k.scope,
        "deploymentId": k.deployment_id,
        "createdBy": (users or {}).get(k.created_by or "", k.created_by),
        "createdById": k.created_by,  # names need not be unique
        "createdAt": iso(k.created_at),
        "lastUsedAt": iso(k.last_used_at),
    }
    if k.scope == "deployment":  # every limit, null where none is set
        own = (limits or {}).get(k.id, {})
        view["limits"] = {name: own.get(name) for name in LIMITS}
    return view


def job(j: db.DockStatus) -> dict[str, Any]:
    return {
        "dockStatusId": j.id,
        "modelId": j.model_id,
        "deploymentId": j.deployment_id,
        "jobType": j.job_type,
        "action": j.action,
        "status": j.status,
        "percentageComplete": j.percentage,
        "message": j.message,
        "response": j.response or {},
        "createdBy": j.created_by,
        "createdAt": iso(j.created_at),
        "updatedAt": iso(j.updated_at),
    }


def user(u: db.User) -> dict[str, Any]:
    return {
        "userId": u.id,
        "name": u.name,
        "email": u.email,
        "isAdmin": u.is_admin,
        "createdAt": iso(u.created_at),
    }


def connection(c: db.HfConnection, users: dict[str, str] | None = None) -> dict[str, Any]:
    """A Hugging Face connection as every API shows it: never the token."""
    return {
        "connectionId": c.id,
        "name": c.name,
        "hfUser": c.hf_user,
        "lastTest": None
        if c.last_tested_at is None
        else {"ok": c.last_test_ok, "message": c.last_test_message, "at": iso(c.last_tested_at)},
        "createdBy": (users or {}).get(c.created_by or "", c.created_by),
        "createdAt": iso(c.created_at),
    }


def usage(
    row: tuple,
    deployments: dict[str, str],
    adapters: dict[str, str],
    keys: dict[str, str],
) -> dict[str, Any]:
    """(period, deployment, adapter, key, requests, prompt, completion tokens) summed."""
    period, deployment_id, adapter_id, key_id, requests, prompt, completion = row
    prompt, completion = int(prompt or 0), int(completion or 0)
    return {
        "period": period,
        "deploymentId": deployment_id,
        "deploymentName": deployments.get(deployment_id),
        "adapterId": adapter_id or None,
        "adapterName": adapters.get(adapter_id) if adapter_id else None,
        "keyId": key_id,
        "keyName": keys.get(key_id),
        "requests": int(requests or 0),
        "promptTokens": prompt,
        "completionTokens": completion,
        "totalTokens": prompt + completion,
    }
