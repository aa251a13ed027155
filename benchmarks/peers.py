"""raydock vs Ray Serve LLM vs `vllm serve`: the same model and vLLM engine settings, one run.

    python -m benchmarks.peers [--size small] [--concurrency 1,16,64] [--rounds 2]
                               [--serve-llm-python PATH] [--sides raydock,serve-llm,vllm]

- raydock: an embedded platform (its own local Ray cluster), the model imported and deployed
  with `optimizationType: vllm` on `--device`, driven at /deployments/<id>/v2 (HAProxy).
- Ray Serve LLM: `ray.serve.llm.build_openai_app` with an `LLMConfig` carrying the engine
  arguments raydock's `VLLMEngine` resolves (dtype, max model length, KV-cache bytes,
  max-num-seqs, eager, chunked prefill, seed, structured-outputs backend, thread
  environment), Serve's defaults otherwise (as a Ray user would run it), in a child process
  (`--serve-llm-python`: `ray.serve.llm` needs pyarrow, Ray's `llm` extra, which raydock's
  venv lacks; see benchmarks/RESULTS.md for the overlay venv used here), driven at /v1.
- `vllm serve` with the same engine arguments (benchmarks.vllm_serving).

Each side starts, is driven with streaming chat completions at every concurrency (identical
prompts, seeds and `ignore_eos` outputs), and stops before the next starts; the order rotates
from round to round. Reports TTFT p50/p95, TPOT p50 and output tokens/s per side and level,
and raydock's ratios to each peer (medians over rounds). A side that cannot start is reported
with its exact error and the comparison stands on the others. Writes benchmarks/out/peers.*.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.loadgen import prompt_text
from benchmarks.serving import OUT, deploy_body, machine, sampling_defaults, save
from benchmarks.vllm_serving import (
    _descendants,
    _reap,
    _stop_group,
    _version,
    drive,
    engine_settings,
    raydock_side,
    vllm_side,
)

SIDES = {"raydock": "raydock (vllm)", "serve-llm": "Ray Serve LLM", "vllm": "vllm serve"}


# ---------------------------------------------------------------------------- Ray Serve LLM


def serve_llm_config(model_dir: Path, eng: dict[str, Any], body: dict[str, Any]) -> dict:
    """What the child process deploys: `build_openai_app`'s LLMConfig, as plain data."""
    return {
        "model_loading_config": {"model_id": "bench", "model_source": str(model_dir)},
        "engine_kwargs": {
            "dtype": eng["dtype"],
            "max_model_len": eng["max_model_len"],
            "max_num_seqs": eng["max_num_seqs"],
            "kv_cache_memory_bytes": eng["kv_cache_bytes"],
            "enforce_eager": True,
            "enable_chunked_prefill": eng["enable_chunked_prefill"],
            "seed": 0,
            "structured_outputs_config": {"backend": eng["structured_outputs_backend"]},
            "override_generation_config": sampling_defaults(body),
        },
        "accelerator_config": {"kind": "cpu"},
        # one replica of as many logical CPUs as raydock's deviceType gives its replica
        "placement_group_config": {"bundles": [{"CPU": eng["threads"] or 1}]},
        "deployment_config": {"num_replicas": 1},
        "runtime_env": {"env_vars": eng["env"]},
    }


def serve_llm_child(config_json: str, port: int) -> None:
    """Runs in the child: a local Ray cluster, the app on `port`, until SIGTERM."""
    config = json.loads(config_json)
    os.environ.update(config["runtime_env"]["env_vars"])  # the raylet's workers inherit it
    import ray
    from ray import serve

    try:
        from ray.serve.llm import LLMConfig, build_openai_app
    except Exception as exc:  # the parent reports this line as the side's reason
        print(f"SERVE_LLM_ERROR import ray.serve.llm: {exc!r}", flush=True)
        raise SystemExit(3) from None
    # logical CPUs as raydock's own cluster has (ray_num_cpus): the replica's bundle and more
    ray.init(address="local", include_dashboard=False, num_cpus=8)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        app = build_openai_app({"llm_configs": [LLMConfig(**config)]})
        serve.run(app, name="serve-llm", route_prefix="/", blocking=False)
    except Exception as exc:
        print(f"SERVE_LLM_ERROR deploy: {exc!r}", flush=True)
        raise SystemExit(4) from None
    print("SERVE_LLM_READY", flush=True)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    while not stop["now"]:
        time.sleep(0.5)
    serve.shutdown()
    ray.shutdown()


def serve_llm_side(model_dir: Path, eng, body, levels, args, messages) -> dict[str, Any]:
    from raydock.platform.bootstrap import free_port

    port = free_port()
    config = serve_llm_config(model_dir, eng, body)
    cmd = [
        args.serve_llm_python,
        "-m",
        "benchmarks.peers",
        "--serve-llm-child",
        json.dumps(config),
        "--port",
        str(port),
    ]
    OUT.mkdir(exist_ok=True)
    log_path = OUT / "serve_llm.log"
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + args.start_timeout
        while True:
            text = log_path.read_text(errors="replace")
            if proc.poll() is not None or "SERVE_LLM_ERROR" in text:
                reason = [
                    ln for ln in text.splitlines() if "SERVE_LLM_ERROR" in ln or "Error" in ln
                ]
                raise RuntimeError((reason or [text[-2000:]])[-1].strip())
            with contextlib.suppress(httpx.HTTPError):
                if "SERVE_LLM_READY" in text and _answers(base):
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"Ray Serve LLM not answering after {args.start_timeout}s")
            time.sleep(1)
        start_s = time.perf_counter() - t0
        print(f"Ray Serve LLM answering after {start_s:.1f}s (log {log_path})", flush=True)
        out = drive(SIDES["serve-llm"], f"{base}/v1", "unused", levels, args, messages)
        return out | {"start_s": start_s, "config": config}
    finally:
        # the child's Ray daemons, workers and HAProxy, before they are orphaned: HAProxy can
        # outlive the child's shutdown, and its listeners broke the next side's HAProxy
        started = _descendants(proc.pid)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # the child shuts Serve and Ray down
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(60)
        _stop_group(proc, grace=5)
        if leftover := _reap(started):
            print(f"Ray Serve LLM: killed {len(leftover)} leftover processes", flush=True)


def _answers(base: str) -> bool:
    body = {"model": "bench", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60).status_code == 200


# ---------------------------------------------------------------------------- report


def medians(rounds: list[dict], side: str, level: int, field: str) -> float | None:
    values = [
        r[field]
        for rnd in rounds
        if "rows" in rnd.get(side, {})
        for r in rnd[side]["rows"]
        if r["concurrency"] == level
    ]
    return statistics.median(values) if values else None


def ratios(rounds: list[dict], peer: str, level: int) -> list[float]:
    """raydock's output tok/s over the peer's, per round where both ran."""
    out = []
    for rnd in rounds:
        mine = {r["concurrency"]: r for r in rnd.get("raydock", {}).get("rows", [])}
        theirs = {r["concurrency"]: r for r in rnd.get(peer, {}).get("rows", [])}
        if level in mine and level in theirs and theirs[level]["output_token_throughput"]:
            out.append(
                mine[level]["output_token_throughput"] / theirs[level]["output_token_throughput"]
            )
    return out


def render(rounds: list[dict], sides: list[str], levels: list[int]) -> str:
    lines = [
        "| side | conc | out tok/s | TTFT p50 ms | TTFT p95 ms | TPOT p50 ms | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for side in sides:
        for c in levels:
            tok = medians(rounds, side, c, "output_token_throughput")
            if tok is None:
                continue
            errors = sum(
                r["errors"]
                for rnd in rounds
                for r in rnd.get(side, {}).get("rows", [])
                if r["concurrency"] == c
            )
            lines.append(
                f"| {SIDES[side]} | {c} | {tok:.1f} "
                f"| {medians(rounds, side, c, 'ttft_ms_p50'):.1f} "
                f"| {medians(rounds, side, c, 'ttft_ms_p95'):.1f} "
                f"| {medians(rounds, side, c, 'tpot_ms_p50'):.1f} | {errors} |"
            )
    lines.append("")
    for peer in (s for s in sides if s != "raydock"):
        for c in levels:
            values = ratios(rounds, peer, c)
            if values:
                each = ", ".join(f"{v:.2f}" for v in values)
                lines.append(
                    f"- raydock / {SIDES[peer]} output tok/s at c{c}: "
                    f"{statistics.median(values):.2f} (rounds: {each})"
                )
        mine, theirs = (
            medians(rounds, "raydock", 1, "ttft_ms_p50"),
            medians(rounds, peer, 1, "ttft_ms_p50"),
        )
        if mine is not None and theirs is not None:
            lines.append(
                f"- TTFT p50 at c1: raydock {mine:.1f} ms, {SIDES[peer]} {theirs:.1f} ms "
                f"({mine / theirs:.2f}x)"
            )
    for rnd in rounds:
        for side in sides:
            if "error" in rnd.get(side, {}):
                lines.append(
                    f"- round {rnd['round']}: {SIDES[side]} did not run: {rnd[side]['error']}"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="small", choices=["tiny", "small"])
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--requests", type=int, default=32, help="minimum requests per level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=48)
    p.add_argument("--device", default="cpu-medium", help="deviceType; its CPUs = vLLM threads")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--sides", default="raydock,serve-llm,vllm")
    p.add_argument(
        "--serve-llm-python",
        default=os.environ.get("RAYDOCK_SERVE_LLM_PYTHON", sys.executable),
        help="the interpreter that runs Ray Serve LLM (needs pyarrow: Ray's llm extra)",
    )
    p.add_argument("--start-timeout", type=int, default=600)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--vllm-port", type=int, default=0)
    p.add_argument("--vllm-args", default="")
    p.add_argument("--serve-llm-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    from benchmarks import loadgen

    loadgen.SEEDED = False  # see loadgen.SEEDED: concurrency 64 would kill every side's worker
    if args.serve_llm_child:
        serve_llm_child(args.serve_llm_child, args.port)
        return

    from raydock.config import hardware_profiles
    from raydock.modelgen import build_model_zip, cached_model_dir

    levels = [int(x) for x in args.concurrency.split(",") if x]
    sides = [s for s in args.sides.split(",") if s]
    batch = max(levels)
    profile = hardware_profiles()[args.device]
    messages = [{"role": "user", "content": prompt_text(args.prompt_words)}]
    model_dir = cached_model_dir(args.size)
    zip_path = build_model_zip(Path(tempfile.mkdtemp()) / f"bench-{args.size}.zip", args.size)
    eng = engine_settings(model_dir, profile, batch)
    vllm = {"optimizationType": "vllm", "quantizationType": ""}
    body = deploy_body(args.device, batch, "bench-peers", optimizationInfo=vllm)
    print(f"engine settings of every side: {json.dumps(eng)}", flush=True)
    run = {
        "raydock": lambda: raydock_side(zip_path, body, levels, args, messages),
        "serve-llm": lambda: serve_llm_side(model_dir, eng, body, levels, args, messages),
        "vllm": lambda: vllm_side(model_dir, eng, body, levels, args, messages),
    }
    rounds = []
    for r in range(args.rounds):
        order = sides[r % len(sides) :] + sides[: r % len(sides)]  # rotate who goes first
        rnd: dict[str, Any] = {"round": r + 1, "order": order}
        for side in order:
            print(f"round {r + 1}: {SIDES[side]}", flush=True)
            try:
                rnd[side] = run[side]()
            except Exception as exc:  # the comparison stands on the sides that run
                rnd[side] = {"error": str(exc) or repr(exc)}
                print(f"{SIDES[side]} failed: {rnd[side]['error']}", flush=True)
        rounds.append(rnd)
        report(rounds, sides, levels, args, eng, batch)  # after every round: a partial run counts


def report(rounds, sides, levels, args, eng, batch) -> None:
    versions = ", ".join(f"{d} {_version(d)}" for d in ("vllm", "ray", "torch"))
    md = (
        f"Machine: {machine()}; {versions}\n\n"
        f"Model: generated `{args.size}`, prompt {args.prompt_words} words, "
        f"{args.max_tokens} output tokens (ignore_eos, unseeded); vLLM dtype {eng['dtype']}, "
        f"max-num-seqs {batch}, KV cache {eng['kv_cache_bytes'] / 2**20:.0f} MiB, "
        f"{eng['threads']} threads (deviceType {args.device}), eager; medians of "
        f"{len(rounds)} round(s), sides one after the other, the first rotating\n\n"
        + render(rounds, sides, levels)
    )
    summary = {"machine": machine(), "versions": versions, "args": vars(args), "engine": eng}
    save("peers", summary | {"rounds": rounds}, md)


if __name__ == "__main__":
    main()
