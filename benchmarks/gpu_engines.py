"""GPU engine benchmark: raydock's transformers and CTranslate2 engines, in-process on CUDA,
against the libraries' own batch generation on the same weights.

    python -m benchmarks.gpu_engines [--size small] [--concurrency 1 16 64] [--requests 16]
                                     [--max-tokens 128] [--rounds 3]
                                     [--compute-type int8_float16] [--device cuda]
                                     [--engines transformers,ctranslate2]
                                     [--name gpu_engines] [--out DIR]

Made for a GPU machine that has PyTorch and transformers but no Ray or vLLM (the device tool's):
nothing here starts Ray. It runs on a CPU machine too (`--device cpu`, or no GPU found), which
is how it is checked before a GPU is lent.

1. Generates the model (`raydock.modelgen`) and converts it to CTranslate2 `--compute-type`.
2. Four rows, taking turns within each round, at every concurrency c:
   - `hf generate`: Hugging Face `generate` on the weights raydock's transformers engine
     loaded (float16 on CUDA), greedy, the requests as static batches of c;
   - `raydock transformers`: `TransformersEngine.generate`, c requests at a time (its
     continuous batching), through the same load generator as benchmarks.engines;
   - `ct2 generate_batch`: CTranslate2's `generate_batch` on the engine's generator, static
     batches of c;
   - `raydock ctranslate2`: `CTranslate2Engine.generate`, c at a time.
   Every request decodes `--max-tokens` tokens greedily (no early end) after the same chat
   prompt. One wave at every level warms each row up first; the round with the median
   output tok/s is kept per row and level.
3. Checks that raydock's transformers engine gives the same greedy tokens as `generate` for
   the prompt (batch 1, stopping at EOS), and how far CTranslate2's quantized tokens agree.

A row that cannot load or run (no CUDA build of CTranslate2, a missing library) reports the
exact error instead of figures, and the device it really ran on is always shown: the engines
fall back to the CPU when they find no GPU. Writes <name>.{json,md} to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import platform
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.loadgen import prompt_text, requests_for, run_engine
from benchmarks.serving import OUT, machine, save

GREEDY = {"temperature": 0.0}


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def static_batches(
    step: Callable[[int, int], Any], concurrency: int, requests: int, tokens: int
) -> dict[str, Any]:
    """Run `requests` as static batches of `concurrency` with `step(batch size, tokens)`,
    which decodes that many tokens per sequence; a one-token batch first gives the time to
    first token. Returns the keys of the load generator's summary that a static batch has."""
    _sync()
    t0 = time.perf_counter()
    step(concurrency, 1)
    _sync()
    ttft = time.perf_counter() - t0
    waves = math.ceil(requests / concurrency)
    t0 = time.perf_counter()
    for _ in range(waves):
        step(concurrency, tokens)
    _sync()
    wall = time.perf_counter() - t0
    per_wave = wall / waves
    return {
        "concurrency": concurrency,
        "requests": waves * concurrency,
        "errors": 0,
        "wall_s": wall,
        "output_token_throughput": waves * concurrency * tokens / wall,
        "ttft_ms_p50": ttft * 1e3,
        "tpot_ms_p50": (per_wave - ttft) / max(tokens - 1, 1) * 1e3,
        "e2e_ms_p50": per_wave * 1e3,
    }


def hf_step(engine: Any, prompt: list[int]) -> Callable[[int, int], Any]:
    import torch

    def step(batch: int, tokens: int):
        ids = torch.tensor([prompt] * batch, device=engine.device)
        with torch.inference_mode():
            return engine.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=engine.pad_id,
            )

    return step


def ct2_step(engine: Any, prompt: list[int]) -> Callable[[int, int], Any]:
    words = [engine.vocab[t] for t in prompt]

    def step(batch: int, tokens: int):
        return engine.generator.generate_batch(
            [words] * batch,
            max_length=tokens,
            include_prompt_in_result=False,
            end_token=[],
            sampling_topk=1,
        )

    return step


async def greedy_tokens(engine: Any, prompt: list[int], tokens: int) -> list[int]:
    """raydock's greedy reply to `prompt` (stopping at EOS), as token ids."""
    from raydock.serve_apps.sampling import SamplingParams

    out: list[int] = []
    async for steps in engine.generate(prompt, SamplingParams(max_tokens=tokens, **GREEDY)):
        for s in steps:
            out += s.token_ids
    return out


def hf_greedy(engine: Any, prompt: list[int], tokens: int) -> list[int]:
    import torch

    ids = torch.tensor([prompt], device=engine.device)
    with torch.inference_mode():
        out = engine.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=tokens,
            do_sample=False,
            pad_token_id=engine.pad_id,
            eos_token_id=sorted(engine.eos),
        )
    reply = out[0, len(prompt) :].tolist()
    cut = next((i for i, t in enumerate(reply) if t in engine.eos), len(reply))
    return reply[:cut]


def common_prefix(a: list[int], b: list[int]) -> int:
    differ = (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    return next(differ, min(len(a), len(b)))


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip()


def environment(device: str) -> dict[str, Any]:
    import torch
    import transformers

    env: dict[str, Any] = {
        "machine": machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device_asked": device,
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["torch_cuda"] = torch.version.cuda
    try:
        import ctranslate2

        env["ctranslate2"] = ctranslate2.__version__
        env["ct2_cuda_devices"] = ctranslate2.get_cuda_device_count()
        if env["ct2_cuda_devices"]:
            env["ct2_cuda_compute_types"] = sorted(ctranslate2.get_supported_compute_types("cuda"))
    except Exception as e:  # noqa: BLE001 - reported, not raised: the other rows still run
        env["ctranslate2_error"] = error_text(e)
    return env


def transformers_engine(args, model_dir: Path, work: Path) -> Any:
    from raydock.serve_apps.engines.transformers_engine import TransformersEngine

    return TransformersEngine(str(model_dir), device=args.device, max_batch_size=max(args.levels))


def ctranslate2_engine(args, model_dir: Path, work: Path) -> Any:
    from raydock.optimizers import ctranslate2 as ct2
    from raydock.serve_apps.engines.ctranslate2_engine import CTranslate2Engine

    conversion = ct2.convert(model_dir, work / "ct2", args.compute_type)
    print(f"converted to CTranslate2 in {conversion['seconds']:.1f}s", flush=True)
    engine = CTranslate2Engine(
        str(work / "ct2"),
        device=args.device,
        max_batch_size=max(args.levels),
        compute_type=args.compute_type,
    )
    # CTranslate2 opens the GPU's libraries (cuBLAS) at the first product, not at load
    ct2_step(engine, [0, 1])(1, 1)
    return engine


LOADERS = {"transformers": transformers_engine, "ctranslate2": ctranslate2_engine}
#: per engine: its library's own batch generation (the reference row), how to run it, and
#: raydock's row
ROWS = {
    "transformers": ("hf generate", hf_step, "raydock transformers"),
    "ctranslate2": ("ct2 generate_batch", ct2_step, "raydock ctranslate2"),
}


def load_engines(args, model_dir: Path, work: Path) -> tuple[dict, dict]:
    """raydock's engines asked for (name -> engine), and each one's load error."""
    engines: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name in args.engines.split(","):
        t0 = time.perf_counter()
        try:
            engines[name] = LOADERS[name](args, model_dir, work)
        except Exception as e:  # noqa: BLE001 - reported in place of the row's figures
            errors[name] = error_text(e)
            traceback.print_exc()
        else:
            print(f"{name} engine ready in {time.perf_counter() - t0:.1f}s", flush=True)
    return engines, errors


def measure(args, engines: dict[str, Any], prompt: list[int], messages: list[dict]) -> list[dict]:
    """Every row's median round per level; a row is (engine key, how it runs a level)."""
    rows_of: dict[str, tuple[str, Callable]] = {}
    for key, engine in engines.items():
        library, step_of, mine = ROWS[key]
        step = step_of(engine, prompt)
        rows_of[library] = (
            key,
            lambda c, n, step=step: static_batches(step, c, n, args.max_tokens),
        )
        rows_of[mine] = (
            key,
            lambda c, n, engine=engine: asyncio.run(
                run_engine(engine, c, n, messages, args.max_tokens, GREEDY)
            ),
        )
    # warm-up, one wave at every level: on a GPU a batch size's first run is several times
    # slower (the clocks, the allocator, cuBLAS's choices per shape), which one round at 2
    # sequences left in the first measured round
    for _, run in rows_of.values():
        for c in args.levels:
            run(c, c)
    rows = []
    for r in range(args.rounds):
        for name, (key, run) in rows_of.items():
            for c in args.levels:
                row = run(c, requests_for(c, args.requests))
                rows.append(row | {"row": name, "device": engines[key].device, "round": r + 1})
                print(
                    f"round {r + 1} {name} c={c}: {row['output_token_throughput']:.0f} tok/s, "
                    f"TTFT p50 {row['ttft_ms_p50']:.1f} ms",
                    flush=True,
                )
    medians = []
    for name in rows_of:
        for c in args.levels:
            runs = sorted(
                (r for r in rows if r["row"] == name and r["concurrency"] == c),
                key=lambda r: r["output_token_throughput"],
            )
            tok_s = [r["output_token_throughput"] for r in runs]
            medians.append(runs[len(runs) // 2] | {"rounds_tok_s": tok_s})
    return medians


#: each raydock row's reference: the library's own batch generation on the same weights
REFERENCE = {mine: library for library, _, mine in ROWS.values()}


def render(record: dict[str, Any]) -> str:
    env = record["environment"]
    lines = [
        f"GPU engines on {env.get('gpu', 'no GPU')} ({env['machine']}); torch {env['torch']}, "
        f"transformers {env['transformers']}, ctranslate2 {env.get('ctranslate2', '-')}; "
        f"model `{record['size']}`, CTranslate2 {record['compute_type']}, "
        f"{record['max_tokens']} tokens per request, greedy, {record['rounds']} rounds (median).",
        "",
        "| row | device | conc | requests | out tok/s | TTFT p50 ms | TPOT p50 ms "
        "| E2E p50 ms | / library | every round's tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["row"], r["concurrency"]): r for r in record["rows"]}
    for r in record["rows"]:
        ref = by.get((REFERENCE.get(r["row"]), r["concurrency"]))
        ratio = ""
        if ref:
            ratio = f"{r['output_token_throughput'] / ref['output_token_throughput']:.2f}x"
        lines.append(
            f"| {r['row']} | {r['device']} | {r['concurrency']} | {r['requests']} "
            f"| {r['output_token_throughput']:.0f} | {r['ttft_ms_p50']:.1f} "
            f"| {r['tpot_ms_p50']:.2f} | {r['e2e_ms_p50']:.0f} | {ratio} "
            f"| {' / '.join(f'{x:.0f}' for x in r['rounds_tok_s'])} |"
        )
    for name, err in record["errors"].items():
        lines.append(f"\n**{name} did not run**: `{err}`")
    for name, check in record["checks"].items():
        lines.append(f"\n{name}: {check}")
    return "\n".join(lines) + "\n"


def checks(engines: dict[str, Any], prompt: list[int], tokens: int) -> dict[str, str]:
    """Greedy agreement of raydock's engines with `generate` (batch 1, to EOS)."""
    if "transformers" not in engines:
        return {}
    e = engines["transformers"]
    reference = hf_greedy(e, prompt, tokens)
    out = {}
    for key, engine in engines.items():
        mine = asyncio.run(greedy_tokens(engine, prompt, tokens))
        same = common_prefix(mine, reference)
        out[f"greedy tokens, raydock {key} vs hf generate"] = (
            f"{'identical' if mine == reference else 'different'}: the first {same} of "
            f"{len(reference)} agree ({len(mine)} produced)"
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="small", choices=["tiny", "small"])
    p.add_argument("--concurrency", nargs="+", default=["1", "16", "64"], help="e.g. 1 16 or 1,16")
    p.add_argument("--requests", type=int, default=16, help="minimum requests per level")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-words", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compute-type", default="int8_float16", help="CTranslate2's")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--engines", default=",".join(LOADERS), help="raydock's engines to run")
    p.add_argument("--name", default="gpu_engines", help="the report's file name")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    args.levels = [int(x) for item in args.concurrency for x in item.split(",") if x]

    from raydock.modelgen import cached_model_dir

    started = time.perf_counter()
    env = environment(args.device)
    print(env, flush=True)
    model_dir = cached_model_dir(args.size)
    with tempfile.TemporaryDirectory(prefix="raydock-gpu-") as work:
        engines, errors = load_engines(args, model_dir, Path(work))
        messages = [{"role": "user", "content": prompt_text(args.prompt_words)}]
        prompt = next(iter(engines.values())).chat_prompt(messages) if engines else []
        rows = measure(args, engines, prompt, messages) if engines else []
        record = {
            "environment": env,
            "size": args.size,
            "compute_type": args.compute_type,
            "max_tokens": args.max_tokens,
            "rounds": args.rounds,
            "prompt_tokens": len(prompt),
            "rows": rows,
            "errors": errors,
            "checks": checks(engines, prompt, args.max_tokens),
            "seconds": time.perf_counter() - started,
        }
        for engine in engines.values():
            if hasattr(engine, "shutdown"):
                engine.shutdown()
    save(args.name, record, render(record), args.out)


if __name__ == "__main__":
    main()
