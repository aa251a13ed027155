"""Streams send at most one message per interval, the first at once, nothing lost or late."""

from __future__ import annotations

import asyncio
import time

import pytest

from raydock.errors import ApiError
from raydock.serve_apps.openai_service import _paced


async def _steps(n: int, gap_s: float, log: list, fail_at: int | None = None):
    try:
        for i in range(n):
            if i == fail_at:
                raise ApiError(504, "too slow", None, "timeout")
            yield [{"index": 0, "step": i}]
            await asyncio.sleep(gap_s)
    finally:
        log.append("closed")


def _run(coro):
    return asyncio.run(coro)


def test_first_batch_goes_at_once_and_later_ones_merge():
    async def main():
        log: list = []
        started = time.monotonic()
        sends = []
        async for batch in _paced(_steps(20, 0.005, log), interval_s=0.05):
            sends.append((time.monotonic() - started, [ev["step"] for ev in batch]))
        return sends, log

    sends, log = _run(main())
    assert sends[0] == (pytest.approx(0, abs=0.03), [0])
    assert [s for _, batch in sends for s in batch] == list(range(20))  # all, in order
    assert len(sends) <= 5  # ~100 ms of steps in 50 ms messages, not 20 messages
    gaps = [b - a for (a, _), (b, _) in zip(sends, sends[1:], strict=False)]
    assert min(gaps[:-1]) >= 0.045  # the stream's end is not held back for the interval
    assert log == ["closed"]


def test_zero_wait_when_steps_are_slower_than_the_interval():
    async def main():
        return [b async for b in _paced(_steps(4, 0.06, []), interval_s=0.05)]

    assert [[ev["step"] for ev in b] for b in _run(main())] == [[0], [1], [2], [3]]


def test_an_error_arrives_after_the_events_before_it():
    async def main():
        got = []
        with pytest.raises(ApiError) as exc:
            async for batch in _paced(_steps(10, 0.001, [], fail_at=5), interval_s=0.02):
                got += [ev["step"] for ev in batch]
        return got, exc.value.status

    assert _run(main()) == ([0, 1, 2, 3, 4], 504)


def test_a_consumer_that_leaves_closes_the_engine_stream():
    async def main():
        log: list = []
        stream = _paced(_steps(1000, 0.001, log), interval_s=0.01)
        async for _ in stream:
            break
        await stream.aclose()
        await asyncio.sleep(0)
        return log

    assert _run(main()) == ["closed"]


def test_a_finishing_batch_is_not_held_back():
    async def steps():
        for i in range(4):
            yield [{"index": 0, "step": i, "finish_reason": "length" if i == 3 else None}]
            await asyncio.sleep(0.005)

    async def main():
        started = time.monotonic()
        return [(time.monotonic() - started, b) async for b in _paced(steps(), interval_s=0.5)]

    sends = _run(main())
    assert [ev["step"] for _, b in sends for ev in b] == [0, 1, 2, 3]
    assert sends[-1][1][-1]["finish_reason"] == "length"
    assert sends[-1][0] < 0.25  # not after the 0.5 s interval
