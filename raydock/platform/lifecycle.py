"""The lifecycle actor: runs jobs and drives each deployment's state machine.

Every transition is persisted through the registry before it is acted on; on start the actor
reconciles Serve with the database, so a restart resumes from what the database says.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from typing import Any

import ray
from ray import serve
from ray.serve.api import RunTarget

from raydock.config import Settings, hardware_profiles
from raydock.optimizers import plan
from raydock.platform import names
from raydock.platform.jobs import export_model_task, import_model_task, optimize_model_task
from raydock.platform.states import DeploymentStatus as D
from raydock.platform.states import JobStatus

log = logging.getLogger("raydock.lifecycle")

DEPLOY_TIMEOUT_S = 900
RESTART_REASON = "interrupted by a platform restart; re-trigger it"


class DeployFailed(Exception):
    pass


def _app_status(name: str) -> Any | None:
    return serve.status().applications.get(name)


class Lifecycle:
    def __init__(self, settings: dict[str, Any]):
        self.settings = Settings(**settings)
        self.registry = ray.get_actor(names.REGISTRY, namespace=names.NAMESPACE)
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._tasks: set[asyncio.Task] = set()

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def ping(self) -> bool:
        return True

    # ------------------------------------------------------------ reconcile on start

    async def reconcile(self) -> dict[str, Any]:
        """Fail what a crash interrupted, restore DEPLOYED apps, delete orphaned apps."""
        failed = await self.registry.fail_interrupted.remote(RESTART_REASON)
        deployed = await self.registry.deployments_in.remote([D.DEPLOYED])
        wanted = {names.engine_app(d["deploymentId"]) for d in deployed}
        apps = (await asyncio.to_thread(serve.status)).applications
        platform_apps = {names.API_APP, names.GATEWAY_APP}
        for app in set(apps) - wanted - platform_apps:
            await asyncio.to_thread(serve.delete, app)
        restored = []
        for d in deployed:
            app = apps.get(names.engine_app(d["deploymentId"]))
            if app is None or app.status not in ("RUNNING", "DEPLOYING"):
                restored.append(d["deploymentId"])
                self._spawn(self._restore(d["deploymentId"]))
        return {**failed, "restored": restored}

    async def _restore(self, deployment_id: str) -> None:
        async with self._locks[deployment_id]:
            try:
                await self._run_app(deployment_id, job_id=None)
            except Exception as exc:
                reason = f"restoring after restart failed: {exc}"
                await self.registry.set_deployment_status.remote(deployment_id, D.FAILED, reason)

    # ------------------------------------------------------------ jobs

    async def submit_import(self, model_id: str, job_id: str, zip_path: str, kind: str) -> None:
        self._spawn(self._import(model_id, job_id, zip_path, kind))

    async def _import(self, model_id: str, job_id: str, zip_path: str, kind: str) -> None:
        try:
            await import_model_task.remote(
                self.settings.to_dict(), model_id, job_id, zip_path, kind
            )
        except Exception as exc:  # the task itself died (worker crash, OOM)
            reason = f"import worker failed: {exc}"
            await self.registry.set_model_status.remote(model_id, "IMPORT_FAILED", error=reason)
            await self.registry.update_job.remote(job_id, status=JobStatus.FAILED, message=reason)

    async def submit_export(self, model: dict, job_id: str, deployconfig: dict | None) -> None:
        async def run() -> None:
            try:
                await export_model_task.remote(self.settings.to_dict(), model, job_id, deployconfig)
            except Exception:
                log.exception("export %s failed", job_id)  # the task already failed the job

        self._spawn(run())

    async def submit_deploy(self, deployment_id: str, job_id: str) -> None:
        self._spawn(self._deploy(deployment_id, job_id))

    async def submit_undeploy(self, deployment_id: str, job_id: str, user_id: str) -> None:
        self._spawn(self._undeploy(deployment_id, job_id, user_id))

    # ------------------------------------------------------------ deploy / undeploy

    async def _progress(self, job_id: str | None, pct: int, message: str) -> None:
        if job_id:
            await self.registry.update_job.remote(job_id, percentage=pct, message=message)

    async def _optimize(
        self, model: dict, engine: plan.EnginePlan, profile: dict, job_id: str | None
    ) -> str:
        """The directory the engine loads: the model itself, or its (cached) conversion."""
        if not engine.converts:
            return model["artifactUri"]
        task = optimize_model_task.options(num_cpus=profile.get("num_cpus", 1))
        try:
            return await task.remote(self.settings.to_dict(), model, engine.quantization, job_id)
        except ray.exceptions.RayTaskError as exc:
            raise DeployFailed(str(exc.cause)) from None  # the converter's own reason

    async def _run_app(self, deployment_id: str, job_id: str | None) -> None:
        from raydock.serve_apps.engine_app import build_engine_app

        dep = await self.registry.get_deployment.remote(deployment_id)
        model = await self.registry.get_model.remote(dep["modelId"])
        config = dep["config"]
        profile = hardware_profiles()[config["deviceType"]]
        engine = plan.check(
            config.get("optimizationInfo", {}), config["deviceType"], profile, model["artifactUri"]
        )
        model_dir = await self._optimize(model, engine, profile, job_id)
        if dep["status"] == D.OPTIMIZING:
            await self.registry.set_deployment_status.remote(deployment_id, D.DEPLOYING)
        app = build_engine_app(
            deployment_id,
            self.settings.db_url,
            model_dir,
            engine,
            config,
            profile,
            stream_interval_s=self.settings.stream_interval_ms / 1000,
        )
        name = names.engine_app(deployment_id)
        # the replicas answer /deployments/<id>/… themselves: no gateway hop per token
        target = RunTarget(target=app, name=name, route_prefix=names.engine_route(deployment_id))
        await asyncio.to_thread(
            serve.run_many,
            [target],
            wait_for_ingress_deployment_creation=False,
            wait_for_applications_running=False,
        )
        await self._progress(job_id, 20, "Serve application submitted")
        deadline = time.monotonic() + DEPLOY_TIMEOUT_S
        while time.monotonic() < deadline:
            status = await asyncio.to_thread(_app_status, name)
            if status is not None and status.status == "RUNNING":
                return
            if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise DeployFailed(status.message or status.status)
            if status is not None:
                states = [dict(d.replica_states) for d in status.deployments.values()]
                running = sum(s.get("RUNNING", 0) for s in states)
                want = dep["config"]["scalingParameters"]["minReplicas"]
                await self._progress(
                    job_id, 20 + int(70 * running / max(1, want)), "starting replicas"
                )
            await asyncio.sleep(0.5)
        raise DeployFailed(f"replicas did not start within {DEPLOY_TIMEOUT_S} s")

    async def _deploy(self, deployment_id: str, job_id: str) -> None:
        async with self._locks[deployment_id]:
            try:
                await self._run_app(deployment_id, job_id)
                await self.registry.set_deployment_status.remote(deployment_id, D.DEPLOYED)
                await self.registry.update_job.remote(
                    job_id, status=JobStatus.SUCCESS, message="deployed"
                )
            except Exception as exc:
                known = (DeployFailed, plan.OptimizationError)
                reason = str(exc) if isinstance(exc, known) else repr(exc)
                log.warning("deployment %s failed: %s", deployment_id, reason)
                await asyncio.to_thread(serve.delete, names.engine_app(deployment_id))
                await self.registry.set_deployment_status.remote(deployment_id, D.FAILED, reason)
                await self.registry.update_job.remote(
                    job_id, status=JobStatus.FAILED, message=reason, response={"error": reason}
                )

    async def _undeploy(self, deployment_id: str, job_id: str, user_id: str) -> None:
        async with self._locks[deployment_id]:
            try:
                await self.registry.record_undeploy.remote(deployment_id, user_id, ended=False)
                await self._progress(job_id, 30, "deleting Serve application")
                await asyncio.to_thread(serve.delete, names.engine_app(deployment_id))
                await self.registry.set_deployment_status.remote(deployment_id, D.UNDEPLOYED)
                await self.registry.record_undeploy.remote(deployment_id, user_id, ended=True)
                await self.registry.update_job.remote(
                    job_id, status=JobStatus.SUCCESS, message="undeployed"
                )
            except Exception as exc:
                await self.registry.update_job.remote(
                    job_id, status=JobStatus.FAILED, message=f"undeploy failed: {exc!r}"
                )

    # ------------------------------------------------------------ views of live state

    async def replicas(self, deployment_id: str) -> dict[str, Any]:
        """Current and target replica counts of a deployment's Serve application."""
        from ray.serve.context import _get_global_client

        controller = _get_global_client()._controller
        details = await controller.get_serve_instance_details.remote()
        app = (details.get("applications") or {}).get(names.engine_app(deployment_id))
        if app is None:
            return {"applicationStatus": None, "current": 0, "target": 0, "byState": {}}
        states: dict[str, int] = {}
        target = 0
        for dep in app["deployments"].values():
            target += dep.get("target_num_replicas") or 0
            for replica in dep.get("replicas", []):
                states[replica["state"]] = states.get(replica["state"], 0) + 1
        return {
            "applicationStatus": app["status"],
            "message": app.get("message"),
            "current": states.get("RUNNING", 0),
            "target": target,
            "byState": states,
        }
