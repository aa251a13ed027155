"""Long-running work as Ray tasks: import, export and conversion. Each reports progress to
its dock status, and reads and writes artifacts only through the artifact store, so it runs
on whichever node Ray places it."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import ray

from raydock import names
from raydock.artifacts import MANIFEST_NAME
from raydock.artifacts.cache import held_cached, resumable_folder, work_folder
from raydock.config import Settings
from raydock.errors import NotFound
from raydock.platform import views
from raydock.platform.states import InvalidTransition, JobStatus, ModelStatus

#: How long a presigned export URL stays valid
EXPORT_URL_TTL_S = 24 * 3600


def _registry():
    return ray.get_actor(names.REGISTRY, namespace=names.NAMESPACE)


class JobProgress:
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


def model_key(model_id: str) -> str:
    """Where a model's directory lives in the artifact store."""
    return f"models/{model_id}"


def upload_key(job_id: str) -> str:
    """Where a zip import's upload waits for its import task (deleted when the import ends)."""
    return f"uploads/{job_id}.zip"


def exports_key(model_id: str) -> str:
    """Where a model's exports live (deleted with the model)."""
    return f"exports/{model_id}"


def bytes_progress(progress: JobProgress, message: str):
    """A store transfer's (bytes done, total) as the job's progress."""
    return lambda done, total: progress(done / total if total else 1.0, message)


def _local_copy(store, key: str, work: Path, progress: JobProgress) -> Path:
    """A stored file as a path on this node: the store's own file when it is a local
    directory, else a download into `work`."""
    local = store.local_path(key)
    if local is not None and local.is_file():
        return local
    dest = work / Path(key).name
    store.get_file(key, dest, bytes_progress(progress, "downloading the upload"))
    return dest


class _ModelImport:
    """What every import does once it has the model's files: validate them (the model goes
    VALIDATING), store them under a manifest whose digest replicas verify (READY), or end
    IMPORT_FAILED with the reason, leaving nothing in the store."""

    def __init__(self, cfg: Settings, model_id: str, job_id: str):
        self.model_id, self.job_id = model_id, job_id
        self.store = cfg.store()
        self.registry = _registry()
        self.key = model_key(model_id)
        self.validating = False
        self.ready_sent = False  # finish asked for READY (the write may commit, its reply fail)

    def mark_validating(self) -> None:
        if not self.validating:
            self.validating = True
            ray.get(self.registry.set_model_status.remote(self.model_id, ModelStatus.VALIDATING))

    def finish(
        self, folder: Path, meta, checksum: str | None = None, origin: dict | None = None
    ) -> dict:
        """`checksum`: the upload's sha256; a download's is its manifest digest (over every
        file), so the same weights share their conversions either way."""
        self.mark_validating()
        storing = JobProgress(self.job_id, 80, 99)
        manifest = self.store.put_dir(folder, self.key, bytes_progress(storing, "storing"))
        info = meta.to_dict()
        deployconfig = info.pop("deployconfig", None)
        if origin:
            info["origin"] = origin
        self.ready_sent = True
        return ray.get(  # READY, and the job SUCCESS, in one step
            self.registry.set_model_status.remote(
                self.model_id,
                ModelStatus.READY,
                job_id=self.job_id,
                artifact_uri=self.key,
                checksum=checksum or manifest.digest,
                meta={**info, "artifactDigest": manifest.digest},
                deployconfig=deployconfig,
            )
        )

    def fail(self, reason: str) -> dict:
        if self._maybe_ready():  # its files are a READY model's now: nothing to undo
            return {"error": reason}
        self.store.delete(self.key)
        # a model deleted meanwhile is gone with its job already failed: nothing to record
        with contextlib.suppress(NotFound, InvalidTransition):
            ray.get(
                self.registry.set_model_status.remote(
                    self.model_id, ModelStatus.IMPORT_FAILED, job_id=self.job_id, error=reason
                )
            )
        return {"error": reason}

    def _maybe_ready(self) -> bool:
        """Whether the model may be READY: finish's write can commit and its reply still fail
        (the registry dying meanwhile). Unknown counts as READY: files left over cost disk,
        a READY model's files deleted cost the model."""
        if not self.ready_sent:
            return False
        try:
            model = ray.get(self.registry.get_model.remote(self.model_id))
        except NotFound:
            return False
        except Exception:
            return True
        return model["status"] == ModelStatus.READY


@ray.remote(num_cpus=1, max_retries=0)
def import_model_task(
    settings: dict[str, Any],
    model_id: str,
    job_id: str,
    upload_key: str,
    kind: str,
    base: dict[str, Any] | None = None,
    file_name: str | None = None,
) -> dict[str, Any]:
    """Validate an uploaded archive (a file in the artifact store) and store the model; an
    adapter is checked against its `base` ({"prefix", "digest", "name"}: fetched through this
    node's cache).

    Runs on any node: the archive comes from the store and the model goes back to it.
    """
    from raydock.platform.model_archive import (
        ArchiveError,
        ArchiveLimits,
        extract_model_archive,
        sha256_file,
    )

    cfg = Settings(**settings)
    job = _ModelImport(cfg, model_id, job_id)
    work = Path(tempfile.mkdtemp(prefix="raydock-import-"))
    extracting = JobProgress(job_id, 5, 80)

    def on_progress(fraction: float, stage: str) -> None:
        if stage == "validating":
            job.mark_validating()
        extracting(fraction, stage)

    try:
        try:
            zip_path = _local_copy(job.store, upload_key, work, JobProgress(job_id, 0, 5))
            checksum = sha256_file(zip_path)
            # held while the adapter is checked against it: no fetch on this node evicts it
            held = (
                held_cached({**base, **cfg.artifact_access()}) if base else contextlib.nullcontext()
            )
            with held as base_dir:
                meta = extract_model_archive(
                    zip_path,
                    work / "model",
                    ArchiveLimits.from_settings(cfg),
                    kind=kind,
                    progress=on_progress,
                    base_dir=base_dir,
                    base_name=base and base["name"],
                    archive_name=file_name,
                )
        finally:
            # spent either way, and gone before the job ends: whoever sees the end sees it gone
            with contextlib.suppress(Exception):  # best effort
                job.store.delete(upload_key)
        return job.finish(work / "model", meta, checksum)
    except Exception as exc:  # any failure ends the import FAILED, store cleaned
        return job.fail(str(exc) if isinstance(exc, ArchiveError) else f"import failed: {exc}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


HF_WORK_PREFIX = ".work-"  # an HF import's work folder, beside its download folder


def hf_download_folder(cfg: Settings, repo_id: str, sha: str) -> Path:
    """Where this node keeps a Hugging Face download while it runs, and after it broke off
    (so that a retry resumes it): beside the node cache, by repo and commit."""
    return (
        Path(cfg.cache_location).expanduser() / "downloads" / f"{repo_id.replace('/', '--')}@{sha}"
    )


@ray.remote(num_cpus=1, max_retries=0)
def import_hf_task(
    settings: dict[str, Any],
    model_id: str,
    job_id: str,
    origin: dict[str, Any],
    token: str | None,
    base: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Download a model from the Hugging Face Hub (only the files it needs, resumable), then
    validate and store it as an uploaded archive would be. `origin`: repoId, revision,
    connection (its name, for messages), catalogId; `base`: an adapter's base model, as for
    `import_model_task`."""
    from raydock.platform import hf
    from raydock.platform.adapter_check import check_adapter_against_base
    from raydock.platform.model_archive import ArchiveError, ArchiveLimits, inspect_model_dir

    cfg = Settings(**settings)
    job = _ModelImport(cfg, model_id, job_id)
    limits = ArchiveLimits.from_settings(cfg)
    endpoint = cfg.hf_endpoint or None
    repo_id = origin["repoId"]
    kind = "adapter" if base else "base"
    cleanup = contextlib.ExitStack()
    try:
        files = hf.repo_files(
            endpoint,
            repo_id,
            origin.get("revision"),
            token,
            origin.get("connection"),
            kind,
            limits,
        )
        folder = hf_download_folder(cfg, repo_id, files.sha)
        folder.parent.mkdir(parents=True, exist_ok=True)

        def waiting() -> None:
            message = f"waiting for another import of {repo_id} on this node to end"
            ray.get(job.registry.update_job.remote(job_id, message=message))

        # kept after a failure for a retry to resume; one no retry came for is removed by a
        # later import on this node
        cleanup.enter_context(resumable_folder(folder, cfg.upload_session_ttl_s, waiting))
        # beside the download, on its filesystem: the files are moved (renamed) out of it;
        # locked while this task lives, so a later import removes it if this process is killed
        work = cleanup.enter_context(work_folder(folder.parent, HF_WORK_PREFIX))
        downloading = JobProgress(job_id, 2, 75)
        hf.download(
            endpoint,
            repo_id,
            files,
            token,
            origin.get("connection"),
            folder,
            lambda done, total: downloading(
                done / total if total else 1.0,
                f"downloading {done / 2**20:.1f} of {total / 2**20:.1f} MiB",
            ),
        )
        ray.get(
            job.registry.update_job.remote(
                job_id,
                message="downloaded",
                response={
                    "downloadedBytes": files.total,
                    "files": sorted(files.sizes),
                    "revision": files.sha,
                },
            )
        )
        hf.take_model_files(folder, files, work / "model")
        shutil.rmtree(folder, ignore_errors=True)  # complete: nothing left to resume
        job.mark_validating()
        meta = inspect_model_dir(work / "model", kind=kind, allow_pickle=limits.allow_pickle)
        if base:
            with held_cached({**base, **cfg.artifact_access()}) as base_dir:
                meta.adapter = check_adapter_against_base(work / "model", base_dir, base["name"])
        return job.finish(work / "model", meta, origin={**origin, "sha": files.sha})
    except (hf.HubError, ArchiveError) as exc:
        return job.fail(str(exc))
    except Exception as exc:
        return job.fail(f"import failed: {exc}")
    finally:
        cleanup.close()


def deployconfig_from(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a deploy body that `deployconfig.json` carries to a re-import."""
    keys = (
        "hyperParameters",
        "scalingParameters",
        "deviceType",
        "optimizationInfo",
        "adapterParameters",
        "routingParameters",
        "timeout",
    )
    return {k: config[k] for k in keys if k in config}


def export_download_path(job_id: str) -> str:
    """The API route that serves (or redirects to) an export's zip."""
    return f"/api/public/exports/{job_id}/download"


def export_file_stem(model_name: str) -> str:
    """A file name for a model's export: a Hugging Face import is named by its repo id
    (`Qwen/Qwen2.5-0.5B`), and a name may hold any character; path separators and the like
    become `_` (the export failed on the folder the `/` named)."""
    stem = re.sub(r"[^\w.\-]+", "_", model_name).strip("._")[:100]
    return stem or "model"


@ray.remote(num_cpus=1, max_retries=0)
def export_model_task(
    settings: dict[str, Any], model: dict[str, Any], job_id: str, deployconfig: dict | None
) -> str:
    """Zip a stored model plus deployconfig.json into the store; the dock status gets the
    download URL (presigned when the store is S3)."""
    cfg = Settings(**settings)
    store = cfg.store()
    registry = _registry()
    work = Path(tempfile.mkdtemp(prefix="raydock-export-"))
    name = f"{export_file_stem(model['name'])}.zip"
    key = f"{exports_key(model['modelId'])}/{job_id}/{name}"
    try:
        src = work / "model"
        fetching = JobProgress(job_id, 0, 40)
        store.get_dir(
            model["artifactUri"],
            src,
            model["metadata"]["artifactDigest"],
            bytes_progress(fetching, "fetching the model"),
        )
        files = sorted(
            p
            for p in src.rglob("*")
            if p.is_file() and p.name not in ("deployconfig.json", MANIFEST_NAME)
        )
        zipping = JobProgress(job_id, 40, 80)
        target = work / name
        with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
            for i, path in enumerate(files):
                zf.write(path, path.relative_to(src).as_posix())
                zipping((i + 1) / (len(files) + 1), "zipping")
            zf.writestr("deployconfig.json", json.dumps(deployconfig or {}, indent=2))
        storing = JobProgress(job_id, 80, 99)
        store.put_file(target, key, bytes_progress(storing, "storing the export"))
        url = store.download_url(key, EXPORT_URL_TTL_S) or export_download_path(job_id)
        ray.get(
            registry.update_job.remote(
                job_id,
                status=JobStatus.SUCCESS,
                message="exported",
                response={"downloadUrl": url, "fileName": name, "artifactKey": key},
            )
        )
        return key
    except Exception as exc:
        store.delete(key)
        reason = f"export failed: {exc}"
        ray.get(
            registry.update_job.remote(
                job_id, status=JobStatus.FAILED, message=reason, response={"error": reason}
            )
        )
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


@ray.remote(max_retries=0)
def optimize_model_task(
    settings: dict[str, Any], model: dict[str, Any], quantization: str, job_id: str | None
) -> dict[str, str]:
    """Convert a stored model to CTranslate2, once per (model checksum, quantization).

    The conversion goes to the store beside the models and is reused by every later deploy
    of the same weights (the job says so); a conversion that fails leaves nothing behind and
    raises the converter's reason. Returns the artifact's {"prefix", "digest"} and "reused":
    whether it was already stored (no conversion ran).
    """
    from raydock.optimizers import ctranslate2 as ct2

    cfg = Settings(**settings)
    store = cfg.store()
    prefix = f"optimized/{ct2.artifact_key(model['checksum'], quantization)}"
    progress = JobProgress(job_id, 0, 15) if job_id else (lambda *_: None)
    if store.exists(f"{prefix}/{MANIFEST_NAME}"):
        progress(1.0, f"reusing the CTranslate2 {ct2.normalize(quantization)} conversion")
        return {"prefix": prefix, "digest": store.read_manifest(prefix).digest, "reused": True}
    work = Path(tempfile.mkdtemp(prefix="raydock-convert-"))
    try:
        # held: other fetches on this node must not evict the source mid-conversion
        with held_cached({**views.stored_artifact(model), **cfg.artifact_access()}) as source:
            ct2.convert(source, work / "ct2", quantization, progress=progress)
        manifest = store.put_dir(work / "ct2", prefix)
        return {"prefix": prefix, "digest": manifest.digest, "reused": False}
    finally:
        shutil.rmtree(work, ignore_errors=True)


@ray.remote(max_retries=0)
def merge_adapter_task(
    settings: dict[str, Any], base: dict[str, Any], adapter: dict[str, Any], job_id: str | None
) -> dict[str, str]:
    """Merge an adapter into its base, once per (base, adapter) weights: the artifact a
    deployment of the adapter serves (`base`, `adapter`: model views). Returns the merged
    artifact's {"prefix", "digest"} (and "checksum", which keys its conversions)."""
    from raydock.optimizers.merge import merge_adapter, merged_key

    cfg = Settings(**settings)
    store = cfg.store()
    prefix = merged_key(base["checksum"], adapter["checksum"])
    checksum = prefix.split("/")[1]
    progress = JobProgress(job_id, 0, 10) if job_id else (lambda *_: None)
    if store.exists(f"{prefix}/{MANIFEST_NAME}"):
        progress(1.0, "reusing the merged adapter")
        digest = store.read_manifest(prefix).digest
        return {"prefix": prefix, "digest": digest, "checksum": checksum}

    def fetch(model: dict[str, Any]) -> contextlib.AbstractContextManager[Path]:
        artifact = views.stored_artifact(model)
        return held_cached(artifact | cfg.artifact_access())

    progress(0.1, "merging the adapter into its base")
    work = Path(tempfile.mkdtemp(prefix="raydock-merge-"))
    try:
        # held: the adapter's fetch (or any other on this node) must not evict the base
        with fetch(base) as base_dir, fetch(adapter) as adapter_dir:
            merge_adapter(base_dir, adapter_dir, work / "merged")
        manifest = store.put_dir(work / "merged", prefix)
        progress(1.0, "adapter merged")
        return {"prefix": prefix, "digest": manifest.digest, "checksum": checksum}
    finally:
        shutil.rmtree(work, ignore_errors=True)
