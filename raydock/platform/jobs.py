"""Long-running work as Ray tasks: import and export. Each reports progress to its dock status."""

from __future__ import annotations

import contextlib
import json
import time
import zipfile
from pathlib import Path
from typing import Any

import ray

from raydock.config import Settings
from raydock.errors import NotFound
from raydock.platform import names
from raydock.platform.states import InvalidTransition, JobStatus, ModelStatus
from raydock.platform.store import ArtifactStore


def _registry():
    return ray.get_actor(names.REGISTRY, namespace=names.NAMESPACE)


class _Progress:
    """Throttled progress reporting to the dock status (at most every 0.5 s or 5 points)."""

    def __init__(self, job_id: str, lo: int = 0, hi: int = 100):
        self.job_id, self.lo, self.hi = job_id, lo, hi
        self._last = (0.0, -100)

    def __call__(self, fraction: float, message: str | None = None) -> None:
        pct = int(self.lo + (self.hi - self.lo) * max(0.0, min(1.0, fraction)))
        now = time.monotonic()
        if pct - self._last[1] >= 5 or now - self._last[0] >= 0.5:
            self._last = (now, pct)
            _registry().update_job.remote(self.job_id, percentage=pct, message=message)


@ray.remote(num_cpus=1, max_retries=0)
def import_model_task(
    settings: dict[str, Any], model_id: str, job_id: str, zip_path: str, kind: str
) -> dict[str, Any]:
    """Validate and extract an uploaded archive into the artifact store."""
    from raydock.platform.model_archive import (
        ArchiveError,
        ArchiveLimits,
        extract_model_archive,
        sha256_file,
    )

    cfg = Settings(**settings)
    store = ArtifactStore(cfg.artifacts)
    registry = _registry()
    progress = _Progress(job_id)
    limits = ArchiveLimits.from_settings(cfg)
    validating = False

    def on_progress(fraction: float, stage: str) -> None:
        nonlocal validating
        if stage == "validating" and not validating:
            validating = True
            ray.get(registry.set_model_status.remote(model_id, ModelStatus.VALIDATING))
        progress(fraction, stage)

    try:
        checksum = sha256_file(zip_path)
        meta = extract_model_archive(
            zip_path, store.staging_dir(model_id), limits, kind=kind, progress=on_progress
        )
        if not validating:
            ray.get(registry.set_model_status.remote(model_id, ModelStatus.VALIDATING))
        uri = store.commit(model_id)
        info = meta.to_dict()
        deployconfig = info.pop("deployconfig", None)
        model = ray.get(
            registry.set_model_status.remote(
                model_id,
                ModelStatus.READY,
                artifact_uri=uri,
                checksum=checksum,
                meta=info,
                deployconfig=deployconfig,
            )
        )
        ray.get(registry.update_job.remote(job_id, status=JobStatus.SUCCESS, message="imported"))
        return model
    except Exception as exc:  # any failure ends the import FAILED, store cleaned
        store.discard(model_id)
        reason = str(exc) if isinstance(exc, ArchiveError) else f"import failed: {exc!r}"
        # a model deleted meanwhile is gone with its job already failed: nothing to record
        with contextlib.suppress(NotFound, InvalidTransition):
            ray.get(
                registry.set_model_status.remote(model_id, ModelStatus.IMPORT_FAILED, error=reason)
            )
            ray.get(
                registry.update_job.remote(
                    job_id, status=JobStatus.FAILED, message=reason, response={"error": reason}
                )
            )
        return {"error": reason}
    finally:
        Path(zip_path).unlink(missing_ok=True)


def deployconfig_from(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a deploy body that `deployconfig.json` carries to a re-import."""
    keys = ("hyperParameters", "scalingParameters", "deviceType", "optimizationInfo", "timeout")
    return {k: config[k] for k in keys if k in config}


@ray.remote(num_cpus=1, max_retries=0)
def export_model_task(
    settings: dict[str, Any], model: dict[str, Any], job_id: str, deployconfig: dict | None
) -> str:
    """Zip a stored model plus deployconfig.json; the dock status gets the download URL."""
    cfg = Settings(**settings)
    registry = _registry()
    out_dir = cfg.exports_path / job_id
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{model['name']}.zip"
    try:
        src = Path(model["artifactUri"])
        files = sorted(p for p in src.rglob("*") if p.is_file() and p.name != "deployconfig.json")
        progress = _Progress(job_id, 0, 99)
        with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
            for i, path in enumerate(files):
                zf.write(path, path.relative_to(src).as_posix())
                progress((i + 1) / (len(files) + 1), "zipping")
            zf.writestr("deployconfig.json", json.dumps(deployconfig or {}, indent=2))
        url = f"/api/public/exports/{job_id}/download"
        ray.get(
            registry.update_job.remote(
                job_id,
                status=JobStatus.SUCCESS,
                message="exported",
                response={"downloadUrl": url, "fileName": target.name},
            )
        )
        return str(target)
    except Exception as exc:
        target.unlink(missing_ok=True)
        reason = f"export failed: {exc}"
        ray.get(
            registry.update_job.remote(
                job_id, status=JobStatus.FAILED, message=reason, response={"error": reason}
            )
        )
        raise


@ray.remote(max_retries=0)
def optimize_model_task(
    settings: dict[str, Any], model: dict[str, Any], quantization: str, job_id: str | None
) -> str:
    """Convert a stored model to CTranslate2, once per (model checksum, quantization).

    The artifact lives in the store beside the models and is reused by every later deploy of
    the same weights; a conversion that fails leaves nothing behind and raises the converter's
    reason.
    """
    from raydock.optimizers import ctranslate2 as ct2

    store = ArtifactStore(Settings(**settings).artifacts)
    target = store.optimized_dir(ct2.artifact_key(model["checksum"], quantization))
    progress = _Progress(job_id, 0, 15) if job_id else (lambda *_: None)
    ct2.convert(model["artifactUri"], target, quantization, progress=progress)
    return str(target)
