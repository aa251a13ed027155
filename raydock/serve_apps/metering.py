"""What a serving process (engine replica or gateway) measures, and its rate-limit checks.

Each request is counted in memory (`Call`, then `ReplicaMeter.finish`), a few dict updates
on the event loop; twice a second the batch goes to the meter actor in one call, off the
request path. A key with limits costs one actor call at admission (the meter decides for all
replicas at once). The meter restarting loses nothing: the batch waits and goes with the next
one, and admission lets requests through meanwhile (a limit is not worth an outage).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import ray

from raydock.errors import ApiError
from raydock.metering import catalog as M
from raydock.metering.batch import Batch

log = logging.getLogger("raydock.metering")

#: how often a process reports what it counted
FLUSH_INTERVAL_S = 0.5
#: admission waits this long for the meter, then lets the request through
ADMIT_TIMEOUT_S = 1.0
#: status recorded for a request whose client went away (nginx's convention)
CLIENT_CLOSED = 499

#: adds what the process measures besides requests (gauges, engine counters) at each report
Collect = Callable[[Batch], None]

#: the key of the event a replica sends once its engine has taken a request's prompt
PROMPT_TAKEN = "prompt_taken"


def prompt_taken(prompt_tokens: int) -> list[dict]:
    """The batch a replica sends when its engine has taken the request's prompt into a batch
    (its prefill begins; `Engine.generate`'s `announce_admission`). The one rule for the
    prompt: charged from then on, even if the client goes (or the deadline passes) before
    the first token, and never before, while the request only waits for a slot (as vLLM
    counts prompt tokens, and OpenAI charges no request that failed before processing).
    `ReplicaMeter.watch` takes it out of the stream, metering on or off: no consumer of the
    events sees it."""
    return [{PROMPT_TAKEN: True, "prompt_tokens": prompt_tokens}]


def is_prompt_taken(batch: list[dict]) -> bool:
    return bool(batch) and PROMPT_TAKEN in batch[0]


@dataclass
class Call:
    """One inference request as it is metered."""

    deployment: str
    key: str
    started: float  # time.monotonic()
    adapter: str = ""
    first_token: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # tokens streamed per choice: what a stream cut before its end (no usage yet) is charged
    streamed: dict[int, int] = field(default_factory=dict)
    finished: int = 0  # choices that ended
    n: int = 1
    done: bool = False


class ReplicaMeter:
    def __init__(
        self, meter: tuple[str, str] | None, collect: Collect | None = None, enabled: bool = True
    ):
        self.meter = meter  # the meter actor's (name, namespace); None: count, report nowhere
        self.collect = collect
        self.enabled = enabled  # False: metering off (`metering: false`), nothing counted
        self.source = uuid.uuid4().hex  # the meter keeps gauges per reporting process
        self.pending = Batch()
        self._task: asyncio.Task | None = None
        self._warned_at = -1e9

    def _actor(self):
        return ray.get_actor(self.meter[0], namespace=self.meter[1])

    def _running(self) -> None:
        if self.meter is not None and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._keep_flushing())

    # ------------------------------------------------------------ requests

    def start(self, deployment: str, key: str) -> Call:
        self._running()
        return Call(deployment, key, time.monotonic())

    def refused(self, deployment: str, status: int) -> None:
        """A request refused before it was authorized (no key known); `deployment`: a known
        deployment's id or "" (never an id taken unchecked from the request's path)."""
        if not self.enabled:
            return
        self._running()
        self.pending.inc(M.REQUESTS, (deployment, "", "", str(status)))

    def finish(self, call: Call, status: int) -> None:
        if call.done or not self.enabled:
            return
        call.done = True
        now = time.monotonic()
        served, keyed = (call.deployment, call.adapter), (call.deployment, call.adapter, call.key)
        b = self.pending
        b.inc(M.REQUESTS, (*keyed, str(status)))
        completion = call.completion_tokens
        if call.finished < call.n:  # cut before its end: what it streamed
            completion = max(completion, sum(call.streamed.values()))
        if call.prompt_tokens:
            b.inc(M.PROMPT_TOKENS, keyed, call.prompt_tokens)
        if completion:
            b.inc(M.COMPLETION_TOKENS, keyed, completion)
        b.add_usage(
            (int(time.time() // 60 * 60), call.deployment, call.adapter, call.key),
            1,
            call.prompt_tokens,
            completion,
        )
        if status != 200:
            return
        b.observe(M.E2E, served, now - call.started)
        if call.first_token is not None:
            b.observe(M.TTFT, served, call.first_token - call.started)
            per_choice = completion / max(1, call.n)
            if per_choice > 1:
                b.observe(M.TPOT, served, (now - call.first_token) / (per_choice - 1))

    def watch(self, events: AsyncIterator[list[dict]], call: Call) -> AsyncIterator[list[dict]]:
        """Engine events, noting the prompt, the first token and the usage; the call is
        finished when the events end, fail or are closed (the client went away). The
        replica's `prompt_taken` batch is read here and passed on to no one."""
        return self._watch(events, call) if self.enabled else _without_prompt_taken(events)

    async def _watch(self, events: AsyncIterator[list[dict]], call: Call):
        status = CLIENT_CLOSED
        try:
            async for batch in events:
                if is_prompt_taken(batch):  # admitted: charged even if no token follows
                    call.prompt_tokens = max(call.prompt_tokens, batch[0]["prompt_tokens"])
                    continue  # not the first token: time to first token runs on
                if call.first_token is None:
                    call.first_token = time.monotonic()
                for ev in batch:
                    # every engine event carries the prompt's length and the choice's tokens
                    # so far: a stream that never finishes is charged what it used
                    call.prompt_tokens = max(call.prompt_tokens, ev.get("prompt_tokens", 0))
                    i = ev.get("index", 0)
                    call.streamed[i] = max(
                        call.streamed.get(i, 0) + len(ev.get("token_ids") or ()),
                        ev.get("completion_tokens", 0),
                    )
                    if ev.get("finish_reason"):
                        call.finished += 1
                        call.completion_tokens += ev.get("completion_tokens", 0)
                yield batch
            status = 200
        except ApiError as exc:
            status = exc.status
            raise
        except Exception:
            status = 500
            raise
        finally:
            self.finish(call, status)
            await events.aclose()

    async def admit(self, deployment: str, key: str, limits: dict[str, int] | None) -> None:
        """Raise a 429 (with Retry-After) when the key is over one of its limits."""
        if not self.enabled:
            return
        # the meter learns the key's budget (or that it has none now) from the report
        self.pending.budgets[key] = (limits or {}).get("tokensPerDay") or None
        if not limits or self.meter is None:
            return
        try:
            refusal = await asyncio.wait_for(
                self._actor().admit.remote(key, deployment, limits), ADMIT_TIMEOUT_S
            )
        except Exception as exc:  # the meter restarting: serve rather than refuse
            if time.monotonic() - self._warned_at > 10:
                self._warned_at = time.monotonic()
                log.warning("rate limits not checked (meter unavailable): %r", exc)
            return
        if refusal is not None:
            self.pending.inc(M.RATE_LIMITED, (deployment, key, refusal["limit"]))
            raise ApiError(
                429,
                refusal["message"],
                None,
                "rate_limit_exceeded",
                headers={"Retry-After": str(refusal["retryAfter"])},
            )

    # ------------------------------------------------------------ reporting

    async def _keep_flushing(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            await self.flush()

    async def flush(self) -> None:
        batch, self.pending = self.pending, Batch()
        if self.collect is not None:
            try:  # the engine's gauges: without them the report still carries the usage
                self.collect(batch)
            except Exception as exc:
                log.warning("replica gauges not collected: %r", exc)
        if not batch:
            return
        try:
            await self._actor().report.remote(self.source, batch)
        except Exception as exc:  # keep it for the next report
            log.debug("meter report failed: %r", exc)
            batch.merge(self.pending)
            self.pending = batch


async def _without_prompt_taken(events: AsyncIterator[list[dict]]) -> AsyncIterator[list[dict]]:
    """Metering off: the engine's events as they come, less the replica's `prompt_taken`."""
    try:
        async for batch in events:
            if not is_prompt_taken(batch):
                yield batch
    finally:
        await events.aclose()
