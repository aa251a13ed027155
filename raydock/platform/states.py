"""Every status enum and the transitions it allows — the one place these rules live."""

from __future__ import annotations

from enum import StrEnum

from raydock.errors import Conflict


class InvalidTransition(Conflict):
    """A state change the state machine does not allow (HTTP 409)."""


class ModelStatus(StrEnum):
    """IMPORTING → VALIDATING → READY or IMPORT_FAILED, driven by the import tasks
    (`jobs.import_model_task`, `jobs.import_hf_task`); the lifecycle's reconciliation fails an
    import whose task is gone, and deleting the model fails its running import. A failed
    download (Hugging Face, catalog) may be retried: IMPORT_FAILED → IMPORTING."""

    IMPORTING = "IMPORTING"
    VALIDATING = "VALIDATING"
    READY = "READY"
    IMPORT_FAILED = "IMPORT_FAILED"


class DeploymentStatus(StrEnum):
    """Driven by the lifecycle actor alone: a deploy, redeploy or re-trigger moves a
    deployment to OPTIMIZING (a conversion runs first) or DEPLOYING, then to DEPLOYED or
    FAILED; an undeploy to UNDEPLOYED (from OPTIMIZING or DEPLOYING it cancels the deploy);
    reconciliation fails a deployment whose deploy job is
    gone, and one whose app it could not restore. A deployment made together with its model's
    import (from Hugging Face or the catalog) waits READY_TO_DEPLOY, then deploys when the
    import ends READY, or goes FAILED with the import's reason."""

    READY_TO_DEPLOY = "READY_TO_DEPLOY"
    OPTIMIZING = "OPTIMIZING"
    DEPLOYING = "DEPLOYING"
    DEPLOYED = "DEPLOYED"
    FAILED = "FAILED"
    UNDEPLOYED = "UNDEPLOYED"


class JobStatus(StrEnum):
    """IN_PROGRESS → SUCCESS or FAILED: set by whatever runs the job (a Ray task or the
    lifecycle); reconciliation fails one that nothing runs any more."""

    IN_PROGRESS = "IN_PROGRESS"
    SUCCESS = "SUCCESS"
    FAILED = "FAILED"


class JobAction(StrEnum):
    IMPORT = "IMPORT"
    EXPORT = "EXPORT"
    DEPLOY = "DEPLOY"
    UNDEPLOY = "UNDEPLOY"
    OPTIMIZE = "OPTIMIZE"


_MODEL = {
    ModelStatus.IMPORTING: {ModelStatus.VALIDATING, ModelStatus.IMPORT_FAILED},
    ModelStatus.VALIDATING: {ModelStatus.READY, ModelStatus.IMPORT_FAILED},
    ModelStatus.READY: set(),
    ModelStatus.IMPORT_FAILED: {ModelStatus.IMPORTING},
}

D = DeploymentStatus
_DEPLOYMENT = {
    D.READY_TO_DEPLOY: {D.OPTIMIZING, D.DEPLOYING, D.FAILED},
    # DEPLOYED: a redeploy's optimization failed and the live version serves on
    # UNDEPLOYED: undeployed while starting (the deploy is cancelled)
    D.OPTIMIZING: {D.DEPLOYING, D.FAILED, D.DEPLOYED, D.UNDEPLOYED},
    D.DEPLOYING: {D.DEPLOYED, D.FAILED, D.UNDEPLOYED},
    D.DEPLOYED: {D.DEPLOYING, D.OPTIMIZING, D.UNDEPLOYED, D.FAILED},
    # READY_TO_DEPLOY: it never deployed, and waits again for its model's retried import
    D.FAILED: {D.DEPLOYING, D.OPTIMIZING, D.UNDEPLOYED, D.READY_TO_DEPLOY},
    D.UNDEPLOYED: {D.DEPLOYING, D.OPTIMIZING},
}

_JOB = {
    JobStatus.IN_PROGRESS: {JobStatus.SUCCESS, JobStatus.FAILED},
    JobStatus.SUCCESS: set(),
    JobStatus.FAILED: set(),
}

# Models an import job is still bringing in.
IMPORTING_MODEL = {ModelStatus.IMPORTING, ModelStatus.VALIDATING}
# Model sources whose import can be retried (the files are fetched again, not uploaded).
RETRYABLE_SOURCES = {"hugging_face", "platform_hosted"}
# Deployments a deploy job is starting (the lifecycle's deploy drives them to DEPLOYED/FAILED).
STARTING_DEPLOYMENT = {D.OPTIMIZING, D.DEPLOYING}


def undeployable_model(model_id: str, status: str) -> str | None:
    """Why a model in `status` cannot be deployed now, or None when it is READY."""
    if status == ModelStatus.READY:
        return None
    retry = " (retry its import first)" if status == ModelStatus.IMPORT_FAILED else ""
    return f"model {model_id} is {status}, not READY: it cannot be deployed{retry}"


def is_serving(status: str, previous_version_live: bool) -> bool:
    """Whether a deployment answers inference requests, on every path (its replicas' routes
    and the gateway's /v1): when DEPLOYED, and while a redeploy of a live version starts
    (Serve keeps the old replicas answering until the new ones are up)."""
    return status == D.DEPLOYED or (status in STARTING_DEPLOYMENT and previous_version_live)


# Deployments that hold (or are about to hold) a Serve application.
ACTIVE_DEPLOYMENT = {D.OPTIMIZING, D.DEPLOYING, D.DEPLOYED}
# Deployments "Undeploy" applies to (a starting one's deploy is cancelled).
UNDEPLOYABLE_DEPLOYMENT = {D.DEPLOYED, D.FAILED, D.OPTIMIZING, D.DEPLOYING}
# Deployments that may be removed from the database.
DELETABLE_DEPLOYMENT = {D.READY_TO_DEPLOY, D.UNDEPLOYED, D.FAILED}
# Deployments that "Re-trigger" restarts (the seed: "only if failed or stopped").
RETRIGGERABLE_DEPLOYMENT = {D.FAILED, D.UNDEPLOYED}


def _check(table: dict, kind: str, current: str, new: str) -> None:
    if new == current:
        return
    allowed = table[type(next(iter(table)))(current)]
    if new not in allowed:
        names = ", ".join(sorted(allowed)) or "none"
        raise InvalidTransition(f"{kind} cannot go from {current} to {new} (allowed: {names})")


def check_model(current: str, new: str) -> None:
    _check(_MODEL, "model", current, new)


def check_deployment(current: str, new: str) -> None:
    _check(_DEPLOYMENT, "deployment", current, new)


def check_job(current: str, new: str) -> None:
    _check(_JOB, "job", current, new)
