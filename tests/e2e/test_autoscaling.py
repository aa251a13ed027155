"""Sustained load grows a deployment from minReplicas to maxReplicas; idleness shrinks it."""

from __future__ import annotations

import threading
import time

import httpx

from .conftest import deploy_and_wait, wait_for

BATCH, TOKENS, CLIENTS = 2, 128, 8


class ReplicaSampler:
    """The deployment's replica counts as its management API shows them, read every 0.25 s
    in a thread from `start` until `stop`: (seconds since start, current, target)."""

    def __init__(self, platform, dep_id: str):
        self.platform, self.dep_id = platform, dep_id
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.started = 0.0

    def _run(self) -> None:
        with self.platform.http() as http:
            while not self._stop.is_set():
                r = http.get(f"/api/public/deployments/{self.dep_id}").json()["replicas"]
                self.samples.append((time.monotonic() - self.started, r["current"], r["target"]))
                self._stop.wait(0.25)

    def start(self) -> None:
        self.started = time.monotonic()
        self._thread.start()
        wait_for(lambda: self.samples, timeout=10, interval=0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def last(self) -> tuple[int, int]:
        return self.samples[-1][1:]

    def sequence(self, field: int) -> list[int]:
        """The distinct values one field took, in order (1 = current, 2 = target)."""
        values = [s[field] for s in self.samples]
        return [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]


def test_load_scales_1_to_2_to_1(platform, ready_model):
    # up after 1 s of load, down after 2 s of quiet
    dep = deploy_and_wait(
        platform,
        ready_model["modelId"],
        "elastic",
        scalingParameters={
            "maxBatchSize": BATCH,
            "minReplicas": 1,
            "maxReplicas": 2,
            "scaleUpDelay": 1,
            "scaleDownDelay": 2,
        },
    )
    dep_id = dep["deploymentId"]
    key = platform.client.create_key(dep_id)
    url = f"{platform.url}/deployments/{dep_id}/v2/chat/completions"
    body = {
        "messages": [{"role": "user", "content": "more"}],
        "max_tokens": TOKENS,
        "ignore_eos": True,
    }
    # CLIENTS requests in flight stay under one replica's limit (BATCH decoding + 4 * BATCH,
    # at least 8, waiting): every request is answered in full, none gets a 429
    answers: list[tuple[int, str | None, int | None]] = []  # status, content, its tokens
    stop = threading.Event()

    def load():
        with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {key}"}) as c:
            while not stop.is_set():
                r = c.post(url, json=body)
                if r.status_code != 200:
                    answers.append((r.status_code, r.text, None))
                    continue
                reply = r.json()
                content = reply["choices"][0]["message"]["content"]
                answers.append((200, content, reply["usage"]["completion_tokens"]))

    sampler = ReplicaSampler(platform, dep_id)
    sampler.start()  # from before the load until after the scale-down
    workers = [threading.Thread(target=load, daemon=True) for _ in range(CLIENTS)]
    try:
        for w in workers:
            w.start()
        wait_for(lambda: sampler.last()[0] == 2, timeout=90, interval=0.25)
        up = time.monotonic() - sampler.started
    finally:
        stopped = time.monotonic() - sampler.started
        stop.set()
        for w in workers:
            w.join()
    try:
        wait_for(lambda: sampler.last() == (1, 1), timeout=60, interval=0.25)
        time.sleep(1.5)  # and it stays there
    finally:
        sampler.stop()
    print(f"2 replicas at {up:.1f} s, load stopped at {stopped:.1f} s, samples {sampler.samples}")
    # observed, not waited into: every count the API showed, from before the load to the end
    assert sampler.sequence(1) == [1, 2, 1], sampler.samples
    assert sampler.sequence(2) == [1, 2, 1], sampler.samples
    down = next(t for t, _, target in sampler.samples if t > up and target == 1)
    assert down - stopped >= 2  # not before scaleDownDelay
    assert answers and all(
        status == 200 and content and tokens == TOKENS for status, content, tokens in answers
    ), [a for a in answers if a[0] != 200 or not a[1]][:3]
    platform.client.wait_job(
        platform.client.post(f"/deployments/{dep_id}/undeploy")["dockStatusId"]
    )
