"""Serving benchmark: raydock over HTTP vs the same engine called in-process.

    python -m benchmarks.serving [--size small] [--concurrency 1,4,16,64]

1. Drives `TransformersEngine` in this process at each concurrency (the baseline).
2. Starts an embedded raydock, imports the same generated model's zip, deploys it on one
   replica with the same threads and batch size, and drives it through the Serve proxy with
   streaming OpenAI requests.
3. With --beside, first drives the in-process engine again while that raydock (platform and
   deployment) sits idle: this splits the gap between 1 and 2 into what the co-resident
   processes cost the engine and what the request path costs.
Writes benchmarks/out/serving.{json,md}; the targets are checked and printed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform as py_platform
import tempfile
from pathlib import Path

from benchmarks.loadgen import prompt_text, requests_for, run_engine, run_http, table

OUT = Path(__file__).parent / "out"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {py_platform.python_version()}"


def baseline(
    model_dir: str, levels, args, messages, target: str = "in-process engine"
) -> list[dict]:
    from raydock.serve_apps.engines.transformers_engine import TransformersEngine

    engine = TransformersEngine(model_dir, num_threads=args.threads, max_batch_size=args.batch)

    async def all_levels(engine):
        await run_engine(engine, 1, 2, messages, 8)  # warm-up
        rows = []
        for c in levels:
            n = requests_for(c, args.requests)
            rows.append(await run_engine(engine, c, n, messages, args.max_tokens))
            print(f"{target} c={c}: {rows[-1]['output_token_throughput']:.1f} tok/s", flush=True)
        return rows

    rows = asyncio.run(all_levels(engine))
    del engine  # free its memory before the served run
    gc.collect()
    return [r | {"target": target} for r in rows]


BESIDE = "in-process, raydock idle beside"


def served(zip_path: Path, levels, args, messages, model_dir: str) -> tuple[list[dict], list[dict]]:
    """The served rows, and with --beside the in-process rows measured beside idle raydock."""
    import ray

    from raydock.client import Client, default_deploy_body
    from raydock.config import load_settings
    from raydock.platform.bootstrap import connect, start_platform, stop_platform

    settings = load_settings(home=tempfile.mkdtemp(prefix="raydock-bench-"), port=args.port)
    connect(settings, include_dashboard=False)
    try:
        info = start_platform(settings)
        client = Client(info["url"], info["admin_key"])
        ref = client.import_zip(zip_path, chunked=True)
        assert client.wait_job(ref["dockStatusId"], timeout=900)["status"] == "SUCCESS"
        body = default_deploy_body(
            "bench",
            args.device,
            scalingParameters={"maxBatchSize": args.batch, "minReplicas": 1, "maxReplicas": 1},
            timeout=180,
        )
        dep = client.deploy(ref["modelId"], body)
        assert client.wait_job(dep["dockStatusId"], timeout=900)["status"] == "SUCCESS"
        key = client.create_key(dep["deploymentId"])
        base = f"{info['url']}/deployments/{dep['deploymentId']}/v2"
        asyncio.run(run_http(base, key, 1, 2, messages, 8))  # warm-up
        beside = baseline(model_dir, levels, args, messages, BESIDE) if args.beside else []
        rows = []
        for c in levels:
            n = requests_for(c, args.requests)
            rows.append(asyncio.run(run_http(base, key, c, n, messages, args.max_tokens)))
            print(f"raydock c={c}: {rows[-1]['output_token_throughput']:.1f} tok/s", flush=True)
        return [r | {"target": "raydock (HTTP, Serve)"} for r in rows], beside
    finally:
        stop_platform()
        ray.shutdown()


def verdicts(
    engine_rows: list[dict], served_rows: list[dict], beside_rows: list[dict]
) -> list[str]:
    by = {r["concurrency"]: r for r in served_rows}
    base = {r["concurrency"]: r for r in engine_rows}
    idle = {r["concurrency"]: r for r in beside_rows}
    lines = []
    if 1 in by and 16 in by:
        scale = by[16]["output_token_throughput"] / by[1]["output_token_throughput"]
        lines.append(f"raydock throughput c16 / c1 = {scale:.2f}x (target >= 5x)")
    if 16 in by and 16 in base:
        ratio = by[16]["output_token_throughput"] / base[16]["output_token_throughput"]
        lines.append(f"raydock / in-process throughput at c16 = {ratio:.3f} (target >= 0.85)")
    if 1 in by and 1 in base:
        added = by[1]["ttft_ms_p50"] - base[1]["ttft_ms_p50"]
        lines.append(f"TTFT p50 added by serving at c1 = {added:.1f} ms (target <= 15 ms)")
    if 16 in idle and 16 in base and 16 in by:
        alone, beside, http = (rows[16]["output_token_throughput"] for rows in (base, idle, by))
        lines.append(
            f"in-process beside idle raydock / alone at c16 = {beside / alone:.3f} (what the "
            f"co-resident processes cost); raydock / in-process beside it = {http / beside:.3f} "
            "(what the request path costs)"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="small", choices=["tiny", "small"])
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--requests", type=int, default=16, help="minimum requests per level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=48)
    p.add_argument("--batch", type=int, default=64, help="maxBatchSize of both engines")
    p.add_argument("--device", default="cpu-medium", help="deviceType of the deployment")
    p.add_argument("--threads", type=int, default=2, help="torch threads (= the profile's CPUs)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument(
        "--beside",
        action="store_true",
        help="also drive the in-process engine while the deployed raydock sits idle",
    )
    args = p.parse_args()

    from raydock.modelgen import build_model_zip, cached_model_dir

    levels = [int(x) for x in args.concurrency.split(",")]
    messages = [{"role": "user", "content": prompt_text(args.prompt_words)}]
    model_dir = str(cached_model_dir(args.size))
    zip_path = build_model_zip(Path(tempfile.mkdtemp()) / f"bench-{args.size}.zip", args.size)

    engine_rows = baseline(model_dir, levels, args, messages)
    served_rows, beside_rows = served(zip_path, levels, args, messages, model_dir)
    notes = verdicts(engine_rows, served_rows, beside_rows)
    OUT.mkdir(exist_ok=True)
    (OUT / "serving.json").write_text(
        json.dumps(
            {
                "machine": machine(),
                "args": vars(args),
                "engine": engine_rows,
                "served": served_rows,
                "beside": beside_rows,
                "verdicts": notes,
            },
            indent=2,
        )
    )
    md = (
        f"Machine: {machine()}\n\nModel: generated `{args.size}`, prompt {args.prompt_words} "
        f"words, {args.max_tokens} output tokens (ignore_eos), maxBatchSize {args.batch}, "
        f"{args.threads} torch threads\n\n"
        + table(engine_rows + beside_rows + served_rows, "target")
        + "\n"
        + "\n".join(f"- {n}" for n in notes)
        + "\n"
    )
    (OUT / "serving.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
