"""What serving many LoRA adapters from one base costs: the transformers engine in-process.

Throughput at concurrency 16 (the `small` model, 64 output tokens per request, greedy with
`ignore_eos`) with requests spread over 1, 4 or 16 distinct adapters, against the plain base
(no adapter loaded at all), in alternating rounds within one run; plus the time to load one
adapter into a warm engine (PEFT, from the node-local directory the replica fetched).
Writes benchmarks/out/adapters.{json,md}.

    python -m benchmarks.adapters --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from benchmarks.serving import machine, save
from raydock.modelgen import cached_model_dir
from raydock.modelgen.adapters import cached_adapter_dir
from raydock.serve_apps.engines.transformers_engine import TransformersEngine
from raydock.serve_apps.sampling import SamplingParams

PROMPT = (
    "Tell me a long story about a lighthouse keeper who collects stones from the shore, "
    "the storms of the northern sea, the ships that pass at night and the bread she bakes"
)


async def _throughput(
    engine: TransformersEngine, adapters: list[str | None], requests: int, tokens: int
) -> float:
    """Output tokens per second for `requests` requests, 16 at a time, adapters round-robin."""
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    prompt = engine.text_prompt(PROMPT)
    slots = asyncio.Semaphore(16)
    produced = 0

    async def one(i: int) -> None:
        nonlocal produced
        async with slots:
            async for steps in engine.generate(prompt, params, adapter=adapters[i % len(adapters)]):
                produced += sum(len(ev.token_ids) for ev in steps)

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(requests)))
    return produced / (time.perf_counter() - start)


def markdown(report: dict) -> str:
    """The report's figures as a short markdown table."""
    args = report["args"]
    lines = [
        f"Machine: {machine()}",
        "",
        f"Model: generated `small`, {args['requests']} requests at concurrency 16, "
        f"{args['tokens']} output tokens (ignore_eos), {args['threads']} torch threads, "
        f"median of {args['rounds']} rounds",
        "",
        "| adapters | tok/s (median) | vs base |",
        "|---|---|---|",
        *(
            f"| {name} | {tok_s:.1f} | {report['ratio_to_base'][name]:.3f} |"
            for name, tok_s in report["tok_s_median"].items()
        ),
        "",
        f"adapter load: first {report['first_load_s']:.2f} s, warm median "
        f"{report['warm_load_s_median']:.3f} s, max {report['warm_load_s_max']:.3f} s",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    model = str(cached_model_dir("small"))
    dirs = [str(cached_adapter_dir("small", seed=s)) for s in range(1, 17)]
    plain = TransformersEngine(model, num_threads=args.threads, max_batch_size=16)
    multi = TransformersEngine(model, num_threads=args.threads, max_batch_size=16)

    async def run() -> dict:
        loads = []
        for i, d in enumerate(dirs):  # the first load wraps the model; the rest are warm
            start = time.perf_counter()
            await multi.load_adapter(f"a{i}", d)
            loads.append(time.perf_counter() - start)
        mixes = {
            "base": (plain, [None]),
            "1": (multi, ["a0"]),
            "4": (multi, [f"a{i}" for i in range(4)]),
        }
        mixes["16"] = (multi, [f"a{i}" for i in range(16)])
        await _throughput(plain, [None], 16, 8)  # warm-up both engines
        await _throughput(multi, ["a0"], 16, 8)
        figures: dict[str, list[float]] = {k: [] for k in mixes}
        for r in range(args.rounds):
            order = list(mixes) if r % 2 == 0 else list(reversed(mixes))
            for name in order:
                engine, adapters = mixes[name]
                figures[name].append(
                    await _throughput(engine, adapters, args.requests, args.tokens)
                )
        return {"loads": loads, "figures": figures}

    res = asyncio.run(run())
    med = {k: statistics.median(v) for k, v in res["figures"].items()}
    warm = res["loads"][1:]
    report = {
        "args": vars(args),
        "tok_s_rounds": res["figures"],
        "tok_s_median": med,
        "ratio_to_base": {k: med[k] / med["base"] for k in med},
        "first_load_s": res["loads"][0],
        "warm_load_s_median": statistics.median(warm),
        "warm_load_s_max": max(warm),
    }
    save("adapters", report, markdown(report))


if __name__ == "__main__":
    main()
