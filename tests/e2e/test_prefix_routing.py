"""Prefix-cache-aware routing as users see it: a 2-replica vLLM deployment, a workload of 4
long shared prefixes x many users, and each replica's request and prefix-cache figures read
from /metrics (raydock_replica_requests_total, raydock_prefix_cache_*_tokens_total).

Needs about 2 minutes: a 2-replica vLLM start (the redeploy with the switch off keeps the
replicas).
"""

from __future__ import annotations

import random
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.e2e.conftest import deploy_and_wait, wait_for
from tests.e2e.test_engines import needs_vllm, optimized, undeploy
from tests.e2e.test_metering import scrape

REQUESTS = "raydock_replica_requests_total"
HITS = "raydock_prefix_cache_hit_tokens_total"
QUERIES = "raydock_prefix_cache_queried_tokens_total"
WORDS = ("lighthouse", "keeper", "fog", "harbour", "lantern", "tide", "rocks", "gull", "night")
USERS = 6


def shared_prefixes(n: int = 4, chars: int = 1200, first: int = 0) -> list[str]:
    """n long system prompts that differ from their first words on."""
    rng = random.Random(7 + first)
    return [
        f"Document {i}: " + " ".join(rng.choice(WORDS) for _ in range(chars // 6))
        for i in range(first, first + n)
    ]


def per_replica(samples: dict, name: str, deployment_id: str) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for (metric, labels), v in samples.items():
        labels = dict(labels)
        if metric == name and labels.get("deployment") == deployment_id:
            out[labels["replica"]] += v
    return out


def run_workload(
    platform, dep: dict, key: str, openai_path: bool = False, prefixes: list[str] | None = None
) -> dict[int, dict[str, float]]:
    """Each prefix's users ask their own question (the first alone, then 4 at a time, through the
    deployment's own route, i.e. HAProxy); returns, per prefix, the requests each replica
    took for it (read from /metrics, one prefix at a time). `openai_path`: through the
    gateway's /v1 (its DeploymentHandle) instead."""
    dep_id = dep["deploymentId"]
    url = f"{platform.url}/deployments/{dep_id}/v2/chat/completions"
    if openai_path:
        url = f"{platform.url}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {key}"}
    taken: dict[int, dict[str, float]] = {}
    with httpx.Client(timeout=120) as http, ThreadPoolExecutor(4) as pool:

        def ask(system: str, user: int) -> None:
            body = {
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": f"User {user}: what do you see?"},
                ],
                "model": dep_id,
                "max_tokens": 2,
                "temperature": 0,
            }
            r = http.post(url, json=body, headers=headers)
            assert r.status_code == 200, r.text

        def total() -> float:
            return sum(per_replica(scrape(platform), REQUESTS, dep_id).values())

        for i, system in enumerate(prefixes or shared_prefixes()):
            before = per_replica(scrape(platform), REQUESTS, dep_id)
            ask(system, 0)  # the prefix's first user fills a replica's cache with it
            list(pool.map(ask, [system] * (USERS - 1), range(1, USERS)))
            goal = sum(before.values()) + USERS
            wait_for(lambda goal=goal: total() >= goal, timeout=30)
            after = per_replica(scrape(platform), REQUESTS, dep_id)
            taken[i] = {r: n - before.get(r, 0) for r, n in after.items() if n > before.get(r, 0)}
    return taken


def deploy_body(affinity: bool | None) -> dict:
    scaling = {"minReplicas": 2, "maxReplicas": 2, "maxBatchSize": 8}
    routing = {} if affinity is None else {"prefixCacheAffinity": affinity}
    return {
        **optimized("vllm", ""),
        "scalingParameters": scaling,
        "routingParameters": routing,
    }


@needs_vllm
@pytest.mark.timeout(900)
def test_shared_prefixes_stay_on_one_replica_and_spread_when_switched_off(platform, ready_model):
    dep = deploy_and_wait(platform, ready_model["modelId"], "prefix-routing", **deploy_body(None))
    dep_id = dep["deploymentId"]
    key = platform.client.create_key(dep_id, "prefix-routing")
    # HAProxy takes the app's route server into its config a moment after the app is up
    # (until then Ray load-balances, README "Prefix-cache-aware routing"): warm-up prefixes
    # until one is routed with affinity
    warmed = any(
        len(run_workload(platform, dep, key, prefixes=[warmup])[0]) == 1
        for warmup in shared_prefixes(10, first=100)
    )
    assert warmed, "none of 10 warm-up prefixes was routed with affinity"
    before = scrape(platform)

    # on (vLLM's default): every user of a prefix lands on the replica that holds it
    taken = run_workload(platform, dep, key)
    assert all(len(replicas) == 1 for replicas in taken.values()), taken
    assert all(sum(r.values()) == USERS for r in taken.values()), taken
    # new prefixes spread over both replicas (the one holding fewer prefixes takes the next)
    assert len({next(iter(r)) for r in taken.values()}) == 2, taken
    # and vLLM's prefix cache answered most of each prompt there
    after = scrape(platform)
    hits = sum(per_replica(after, HITS, dep_id).values()) - sum(
        per_replica(before, HITS, dep_id).values()
    )
    queried = sum(per_replica(after, QUERIES, dep_id).values()) - sum(
        per_replica(before, QUERIES, dep_id).values()
    )
    print(f"affinity on: requests per prefix and replica {taken}; prefix cache {hits}/{queried}")
    assert queried > 0 and hits / queried > 0.5, (hits, queried)
    # /v1 reaches the replicas through the gateway's DeploymentHandle: the same rule there
    via_gateway = run_workload(platform, dep, key, openai_path=True, prefixes=shared_prefixes(2))
    assert all(len(replicas) == 1 for replicas in via_gateway.values()), via_gateway

    # off: the same workload spreads over the replicas as Serve balances it
    body = platform.client.get(f"/deployments/{dep_id}")["config"]
    body |= {"routingParameters": {"prefixCacheAffinity": False}, "isDeployedPreviously": True}
    ref = platform.client.post(f"/deployments/{dep_id}/redeploy", json=body)
    job = platform.client.wait_job(ref["dockStatusId"], timeout=600)
    assert job["status"] == "SUCCESS"
    assert job["message"] == "deployed: 2 replicas kept running (the change was applied to them)"
    spread = run_workload(platform, dep, key)
    print(f"affinity off: requests per prefix and replica {spread}")
    assert sum(len(replicas) == 2 for replicas in spread.values()) >= 3, spread
    # a routing change only: Serve reconfigured the replicas that ran, none was replaced
    serving = {replica for replicas in taken.values() for replica in replicas}
    assert {replica for replicas in spread.values() for replica in replicas} == serving
    undeploy(platform, dep)
