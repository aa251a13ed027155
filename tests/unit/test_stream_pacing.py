"""Streams send at most one message per interval, the first at once, nothing lost or late.

The assertions are about what travels together and in which order, not about how fast: the
step sources wait for the consumer where timing matters (a batch _paced held would stall
them, and the test fails on a timeout), and the intervals are either far longer than a test
runs (so only the rule under test can release a batch) or far shorter than the gaps. The
only clock reading is a lower bound that load cannot break (a batch merged until the interval
was over cannot arrive before it) and an upper bound of a whole interval on a batch that
should go at once.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from starlette.requests import Request

from raydock.errors import ApiError
from raydock.serve_apps.metering import ReplicaMeter
from raydock.serve_apps.openai_service import _paced, complete
from tests.unit.test_metering import dep_access

LONG = 30.0  # an interval no test waits out: a batch that goes was released by another rule
STALL = 5.0  # how long a step source waits for the consumer before it gives up


def _ev(step: int, finish: str | None = None) -> dict:
    return {"index": 0, "step": step, "finish_reason": finish}


class Consumer:
    """Reads a paced stream, noting each batch's steps and when it arrived; a step source
    waits (`until`) for the consumer to have received a step."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.arrived: list[float] = []
        self._seen: dict[int, asyncio.Event] = {}

    def _event(self, step: int) -> asyncio.Event:
        return self._seen.setdefault(step, asyncio.Event())

    async def until(self, step: int) -> None:
        """Wait until `step` reached the consumer (TimeoutError after STALL seconds)."""
        await asyncio.wait_for(self._event(step).wait(), STALL)

    async def read(self, stream) -> list[list[int]]:
        async with asyncio.timeout(3 * STALL):  # a held batch fails the test, never hangs it
            async for batch in stream:
                self.arrived.append(time.monotonic())
                self.batches.append([ev["step"] for ev in batch])
                for ev in batch:
                    self._event(ev["step"]).set()
        return self.batches


def _run(coro):
    return asyncio.run(coro)


def test_the_first_batch_goes_at_once_and_later_ones_merge():
    consumer = Consumer()
    log: list[str] = []

    async def steps():
        try:
            yield [_ev(0)]
            await consumer.until(0)  # held back for the interval, it would never arrive
            for i in range(1, 20):
                await asyncio.sleep(0.001)
                yield [_ev(i)]
        finally:
            log.append("closed")

    batches = _run(consumer.read(_paced(steps(), interval_s=LONG)))
    # the end of the stream releases the rest: all of it, in order, in one message
    assert batches == [[0], list(range(1, 20))]
    assert log == ["closed"]


def test_a_batch_goes_when_the_interval_is_over():
    interval = 0.5
    consumer = Consumer()

    async def steps():
        yield [_ev(0)]
        await consumer.until(0)
        yield [_ev(1)]
        await asyncio.sleep(0.001)
        yield [_ev(2)]
        await consumer.until(2)  # only the interval's end can release 1 and 2
        yield [_ev(3)]

    async def main():
        started = time.monotonic()
        batches = await consumer.read(_paced(steps(), interval_s=interval))
        return batches, consumer.arrived[1] - started

    batches, second = _run(main())
    assert batches == [[0], [1, 2], [3]]
    # at most one message per interval: the second was sent an interval after the first
    assert second >= 0.9 * interval


def test_a_batch_slower_than_the_interval_goes_at_once():
    interval, gap = 0.25, 0.4
    consumer = Consumer()
    produced: list[float] = []

    async def steps():
        for i in range(3):
            if i:
                await consumer.until(i - 1)
                await asyncio.sleep(gap)  # the interval since the last message is over
            produced.append(time.monotonic())
            yield [_ev(i)]

    batches = _run(consumer.read(_paced(steps(), interval_s=interval)))
    assert batches == [[0], [1], [2]]
    # not held for another interval (which would take at least `interval` each)
    delays = [got - made for made, got in zip(produced, consumer.arrived, strict=True)]
    assert max(delays) < interval, delays


def test_an_error_arrives_after_the_events_before_it():
    async def steps():
        for i in range(10):
            if i == 5:
                raise ApiError(504, "too slow", None, "timeout")
            yield [_ev(i)]
            await asyncio.sleep(0.001)

    async def main():
        consumer = Consumer()
        with pytest.raises(ApiError) as exc:
            await consumer.read(_paced(steps(), interval_s=LONG))
        return consumer.batches, exc.value.status

    # 1-4 merged with the error (which is not held for the interval), and sent before it
    assert _run(main()) == ([[0], [1, 2, 3, 4]], 504)


def test_a_consumer_that_leaves_closes_the_engine_stream():
    async def steps(log: list):
        try:
            for i in range(1000):
                yield [_ev(i)]
                await asyncio.sleep(0.001)
        finally:
            log.append("closed")

    async def main():
        log: list = []
        stream = _paced(steps(log), interval_s=0.01)
        async for _ in stream:
            break
        await stream.aclose()
        await asyncio.sleep(0)
        return log

    assert _run(main()) == ["closed"]


def test_a_finishing_batch_is_not_held_back():
    consumer = Consumer()

    async def steps():
        for i in range(4):
            yield [_ev(i, "length" if i == 3 else None)]
            await asyncio.sleep(0.001)
        # the stream stays open until the finish arrived: only the finish can release it
        await consumer.until(3)

    assert _run(consumer.read(_paced(steps(), interval_s=LONG))) == [[0], [1, 2, 3]]


# ------------------------------------------------------------- stream_interval_s in complete


def _request(body: dict) -> Request:
    async def receive():
        return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}

    return Request({"type": "http", "headers": [], "state": {}}, receive)


def _stream_messages(interval_s: float) -> list[list[str]]:
    """The texts in each message of a streamed completion of 5 engine batches, the engine
    faster than the client reads (so a paced stream would have batches to merge)."""

    async def run(payload):
        for i in range(5):
            await asyncio.sleep(0.002)
            finish = "length" if i == 4 else None
            ev = {"index": 0, "text": f"t{i}", "logprobs": [], "finish_reason": finish}
            yield [ev | {"prompt_tokens": 1, "completion_tokens": 5}]

    async def main():
        req = _request({"prompt": "x", "stream": True})
        resp = await complete(
            "completion",
            req,
            dep_access(status="running"),
            "key-1",
            run,
            ReplicaMeter(None),
            stream_interval_s=interval_s,
        )
        messages = []
        async with asyncio.timeout(3 * STALL):
            async for message in resp.body_iterator:
                messages.append(message)
                await asyncio.sleep(0.03)  # a slow client
        assert messages[-1] == "data: [DONE]\n\n"
        out = []
        for message in messages[:-1]:
            chunks = [json.loads(line[6:]) for line in message.split("\n\n") if line]
            out.append([c["choices"][0]["text"] for c in chunks])
        return out

    return _run(main())


def test_stream_interval_zero_sends_every_batch_alone():
    """0 means no pacing: each engine batch is its own message, however slow the client."""
    assert _stream_messages(0) == [["t0"], ["t1"], ["t2"], ["t3"], ["t4"]]


def test_a_stream_interval_merges_batches_in_complete():
    assert _stream_messages(LONG) == [["t0"], ["t1", "t2", "t3", "t4"]]
