"""vLLM through raydock vs vLLM's own OpenAI server (`vllm serve`), side by side in one run.

    python -m benchmarks.vllm_serving [--size small] [--concurrency 1,16] [--requests 32]
                                      [--max-tokens 64] [--device cpu-medium] [--rounds 3]

1. Builds the generated model via modelgen (cached) and its zip.
2. Starts `vllm serve` on that model directory with the engine settings raydock's
   `VLLMEngine` would pick for the deployment (dtype, max model length, KV-cache bytes,
   max-num-seqs, eager mode, chunked prefill, seed, structured-outputs backend, thread
   environment, with the threads = the deviceType's CPUs), waits for /health, drives it with
   streaming chat completions at each concurrency, then stops it (the whole process group).
3. Starts an embedded raydock (its own local Ray cluster and port), imports the same zip,
   deploys it with `optimizationType: vllm` on `--device`, drives the same load through the
   Serve proxy at /deployments/<id>/v2, then shuts the platform and Ray down.
The two sides run one after the other, never together, for `--rounds` rounds; the side that
goes first alternates from round to round, so neither always gets the machine's fresher or
slower spell. The verdict is on the median of the rounds' raydock / vllm serve ratios. Both
sides get identical prompts, seeds and fixed-length outputs (`ignore_eos`); raydock fills
temperature/top_p/top_k from the deploy body's hyperParameters, and `vllm serve` gets the same
values as its default sampling parameters (`--override-generation-config`). Writes
benchmarks/out/vllm_serving.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.loadgen import prompt_text, requests_for, run_http
from benchmarks.serving import OUT, deploy_body, machine, sampling_defaults, save

VLLM_SIDE = "vllm serve"
RAYDOCK_SIDE = "raydock (vllm)"
TARGET_CONCURRENCY, TARGET_RATIO = 16, 0.9


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in (f"{name}-cpu", name):
        with contextlib.suppress(PackageNotFoundError):
            return version(dist)
    return "?"


def engine_settings(model_dir: Path, profile: dict[str, Any], batch: int) -> dict[str, Any]:
    """What `VLLMEngine` resolves for this model on this deviceType (its own helpers)."""
    from raydock.serve_apps.engines import vllm_engine as ve

    config = ve._text_config(model_dir)
    device = profile.get("device", "cpu")
    limit = int(config.get("max_position_embeddings") or ve.MAX_MODEL_LEN)
    max_len = min(limit, ve.MAX_MODEL_LEN)
    dtype = ve._default_dtype(device, config, None)
    kv_dtype = dtype if dtype != "auto" else str(config.get("torch_dtype", "bfloat16"))
    threads = int(profile.get("num_cpus", 1)) if device == "cpu" else None
    env = {"VLLM_NO_USAGE_STATS": os.environ.get("VLLM_NO_USAGE_STATS", "1")}
    if "VLLM_REGEX_COMPILATION_TIMEOUT_S" not in os.environ:
        env["VLLM_REGEX_COMPILATION_TIMEOUT_S"] = ve.REGEX_COMPILE_TIMEOUT_S
    if device == "cpu" and threads and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        env["OMP_NUM_THREADS"] = str(threads)
    return {
        "dtype": dtype,
        "max_model_len": max_len,
        "kv_cache_bytes": ve._kv_cache_bytes(config, max_len, batch, kv_dtype),
        "max_num_seqs": batch,
        "enable_chunked_prefill": ve.chunked_prefill(device == "cpu"),
        "threads": threads,
        "structured_outputs_backend": ve.STRUCTURED_OUTPUTS_BACKEND,
        "env": env,
    }


def prompt_tokens(base: str, key: str, messages: list[dict]) -> int | None:
    """Prompt length as the server counted it (both sides should tokenize identically)."""
    body = {"model": "bench", "messages": messages, "max_tokens": 1, "seed": 0}
    try:
        r = httpx.post(
            f"{base}/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            timeout=120,
        )
        return r.json()["usage"]["prompt_tokens"]
    except (httpx.HTTPError, KeyError, ValueError):
        return None


def drive(side: str, base: str, key: str, levels: list[int], args, messages) -> dict[str, Any]:
    top = max(levels)
    asyncio.run(run_http(base, key, top, top, messages, 8))  # warm-up, every batch slot
    rows = []
    for c in levels:
        row = asyncio.run(
            run_http(base, key, c, requests_for(c, args.requests), messages, args.max_tokens)
        )
        rows.append(row | {"side": side})
        print(
            f"{side} c={c}: {row['output_token_throughput']:.1f} tok/s, "
            f"{row['request_throughput']:.2f} req/s, errors {row['errors']}",
            flush=True,
        )
    return {"rows": rows, "prompt_tokens": prompt_tokens(base, key, messages)}


# ---------------------------------------------------------------------------- vllm serve


def vllm_command(model_dir: Path, port: int, eng: dict[str, Any], body, args) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        "bench",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        eng["dtype"],
        "--max-model-len",
        str(eng["max_model_len"]),
        "--max-num-seqs",
        str(eng["max_num_seqs"]),
        "--kv-cache-memory-bytes",
        str(eng["kv_cache_bytes"]),
        "--enforce-eager",
        "--enable-chunked-prefill"
        if eng["enable_chunked_prefill"]
        else "--no-enable-chunked-prefill",
        "--seed",
        "0",
        "--structured-outputs-config",
        json.dumps({"backend": eng["structured_outputs_backend"]}),
        "--override-generation-config",
        json.dumps(sampling_defaults(body)),
        "--disable-log-stats",
        "--disable-uvicorn-access-log",
    ]
    return cmd + shlex.split(args.vllm_args)


def _stop_group(proc: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM the server's process group (API server, EngineCore, worker), then SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    with contextlib.suppress(ProcessLookupError):  # children that outlived the API server
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def vllm_side(model_dir: Path, eng, body, levels, args, messages) -> dict[str, Any]:
    from raydock.platform.bootstrap import free_port

    port = args.vllm_port or free_port()
    cmd = vllm_command(model_dir, port, eng, body, args)
    env = os.environ | eng["env"]
    OUT.mkdir(exist_ok=True)
    log_path = OUT / "vllm_serve.log"
    print("starting:", " ".join(f"{k}={v}" for k, v in eng["env"].items()), shlex.join(cmd))
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + args.start_timeout
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n{tail}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"vllm serve not healthy after {args.start_timeout}s")
            time.sleep(1)
        start_s = time.perf_counter() - t0
        print(f"vllm serve healthy after {start_s:.1f}s (pid {proc.pid}, log {log_path})")
        out = drive(VLLM_SIDE, f"{base}/v1", "unused", levels, args, messages)
        return out | {"start_s": start_s, "command": cmd, "env": eng["env"]}
    finally:
        _stop_group(proc)


# ---------------------------------------------------------------------------- raydock


def _descendants(pid: int | None = None) -> list:
    """The processes below `pid` (default: this one)."""
    import psutil

    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).children(recursive=True)
    return []


def _reap(procs: list, grace: float = 15) -> list[int]:
    """Kill what this run started (Ray's daemons and workers, vLLM's children) and outlived
    the shutdown; returns their pids."""
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)
    return [p.pid for p in alive]


def raydock_side(zip_path: Path, body, levels, args, messages) -> dict[str, Any]:
    import ray

    from raydock.client import Client
    from raydock.config import load_settings
    from raydock.platform.bootstrap import connect, free_port, start_platform, stop_platform

    port = args.port or free_port()
    settings = load_settings(home=tempfile.mkdtemp(prefix="raydock-bench-vllm-"), port=port)
    # address="local": a cluster of this run's own, never one that is already running here
    connect(settings, include_dashboard=False, address="local")
    try:
        info = start_platform(settings)
        client = Client(info["url"], info["admin_key"])
        ref = client.import_zip(zip_path, chunked=True)
        assert client.wait_job(ref["dockStatusId"], timeout=900)["status"] == "SUCCESS"
        t0 = time.perf_counter()
        dep = client.deploy(ref["modelId"], body)
        job = client.wait_job(dep["dockStatusId"], timeout=args.start_timeout + 300)
        assert job["status"] == "SUCCESS", job
        start_s = time.perf_counter() - t0
        print(f"raydock deployment {dep['deploymentId']} serving after {start_s:.1f}s")
        key = client.create_key(dep["deploymentId"])
        base = f"{info['url']}/deployments/{dep['deploymentId']}/v2"
        out = drive(RAYDOCK_SIDE, base, key, levels, args, messages)
        with contextlib.suppress(Exception):
            out["stats"] = client.get(f"/deployments/{dep['deploymentId']}/stats")
        return out | {"start_s": start_s, "deploy_body": body}
    finally:
        started = _descendants()
        stop_platform()
        ray.shutdown()
        leftover = _reap(started)
        if leftover:
            print(f"killed {len(leftover)} leftover processes of this run: {leftover}")


# ---------------------------------------------------------------------------- report


def ratio(rnd: dict, row: dict) -> float | None:
    """A raydock row's output-token throughput over vllm serve's at its level and round."""
    ref = {r["concurrency"]: r for r in rnd["vllm_serve"]["rows"]}.get(row["concurrency"])
    if row["side"] == VLLM_SIDE or not ref or not ref["output_token_throughput"]:
        return None
    return row["output_token_throughput"] / ref["output_token_throughput"]


def render(rounds: list[dict]) -> str:
    head = (
        "| round | side | conc | requests | errors | out tok/s | req/s | TTFT p50 ms "
        "| TPOT p50 ms | E2E p50 ms | raydock / vllm serve |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for rnd in rounds:
        for r in (r for side in rnd["order"] for r in rnd[side]["rows"]):
            value = ratio(rnd, r)
            lines.append(
                f"| {rnd['round']} | {r['side']} | {r['concurrency']} | {r['requests']} "
                f"| {r['errors']} | {r['output_token_throughput']:.1f} "
                f"| {r['request_throughput']:.2f} | {r['ttft_ms_p50']:.1f} "
                f"| {r['tpot_ms_p50']:.1f} | {r['e2e_ms_p50']:.0f} "
                f"| {'' if value is None else format(value, '.3f')} |"
            )
    return head + "\n".join(lines) + "\n"


def verdicts(rounds: list[dict], max_tokens: int) -> list[str]:
    rows = [r for rnd in rounds for side in ("vllm_serve", "raydock") for r in rnd[side]["rows"]]
    lines = []
    for r in rows:  # ignore_eos: every request yields max_tokens
        ok = r["requests"] - r["errors"]
        per_request = r["output_token_throughput"] * r["wall_s"] / ok if ok else 0
        if abs(per_request - max_tokens) > 0.01:
            lines.append(
                f"{r['side']} c{r['concurrency']}: {per_request:.2f} output tokens per request, "
                f"not {max_tokens}"
            )
    by_level: dict[int, list[float]] = {}
    for rnd in rounds:
        for r in rnd["raydock"]["rows"]:
            if (value := ratio(rnd, r)) is not None:
                by_level.setdefault(r["concurrency"], []).append(value)
    for c, values in by_level.items():
        median = statistics.median(values)
        target = (
            f" (target >= {TARGET_RATIO}: {'met' if median >= TARGET_RATIO else 'NOT met'})"
            if c == TARGET_CONCURRENCY
            else ""
        )
        each = ", ".join(f"{v:.3f}" for v in values)
        lines.append(
            f"raydock / vllm serve output tok/s at c{c} = {median:.3f}, median of "
            f"{len(values)} round(s): {each}{target}"
        )
    errors = sum(r["errors"] for r in rows)
    if errors:
        lines.append(f"{errors} requests failed: the figures above are not comparable")
    prompts = {rnd[side]["prompt_tokens"] for rnd in rounds for side in ("vllm_serve", "raydock")}
    if len(prompts) > 1:
        lines.append(f"prompt lengths differ between the sides: {sorted(prompts, key=str)} tokens")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="small", choices=["tiny", "small"])
    p.add_argument("--concurrency", default="1,16")
    p.add_argument("--requests", type=int, default=32, help="minimum requests per level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=48)
    p.add_argument("--batch", type=int, default=0, help="maxBatchSize = --max-num-seqs (0: top)")
    p.add_argument("--device", default="cpu-medium", help="deviceType; its CPUs = vLLM threads")
    p.add_argument("--port", type=int, default=0, help="raydock's port (0: a free one)")
    p.add_argument("--vllm-port", type=int, default=0, help="vllm serve's port (0: a free one)")
    p.add_argument("--vllm-args", default="", help="extra `vllm serve` arguments")
    p.add_argument(
        "--raydock-first", action="store_true", help="run the raydock side first in round 1"
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds of both sides (median ratio)")
    p.add_argument("--start-timeout", type=int, default=600, help="seconds for a side to start")
    args = p.parse_args()

    from raydock.config import hardware_profiles
    from raydock.modelgen import build_model_zip, cached_model_dir

    levels = [int(x) for x in args.concurrency.split(",") if x]
    batch = args.batch or max(levels)
    profile = hardware_profiles()[args.device]
    messages = [{"role": "user", "content": prompt_text(args.prompt_words)}]
    model_dir = cached_model_dir(args.size)
    zip_path = build_model_zip(Path(tempfile.mkdtemp()) / f"bench-{args.size}.zip", args.size)
    eng = engine_settings(model_dir, profile, batch)
    body = deploy_body(
        args.device,
        batch,
        "bench-vllm",
        optimizationInfo={"optimizationType": "vllm", "quantizationType": ""},
    )
    print(f"engine settings of both sides: {json.dumps(eng)}", flush=True)

    rounds = []
    for r in range(args.rounds):
        # the first side alternates, so neither always meets the machine's fresher spell
        order = ["vllm_serve", "raydock"]
        if args.raydock_first ^ (r % 2 == 1):
            order.reverse()
        rnd: dict[str, Any] = {"round": r + 1, "order": order}
        for side in order:
            print(f"round {r + 1}: {side}", flush=True)
            if side == "raydock":
                rnd[side] = raydock_side(zip_path, body, levels, args, messages)
            else:
                rnd[side] = vllm_side(model_dir, eng, body, levels, args, messages)
        rounds.append(rnd)
    notes = verdicts(rounds, args.max_tokens)

    def starts(side: str) -> str:
        return " / ".join(f"{rnd[side]['start_s']:.0f}" for rnd in rounds)

    versions = ", ".join(f"{d} {_version(d)}" for d in ("vllm", "ray", "torch"))
    md = (
        f"Machine: {machine()}; {versions}\n\n"
        f"Model: generated `{args.size}`, prompt {args.prompt_words} words "
        f"({rounds[0]['vllm_serve']['prompt_tokens']} tokens), {args.max_tokens} output "
        "tokens (ignore_eos), "
        f"sampling {sampling_defaults(body)}; vLLM dtype {eng['dtype']}, max-model-len "
        f"{eng['max_model_len']}, max-num-seqs {batch}, KV cache "
        f"{eng['kv_cache_bytes'] / 2**20:.0f} MiB, {eng['threads']} threads "
        f"(deviceType {args.device}), eager; sides run one after the other, the first "
        f"alternating over {args.rounds} round(s) (start: vllm serve "
        f"{starts('vllm_serve')} s, raydock deploy {starts('raydock')} s)"
        "\n\n" + render(rounds) + "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    )
    record = {
        "machine": machine(),
        "versions": versions,
        "args": vars(args),
        "engine": eng,
        "rounds": rounds,
        "verdicts": notes,
    }
    save("vllm_serving", record, md)


if __name__ == "__main__":
    main()
