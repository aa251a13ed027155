"""Prefix-cache-aware routing on vs off: two 2-replica vLLM deployments of one model in one
embedded raydock, the same shared-prefix workload on each, alternating rounds.

    python -m benchmarks.prefix_routing [--size small] [--rounds 3] [--prefixes 8]
                                        [--prefix-words 1000] [--users 8] [--concurrency 4]
                                        [--batch 4] [--max-tokens 16] [--device cpu-small]

Workload of a round: `--prefixes` long system prompts (new ones every round, so no cache
carries over from the last) x `--users` users, each asking their own short question, sent in
random order at `--concurrency` through the deployment's own route (HAProxy, then the route
server when routing is on). The two deployments are identical but for
`routingParameters.prefixCacheAffinity`; each round drives one then the other (the first
alternates). Reported per arm: TTFT p50/p95, output tok/s, and vLLM's prefix-cache hit
ratio (from /metrics), medians of rounds; the verdict is on TTFT p50 (target: affinity
>= 30 % lower).

The setting where routing matters: each replica's KV cache (maxBatchSize x 2,048 tokens,
as raydock sizes it: 8,192 here) holds about half the prefixes (8 x ~1,400 tokens), so
spread over both replicas every prefix competes for every cache, while with affinity each
replica keeps its half.
Writes benchmarks/out/prefix_routing.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from benchmarks.loadgen import WORDS, _run_level, http_one, summarize
from benchmarks.serving import deploy_body, machine, save

ARMS = ("on", "off")
TARGET = 0.30  # TTFT p50 at least 30 % lower with affinity


def workload(round_no: int, args) -> list[list[dict]]:
    """This round's requests (messages each), shuffled: prefixes x users."""
    rng = random.Random(1000 + round_no)
    prefixes = [
        f"Round {round_no} document {p}: "
        + " ".join(rng.choice(WORDS) for _ in range(args.prefix_words))
        for p in range(args.prefixes)
    ]
    requests = [
        [
            {"role": "system", "content": prefix},
            {"role": "user", "content": f"User {u}: summarise part {u} please."},
        ]
        for prefix in prefixes
        for u in range(args.users)
    ]
    rng.shuffle(requests)
    return requests


async def drive(base: str, key: str, requests: list[list[dict]], args) -> dict[str, Any]:
    url = base + "/chat/completions"
    connector = aiohttp.TCPConnector(limit=args.concurrency + 4)
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(
        connector=connector, headers=headers, timeout=aiohttp.ClientTimeout(total=600)
    ) as session:
        samples, wall = await _run_level(
            # unseeded: see loadgen.SEEDED
            lambda i: http_one(session, url, requests[i], args.max_tokens, None),
            args.concurrency,
            len(requests),
        )
    return summarize(samples, wall, args.concurrency)


def cache_figures(url: str, dep_id: str) -> tuple[float, float, dict[str, float]]:
    """(prefix-cache hit tokens, queried tokens, requests per replica) of a deployment."""
    from prometheus_client.parser import text_string_to_metric_families

    hits = queried = 0.0
    per_replica: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in family.samples:
            if s.labels.get("deployment") != dep_id:
                continue
            if s.name == "raydock_prefix_cache_hit_tokens_total":
                hits += s.value
            elif s.name == "raydock_prefix_cache_queried_tokens_total":
                queried += s.value
            elif s.name == "raydock_replica_requests_total":
                per_replica[s.labels["replica"]] = s.value
    return hits, queried, per_replica


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="small", choices=["tiny", "small"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prefixes", type=int, default=8)
    p.add_argument("--prefix-words", type=int, default=1000, help="~1.37 tokens a word")
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--batch", type=int, default=4, help="maxBatchSize (sizes the KV cache)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--device", default="cpu-small")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()

    import ray

    from raydock.client import Client
    from raydock.config import load_settings
    from raydock.modelgen import build_model_zip
    from raydock.platform.bootstrap import connect, free_port, start_platform, stop_platform

    zip_path = build_model_zip(Path(tempfile.mkdtemp()) / f"bench-{args.size}.zip", args.size)
    settings = load_settings(
        home=tempfile.mkdtemp(prefix="raydock-bench-prefix-"), port=args.port or free_port()
    )
    connect(settings, include_dashboard=False, address="local")
    rounds: list[dict[str, Any]] = []
    try:
        info = start_platform(settings)
        client = Client(info["url"], info["admin_key"])
        ref = client.import_zip(zip_path, chunked=True)
        assert client.wait_job(ref["dockStatusId"], timeout=900)["status"] == "SUCCESS"
        deps: dict[str, dict[str, str]] = {}
        for arm in ARMS:
            body = deploy_body(
                args.device,
                args.batch,
                f"prefix-{arm}",
                optimizationInfo={"optimizationType": "vllm", "quantizationType": ""},
                routingParameters={"prefixCacheAffinity": arm == "on"},
            )
            body["scalingParameters"] |= {"minReplicas": 2, "maxReplicas": 2}
            dep = client.deploy(ref["modelId"], body)
            job = client.wait_job(dep["dockStatusId"], timeout=900)
            assert job["status"] == "SUCCESS", job
            deps[arm] = {"id": dep["deploymentId"], "key": client.create_key(dep["deploymentId"])}
        for arm in ARMS:  # warm-up: every replica's first request (short, no shared prefix)
            base = f"{info['url']}/deployments/{deps[arm]['id']}/v2"
            warm = [[{"role": "user", "content": f"hello {i}"}] for i in range(8)]
            asyncio.run(drive(base, deps[arm]["key"], warm, args))
        for r in range(args.rounds):
            requests = workload(r, args)
            order = list(ARMS) if r % 2 == 0 else list(reversed(ARMS))
            rnd: dict[str, Any] = {"round": r + 1, "order": order}
            for arm in order:
                dep_id = deps[arm]["id"]
                before = cache_figures(info["url"], dep_id)
                row = asyncio.run(
                    drive(
                        f"{info['url']}/deployments/{dep_id}/v2", deps[arm]["key"], requests, args
                    )
                )
                asyncio.run(asyncio.sleep(1.5))  # the replicas' next metrics report
                after = cache_figures(info["url"], dep_id)
                queried = after[1] - before[1]
                row["prefix_cache_hit_ratio"] = (after[0] - before[0]) / queried if queried else 0
                row["requests_per_replica"] = sorted(
                    after[2].get(k, 0) - before[2].get(k, 0) for k in after[2]
                )
                rnd[arm] = row
                print(
                    f"round {r + 1} affinity {arm}: TTFT p50 {row['ttft_ms_p50']:.0f} ms, "
                    f"p95 {row['ttft_ms_p95']:.0f} ms, {row['output_token_throughput']:.1f} "
                    f"tok/s, prefix cache hits {row['prefix_cache_hit_ratio']:.0%}, "
                    f"per replica {row['requests_per_replica']}, errors {row['errors']}",
                    flush=True,
                )
            rounds.append(rnd)
    finally:
        stop_platform()
        ray.shutdown()

    def med(arm: str, field: str) -> float:
        return statistics.median(rnd[arm][field] for rnd in rounds)

    lines = [
        "| affinity | TTFT p50 ms | TTFT p95 ms | out tok/s | prefix cache hits | errors |",
        "|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        errors = sum(rnd[arm]["errors"] for rnd in rounds)
        lines.append(
            f"| {arm} | {med(arm, 'ttft_ms_p50'):.0f} | {med(arm, 'ttft_ms_p95'):.0f} "
            f"| {med(arm, 'output_token_throughput'):.1f} "
            f"| {med(arm, 'prefix_cache_hit_ratio'):.0%} | {errors} |"
        )
    each = [1 - rnd["on"]["ttft_ms_p50"] / rnd["off"]["ttft_ms_p50"] for rnd in rounds]
    gain = statistics.median(each)
    verdict = (
        f"TTFT p50 {gain:.0%} lower with affinity (median of rounds: "
        f"{', '.join(f'{g:.0%}' for g in each)}; target >= {TARGET:.0%}: "
        f"{'met' if gain >= TARGET else 'NOT met'})"
    )
    md = (
        f"Machine: {machine()}\n\nModel: generated `{args.size}`, vLLM, 2 replicas of "
        f"{args.device} (maxBatchSize {args.batch}); {args.prefixes} prefixes of "
        f"{args.prefix_words} words x {args.users} users, concurrency {args.concurrency}, "
        f"{args.max_tokens} output tokens; {args.rounds} alternating rounds\n\n"
        + "\n".join(lines)
        + f"\n\n- {verdict}\n"
    )
    save("prefix_routing", {"machine": machine(), "args": vars(args), "rounds": rounds}, md)


if __name__ == "__main__":
    main()
