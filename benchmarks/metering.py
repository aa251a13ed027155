"""What metering costs: raydock serving at concurrency 16 with metrics, usage and a
non-binding rate limit on the key, against the same platform with `metering: false`.

    python -m benchmarks.metering [--size small] [--rounds 4] [--requests 48]

Each round starts an embedded raydock (metering on, or off), imports the generated model,
deploys it on one replica and drives it through the Serve proxy with streaming chat requests
(with metering on, through a key with a limit of 10^6 requests per minute and a 10^12-token
daily budget: every request goes through admission). Rounds alternate on/off (off first in
odd rounds), and the verdict is the median of each on round's throughput over its neighbour
off round's. Writes benchmarks/out/metering.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path

from benchmarks.loadgen import prompt_text, run_http, table
from benchmarks.serving import embedded_deployment, machine, save

TARGET = 0.97
LIMITS = {"requestsPerMinute": 1_000_000, "tokensPerDay": 10**12}  # never reached


def served(zip_path: Path, metering: bool, args, messages) -> dict:
    with embedded_deployment(zip_path, args, metering=metering) as (client, dep_id):
        body = {"name": "bench"} | ({"limits": LIMITS} if metering else {})
        key = client.post(f"/deployments/{dep_id}/api-keys", json=body)["apiKey"]
        base = f"{client.base_url}/deployments/{dep_id}/v2"
        asyncio.run(run_http(base, key, 4, 8, messages, 8))  # warm-up
        row = asyncio.run(run_http(base, key, 16, args.requests, messages, args.max_tokens))
        label = "metering on" if metering else "metering off"
        print(f"{label}: {row['output_token_throughput']:.1f} tok/s", flush=True)
        return row | {"target": label}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="small", choices=["tiny", "small"])
    p.add_argument("--requests", type=int, default=48, help="requests at concurrency 16")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=48)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="cpu-medium")
    p.add_argument("--port", type=int, default=8766)
    p.add_argument("--rounds", type=int, default=4, help="on/off passes, alternating")
    args = p.parse_args()

    from raydock.modelgen import build_model_zip

    messages = [{"role": "user", "content": prompt_text(args.prompt_words)}]
    zip_path = build_model_zip(Path(tempfile.mkdtemp()) / f"bench-{args.size}.zip", args.size)
    rows, ratios = [], []
    for r in range(args.rounds):
        order = (False, True) if r % 2 else (True, False)
        got = {on: served(zip_path, on, args, messages) for on in order}
        rows += [got[on] | {"target": f"{got[on]['target']}, round {r + 1}"} for on in order]
        ratios.append(got[True]["output_token_throughput"] / got[False]["output_token_throughput"])
    median = statistics.median(ratios)
    verdict = (
        f"metering on / off at c16 = {median:.3f} (rounds: "
        f"{', '.join(f'{x:.3f}' for x in ratios)}; target >= {TARGET}: "
        f"{'met' if median >= TARGET else 'NOT met'})"
    )
    md = f"Machine: {machine()}\n\n{table(rows, 'target')}\n- {verdict}\n"
    record = {"machine": machine(), "args": vars(args), "rows": rows, "verdict": verdict}
    save("metering", record, md)


if __name__ == "__main__":
    main()
