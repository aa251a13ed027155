"""Serving benchmark: raydock over HTTP vs the same engine called in-process.

    python -m benchmarks.serving [--size small] [--concurrency 1,4,16,64] [--rounds 1]

1. Drives `TransformersEngine` in this process at each concurrency (the baseline).
2. Starts an embedded raydock, imports the same generated model's zip, deploys it on one
   replica with the same threads and batch size, and drives it through the Serve proxy with
   streaming OpenAI requests; then shuts it down.
3. With --beside, first drives the in-process engine again while that raydock (platform and
   deployment) sits idle: this splits the gap between 1 and 2 into what the co-resident
   processes cost the engine and what the request path costs.
With --rounds N, 1 and 2 repeat N times, the first of them alternating from round to round,
and each target is judged on the median of the rounds' figures: on this noisy machine one
pass can land anywhere in a ±15 % band.
Writes benchmarks/out/serving.{json,md}; the targets are checked and printed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform as py_platform
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.loadgen import prompt_text, requests_for, run_engine, run_http, table

OUT = Path(__file__).parent / "out"


def save(name: str, record: dict[str, Any], md: str, out: Path = OUT) -> None:
    """A benchmark's raw record as <out>/<name>.json and its report as <out>/<name>.md, printed.

    `out` is benchmarks/out unless the benchmark lets its caller choose another folder.
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(record, indent=2, default=str))
    (out / f"{name}.md").write_text(md)
    print(md, flush=True)


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


def deploy_body(device: str, batch: int, name: str = "bench", **fields: Any) -> dict[str, Any]:
    """A benchmark deployment: one replica (no autoscaling mid-run) of `batch` sequences."""
    from raydock.client import default_deploy_body

    return default_deploy_body(
        name,
        device,
        scalingParameters={"maxBatchSize": batch, "minReplicas": 1, "maxReplicas": 1},
        timeout=180,
        **fields,
    )


def sampling_defaults(body: dict[str, Any]) -> dict[str, Any]:
    """The sampling values raydock applies to requests that leave them out."""
    hp = body["hyperParameters"]
    return {"temperature": hp["temperature"], "top_p": hp["topP"], "top_k": hp["topK"]}


def baseline(
    model_dir: str, levels, args, messages, target: str = "in-process engine"
) -> list[dict]:
    """The engine driven in this process, sampling as the deployment does (its top-k too)."""
    from raydock.serve_apps.engines.transformers_engine import TransformersEngine

    engine = TransformersEngine(model_dir, num_threads=args.threads, max_batch_size=args.batch)
    sampling = sampling_defaults(deploy_body(args.device, args.batch))

    async def all_levels(engine):
        await run_engine(engine, 1, 2, messages, 8)  # warm-up
        rows = []
        for c in levels:
            n = requests_for(c, args.requests)
            rows.append(await run_engine(engine, c, n, messages, args.max_tokens, sampling))
            print(f"{target} c={c}: {rows[-1]['output_token_throughput']:.1f} tok/s", flush=True)
        return rows

    rows = asyncio.run(all_levels(engine))
    del engine  # free its memory before the served run
    gc.collect()
    return [r | {"target": target} for r in rows]


BESIDE = "in-process, raydock idle beside"
SERVED = "raydock (HTTP, Serve)"


@contextlib.contextmanager
def embedded_deployment(zip_path: Path, args, **settings: Any) -> Iterator[tuple[Any, str]]:
    """An embedded raydock (`settings` over the defaults) serving the model in `zip_path` on
    one replica: (its admin client, the deployment's id); shut down on exit."""
    import ray

    from raydock.client import Client
    from raydock.config import load_settings
    from raydock.platform.bootstrap import connect, start_platform, stop_platform

    home = tempfile.mkdtemp(prefix="raydock-bench-")
    parsed = load_settings(home=home, port=args.port, **settings)
    connect(parsed, include_dashboard=False)
    try:
        info = start_platform(parsed)
        client = Client(info["url"], info["admin_key"])
        ref = client.import_zip(zip_path, chunked=True)
        assert client.wait_job(ref["dockStatusId"], timeout=900)["status"] == "SUCCESS"
        dep = client.deploy(ref["modelId"], deploy_body(args.device, args.batch))
        assert client.wait_job(dep["dockStatusId"], timeout=900)["status"] == "SUCCESS"
        yield client, dep["deploymentId"]
    finally:
        stop_platform()
        ray.shutdown()


def served(zip_path: Path, levels, args, messages, model_dir: str) -> tuple[list[dict], list[dict]]:
    """The served rows, and with --beside the in-process rows measured beside idle raydock."""
    with embedded_deployment(zip_path, args) as (client, dep_id):
        key = client.create_key(dep_id)
        base = f"{client.base_url}/deployments/{dep_id}/v2"
        asyncio.run(run_http(base, key, 1, 2, messages, 8))  # warm-up
        beside = baseline(model_dir, levels, args, messages, BESIDE) if args.beside else []
        rows = []
        for c in levels:
            n = requests_for(c, args.requests)
            rows.append(asyncio.run(run_http(base, key, c, n, messages, args.max_tokens)))
            print(f"raydock c={c}: {rows[-1]['output_token_throughput']:.1f} tok/s", flush=True)
        return [r | {"target": SERVED} for r in rows], beside


def one_round(r: int, zip_path: Path, levels, args, messages, model_dir: str) -> dict:
    """Round `r` (from 0): the in-process pass and the served one, in alternating order."""
    out: dict[str, list[dict]] = {}
    if r % 2 == 0:
        out["engine"] = baseline(model_dir, levels, args, messages)
    out["served"], out["beside"] = served(zip_path, levels, args, messages, model_dir)
    if r % 2 == 1:
        out["engine"] = baseline(model_dir, levels, args, messages)
    return {part: [row | {"round": r + 1} for row in rows] for part, rows in out.items()}


def figures(rnd: dict) -> dict[str, float]:
    """What the targets read from one round (absent where a level was not run)."""
    by, base, idle = (
        {row["concurrency"]: row for row in rnd[part]} for part in ("served", "engine", "beside")
    )

    def tok(rows: dict, c: int) -> float:
        return rows[c]["output_token_throughput"]

    out = {}
    if 1 in by and 16 in by:
        out["scale"] = tok(by, 16) / tok(by, 1)
    if 16 in by and 16 in base:
        out["ratio"] = tok(by, 16) / tok(base, 16)
    if 1 in by and 1 in base:
        out["ttft_added"] = by[1]["ttft_ms_p50"] - base[1]["ttft_ms_p50"]
    if 16 in idle and 16 in base and 16 in by:
        out["co_resident"] = tok(idle, 16) / tok(base, 16)
        out["request_path"] = tok(by, 16) / tok(idle, 16)
    return out


def verdicts(rounds: list[dict]) -> list[str]:
    per_round = [figures(rnd) for rnd in rounds]

    def median(name: str, fmt: str) -> tuple[float, str] | None:
        values = [f[name] for f in per_round if name in f]
        if not values:
            return None
        each = f" (rounds: {', '.join(format(v, fmt) for v in values)})" if len(values) > 1 else ""
        return statistics.median(values), each

    lines = []
    for name, label, fmt, unit, op, target in (
        ("scale", "raydock throughput c16 / c1", ".2f", "x", ">=", 5),
        ("ratio", "raydock / in-process throughput at c16", ".3f", "", ">=", 0.85),
        ("ttft_added", "TTFT p50 added by serving at c1", ".1f", " ms", "<=", 15),
    ):
        got = median(name, fmt)
        if got:
            value, each = got
            ok = value >= target if op == ">=" else value <= target
            lines.append(
                f"{label} = {value:{fmt}}{unit}{each} "
                f"(target {op} {target}{unit}: {'met' if ok else 'NOT met'})"
            )
    co, path = median("co_resident", ".3f"), median("request_path", ".3f")
    if co and path:
        lines.append(
            f"in-process beside idle raydock / alone at c16 = {co[0]:.3f}{co[1]} (what the "
            f"co-resident processes cost); raydock / in-process beside it = {path[0]:.3f}"
            f"{path[1]} (what the request path costs)"
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
    p.add_argument("--rounds", type=int, default=1, help="rounds of both passes (medians)")
    args = p.parse_args()

    from raydock.modelgen import build_model_zip, cached_model_dir

    levels = [int(x) for x in args.concurrency.split(",")]
    messages = [{"role": "user", "content": prompt_text(args.prompt_words)}]
    model_dir = str(cached_model_dir(args.size))
    zip_path = build_model_zip(Path(tempfile.mkdtemp()) / f"bench-{args.size}.zip", args.size)

    rounds = []
    for r in range(args.rounds):
        print(f"round {r + 1} of {args.rounds}", flush=True)
        rounds.append(one_round(r, zip_path, levels, args, messages, model_dir))
    notes = verdicts(rounds)
    rows = [row for rnd in rounds for part in ("engine", "beside", "served") for row in rnd[part]]
    if args.rounds > 1:
        rows = [row | {"target": f"{row['target']}, round {row['round']}"} for row in rows]
    md = (
        f"Machine: {machine()}\n\nModel: generated `{args.size}`, prompt {args.prompt_words} "
        f"words, {args.max_tokens} output tokens (ignore_eos), maxBatchSize {args.batch}, "
        f"{args.threads} torch threads\n\n"
        + table(rows, "target")
        + "\n"
        + "\n".join(f"- {n}" for n in notes)
        + "\n"
    )
    record = {"machine": machine(), "args": vars(args), "rounds": rounds, "verdicts": notes}
    save("serving", record, md)


if __name__ == "__main__":
    main()
