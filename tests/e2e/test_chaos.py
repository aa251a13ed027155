"""Self-healing: kill each platform component under streaming load; the platform answers again
within 30 s, no job stays IN_PROGRESS, every deployment's status matches its Serve app."""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve
from ray.serve.api import RunTarget
from ray.serve.context import _get_global_client

from raydock import names
from raydock.client import default_deploy_body
from raydock.modelgen import build_model_zip
from raydock.platform import lifecycle
from raydock.platform.jobs import upload_key

from .conftest import ASK_JSON, Live, deploy_and_wait, import_ready, wait_for

HEAL_S = 30
REVOKE_S = 1  # a deleted key stops working on every replica within a second (issue 17)


class StreamLoad:
    """Streams on one deployment in a loop (the data path: Serve's ingress to the replica)."""

    def __init__(self, live, streams: int = 2):
        self.live, self.stop = live, threading.Event()
        self.done = 0
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(streams)]

    def _run(self) -> None:
        body = {"messages": ASK_JSON, "max_tokens": 12, "stream": True}
        headers = {"Authorization": f"Bearer {self.live.key}"}
        with httpx.Client(timeout=60) as http:
            while not self.stop.is_set():
                url = f"{self.live.base_url}/chat/completions"
                with http.stream("POST", url, json=body, headers=headers) as r:
                    text = "".join(r.iter_text())
                if r.status_code != 200 or not text.rstrip().endswith("data: [DONE]"):
                    self.failures.append(f"{r.status_code}: {text[-300:]}")
                elif '"error"' in text:
                    self.failures.append(text[-300:])
                else:
                    self.done += 1

    def __enter__(self) -> StreamLoad:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=90)


def answers(platform, model_id: str) -> bool:
    try:
        with platform.http() as http:
            return (
                http.get("/api/public/health", timeout=5).status_code == 200
                and http.get(f"/api/public/models/{model_id}", timeout=5).status_code == 200
            )
    except httpx.HTTPError:
        return False


def serve_replica_of(app: str):
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith(f"SERVE_REPLICA::{app}#"):
            return ray.get_actor(actor["name"], namespace=actor["namespace"])
    raise AssertionError(f"no replica of {app}")


VICTIMS = {
    "registry": lambda: ray.get_actor(names.REGISTRY, namespace=names.NAMESPACE),
    "lifecycle": lambda: ray.get_actor(names.LIFECYCLE, namespace=names.NAMESPACE),
    # pushes key changes to the replicas; the supervisor (the API replica) creates a new one
    "access hub": lambda: ray.get_actor(names.ACCESS_HUB, namespace=names.NAMESPACE),
    "api replica": lambda: serve_replica_of(names.API_APP),
    "serve controller": lambda: ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve"),
}


def replica_route_status(live, key: str) -> int:
    """What the deployment's own route (its replicas, no gateway) answers a chat with `key`."""
    body = {"messages": ASK_JSON, "max_tokens": 2}
    headers = {"Authorization": f"Bearer {key}"}
    r = httpx.post(f"{live.base_url}/chat/completions", json=body, headers=headers, timeout=60)
    assert r.status_code in (200, 401), r.text
    return r.status_code


def keys_follow(platform, live, killed: float) -> tuple[float, float]:
    """A key created after a kill works on the replica route within HEAL_S of the kill, and
    stops working there within REVOKE_S of its delete (the replicas learn both from the access
    hub). Returns (seconds from the kill until it worked, from its delete until a 401)."""
    dep_id = live.deployment["deploymentId"]
    created = platform.client.post(f"/deployments/{dep_id}/api-keys", json={"name": "after-kill"})
    left = killed + HEAL_S - time.monotonic()
    wait_for(lambda: replica_route_status(live, created["apiKey"]) == 200, left, 0.2)
    works = time.monotonic() - killed
    platform.client.delete(f"/deployments/{dep_id}/api-keys/{created['keyId']}")
    deleted = time.monotonic()
    wait_for(lambda: replica_route_status(live, created["apiKey"]) == 401, REVOKE_S, 0.05)
    return round(works, 1), round(time.monotonic() - deleted, 2)


def test_killing_each_platform_component_heals_within_30_s(platform, ready_model, live):
    healed, keys, model_id = {}, {}, ready_model["modelId"]
    with StreamLoad(live) as load:
        for victim, find in VICTIMS.items():
            ray.kill(find(), no_restart=False)
            killed = time.monotonic()
            time.sleep(0.5)  # let the kill land before asking
            wait_for(lambda: answers(platform, model_id), timeout=HEAL_S, interval=0.5)
            healed[victim] = round(time.monotonic() - killed, 1)
            try:
                keys[victim] = keys_follow(platform, live, killed)
            except AssertionError as exc:
                raise AssertionError(f"keys after a kill of the {victim}: {exc}") from None
        time.sleep(2)  # streams that started during the last kill finish
    print(f"answering again after a kill of (s): {healed}; streams served: {load.done}")
    print(f"(new key works from the kill, deleted key refused from its delete) (s): {keys}")
    assert load.done > 0 and not load.failures, (load.failures[:3], healed)
    assert_consistent(platform)


def test_a_deploy_whose_lifecycle_dies_ends_failed_and_a_redeploys_keeps_the_live_one(
    platform, ready_model
):
    ref = platform.client.deploy(ready_model["modelId"], default_deploy_body("chaos-deploy"))
    ray.kill(VICTIMS["lifecycle"](), no_restart=False)
    job = platform.client.wait_job(ref["dockStatusId"], timeout=60)
    assert job["status"] == "FAILED" and "interrupted" in job["message"]
    dep = platform.client.get(f"/deployments/{ref['deploymentId']}")
    assert dep["status"] == "FAILED" and "interrupted" in dep["failureReason"]
    wait_for(lambda: names.engine_app(ref["deploymentId"]) not in serve.status().applications)
    # and it can be re-triggered, by the new lifecycle
    ref = platform.client.post(f"/deployments/{ref['deploymentId']}/retrigger")
    assert platform.client.wait_job(ref["dockStatusId"], timeout=300)["status"] == "SUCCESS"
    dep_id = ref["deploymentId"]
    key = platform.client.post(f"/deployments/{dep_id}/api-keys", json={"name": "k"})["apiKey"]

    # a redeploy whose lifecycle dies while DEPLOYING: the live version serves on (it was
    # FAILED: an outage of a version that had been serving); a new batch size, so that Serve
    # replaces the replicas (a sampling default alone would reconfigure them at once)
    changed = default_deploy_body("chaos-deploy", scalingParameters={"maxBatchSize": 4})
    ref = platform.client.post(f"/deployments/{dep_id}/redeploy", json=changed)
    assert platform.client.get(f"/deployments/{dep_id}")["status"] == "DEPLOYING"
    ray.kill(VICTIMS["lifecycle"](), no_restart=False)
    job = platform.client.wait_job(ref["dockStatusId"], timeout=60)
    assert job["status"] == "FAILED" and "interrupted" in job["message"]
    dep = platform.client.get(f"/deployments/{dep_id}")
    assert dep["status"] == "DEPLOYED" and dep["config"]["scalingParameters"]["maxBatchSize"] != 4
    body = {"messages": ASK_JSON, "max_tokens": 2}
    url = f"{platform.url}/deployments/{dep_id}/v2/chat/completions"

    def serving() -> bool:
        r = httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        app = serve.status().applications.get(names.engine_app(dep_id))
        return r.status_code == 200 and app is not None and app.status == "RUNNING"

    wait_for(serving, timeout=180, interval=1)
    job = platform.client.post(f"/deployments/{dep_id}/undeploy")
    assert platform.client.wait_job(job["dockStatusId"], timeout=120)["status"] == "SUCCESS"


def test_a_deployed_deployment_whose_app_vanished_is_restored(platform, live):
    # not blocking: the lifecycle may bring the app back before a blocking delete sees it gone
    serve.delete(names.engine_app(live.deployment["deploymentId"]), _blocking=False)
    body = {"messages": ASK_JSON, "max_tokens": 3}
    headers = {"Authorization": f"Bearer {live.key}"}

    def served() -> bool:  # by the restored app: the old one answers while it is deleting
        r = httpx.post(f"{live.base_url}/chat/completions", json=body, headers=headers, timeout=60)
        assert r.status_code in (200, 503), r.text
        app = serve.status().applications.get(names.engine_app(live.deployment["deploymentId"]))
        return r.status_code == 200 and app is not None and app.status == "RUNNING"

    wait_for(served, timeout=180, interval=1)
    assert_consistent(platform)


@pytest.fixture(autouse=True)
def _no_job_left_running(platform):
    yield
    # every job any test here started has ended (the registry's own view of running jobs)
    registry = ray.get_actor(names.REGISTRY, namespace=names.NAMESPACE)
    wait_for(lambda: not ray.get(registry.orphan_jobs.remote([], 0.0)), timeout=60)


def assert_consistent(platform) -> None:
    """Every deployment's status matches its Serve application."""
    apps = serve.status().applications
    for model in platform.client.every("/models", "models", "modelId"):
        for dep in platform.client.get(f"/models/{model['modelId']}/deployments")["deployments"]:
            app = apps.get(names.engine_app(dep["deploymentId"]))
            if dep["status"] == "DEPLOYED":
                assert app is not None and app.status in ("RUNNING", "DEPLOYING"), dep
            elif dep["status"] in ("FAILED", "UNDEPLOYED", "READY_TO_DEPLOY"):
                assert app is None, (dep["deploymentId"], dep["status"], app.status)


def test_a_stream_whose_replica_dies_ends_with_an_error_event(platform, live):
    # the gateway's /v1 path reads the replica through Ray, so it can tell the client
    dep_id = live.deployment["deploymentId"]
    body = {
        "model": dep_id,
        "messages": ASK_JSON,
        "max_tokens": 512,
        "ignore_eos": True,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {live.key}"}
    lines = []
    with httpx.stream(
        "POST", f"{platform.url}/v1/chat/completions", json=body, headers=headers, timeout=120
    ) as r:
        assert r.status_code == 200
        for line in filter(None, r.iter_lines()):
            lines.append(line)
            if len(lines) == 3:  # streaming: now the replica dies
                ray.kill(serve_replica_of(dep_id), no_restart=False)
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert error["code"] == "replica_failed" and error["request_id"]
    # Serve replaces the replica; the deployment serves again
    wait_for(lambda: chat_ok(live), timeout=120, interval=1)


def chat_ok(live) -> bool:
    body = {"messages": ASK_JSON, "max_tokens": 2}
    headers = {"Authorization": f"Bearer {live.key}"}
    r = httpx.post(f"{live.base_url}/chat/completions", json=body, headers=headers, timeout=60)
    return r.status_code == 200


def test_an_app_nobody_owns_is_removed(platform):
    # an app with a deployment's kind of name and route that no deployment owns; and an app
    # of someone else's (raydock may share the cluster), which is left alone
    name = f"dp-{uuid.uuid4()}"

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    def stray(request) -> str:
        return "stray"

    serve.run(stray.bind(), name="their-app", route_prefix="/their-app")  # up first: the
    # stray may be removed before run_many sees its deployment made, which it then waits for
    target = RunTarget(target=stray.bind(), name=name, route_prefix=names.engine_route(name))
    serve.run_many([target], wait_for_applications_running=False)
    started = time.monotonic()
    assert name in serve.status().applications
    wait_for(lambda: name not in serve.status().applications, timeout=HEAL_S, interval=0.5)
    removed = time.monotonic() - started
    lifecycle_actor = ray.get_actor(names.LIFECYCLE, namespace=names.NAMESPACE)
    ray.get(lifecycle_actor.reconcile.remote())  # one more whole pass after the removal
    assert "their-app" in serve.status().applications
    serve.delete("their-app")
    # raydock answers its route again: an unknown deployment
    r = httpx.post(f"{platform.url}/deployments/{name}/v2/chat/completions", json={}, timeout=30)
    assert r.status_code in (401, 404) and r.json()["error"], r.text
    print(f"removed after {removed:.1f} s")


def test_an_interrupted_zip_import_leaves_no_upload_in_the_store(platform, tmp_path):
    """A zip import whose lifecycle died between storing the upload and running its import
    task (as the registry sees it: an import job no worker runs): reconciliation fails the
    import and deletes the upload, which nothing else would read."""
    registry = ray.get_actor(names.REGISTRY, namespace=names.NAMESPACE)
    me = platform.client.get("/me")["userId"]
    begun = ray.get(registry.begin_import.remote("chaos-orphan.zip", "file", me))
    job_id, model_id = begun["job"]["dockStatusId"], begun["model"]["modelId"]
    store = platform.settings.store()
    (tmp_path / "upload.zip").write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip
    store.put_file(tmp_path / "upload.zip", upload_key(job_id))
    job = platform.client.wait_job(job_id, timeout=60)
    assert job["status"] == "FAILED" and "interrupted" in job["message"], job
    assert not store.exists(upload_key(job_id))
    assert platform.client.get(f"/models/{model_id}")["status"] == "IMPORT_FAILED"


def test_a_deployment_whose_app_cannot_come_back_ends_failed_with_why(platform, zips):
    """About a minute: MAX_RESTORES restores, each of them Serve's 3 tries to start a replica.

    With its own model: the test takes the model's files away (from the store and this
    node's cache), so every restore of its app fails for real, in the replica."""
    model = import_ready(platform, build_model_zip(zips / "lost.zip", size="tiny", seed=31))
    dep = deploy_and_wait(platform, model["modelId"], "lost")
    dep_id = dep["deploymentId"]
    stored = ray.get(VICTIMS["registry"]().get_model.remote(model["modelId"]))
    platform.store.delete(stored["artifactUri"])
    shutil.rmtree(Path(platform.settings.cache_location) / stored["metadata"]["artifactDigest"])
    serve.delete(names.engine_app(dep_id), _blocking=False)
    started = time.monotonic()

    def failed() -> dict | None:
        d = platform.client.get(f"/deployments/{dep_id}")
        return d if d["status"] == "FAILED" else None

    dep = wait_for(failed, timeout=180, interval=1)
    print(f"FAILED after {time.monotonic() - started:.1f} s: {dep['failureReason']}")
    assert f"{lifecycle.MAX_RESTORES} restores failed" in dep["failureReason"]
    assert "artifact cannot be used" in dep["failureReason"]  # the replica's own error
    assert names.engine_app(dep_id) not in serve.status().applications
    assert_consistent(platform)
    assert platform.http().delete(f"/api/public/deployments/{dep_id}").status_code == 200
    assert platform.http().delete(f"/api/public/models/{model['modelId']}").status_code == 200


PAIR_UP, PAIR_DOWN = 600, 900  # no autoscaling while a test here runs


@pytest.fixture(scope="module")
def pair(platform, ready_model) -> Live:
    """A deployment that starts with two replicas, each decoding one sequence at a time."""
    dep = deploy_and_wait(
        platform,
        ready_model["modelId"],
        "pair",
        scalingParameters={
            "maxBatchSize": 1,
            "minReplicas": 2,
            "maxReplicas": 3,
            "scaleUpDelay": PAIR_UP,
            "scaleDownDelay": PAIR_DOWN,
        },
    )
    key = platform.client.create_key(dep["deploymentId"])
    yield Live(dep, key, f"{platform.url}/deployments/{dep['deploymentId']}/v2")
    job = platform.client.post(f"/deployments/{dep['deploymentId']}/undeploy")
    assert platform.client.wait_job(job["dockStatusId"], timeout=120)["status"] == "SUCCESS"


def test_the_serve_app_has_the_replicas_and_delays_the_deploy_asked_for(platform, pair):
    dep_id = pair.deployment["deploymentId"]
    app = _get_global_client().get_serve_details()["applications"][dep_id]
    config = app["deployments"]["engine"]["deployment_config"]
    scaling = config["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["initial_replicas"]) == (2, 2)
    assert scaling["max_replicas"] == 3
    assert (scaling["upscale_delay_s"], scaling["downscale_delay_s"]) == (PAIR_UP, PAIR_DOWN)
    assert config["max_ongoing_requests"] == 1 + 8 + 1  # one decoding, 8 waiting, + 1
    replicas = platform.client.get(f"/deployments/{dep_id}")["replicas"]
    assert (replicas["current"], replicas["min"], replicas["max"]) == (2, 2, 3)


class Stream(threading.Thread):
    """One streamed /v1 chat: when its first token came, its content, how it ended."""

    def __init__(self, platform, live, max_tokens: int, n: int = 1):
        super().__init__(daemon=True)
        self.url = f"{platform.url}/v1/chat/completions"
        self.headers = {"Authorization": f"Bearer {live.key}"}
        self.body = {
            "model": live.deployment["deploymentId"],
            "messages": ASK_JSON,
            "max_tokens": max_tokens,
            "n": n,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        self.expected_tokens = max_tokens * n
        self.first_token: float | None = None
        self.status: int | None = None
        self.events: list[dict] = []
        self.done = False
        self.refusal = ""  # the body of a non-200 answer
        self.ended = 0.0

    def run(self) -> None:
        with httpx.stream("POST", self.url, json=self.body, headers=self.headers, timeout=120) as r:
            self.status = r.status_code
            if r.status_code != 200:
                self.refusal = r.read().decode()
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    self.done = True
                elif line.startswith("data: "):
                    event = json.loads(line.removeprefix("data: "))
                    self.events.append(event)
                    if any(c["delta"].get("content") for c in event.get("choices", [])):
                        self.first_token = self.first_token or time.monotonic()
        self.ended = time.monotonic()

    def served(self) -> bool:
        finish = [c["finish_reason"] for e in self.events for c in e.get("choices", [])]
        errors = [e for e in self.events if "error" in e]
        usage = [e["usage"] for e in self.events if e.get("usage")]
        return (
            self.status == 200
            and self.done
            and not errors
            and finish[-1:] == ["length"]
            and [u["completion_tokens"] for u in usage] == [self.expected_tokens]
        )


def replicas_of(app: str) -> list:
    return [
        ray.get_actor(a["name"], namespace=a["namespace"])
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{app}#")
    ]


def test_v1_requests_without_a_token_move_to_another_replica_when_theirs_dies(platform, pair):
    dep_id = pair.deployment["deploymentId"]
    replicas = replicas_of(dep_id)
    assert len(replicas) == 2

    def ongoing() -> list[int]:
        return ray.get([r.get_num_ongoing_requests.remote() for r in replicas])

    # a long stream decoding on each replica (one sequence at a time; its 2 choices decode one
    # after the other, which leaves seconds for the rest): Serve picks the replica, so more
    # are sent until both decode one; the ones after the first on a replica wait, as do the
    # short ones sent next
    long: list[Stream] = []
    while min(ongoing()) == 0:
        assert len(long) < 8, ongoing()
        long.append(Stream(platform, pair, 512, n=2))
        long[-1].start()
        wait_for(lambda: sum(ongoing()) == len(long), timeout=10, interval=0.02)
    short = [Stream(platform, pair, 8) for _ in range(6)]
    for s in short:
        s.start()
    wait_for(lambda: sum(ongoing()) == len(long) + len(short), timeout=10, interval=0.02)
    counts = ongoing()
    victim = replicas[counts.index(max(counts))]
    ray.kill(victim, no_restart=False)
    killed = time.monotonic()
    streams = long + short
    for s in streams:
        s.join(timeout=120)
    waiting = [s for s in streams if s.first_token is None or s.first_token > killed]
    print(
        f"ongoing per replica at the kill: {counts}; without a token then: {len(waiting)}; "
        f"the long streams ended {[round(s.ended - killed, 1) for s in long]} s after it"
    )
    assert len(waiting) >= max(counts) - 1  # those waiting on the victim, at least
    # every request that had no token yet was served in full, by the other replica
    unserved = [(s.status, s.refusal, s.events[-1:]) for s in waiting if not s.served()]
    assert not unserved, unserved
    # only the stream the victim was decoding ended otherwise: with an error event
    (cut,) = [s for s in streams if not s.served()]
    assert cut.status == 200 and cut.first_token < killed
    assert cut.events[-1]["error"]["code"] == "replica_failed", cut.events[-1]
