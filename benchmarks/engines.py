"""Engine benchmark: transformers fp32 vs CTranslate2 int8 vs vLLM, in-process, same load.

    python -m benchmarks.engines [--size small] [--concurrency 1 16] [--requests 16]
                                 [--max-tokens 64] [--quantization int8] [--rounds 3]
                                 [--engines transformers,ctranslate2,vllm]

1. Builds the generated model via modelgen (cached) and converts it to CTranslate2
   (`--quantization`, int8 by default) in a fresh directory, timing the conversion.
2. Drives `TransformersEngine` (float32), `CTranslate2Engine` and `VLLMEngine` (the dtype
   raydock picks for the CPU: bfloat16 where native) in this process, one after the other,
   at each concurrency with identical chat prompts and fixed-length outputs (`ignore_eos`),
   through the same load generator as benchmarks.serving, for `--rounds` rounds (median
   kept; transformers and CTranslate2 take turns within a round). vLLM is skipped, with a note,
   where it is not installed. Each engine computes with the threads a deployment on a
   replica with `--threads` CPUs gives it (`engine_app.engine_threads`; `--engine-threads`
   forces one number for all).
Prints a markdown table and writes engines.{json,md} to --out (benchmarks/out).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.loadgen import prompt_text, requests_for, run_engine
from benchmarks.serving import OUT, machine, save


def measure(makers: dict, levels: list[int], args, messages) -> list[dict]:
    """Load every engine in `makers` (name -> constructor), then run `args.rounds` rounds in
    which each engine takes its turn at every level, so a slow spell of the machine hits
    them alike. Per engine and level, the round with the median throughput is reported
    (with every round's throughput in `rounds_tok_s`)."""
    engines = {}
    for name, make in makers.items():
        t0 = time.perf_counter()
        engines[name] = (make(), time.perf_counter() - t0)

    async def all_rounds() -> list[dict]:
        for engine, _ in engines.values():
            await run_engine(engine, 1, 2, messages, 8)  # warm-up
        rows = []
        for r in range(args.rounds):
            for name, (engine, load_s) in engines.items():
                for c in levels:
                    n = requests_for(c, args.requests)
                    row = await run_engine(engine, c, n, messages, args.max_tokens)
                    rows.append(row | {"engine": name, "round": r + 1, "load_s": load_s})
                    print(
                        f"round {r + 1} {name} c={c}: {row['output_token_throughput']:.1f} "
                        f"tok/s, e2e p50 {row['e2e_ms_p50']:.0f} ms",
                        flush=True,
                    )
        return rows

    rows = asyncio.run(all_rounds())
    medians = []
    for name, (engine, _) in engines.items():
        for c in levels:
            runs = sorted(
                (r for r in rows if r["engine"] == name and r["concurrency"] == c),
                key=lambda r: r["output_token_throughput"],
            )
            medians.append(
                runs[len(runs) // 2]
                | {"rounds_tok_s": [r["output_token_throughput"] for r in runs]}
            )
        medians[-1]["stats"] = engine.stats()
        if hasattr(engine, "shutdown"):  # vLLM: stop its EngineCore and worker processes
            engine.shutdown()
    engines.clear()
    gc.collect()
    return medians


def render(rows: list[dict], base: str) -> str:
    ref = {r["concurrency"]: r for r in rows if r["engine"] == base}
    head = (
        "| engine | conc | requests | out tok/s | decode tok/s per seq | TTFT p50 ms "
        "| E2E p50 ms | E2E p99 ms | speed-up | every round's tok/s |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        per_seq = 1e3 / r["tpot_ms_p50"] if r["tpot_ms_p50"] == r["tpot_ms_p50"] else float("nan")
        b = ref.get(r["concurrency"])
        speed = r["output_token_throughput"] / b["output_token_throughput"] if b else float("nan")
        lines.append(
            f"| {r['engine']} | {r['concurrency']} | {r['requests']} "
            f"| {r['output_token_throughput']:.1f} | {per_seq:.1f} | {r['ttft_ms_p50']:.1f} "
            f"| {r['e2e_ms_p50']:.0f} | {r['e2e_ms_p99']:.0f} | {speed:.2f}x "
            f"| {' / '.join(f'{x:.1f}' for x in r['rounds_tok_s'])} |"
        )
    return head + "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="small", choices=["tiny", "small"])
    p.add_argument("--concurrency", nargs="+", default=["1", "16"], help="e.g. 1 16 or 1,16")
    p.add_argument("--requests", type=int, default=16, help="minimum requests per level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=48)
    p.add_argument("--quantization", default="int8", help="CTranslate2 compute type")
    p.add_argument("--batch", type=int, default=0, help="maxBatchSize (0: the top concurrency)")
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="the replica's CPUs; each engine gets the threads a deployment would give it",
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds per engine (median kept)")
    p.add_argument("--engine-threads", type=int, default=0, help="force this many threads")
    p.add_argument("--out", type=Path, default=OUT, help="where engines.{json,md} go")
    p.add_argument("--engines", default="transformers,ctranslate2,vllm")
    p.add_argument(
        "--vllm-quantization",
        default="",
        help="also run vLLM on these 4-bit checkpoints of the model (awq,gptq)",
    )
    args = p.parse_args()

    from raydock.modelgen import cached_model_dir
    from raydock.optimizers import ctranslate2 as ct2
    from raydock.serve_apps.engine_app import engine_threads

    profile = {"device": "cpu", "num_cpus": args.threads}

    def threads(engine: str) -> int:
        return args.engine_threads or engine_threads(engine, profile)

    levels = [int(x) for item in args.concurrency for x in item.split(",") if x]
    batch = args.batch or max(levels)
    messages = [{"role": "user", "content": prompt_text(args.prompt_words)}]
    model_dir = cached_model_dir(args.size)
    work = Path(tempfile.mkdtemp(prefix="raydock-bench-ct2-"))
    try:
        conversion = ct2.convert(model_dir, work / "ct2", args.quantization)
        print(
            f"converted {args.size} to CTranslate2 {args.quantization} in "
            f"{conversion['seconds']:.1f}s ({conversion['size_bytes'] / 2**20:.1f} MiB)",
            flush=True,
        )

        def transformers_engine():
            from raydock.serve_apps.engines.transformers_engine import TransformersEngine

            return TransformersEngine(
                str(model_dir), num_threads=threads("transformers"), max_batch_size=batch
            )

        def ct2_engine():
            from raydock.serve_apps.engines.ctranslate2_engine import CTranslate2Engine

            return CTranslate2Engine(
                str(work / "ct2"),
                num_threads=threads("ctranslate2"),
                max_batch_size=batch,
                compute_type=args.quantization,
            )

        def vllm_engine(quantization: str = ""):
            from raydock.serve_apps.engines.vllm_engine import VLLMEngine

            return VLLMEngine(
                str(cached_model_dir(args.size, quantization=quantization or None)),
                num_threads=threads("vllm"),
                max_batch_size=batch,
                quantization=quantization or None,
            )

        base = "transformers fp32"
        wanted = args.engines.split(",")
        # transformers and CTranslate2 alternate within each round; vLLM (its own
        # processes, which poll while idle) runs its rounds afterwards
        makers = {}
        if "transformers" in wanted:
            makers[base] = transformers_engine
        if "ctranslate2" in wanted:
            makers[f"ctranslate2 {args.quantization}"] = ct2_engine
        rows = measure(makers, levels, args, messages) if makers else []
        if "vllm" in wanted:
            if importlib.util.find_spec("vllm") is None:
                print("vllm is not installed: no vLLM rows (pip install -e '.[vllm]')")
            else:
                from raydock.serve_apps.engines import vllm_engine as ve

                dtype = ve._default_dtype("cpu", ve._text_config(model_dir), None)
                vllm_makers = {f"vllm {dtype}": vllm_engine}
                for q in filter(None, args.vllm_quantization.split(",")):
                    vllm_makers[f"vllm {q} (4-bit)"] = functools.partial(vllm_engine, q)
                for name, make in vllm_makers.items():  # one at a time: idle vLLMs poll
                    rows += measure({name: make}, levels, args, messages)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    md = (
        f"Machine: {machine()}\n\nModel: generated `{args.size}`, prompt {args.prompt_words} "
        f"words, {args.max_tokens} output tokens (ignore_eos, temperature 1), maxBatchSize "
        f"{batch}, replica CPUs {args.threads} (engine threads: "
        + ", ".join(f"{e} {threads(e)}" for e in ("transformers", "ctranslate2", "vllm"))
        + f"); CTranslate2 {args.quantization} conversion "
        f"{conversion['seconds']:.1f}s, {conversion['size_bytes'] / 2**20:.1f} MiB\n\n"
        + render(rows, base)
    )
    record = {"machine": machine(), "args": vars(args), "conversion": conversion, "rows": rows}
    save("engines", record, md, out=args.out)


if __name__ == "__main__":
    main()
