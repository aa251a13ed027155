"""Where the serving layer's per-request time goes: sequential requests that stop at
successive stages of the path, on one deployment, one at a time.

    python -m benchmarks.latency [--size tiny] [--requests 100] [--device cpu-small]

- 401 (bad key): proxy → replica → key check, no engine;
- 400 (temperature out of range): the key read from the database, body parsed and validated;
- max_tokens=1: plus chat template, prefill and one sampled token, as one JSON response;
- first SSE chunk of a stream with max_tokens=1: the same as a stream;
- the engine in-process: prefill and one token, no serving layer at all.
Writes benchmarks/out/latency.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.serving import machine, save

MESSAGES = [{"role": "user", "content": "hello there"}]


def timed(fn, n: int) -> dict[str, float]:
    for _ in range(3):  # warm-up
        fn()
    xs = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        xs.append((time.perf_counter() - t0) * 1e3)
    xs.sort()
    return {"p50": statistics.median(xs), "p90": xs[int(0.9 * (n - 1))], "min": xs[0]}


def in_process(model_dir: str, threads: int, n: int) -> dict[str, float]:
    from raydock.serve_apps.engines.transformers_engine import TransformersEngine
    from raydock.serve_apps.sampling import SamplingParams

    engine = TransformersEngine(model_dir, num_threads=threads, max_batch_size=8)

    async def one() -> None:
        ids = engine.chat_prompt(MESSAGES)
        async for _ in engine.generate(ids, SamplingParams(max_tokens=1)):
            pass

    loop = asyncio.new_event_loop()
    try:
        return timed(lambda: loop.run_until_complete(one()), n)
    finally:
        loop.close()


def served(args) -> dict[str, dict[str, float]]:
    import ray

    from raydock.client import Client, default_deploy_body
    from raydock.config import load_settings
    from raydock.modelgen import build_model_zip
    from raydock.platform.bootstrap import connect, start_platform, stop_platform

    settings = load_settings(home=tempfile.mkdtemp(prefix="raydock-latency-"), port=args.port)
    connect(settings, include_dashboard=False)
    try:
        info = start_platform(settings)
        client = Client(info["url"], info["admin_key"])
        zip_path = build_model_zip(Path(tempfile.mkdtemp()) / f"lat-{args.size}.zip", args.size)
        ref = client.import_zip(zip_path)
        assert client.wait_job(ref["dockStatusId"], timeout=900)["status"] == "SUCCESS"
        body = default_deploy_body(
            "latency",
            args.device,
            scalingParameters={"maxBatchSize": 8, "minReplicas": 1, "maxReplicas": 1},
        )
        dep = client.deploy(ref["modelId"], body)
        assert client.wait_job(dep["dockStatusId"], timeout=900)["status"] == "SUCCESS"
        key = client.create_key(dep["deploymentId"])
        url = f"{info['url']}/deployments/{dep['deploymentId']}/v2/chat/completions"
        good = {"Authorization": f"Bearer {key}"}
        with httpx.Client(timeout=60) as c:

            def post(body: dict, headers: dict, status: int) -> None:
                r = c.post(url, json={"messages": MESSAGES} | body, headers=headers)
                assert r.status_code == status, r.text

            def first_chunk() -> None:
                body = {"messages": MESSAGES, "max_tokens": 1, "stream": True}
                with c.stream("POST", url, json=body, headers=good) as r:
                    next(line for line in r.iter_lines() if line.startswith("data:"))

            n = args.requests
            return {
                "401 bad key": timed(lambda: post({}, {"Authorization": "Bearer no"}, 401), n),
                "400 bad temperature": timed(lambda: post({"temperature": 9}, good, 400), n),
                "200 max_tokens=1": timed(lambda: post({"max_tokens": 1}, good, 200), n),
                "first SSE chunk": timed(first_chunk, n),
            }
    finally:
        stop_platform()
        ray.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="tiny", choices=["tiny", "small"])
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--device", default="cpu-small")
    p.add_argument("--port", type=int, default=8766)
    args = p.parse_args()

    from raydock.config import hardware_profiles
    from raydock.modelgen import cached_model_dir

    threads = int(hardware_profiles()[args.device].get("num_cpus", 1))
    rows = {
        "in-process engine, max_tokens=1": in_process(
            str(cached_model_dir(args.size)), threads, args.requests
        )
    }
    rows |= served(args)
    md = (
        f"Machine: {machine()}\n\nModel: generated `{args.size}`, deviceType {args.device} "
        f"({threads} threads), {args.requests} sequential requests each\n\n"
        "| path | p50 ms | p90 ms | min ms |\n|---|---|---|---|\n"
        + "".join(
            f"| {k} | {v['p50']:.1f} | {v['p90']:.1f} | {v['min']:.1f} |\n" for k, v in rows.items()
        )
    )
    save("latency", {"machine": machine(), "args": vars(args), "rows": rows}, md)


if __name__ == "__main__":
    main()
