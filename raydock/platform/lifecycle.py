"""The lifecycle actor: runs jobs and drives each deployment's state machine.

Every transition is persisted through the registry before it is acted on. The actor keeps
actual state (Serve applications, running jobs) in line with desired state (the database)
continuously: a reconciliation pass runs when the actor starts (also after Ray restarts it)
and every few seconds after, so the platform heals itself after any component dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve.api import RunTarget

from raydock import names
from raydock.config import Settings, hardware_profiles
from raydock.errors import Conflict
from raydock.optimizers import plan
from raydock.platform import deploy_checks, views
from raydock.platform.jobs import (
    JobProgress,
    bytes_progress,
    export_model_task,
    import_hf_task,
    import_model_task,
    merge_adapter_task,
    optimize_model_task,
    upload_key,
)
from raydock.platform.states import (
    ACTIVE_DEPLOYMENT,
    STARTING_DEPLOYMENT,
    JobAction,
    JobStatus,
    ModelStatus,
    undeployable_model,
)
from raydock.platform.states import DeploymentStatus as D

log = logging.getLogger("raydock.lifecycle")

DEPLOY_TIMEOUT_S = 900
RECONCILE_INTERVAL_S = 5.0
# a job the API created is handed to the lifecycle within milliseconds; one older than this
# that no worker of this lifecycle runs was interrupted
ORPHAN_GRACE_S = 15.0
# a DEPLOYED deployment whose app is lost is restored at most this many times in a row
MAX_RESTORES = 3
# Serve replaces unhealthy replicas itself; an app unhealthy for longer is redeployed
UNHEALTHY_GRACE_S = 60.0
# a cancelled conversion is awaited this long for its task to end (Python code sees the
# cancellation at its next bytecode; a native call in progress is waited for), then killed
CANCEL_WAIT_S = 120.0
#: how long a deleted model's import task has to end when asked, before it is killed
STOP_WAIT_S = 10.0
INTERRUPTED_REASON = "interrupted: the platform component running it stopped; re-trigger it"


class DeployFailed(Exception):
    pass


#: one Serve submission at a time in this process: building an app's config registers its
#: autoscaling policy's and request router's modules for pickling by value and unregisters
#: them after, process-wide (ray.serve.config), so two deploys submitted at once in threads
#: could fail one ("<module …> is not registered for pickle by value", seen in CI)
_SUBMIT_LOCK = threading.Lock()


def submit_app(target: RunTarget) -> None:
    """Hand the application to Serve without waiting for it to run (a worker thread's)."""
    with _SUBMIT_LOCK:
        serve.run_many(
            [target],
            wait_for_ingress_deployment_creation=False,
            wait_for_applications_running=False,
        )


def _app_status(name: str) -> Any | None:
    return serve.status().applications.get(name)


_EXCEPTION_LINE = re.compile(r"^(?:[\w.]+\.)?\w*(?:Error|Exception|Exit)\b.*")
_VALIDATION_ERRORS = re.compile(r"\d+ validation errors? for \w+$")


def failure_reason(app: Any) -> str:
    """Why an app failed, in the replica's own words: the last exception line of a failing
    deployment's message (Serve's app message only says which deployment failed)."""
    for dep in app.deployments.values():
        lines = [line.strip() for line in (dep.message or "").splitlines() if line.strip()]
        raised = [i for i, line in enumerate(lines) if _EXCEPTION_LINE.match(line)]
        if raised:
            last = raised[-1]
            # "...: Error(s) in loading state_dict:" says what on the lines after it, and so
            # does pydantic's "1 validation error for VllmConfig" (less its input dump)
            said_after = lines[last].endswith(":") or _VALIDATION_ERRORS.search(lines[last])
            end = last + 3 if said_after else last + 1
            said = " ".join(line.split(" [type=")[0] for line in lines[last:end])
            return "a replica failed to start: " + said
    return app.message or app.status


class Lifecycle:
    def __init__(self, settings: dict[str, Any]):
        self.settings = Settings(**settings)
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        # one merge or conversion of the same weights at a time: the next deploy that needs
        # it waits, then finds it stored (two at once wrote one prefix with two manifests)
        self._artifact_locks: dict[tuple, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._tasks: set[asyncio.Task] = set()
        self._jobs: set[str] = set()  # jobs a task of this actor is running
        self._job_tasks: dict[str, ray.ObjectRef] = {}  # import job id -> its Ray task
        self._stopped_jobs: set[str] = set()  # import jobs stopped before their task began
        self._deploys: dict[str, asyncio.Task] = {}  # deployment id -> its running deploy
        self._restores: dict[str, int] = defaultdict(int)  # failed restores in a row
        self._restoring: dict[str, asyncio.Task] = {}  # deployment id -> its running restore
        # deployments whose live version's app must run again whatever Serve shows (a
        # redeploy interrupted while DEPLOYING: Serve may hold the new version's app)
        self._rerun: set[str] = set()
        self._unhealthy_since: dict[str, float] = {}
        self._pass = asyncio.Lock()
        # the first pass runs as soon as __init__ returns: at start and after every restart
        ray.get_runtime_context().current_actor.keep_reconciling.remote()

    @property
    def registry(self):
        """Looked up on each use: the supervisor replaces a registry that died."""
        return ray.get_actor(names.REGISTRY, namespace=names.NAMESPACE)

    def _spawn(self, coro, job_id: str | None = None) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if job_id:
            self._jobs.add(job_id)
            task.add_done_callback(lambda _: self._jobs.discard(job_id))
        return task

    async def ping(self) -> bool:
        return True

    # ------------------------------------------------------------ reconciliation

    async def keep_reconciling(self) -> None:
        while True:
            try:
                await self.reconcile()
            except Exception as exc:  # the registry or Serve restarting: next pass
                log.warning("reconciliation pass failed: %r", exc)
            await asyncio.sleep(RECONCILE_INTERVAL_S)

    async def reconcile(self) -> dict[str, Any]:
        """One pass: end jobs nobody runs, restore DEPLOYED deployments whose app is lost,
        delete engine apps no deployment owns (other apps are not raydock's). Returns what
        it did."""
        async with self._pass:
            orphans = await self.registry.orphan_jobs.remote(list(self._jobs), ORPHAN_GRACE_S)
            resumed = []
            for job in orphans:  # an undeploy is resumed: it is what the user asked for
                if job["action"] == JobAction.UNDEPLOY:
                    resumed.append(job["dockStatusId"])
                    self._spawn(
                        self._undeploy(job["deploymentId"], job["dockStatusId"], job["createdBy"]),
                        job["dockStatusId"],
                    )
            stale = [j["dockStatusId"] for j in orphans if j["dockStatusId"] not in resumed]
            # an interrupted zip import's upload would stay in the store: nothing else reads it
            for job in orphans:
                if job["action"] == JobAction.IMPORT:
                    key = upload_key(job["dockStatusId"])
                    await asyncio.to_thread(self.settings.store().delete, key)
            failed = await self.registry.fail_jobs.remote(stale, INTERRUPTED_REASON)
            self._rerun |= set(failed.get("kept", ()))  # kept until a restore succeeds
            # an import that ended READY while its deployment's deploy never came
            for job_id in await self.registry.stranded_waits.remote(list(self._jobs)):
                self._spawn(self._deploy_waiting(job_id), job_id)
            # apps first: a deploy that starts between the two reads is active by the second
            # (its record precedes its app), so its new app is never taken for a stray
            apps = (await asyncio.to_thread(serve.status)).applications
            active = await self.registry.deployments_in.remote(list(ACTIVE_DEPLOYMENT))
            owned = {names.engine_app(d["deploymentId"]) for d in active}
            removed = sorted(a for a in set(apps) - owned if names.is_engine_app(a))
            for app in removed:
                await asyncio.to_thread(serve.delete, app)
            restored = []
            for d in active:
                dep_id = d["deploymentId"]
                if d["status"] != D.DEPLOYED or self._locks[dep_id].locked():
                    continue  # a deploy, undeploy or restore of it is running
                lost = self._app_lost(dep_id, apps.get(names.engine_app(dep_id)))
                if dep_id in self._rerun or lost:
                    restored.append(dep_id)
                    self._track(self._restoring, dep_id, self._spawn(self._restore(dep_id)))
        done = {"failed": failed, "resumedUndeploys": resumed, "removedApps": removed}
        if any(failed.values()) or resumed or removed or restored:
            log.warning("reconciled: %s, restoring %s", done, restored)
        return {**done, "restored": restored}

    def _app_lost(self, deployment_id: str, app: Any | None) -> bool:
        """Whether a DEPLOYED deployment's app is gone, failed, or unhealthy for too long."""
        status = app.status if app is not None else None
        if status == "UNHEALTHY":
            since = self._unhealthy_since.setdefault(deployment_id, time.monotonic())
            return time.monotonic() - since > UNHEALTHY_GRACE_S
        self._unhealthy_since.pop(deployment_id, None)
        if status == "DEPLOYING" and self._restores.get(deployment_id):
            return True  # a restore timed out with its replicas still unplaced: try again
        # DELETING: restored once it is gone (a new app under its name would stop the delete)
        return status not in ("RUNNING", "DEPLOYING", "DELETING")

    async def _restore(self, deployment_id: str) -> None:
        async with self._locks[deployment_id]:
            try:  # undeployed, redeployed or deleted since reconcile saw it lost: not ours
                dep = await self.registry.get_deployment.remote(deployment_id)
            except Exception:  # gone (or the registry restarting: the next reconcile sees)
                return
            if dep["status"] != D.DEPLOYED:
                self._rerun.discard(deployment_id)
                return
            try:
                await self._run_app(deployment_id, job_id=None)
                self._rerun.discard(deployment_id)
                self._restores.pop(deployment_id, None)
                self._unhealthy_since.pop(deployment_id, None)
            except Exception as exc:
                self._restores[deployment_id] += 1
                tries = self._restores[deployment_id]
                log.warning("restoring %s failed (%d): %r", deployment_id, tries, exc)
                if tries >= MAX_RESTORES:
                    self._restores.pop(deployment_id, None)
                    self._rerun.discard(deployment_id)
                    reason = f"its Serve application was lost; {tries} restores failed: {exc}"
                    await asyncio.to_thread(serve.delete, names.engine_app(deployment_id))
                    await self.registry.set_deployment_status.remote(
                        deployment_id, D.FAILED, reason
                    )

    # ------------------------------------------------------------ commands

    async def deploy(
        self, deployment_id: str, config: dict[str, Any] | None, user_id: str
    ) -> dict[str, Any]:
        """Start a deploy (config None: the deployment's last one, a re-trigger): records the
        transition and its job in one step, then runs it; returns the job."""
        dep = await self.registry.get_deployment.remote(deployment_id)
        model = await self.registry.get_model.remote(dep["modelId"])
        problem = undeployable_model(model["modelId"], model["status"])
        if problem:
            raise Conflict(problem)
        engine = deploy_checks.check_deploy(model, config or dep["config"])
        # an adapter is merged into its base first: optimizing too
        converts = engine.converts or model["kind"] == "adapter"
        status = D.OPTIMIZING if converts else D.DEPLOYING
        job = await self.registry.begin_deploy.remote(deployment_id, config, user_id, status)
        task = self._spawn(self._deploy(deployment_id, job["dockStatusId"]), job["dockStatusId"])
        self._track(self._deploys, deployment_id, task)
        return job

    @staticmethod
    def _track(running: dict[str, asyncio.Task], deployment_id: str, task: asyncio.Task) -> None:
        """Keep `task` in `running` under its deployment while it runs."""
        running[deployment_id] = task

        def ended(_: asyncio.Task) -> None:  # a later one of it may be running by now
            if running.get(deployment_id) is task:
                del running[deployment_id]

        task.add_done_callback(ended)

    async def _stop_restore(self, deployment_id: str) -> None:
        """A restore of the deployment's lost app gives way to a deploy or undeploy the user
        asked for: it may wait up to DEPLOY_TIMEOUT_S for replicas that cannot be placed
        (a node gone), holding the deployment's lock all that time."""
        restore = self._restoring.get(deployment_id)
        if restore is not None:
            restore.cancel()
            await asyncio.wait([restore])

    async def undeploy(self, deployment_id: str, user_id: str) -> dict[str, Any]:
        """Start an undeploy; one of a deployment still OPTIMIZING or DEPLOYING cancels that
        deploy first. Returns the undeploy job."""
        job = await self.registry.begin_undeploy.remote(deployment_id, user_id)
        self._spawn(
            self._undeploy(deployment_id, job["dockStatusId"], user_id), job["dockStatusId"]
        )
        return job

    # ------------------------------------------------------------ jobs

    async def submit_import(self, model_id: str, job_id: str, zip_path: str, kind: str) -> None:
        self._spawn(self._import(model_id, job_id, zip_path, kind), job_id)

    async def submit_hf_import(self, model_id: str, job_id: str) -> None:
        """Download a model from the Hugging Face Hub (its origin is in the model), then
        deploy the deployment that waits for it, if any."""
        self._spawn(self._hf_import(model_id, job_id), job_id)

    async def _hf_import(self, model_id: str, job_id: str) -> None:
        try:
            model = await self.registry.get_model.remote(model_id)
            origin = dict(model["metadata"]["origin"])
            token = None
            if origin.get("connectionId"):
                # the token goes to the task as an argument, never into a log or a record
                token = await self.registry.connection_token.remote(origin["connectionId"])
            base = await self._base_artifact(model_id) if model["kind"] == "adapter" else None
            result = await self._job_task(
                job_id,
                lambda: import_hf_task.remote(
                    self.settings.without_secrets(), model_id, job_id, origin, token, base
                ),
            )
        except Exception as exc:  # the connection is gone, or the task itself died
            await self.registry.fail_jobs.remote([job_id], f"import failed: {exc}")
            return
        if result.get("status") == ModelStatus.READY:  # else it failed with its reason
            await self._deploy_waiting(job_id)

    async def _job_task(self, job_id: str, launch: Callable[[], ray.ObjectRef]) -> Any:
        """Launch an import job's Ray task and await it; `stop_job_task` ends it meanwhile,
        or keeps it from starting."""
        if job_id in self._stopped_jobs:
            self._stopped_jobs.discard(job_id)
            raise RuntimeError("stopped: its model was deleted")
        ref = self._job_tasks[job_id] = launch()
        try:
            return await ref
        finally:
            self._job_tasks.pop(job_id, None)

    async def stop_job_task(self, job_id: str) -> None:
        """End the task of an import job that ended without it (its model was deleted): it
        went on downloading, validating and storing, up to the archive limit, for nothing.
        Asked first, so that its own clean-up runs (its work folders), killed when it does
        not end within STOP_WAIT_S (the model's DELETE waits); returns once it has ended."""
        ref = self._job_tasks.get(job_id)
        if ref is None:
            if job_id in self._jobs:  # still staging its upload, say: it will not start
                self._stopped_jobs.add(job_id)
            return
        stop, kill = lambda: ray.cancel(ref), lambda: ray.cancel(ref, force=True)
        await _stop(ref.as_future(), stop, kill, STOP_WAIT_S)

    async def _deploy_waiting(self, import_job_id: str) -> None:
        """Deploy the deployment made together with an import that just ended READY, unless
        its user deployed it first (the import's end is visible before this runs)."""
        job = await self.registry.get_job.remote(import_job_id)
        dep_id = job["deploymentId"]
        if not dep_id:
            return
        if (await self.registry.get_deployment.remote(dep_id))["status"] != D.READY_TO_DEPLOY:
            return
        try:
            await self.deploy(dep_id, None, job["createdBy"])
        except Exception as exc:  # the deploy checks refused it: e.g. it does not fit
            reason = getattr(exc, "message", None) or str(exc)
            # a deploy the user started meanwhile (a Conflict here) goes on as theirs
            await self.registry.set_deployment_status.remote(
                dep_id, D.FAILED, reason, only_from=D.READY_TO_DEPLOY
            )

    async def _import(self, model_id: str, job_id: str, zip_path: str, kind: str) -> None:
        upload = upload_key(job_id)
        try:
            # the upload arrived on this (the head) node; the import task may run on any
            await asyncio.to_thread(self._stage_upload, Path(zip_path), upload, job_id)
            base = await self._base_artifact(model_id) if kind == "adapter" else None
            # errors name the user's file (a file import's model is named after it)
            name = (await self.registry.get_model.remote(model_id))["name"] + ".zip"
            await self._job_task(
                job_id,
                lambda: import_model_task.remote(
                    self.settings.without_secrets(), model_id, job_id, upload, kind, base, name
                ),
            )
        except Exception as exc:  # staging failed, or the task itself died (crash, OOM)
            # both copies of the upload go before the job ends: whoever sees it end sees them gone
            Path(zip_path).unlink(missing_ok=True)
            await asyncio.to_thread(self.settings.store().delete, upload)
            await self.registry.fail_jobs.remote([job_id], f"import failed: {exc}")
        finally:  # also when the import is cancelled (the lifecycle stopping)
            Path(zip_path).unlink(missing_ok=True)

    async def _base_artifact(self, adapter_id: str) -> dict[str, Any]:
        """Where an adapter's base model is stored, so the import checks the adapter
        against it: {"prefix", "digest", "name"}."""
        adapter = await self.registry.get_model.remote(adapter_id)
        base = await self.registry.get_model.remote(adapter["baseModelId"])
        return {**views.stored_artifact(base), "name": base["name"]}

    def _stage_upload(self, local: Path, key: str, job_id: str) -> None:
        """Put an uploaded archive into the artifact store: moved when the store is a local
        directory, else uploaded (multipart, parallel parts) with progress."""
        store = self.settings.store()
        target = store.local_path(key)
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(local, target)
            return
        store.put_file(local, key, bytes_progress(JobProgress(job_id, 0, 5), "storing the upload"))
        local.unlink()  # now, not when the import ends: the head's disk room is for new uploads

    async def submit_export(self, model: dict, job_id: str, deployconfig: dict | None) -> None:
        async def run() -> None:
            try:
                await export_model_task.remote(
                    self.settings.without_secrets(), model, job_id, deployconfig
                )
            except Exception:
                log.exception("export %s failed", job_id)  # the task already failed the job

        self._spawn(run(), job_id)

    # ------------------------------------------------------------ deploy / undeploy

    async def _progress(self, job_id: str | None, pct: int, message: str) -> None:
        if job_id:
            await self.registry.update_job.remote(job_id, percentage=pct, message=message)

    async def _optimize(
        self, model: dict, engine: plan.EnginePlan, profile: dict, job_id: str | None
    ) -> dict[str, str]:
        """The artifact the engine loads ({"prefix", "digest"} in the store): the model
        itself, an adapter merged into its base, or the conversion of either (each made
        once, then reused)."""
        served = model
        if model["kind"] == "adapter":
            base = await self.registry.get_model.remote(model["baseModelId"])
            async with self._one_at_a_time(("merge", base["checksum"], model["checksum"]), job_id):
                merged = await self._run_task(
                    merge_adapter_task,
                    profile,
                    self.settings.without_secrets(),
                    base,
                    model,
                    job_id,
                )
            served = {
                "checksum": merged["checksum"],
                "artifactUri": merged["prefix"],
                "metadata": {"artifactDigest": merged["digest"]},
            }
        if not engine.converts:
            return views.stored_artifact(served)
        async with self._one_at_a_time(
            ("convert", served["checksum"], engine.quantization), job_id
        ):
            converted = await self._run_task(
                optimize_model_task,
                profile,
                self.settings.without_secrets(),
                served,
                engine.quantization,
                job_id,
            )
        reused = converted.pop("reused")
        if job_id:  # the deploy job tells whether this deploy converted or found it stored
            conversion = {"artifact": converted["prefix"], "reused": reused}
            await self.registry.update_job.remote(job_id, response={"conversion": conversion})
        return converted

    @contextlib.asynccontextmanager
    async def _one_at_a_time(self, key: tuple, job_id: str | None) -> AsyncIterator[None]:
        """Hold the merge or conversion `key` ("merge"|"convert", weights...) alone."""
        lock = self._artifact_locks[key]
        if lock.locked():
            await self._progress(
                job_id, 1, f"waiting for another deploy's {key[0]} of the same weights"
            )
        async with lock:
            yield

    @staticmethod
    async def _run_task(task, profile: dict, *args: Any) -> dict[str, str]:
        """A conversion task with the replica's CPUs (one node's share of them: a task runs
        on one node); its failure fails the deploy with the converter's own reason. A deploy
        cancelled meanwhile cancels the task, and waits for it to end: the next conversion of
        the same weights must not meet it writing."""
        cpus = deploy_checks.one_node_share(profile)["CPU"]
        ref = task.options(num_cpus=int(cpus) if cpus >= 1 else cpus).remote(*args)

        def stop() -> None:  # asked first; killed when it does not end in time
            ray.cancel(ref)

        try:
            return await _to_the_end(ref.as_future(), stop, lambda: ray.cancel(ref, force=True))
        except ray.exceptions.RayTaskError as exc:
            raise DeployFailed(str(exc.cause)) from None

    async def _run_app(
        self, deployment_id: str, job_id: str | None, config: dict[str, Any] | None = None
    ) -> None:
        await self._start_app(*await self._build_app(deployment_id, job_id, config), job_id)

    async def _build_app(
        self, deployment_id: str, job_id: str | None, config: dict[str, Any] | None = None
    ) -> tuple[RunTarget, int]:
        """The Serve application of a deployment's configuration (or of `config`, a version
        it ran before), its artifact optimized first, and how many replicas it starts with;
        Serve is not touched yet."""
        from raydock.serve_apps.engine_app import build_engine_app

        dep = await self.registry.get_deployment.remote(deployment_id)
        model = await self.registry.get_model.remote(dep["modelId"])
        config = config or dep["config"]
        profile = hardware_profiles()[config["deviceType"]]
        engine = plan.check(
            config.get("optimizationInfo", {}),
            config["deviceType"],
            profile,
            model["metadata"].get("quantization_config"),
        )
        artifact = await self._optimize(model, engine, profile, job_id)
        if dep["status"] == D.OPTIMIZING:
            await self.registry.set_deployment_status.remote(deployment_id, D.DEPLOYING)
        access = await self.registry.access_snapshots.remote([deployment_id])
        app = build_engine_app(
            deployment_id,
            access[deployment_id],
            names.control_plane(self.settings.metering),
            artifact | self.settings.artifact_access(),
            engine,
            config,
            profile,
            stream_interval_s=self.settings.stream_interval_ms / 1000,
            max_request_bytes=self.settings.max_request_bytes,
            source=views.stored_artifact(model) if model["kind"] == "base" else None,
        )
        # the replicas answer /deployments/<id>/… themselves: no gateway hop per token
        target = RunTarget(
            target=app,
            name=names.engine_app(deployment_id),
            route_prefix=names.engine_route(deployment_id),
        )
        return target, config["scalingParameters"]["minReplicas"]

    async def _start_app(self, target: RunTarget, want: int, job_id: str | None) -> str:
        """Submit the application to Serve and wait until its replicas run; returns which
        replicas serve it now, in words (a redeploy keeps those whose build is unchanged)."""
        name = target.name
        before = running_replicas(await serve_details(), name)
        # a cancelled deploy waits for its submit: an undeploy's delete must come after it
        submit = asyncio.to_thread(submit_app, target)
        await _to_the_end(asyncio.ensure_future(submit))
        await self._progress(job_id, 20, "Serve application submitted")
        deadline = time.monotonic() + DEPLOY_TIMEOUT_S
        while time.monotonic() < deadline:
            status = await asyncio.to_thread(_app_status, name)
            if status is not None and status.status == "RUNNING":
                return replicas_said(before, running_replicas(await serve_details(), name))
            if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise DeployFailed(failure_reason(status))
            if status is not None:
                engine = status.deployments.get(names.ENGINE_DEPLOYMENT)
                running = dict(engine.replica_states).get("RUNNING", 0) if engine else 0
                await self._progress(
                    job_id, 20 + int(70 * running / max(1, want)), "starting replicas"
                )
            await asyncio.sleep(0.5)
        raise DeployFailed(f"replicas did not start within {DEPLOY_TIMEOUT_S} s")

    def _start_over(self, deployment_id: str) -> None:
        """A deploy or an undeploy of a deployment: what reconciliation noted about its app
        before (failed restores in a row, unhealthy since, a live version to run again) is
        about an app that is replaced or gone."""
        self._restores.pop(deployment_id, None)
        self._unhealthy_since.pop(deployment_id, None)
        self._rerun.discard(deployment_id)

    async def _deploy(self, deployment_id: str, job_id: str) -> None:
        await self._stop_restore(deployment_id)
        async with self._locks[deployment_id]:
            self._start_over(deployment_id)
            submitted = False
            try:
                app = await self._build_app(deployment_id, job_id)
                submitted = True
                replicas = await self._start_app(*app, job_id)
            except Exception as exc:
                known = (DeployFailed, plan.OptimizationError)
                reason = str(exc) if isinstance(exc, known) else repr(exc)
                log.warning("deployment %s failed: %s", deployment_id, reason)
                kept, reason = await self._keep_live(deployment_id, job_id, reason, submitted)
                if kept:
                    message = f"{reason}; {kept}'s configuration goes on serving"
                    await self.registry.update_job.remote(
                        job_id, status=JobStatus.FAILED, message=message, response={"error": reason}
                    )
                    return
                await asyncio.to_thread(serve.delete, names.engine_app(deployment_id))
                await self.registry.set_deployment_status.remote(deployment_id, D.FAILED, reason)
                await self.registry.update_job.remote(
                    job_id, status=JobStatus.FAILED, message=reason, response={"error": reason}
                )
                return
            # running: DEPLOYED and the job's end in one step (a registry that fails to record
            # it leaves the job to reconciliation, as a lifecycle that died here would)
            await self.registry.set_deployment_status.remote(
                deployment_id, D.DEPLOYED, job_id=job_id, job_message=f"deployed: {replicas}"
            )

    async def _keep_live(
        self, deployment_id: str, job_id: str, reason: str, submitted: bool
    ) -> tuple[str | None, str]:
        """A redeploy failed: the version that was serving serves on. Before Serve saw the
        new version nothing else is needed; after, Serve replaced the live replicas, so the
        live version's app runs again first. Returns the kept version's name (None: none
        was live, or it could not run again) and the reason the redeploy failed."""
        if submitted:
            live = await self.registry.live_version.remote(deployment_id)
            if live is None:
                return None, reason
            await self._progress(job_id, 95, f"{reason}; starting {live['name']} again")
            try:
                await self._run_app(deployment_id, None, config=live["config"])
            except Exception as exc:
                log.warning("starting %s of %s again failed: %r", live["name"], deployment_id, exc)
                return None, f"{reason}; starting {live['name']} again failed too: {exc}"
        return await self.registry.keep_live_version.remote(deployment_id, reason), reason

    async def _undeploy(self, deployment_id: str, job_id: str, user_id: str) -> None:
        deploy = self._deploys.get(deployment_id)
        if deploy is not None:  # still starting: stopped where it is, its app deleted below
            await self._progress(job_id, 10, "cancelling the deploy")
            deploy.cancel()
            await asyncio.wait([deploy])
        await self._stop_restore(deployment_id)
        async with self._locks[deployment_id]:
            self._start_over(deployment_id)
            try:
                # the deploy's job and version end (also one an earlier lifecycle ran)
                await self.registry.cancel_deploy.remote(deployment_id, user_id)
                await self.registry.record_undeploy.remote(deployment_id, user_id, ended=False)
                await self._progress(job_id, 30, "deleting Serve application")
                await asyncio.to_thread(serve.delete, names.engine_app(deployment_id))
                await self.registry.set_deployment_status.remote(deployment_id, D.UNDEPLOYED)
                await self.registry.record_undeploy.remote(deployment_id, user_id, ended=True)
                await self.registry.update_job.remote(
                    job_id, status=JobStatus.SUCCESS, message="undeployed"
                )
            except Exception as exc:
                reason = f"undeploy failed: {exc!r}"
                await self.registry.update_job.remote(
                    job_id, status=JobStatus.FAILED, message=reason
                )
                # a cancelled deploy has no job left to end it: it must not stay starting
                dep = await self.registry.get_deployment.remote(deployment_id)
                if dep["status"] in STARTING_DEPLOYMENT:
                    await self.registry.set_deployment_status.remote(
                        deployment_id, D.FAILED, reason
                    )

    # ------------------------------------------------------------ views of live state

    async def replicas(self, deployment_id: str) -> dict[str, Any]:
        """Current and target replica counts of a deployment's Serve application."""
        details = await serve_details()
        return replica_view(
            (details.get("applications") or {}).get(names.engine_app(deployment_id))
        )


async def _to_the_end(
    future: asyncio.Future,
    stop: Callable[[], None] | None = None,
    kill: Callable[[], None] | None = None,
) -> Any:
    """Await `future`. When the awaiting task is cancelled meanwhile (an undeploy cancelling a
    deploy), `stop` it and wait for it to end before the cancellation goes on — `kill` it when
    it does not within CANCEL_WAIT_S — so that what it does (a submit to Serve, a conversion
    writing to the store) cannot land after what the canceller does next."""
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await _stop(future, stop, kill, CANCEL_WAIT_S)
        raise


async def _stop(
    future: asyncio.Future,
    stop: Callable[[], None] | None,
    kill: Callable[[], None] | None,
    wait_s: float,
) -> None:
    """Ask the work behind `future` to stop, wait up to `wait_s` for it to end, then kill it
    and wait for that; its own failure is not the stopper's."""
    if stop is not None:
        stop()
    with contextlib.suppress(Exception):
        try:
            await asyncio.wait_for(asyncio.shield(future), wait_s)
        except TimeoutError:
            if kill is not None:
                kill()
                await future


async def serve_details() -> dict[str, Any]:
    """Serve's own view of every application, its deployments and their replicas."""
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller
    return await controller.get_serve_instance_details.remote()


def running_replicas(details: dict[str, Any], app_name: str) -> set[str]:
    """The ids of the engine replicas running in application `app_name` of `serve_details`."""
    app = (details.get("applications") or {}).get(app_name) or {}
    engine = (app.get("deployments") or {}).get(names.ENGINE_DEPLOYMENT) or {}
    return {r["replica_id"] for r in engine.get("replicas", []) if r["state"] == "RUNNING"}


def replicas_said(before: set[str], after: set[str]) -> str:
    """Which replicas serve a deployment after a deploy, for its job: kept (a redeploy whose
    replicas' build did not change, engine_app.versioned) or started."""
    kept, started = len(before & after), len(after - before)

    def count(n: int) -> str:
        return f"{n} replica{'' if n == 1 else 's'}"

    if not kept:
        return f"{count(started)} started"
    if not started:
        return f"{count(kept)} kept running (the change was applied to them)"
    return f"{count(kept)} kept running, {started} started"


def replica_view(app: dict[str, Any] | None) -> dict[str, Any]:
    """Current and target replicas of one application of `serve_details`, by state and node."""
    if app is None:
        return {
            "applicationStatus": None,
            "message": None,
            "current": 0,
            "target": 0,
            "byState": {},
            "nodes": {},
        }
    states: dict[str, int] = {}
    nodes: dict[str, int] = {}  # running replicas per node
    messages = [app.get("message") or ""]
    target = 0
    for name, dep in app["deployments"].items():
        if name != names.ENGINE_DEPLOYMENT:  # the prefix route server is no engine replica
            continue
        target += dep.get("target_num_replicas") or 0
        messages.append(dep.get("message") or "")  # e.g. replicas that cannot be placed
        for replica in dep.get("replicas", []):
            states[replica["state"]] = states.get(replica["state"], 0) + 1
            if replica["state"] == "RUNNING" and replica.get("node_id"):
                nodes[replica["node_id"]] = nodes.get(replica["node_id"], 0) + 1
    return {
        "applicationStatus": app["status"],
        "message": " ".join(m for m in messages if m) or None,
        "current": states.get("RUNNING", 0),
        "target": target,
        "byState": states,
        "nodes": nodes,
    }
