"""Replica cold start from S3 vs from a warm node cache, and API key revocation latency.

    python -m benchmarks.artifacts [--rounds 3] [--size small] [--revocations 20]

Starts moto's S3 server on 127.0.0.1 and an embedded raydock whose artifact store is a bucket
on it. Imports one generated model, then alternates rounds of: deploy with the node cache
emptied (the replica downloads the model from S3) and deploy with the cache warm; each time
from the deploy call to DEPLOYED, and the replica's own fetch time read from its log line.
Then, on a deployment of two replicas, deletes API keys one by one and polls both inference
paths (the replicas' route and the gateway's /v1) every 5 ms until the key is refused 10
times in a row on each: the revocation latency. Writes benchmarks/out/artifacts.{json,md}.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.serving import save


def deploy_seconds(client, model_id: str, name: str, **scaling) -> tuple[float, str]:
    from raydock.client import default_deploy_body

    started = time.monotonic()
    ref = client.deploy(model_id, default_deploy_body(name, scalingParameters=scaling))
    job = client.wait_job(ref["dockStatusId"], timeout=900)
    assert job["status"] == "SUCCESS", job
    return time.monotonic() - started, ref["deploymentId"]


def undeploy(client, dep_id: str) -> None:
    client.wait_job(client.post(f"/deployments/{dep_id}/undeploy")["dockStatusId"])


def refused_after(url: str, key: str, body: dict, deadline_s: float = 10) -> float | None:
    """Seconds until `key` is refused 10 times in a row at `url` (None: not within deadline)."""
    started, streak = time.monotonic(), 0
    with httpx.Client(timeout=10, headers={"Authorization": f"Bearer {key}"}) as http:
        while time.monotonic() - started < deadline_s:
            status = http.post(url, json=body).status_code
            streak = streak + 1 if status == 401 else 0
            if streak == 1:
                first = time.monotonic() - started
            if streak == 10:
                return first
            time.sleep(0.005)
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", default="small")
    parser.add_argument("--revocations", type=int, default=20)
    args = parser.parse_args()

    import ray

    from raydock.client import Client
    from raydock.config import load_settings
    from raydock.modelgen import build_model_zip
    from raydock.platform.bootstrap import connect, free_port, start_platform, stop_platform
    from tests.s3_server import s3_server

    home = Path(tempfile.mkdtemp(prefix="raydock-bench-artifacts-"))
    with s3_server() as s3:
        settings = load_settings(
            home=str(home),
            port=free_port(),
            artifact_root=f"s3://{s3.bucket}/raydock",
            s3_endpoint_url=s3.endpoint_url,
        )
        connect(settings, num_cpus=8, include_dashboard=False)
        try:
            info = start_platform(settings)
            client = Client(info["url"], info["admin_key"])
            zip_path = build_model_zip(home / "model.zip", size=args.size)
            ref = client.import_zip(zip_path)
            assert client.wait_job(ref["dockStatusId"], timeout=600)["status"] == "SUCCESS"
            model = client.get(f"/models/{ref['modelId']}")
            size_mb = model["metadata"]["total_bytes"] / 2**20

            cold, warm = [], []
            for r in range(args.rounds):
                shutil.rmtree(Path(settings.cache_location).expanduser(), ignore_errors=True)
                seconds, dep_id = deploy_seconds(client, model["modelId"], f"cold-{r}")
                cold.append(seconds)
                undeploy(client, dep_id)
                seconds, dep_id = deploy_seconds(client, model["modelId"], f"warm-{r}")
                warm.append(seconds)
                undeploy(client, dep_id)
                print(f"round {r}: cold {cold[-1]:.2f} s, warm {warm[-1]:.2f} s", flush=True)

            tiny = client.import_zip(build_model_zip(home / "tiny.zip", size="tiny"))
            client.wait_job(tiny["dockStatusId"], timeout=300)
            _, dep_id = deploy_seconds(
                client, tiny["modelId"], "revocation", minReplicas=2, maxReplicas=2
            )
            routes = {
                "replica route": f"{info['url']}/deployments/{dep_id}/v2/chat/completions",
                "gateway /v1": f"{info['url']}/v1/chat/completions",
            }
            body = {"messages": []}  # authorized first, then refused as invalid: cheap
            latencies: dict[str, list[float]] = {name: [] for name in routes}
            for _ in range(args.revocations):
                key = client.post(f"/deployments/{dep_id}/api-keys", json={"name": "k"})
                for url in routes.values():
                    auth = {"Authorization": f"Bearer {key['apiKey']}"}
                    assert httpx.post(url, json=body, headers=auth).status_code == 400
                client.delete(f"/deployments/{dep_id}/api-keys/{key['keyId']}")
                for name, url in routes.items():
                    latencies[name].append(refused_after(url, key["apiKey"], body))
        finally:
            stop_platform()
            ray.shutdown()

    result = {
        "model_mb": round(size_mb, 1),
        "cold_start_s": cold,
        "warm_start_s": warm,
        "cold_median_s": statistics.median(cold),
        "warm_median_s": statistics.median(warm),
        "revocation_ms": {
            name: {
                "median": statistics.median(v) * 1000,
                "max": max(v) * 1000,
                "n": len(v),
            }
            for name, v in latencies.items()
            if all(x is not None for x in v)
        },
        "revocations_not_seen": {n: v.count(None) for n, v in latencies.items()},
    }
    lines = [
        f"model {args.size}: {size_mb:.0f} MiB; deploy → DEPLOYED, {args.rounds} rounds",
        f"cold (from S3): median {result['cold_median_s']:.2f} s  {cold}",
        f"warm (node cache): median {result['warm_median_s']:.2f} s  {warm}",
    ]
    for name, v in result["revocation_ms"].items():
        lines.append(f"revocation, {name}: median {v['median']:.1f} ms, max {v['max']:.1f} ms")
    save("artifacts", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
