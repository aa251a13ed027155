"""Soak test: concurrent streams for minutes, mixed with a steady stream of hostile requests.

    python -m benchmarks.soak [--duration 300] [--concurrency 64] [--max-tokens 32]

Starts an embedded raydock, deploys the tiny generated model on one replica, then for
`--duration` seconds keeps `--concurrency` streaming chats going while one client sends
hostile requests in a loop (invalid UTF-8, nesting, oversized bodies, malformed JSON, bad
parameters and tool fields, unknown ids, management bodies over their limits). Every
process's peak resident memory is sampled from /proc each second. The verdict: 0 server
errors (any 5xx, or a stream that does not end in `data: [DONE]`), and every hostile
request answered with a 4xx. Writes benchmarks/out/soak.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.serving import save

ASK = [{"role": "user", "content": "Tell me about the sea."}]


def hostile_requests(base: str, api: str, model_id: str) -> list[tuple[str, str, dict]]:
    """(method, url, aiohttp kwargs) of requests that must each get a 4xx."""
    chat = f"{base}/chat/completions"
    deep_schema: dict = {"type": "string"}
    for _ in range(200):
        deep_schema = {"type": "object", "properties": {"a": deep_schema}}
    json_ct = {"Content-Type": "application/json"}
    return [
        ("POST", chat, {"data": b'{"messages": [\xff]}', "headers": json_ct}),
        ("POST", chat, {"data": b'{"messages": [}', "headers": json_ct}),
        ("POST", chat, {"data": b'{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"}),
        ("POST", chat, {"json": {"messages": [{"role": "user", "content": "a" * 9_000_000}]}}),
        ("POST", chat, {"json": {"messages": [{"role": "user", "content": "w " * 1_000_000}]}}),
        (
            "POST",
            chat,
            {
                "json": {
                    "messages": ASK,
                    "response_format": {
                        "type": "json_schema",
                        "json_schema": {"name": "d", "schema": deep_schema},
                    },
                }
            },
        ),
        ("POST", chat, {"json": {"messages": ASK, "temperature": 9}}),
        ("POST", chat, {"json": {"messages": ASK, "tool_choice": "required"}}),
        ("POST", chat, {"json": {"messages": [{"role": "tool", "tool_calls": [{"id": 1}]}]}}),
        ("POST", chat, {"json": {"messages": ASK, "guided_regex": "(?=a)b"}}),
        ("GET", f"{api}/models/cm-nope", {}),
        ("PATCH", f"{api}/models/{model_id}", {"json": {"tags": ["t" * 101]}}),
        ("POST", f"{api}/users", {"json": {"name": "x", "email": "nope"}}),
        ("POST", f"{api}/deployments/dp-nope/undeploy", {}),
        ("PUT", f"{api}/models", {}),
    ]


class PeakMemory:
    """Each process's peak resident memory (MiB), by its command line, sampled from /proc."""

    def __init__(self, interval_s: float = 1.0):
        self.interval_s, self.peaks = interval_s, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _sample() -> dict[str, float]:
        out: dict[str, float] = {}
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
                status = (proc / "status").read_text()
            except OSError:
                continue
            rss = next((ln for ln in status.splitlines() if ln.startswith("VmRSS:")), None)
            if not cmd or rss is None:
                continue
            out[f"{proc.name} {cmd[:80]}"] = int(rss.split()[1]) / 1024
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            for name, mib in self._sample().items():
                self.peaks[name] = max(self.peaks.get(name, 0.0), mib)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()


async def soak(base: str, api: str, key: str, admin: str, model_id: str, args) -> dict[str, Any]:
    deadline = time.monotonic() + args.duration
    streams: Counter = Counter()
    hostile: Counter = Counter()
    failures: list[str] = []
    body = {"messages": ASK, "max_tokens": args.max_tokens, "stream": True, "ignore_eos": True}

    async def streamer(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            try:
                async with session.post(f"{base}/chat/completions", json=body) as r:
                    text = (await r.read()).decode()
                ok = r.status == 200 and text.rstrip().endswith("data: [DONE]")
                ok = ok and '"error"' not in text
                streams["ok" if ok else f"HTTP {r.status}"] += 1
                if not ok:
                    failures.append(f"stream HTTP {r.status}: {text[-200:]}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                streams["transport error"] += 1
                failures.append(f"stream {exc!r}")

    async def attacker(session: aiohttp.ClientSession) -> None:
        cases = hostile_requests(base, api, model_id)
        i = 0
        while time.monotonic() < deadline:
            method, url, kw = cases[i % len(cases)]
            i += 1
            headers = ({"X-api-key": admin} if url.startswith(api) else {}) | kw.get("headers", {})
            payload = {k: v for k, v in kw.items() if k != "headers"}
            try:
                async with session.request(method, url, headers=headers, **payload) as r:
                    await r.read()
                hostile[r.status] += 1
                if not 400 <= r.status < 500:
                    failures.append(f"hostile {method} {url[-40:]}: HTTP {r.status}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                hostile["transport error"] += 1
                failures.append(f"hostile {method} {url[-40:]}: {exc!r}")
            await asyncio.sleep(0.05)

    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(limit=args.concurrency + 8)
    auth = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=auth) as s:
        await asyncio.gather(attacker(s), *(streamer(s) for _ in range(args.concurrency)))
    return {"streams": dict(streams), "hostile": dict(hostile), "failures": failures[:50]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()

    import ray

    from benchmarks.serving import deploy_body
    from raydock.client import Client
    from raydock.config import load_settings
    from raydock.modelgen import build_model_zip
    from raydock.platform.bootstrap import connect, free_port, start_platform, stop_platform

    home = tempfile.mkdtemp(prefix="raydock-soak-")
    settings = load_settings(home=home, port=args.port or free_port())
    connect(settings, include_dashboard=False)
    try:
        info = start_platform(settings)
        client = Client(info["url"], info["admin_key"])
        ref = client.import_zip(build_model_zip(Path(home) / "tiny.zip", size="tiny"))
        assert client.wait_job(ref["dockStatusId"], timeout=600)["status"] == "SUCCESS"
        dep = client.deploy(ref["modelId"], deploy_body("cpu-small", 16, name="soak"))
        assert client.wait_job(dep["dockStatusId"], timeout=600)["status"] == "SUCCESS"
        key = client.create_key(dep["deploymentId"])
        base = f"{info['url']}/deployments/{dep['deploymentId']}/v2"
        api = f"{info['url']}/api/public"
        with PeakMemory() as memory:
            result = asyncio.run(soak(base, api, key, info["admin_key"], ref["modelId"], args))
    finally:
        stop_platform()
        ray.shutdown()
    peaks = dict(sorted(memory.peaks.items(), key=lambda kv: -kv[1])[:25])
    server_errors = len(result["failures"])
    report = {"args": vars(args), **result, "serverErrors": server_errors, "peakRssMiB": peaks}
    lines = [
        f"# Soak: {args.concurrency} streams for {args.duration} s + hostile requests",
        "",
        f"streams: {result['streams']}",
        f"hostile answers by status: {result['hostile']}",
        f"server errors: {server_errors}",
        "",
        "| peak RSS (MiB) | process |",
        "| ---: | --- |",
        *(f"| {mib:.0f} | `{name}` |" for name, mib in peaks.items()),
    ]
    save("soak", report, "\n".join(lines) + "\n")
    print("VERDICT:", "PASS" if server_errors == 0 else f"FAIL ({server_errors} server errors)")


if __name__ == "__main__":
    main()
