"""raydock on a cluster of several nodes, its artifacts in S3 (moto's server on 127.0.0.1).

The head runs the platform (registry, lifecycle, access hub, API: pinned there) and no engine
replica (0 CPUs); the workers cannot see raydock's home, so every replica, import, conversion
and export proves it needs no file of the head and no database. The tests run in order and
share one platform.
"""

from __future__ import annotations

import io
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve

from raydock.client import ApiFailure, Client, default_deploy_body
from raydock.config import SettingsError, load_settings
from raydock.modelgen import build_model_zip
from raydock.platform.bootstrap import connect, free_port, start_platform, stop_platform
from tests.e2e.conftest import Platform, import_ready, wait_for

ASK = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def platform(cluster, mn_home, s3):
    if ray.is_initialized():
        pytest.skip("this process is connected to another Ray cluster: run tests/multinode alone")
    settings = load_settings(
        home=str(mn_home),
        port=free_port(),
        ray_address=cluster.address,
        artifact_root=f"s3://{s3.bucket}/raydock",
        s3_endpoint_url=s3.endpoint_url,
        max_archive_bytes=20 * 2**20,
    )
    connect(settings)
    info = start_platform(settings)
    yield Platform(settings, info["url"], info["admin_key"], Client(info["url"], info["admin_key"]))
    # a cluster raydock joined: its own apps go, someone else's stay
    serve.run(_theirs.bind(), name="their-app", route_prefix="/their-app")
    stop_platform(own_cluster=False)
    assert list(serve.status().applications) == ["their-app"]
    ray.shutdown()


@serve.deployment(ray_actor_options={"num_cpus": 0})
def _theirs(request) -> str:
    return "theirs"


def test_the_secret_key_must_be_the_head_nodes(platform, monkeypatch):
    """The API replica reads RAYDOCK_SECRET_KEY on the head, from `ray start`'s environment:
    a key set only in the shell that joins would seal and open tokens with two keys."""
    monkeypatch.setenv("RAYDOCK_SECRET_KEY", "k" * 44)
    with pytest.raises(SettingsError, match="not in the head node's `ray start` environment"):
        start_platform(platform.settings)


@pytest.fixture(scope="module")
def models(platform, tmp_path_factory) -> dict[str, dict]:
    """Two models, one through each upload path."""
    zips = tmp_path_factory.mktemp("zips")
    return {
        "multipart": import_ready(platform, build_model_zip(zips / "mn-a.zip", seed=1)),
        "chunked": import_ready(platform, build_model_zip(zips / "mn-b.zip", seed=2), chunked=True),
    }


def stored(s3, area: str = "") -> list[str]:
    return [
        k
        for k in s3.client().list_objects_v2(Bucket=s3.bucket).get("Contents", [])
        if k["Key"].startswith(f"raydock/{area}")
    ]


def replica_nodes(platform, dep_id: str) -> dict[str, int]:
    return platform.client.get(f"/deployments/{dep_id}")["replicas"]["nodes"]


def chat(platform, dep_id: str, key: str, path: str = "v2") -> httpx.Response:
    if path == "v1":
        url, body = f"{platform.url}/v1/chat/completions", {"model": dep_id}
    else:
        url, body = f"{platform.url}/deployments/{dep_id}/v2/chat/completions", {}
    return httpx.post(
        url,
        json={**body, "messages": ASK, "max_tokens": 4},
        headers={"Authorization": f"Bearer {key}"},
        timeout=120,
    )


def head_uploads(platform) -> list[Path]:
    """Files in the head's upload staging dir (uploads arrive there, then go to the store)."""
    return [p for p in platform.settings.uploads_path.rglob("*") if p.is_file()]


def refused_after(platform, dep_id: str, key: str, in_a_row: int = 8) -> dict[str, float]:
    """Poll both paths (interleaved) with a key deleted just now until each answered
    `in_a_row` 401s in a row (so from either replica: the proxy and the gateway spread
    requests over them); per path, seconds from now until the answer of the first 401 of that
    run (a 200 after a 401, from a replica that still knows the key, starts the count again)."""
    deleted = time.monotonic()
    refused: dict[str, float] = {}
    run = {"v2": 0, "v1": 0}
    while min(run.values()) < in_a_row and time.monotonic() - deleted < 10:
        for path in (p for p, n in run.items() if n < in_a_row):
            code = chat(platform, dep_id, key, path).status_code
            assert code in (200, 401), code
            if code == 200:
                run[path] = 0
                continue
            if run[path] == 0:
                refused[path] = round(time.monotonic() - deleted, 3)
            run[path] += 1
    assert min(run.values()) >= in_a_row, (run, refused)
    return refused


def deploy(platform, model_id: str, name: str, **overrides) -> dict:
    ref = platform.client.deploy(model_id, default_deploy_body(name, **overrides))
    job = platform.client.wait_job(ref["dockStatusId"], timeout=900)
    dep = platform.client.get(f"/deployments/{ref['deploymentId']}")
    return {**dep, "job": job}


def test_a_failed_import_leaves_nothing_in_the_bucket(platform, s3, tmp_path):
    good = build_model_zip(tmp_path / "mn-good.zip", seed=9)
    bad = tmp_path / "mn-bad.zip"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w") as zout:
        for item in zin.infolist():
            if item.filename != "config.json":
                zout.writestr(item, zin.read(item))
    ref = platform.client.import_zip(bad, chunked=True)
    assert platform.client.wait_job(ref["dockStatusId"], timeout=300)["status"] == "FAILED"
    model = platform.client.get(f"/models/{ref['modelId']}")
    assert "config.json is missing" in model["error"], model["error"]
    assert stored(s3) == []  # neither the upload nor half a model
    assert head_uploads(platform) == []  # nor the head's copy of the upload


def test_both_upload_paths_import_into_s3(platform, models, s3):
    for model in models.values():
        keys = [o["Key"] for o in stored(s3, f"models/{model['modelId']}/")]
        assert any(k.endswith("model.safetensors") for k in keys), keys
        assert any(k.endswith("raydock-manifest.json") for k in keys)
    assert not stored(s3, "uploads/")  # spent uploads are gone
    # nothing on the head's disk but the database and the (empty) upload staging dir
    assert not (platform.settings.home_path / "artifacts").exists()
    assert head_uploads(platform) == []


def test_a_replica_larger_than_any_node_is_refused(platform, models):
    """The workers have 2 CPUs each: the cluster's 4 would hold cpu-large (4 CPUs), no node
    does, and Ray would wait for one without end."""
    hardware = platform.client.get("/hardware")
    assert hardware["cpu-medium"]["available"] and not hardware["cpu-large"]["available"]
    with pytest.raises(ApiFailure) as refused:
        platform.client.deploy(
            models["multipart"]["modelId"], default_deploy_body("mn-too-big", "cpu-large")
        )
    assert refused.value.status == 400
    error = refused.value.body["error"]
    assert error["param"] == "deviceType", error
    assert "needs 4 CPUs on one node; the largest node has 2 CPUs" in error["message"]


def test_replicas_serve_from_workers_and_keys_are_revoked_within_a_second(
    platform, models, cluster
):
    dep = deploy(platform, models["multipart"]["modelId"], "mn-chat")
    assert dep["job"]["status"] == "SUCCESS", dep
    dep_id = dep["deploymentId"]
    workers = {w.node_id for w in cluster.alive_workers}
    assert set(replica_nodes(platform, dep_id)) <= workers  # never on the head
    key = platform.client.create_key(dep_id)
    for path in ("v2", "v1"):
        r = chat(platform, dep_id, key, path)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"], r.text

    created = platform.client.post(f"/deployments/{dep_id}/api-keys", json={"name": "short"})
    assert chat(platform, dep_id, created["apiKey"]).status_code == 200
    platform.client.delete(f"/deployments/{dep_id}/api-keys/{created['keyId']}")
    revoked_at = time.monotonic()
    for path in ("v2", "v1"):
        wait_for(
            lambda p=path: chat(platform, dep_id, created["apiKey"], p).status_code == 401,
            timeout=1,
            interval=0.05,
        )
    assert time.monotonic() - revoked_at <= 2  # both paths, each within its second


def test_two_replicas_across_nodes_and_a_lost_node(platform, models, cluster):
    dep_id = platform.client.get(f"/models/{models['multipart']['modelId']}/deployments")[
        "deployments"
    ][0]["deploymentId"]
    ref = platform.client.post(
        f"/deployments/{dep_id}/redeploy",
        json=default_deploy_body("mn-chat", scalingParameters={"minReplicas": 2, "maxReplicas": 2}),
    )
    assert platform.client.wait_job(ref["dockStatusId"], timeout=900)["status"] == "SUCCESS"
    nodes = wait_for(lambda: len(n := replica_nodes(platform, dep_id)) == 2 and n, timeout=60)

    # a new key works at once on both paths (on either replica: several requests each)
    key = platform.client.create_key(dep_id, "lost-node")
    for path in ("v2", "v1"):
        codes = [chat(platform, dep_id, key, path).status_code for _ in range(4)]
        assert codes == [200] * 4, (path, codes)
    # a deleted key stops working on both replicas, on both paths, within a second
    short = platform.client.post(f"/deployments/{dep_id}/api-keys", json={"name": "two-nodes"})
    for path in ("v2", "v1"):
        assert chat(platform, dep_id, short["apiKey"], path).status_code == 200
    platform.client.delete(f"/deployments/{dep_id}/api-keys/{short['keyId']}")
    refused = refused_after(platform, dep_id, short["apiKey"])
    print(f"deleted key refused on two replicas of two nodes after (s): {refused}")
    assert all(seconds <= 1 for seconds in refused.values()), refused

    # a key's limit holds for both replicas together: 3 requests a minute, then 429 on both
    # paths (each path spreads its requests over the replicas, on two nodes)
    limited = platform.client.post(
        f"/deployments/{dep_id}/api-keys",
        json={"name": "three-a-minute", "limits": {"requestsPerMinute": 3}},
    )["apiKey"]
    with ThreadPoolExecutor(3) as pool:  # concurrent: the replicas share the load
        codes = list(
            pool.map(lambda p: chat(platform, dep_id, limited, p).status_code, ["v2", "v1", "v2"])
        )
    assert codes == [200, 200, 200], codes
    later = [chat(platform, dep_id, limited, p) for p in ("v2", "v1", "v2", "v1")]
    assert [r.status_code for r in later] == [429] * 4, [r.text for r in later]
    assert all(r.headers["retry-after"] for r in later)

    # lose the node of one replica: the other keeps answering, Serve places a new one
    lost = next(w for w in cluster.alive_workers if w.node_id in nodes)
    cluster.remove_worker(lost)
    try:
        cluster.wait_node_dead(lost, timeout=30)
        started = time.monotonic()
        wait_for(lambda: chat(platform, dep_id, key).status_code == 200, timeout=60, interval=0.5)
        serving_again = time.monotonic() - started

        seen: list[dict] = []  # every view until the replacement runs

        def replaced() -> dict | None:  # Serve notices the lost replica at its next health check
            d = platform.client.get(f"/deployments/{dep_id}")
            seen.append(d)
            nodes = d["replicas"]["nodes"]
            return d if lost.node_id not in nodes and sum(nodes.values()) == 2 else None

        try:
            view = wait_for(replaced, timeout=120, interval=0.2)
        except AssertionError:
            raise AssertionError(
                f"not replaced: {seen[-1]['status']} {seen[-1]['replicas']}"
            ) from None
        assert view["status"] == "DEPLOYED" and view["replicas"]["current"] == 2
        print(f"serving again {serving_again:.1f} s after the node was declared dead")

        # while Serve counted a replica missing, the view said why (Serve's words)
        missing = [
            d["replicas"] for d in seen if d["replicas"]["current"] < d["replicas"]["target"]
        ]
        views = {(r["current"], r["target"], r["message"]) for r in (d["replicas"] for d in seen)}
        assert missing, f"no view showed the replica missing before its replacement ran: {views}"
        print(f"{len(missing)} views with a replica missing, e.g. {missing[0]}")
        for replicas in missing:
            assert replicas["current"] == 1 and replicas["target"] == 2, replicas
            assert replicas["applicationStatus"] == "UNHEALTHY", replicas
            message = replicas["message"] or ""
            assert "A replica's health check failed" in message, replicas
        ok = sum(chat(platform, dep_id, key).status_code == 200 for _ in range(6))
        assert ok == 6
    finally:  # back to two workers and no replicas for the next tests, whatever happened
        cluster.add_worker(num_cpus=2)
        platform.client.wait_job(
            platform.client.post(f"/deployments/{dep_id}/undeploy")["dockStatusId"]
        )


def test_ctranslate2_converts_on_a_worker_and_serves(platform, models, cluster, s3):
    dep = deploy(
        platform,
        models["chunked"]["modelId"],
        "mn-ct2",
        optimizationInfo={"optimizationType": "ctranslate2", "quantizationType": "int8"},
    )
    assert dep["job"]["status"] == "SUCCESS", dep
    assert stored(s3, "optimized/")  # the conversion went to the store, not a node's disk
    key = platform.client.create_key(dep["deploymentId"])
    r = chat(platform, dep["deploymentId"], key)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"], r.text
    assert set(replica_nodes(platform, dep["deploymentId"])) <= {
        w.node_id for w in cluster.alive_workers
    }
    job = platform.client.post(f"/deployments/{dep['deploymentId']}/undeploy")
    platform.client.wait_job(job["dockStatusId"])


def test_export_downloads_through_a_presigned_url(platform, models, s3):
    model_id = models["chunked"]["modelId"]
    job = platform.client.post(f"/models/{model_id}/export")
    done = platform.client.wait_job(job["dockStatusId"], timeout=300)
    assert done["status"] == "SUCCESS", done
    url = done["response"]["downloadUrl"]
    assert url.startswith(s3.endpoint_url) and "Signature" in url  # presigned, no raydock key
    r = httpx.get(url, timeout=60)
    assert r.status_code == 200
    names = zipfile.ZipFile(io.BytesIO(r.content)).namelist()
    assert {"config.json", "model.safetensors", "deployconfig.json"} <= set(names)
    assert "raydock-manifest.json" not in names


def test_a_corrupted_artifact_fails_the_deploy_with_its_reason(platform, s3, tmp_path):
    model = import_ready(platform, build_model_zip(tmp_path / "mn-corrupt.zip", seed=7))
    key = f"raydock/models/{model['modelId']}/model.safetensors"
    body = s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read()
    flipped = bytes([body[-1] ^ 0xFF])
    s3.client().put_object(Bucket=s3.bucket, Key=key, Body=body[:-1] + flipped)
    dep = deploy(platform, model["modelId"], "mn-corrupt")
    assert dep["job"]["status"] == "FAILED"
    assert dep["status"] == "FAILED"
    assert "model.safetensors" in dep["failureReason"], dep["failureReason"]
    assert "sha256" in dep["failureReason"] or "corrupt" in dep["failureReason"].lower()


def test_a_missing_artifact_fails_the_deploy_with_its_reason(platform, s3, tmp_path):
    # a seed of its own: no node has these weights in its cache
    model = import_ready(platform, build_model_zip(tmp_path / "mn-missing.zip", seed=8))
    key = f"raydock/models/{model['modelId']}/model.safetensors"
    s3.client().delete_object(Bucket=s3.bucket, Key=key)
    dep = deploy(platform, model["modelId"], "mn-missing")
    assert dep["job"]["status"] == "FAILED", dep["job"]
    assert dep["status"] == "FAILED"
    reason = dep["failureReason"]
    assert "the model artifact cannot be used" in reason, reason
    assert "file 'model.safetensors' listed in its manifest is missing from s3://" in reason
    # and no replica is left retrying: the application is gone
    view = f"/deployments/{dep['deploymentId']}"
    wait_for(lambda: platform.client.get(view)["replicas"]["applicationStatus"] is None)


def test_deleting_the_models_empties_the_bucket(platform, s3):
    for model in platform.client.get("/models")["models"]:
        r = platform.http().delete(f"/api/public/models/{model['modelId']}")
        assert r.status_code == 200, r.text
    assert stored(s3) == []
