"""Metering without Ray: what a request counts, how batches add up and render, the limits."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request

from raydock.errors import ApiError
from raydock.metering import catalog as M
from raydock.metering.batch import Batch
from raydock.metering.exposition import render
from raydock.metering.limits import DAY_S, Limiter, budget_reached, day_of
from raydock.platform.meter import Meter
from raydock.platform.registry import Registry
from raydock.serve_apps.access import DeploymentAccess
from raydock.serve_apps.metering import CLIENT_CLOSED, ReplicaMeter, prompt_taken
from raydock.serve_apps.openai_service import complete


def _samples(text: bytes) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# ------------------------------------------------------------ batches and their rendering


def test_batches_add_up_and_render_as_prometheus_text():
    a, b = Batch(), Batch()
    a.inc(M.REQUESTS, ("d", "", "key-1", "200"))
    b.inc(M.REQUESTS, ("d", "", "key-1", "200"), 2)
    a.observe(M.TTFT, ("d", ""), 0.05)  # on a bucket's bound: counted in it (le is <=)
    b.observe(M.TTFT, ("d", ""), 7)
    b.set(M.RUNNING, ("d",), 3)
    a.merge(b)
    out = _samples(render(a))
    assert (
        out[
            (
                "raydock_requests_total",
                (("adapter", ""), ("deployment", "d"), ("key", "key-1"), ("status", "200")),
            )
        ]
        == 3
    )
    ttft = "raydock_time_to_first_token_seconds"
    labels = (("adapter", ""), ("deployment", "d"))
    assert out[(f"{ttft}_bucket", (*labels, ("le", "0.05")))] == 1
    assert out[(f"{ttft}_bucket", (*labels, ("le", "5.0")))] == 1
    assert out[(f"{ttft}_bucket", (*labels, ("le", "10.0")))] == 2
    assert out[(f"{ttft}_bucket", (*labels, ("le", "+Inf")))] == 2
    assert out[(f"{ttft}_count", labels)] == 2 and out[(f"{ttft}_sum", labels)] == 7.05
    assert out[("raydock_running_sequences", (("deployment", "d"),))] == 3


def test_every_metric_is_described_even_before_it_has_a_sample():
    names = {f.name for f in text_string_to_metric_families(render(Batch()).decode())}
    assert names == {m.name.removesuffix("_total") for m in M.ALL}


def test_a_series_needs_its_metric_labels():
    with pytest.raises(ValueError, match="labels"):
        Batch().inc(M.REQUESTS, ("d",))


# ------------------------------------------------------------ limits


class Clock:
    def __init__(self, t: float = 10 * DAY_S + 100):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_requests_per_minute_is_exact_and_says_when_to_retry():
    clock = Clock()
    lim = Limiter(clock)
    limits = {"requestsPerMinute": 3}
    assert [lim.admit("k", limits) for _ in range(3)] == [None] * 3
    clock.t += 20
    refusal = lim.admit("k", limits)
    assert refusal.limit == "requestsPerMinute" and refusal.retry_after_s == 40
    assert "requestsPerMinute" in refusal.message and "3 requests per minute" in refusal.message
    assert lim.admit("other", limits) is None  # per key
    clock.t += 40  # the first three leave the window
    assert lim.admit("k", limits) is None


def test_tokens_per_minute_and_per_day():
    clock = Clock()
    lim = Limiter(clock)
    assert lim.admit("k", {"tokensPerMinute": 100}) is None
    lim.charge("k", 100)
    refusal = lim.admit("k", {"tokensPerMinute": 100})
    assert refusal.limit == "tokensPerMinute" and refusal.retry_after_s == 60
    clock.t += 61
    assert lim.admit("k", {"tokensPerMinute": 100}) is None
    # the budget: what was used today, until midnight UTC
    assert lim.charge("k", 50) == (100, 150)
    refusal = lim.admit("k", {"tokensPerDay": 150})
    assert refusal.limit == "tokensPerDay"
    assert refusal.retry_after_s == DAY_S - (clock.t % DAY_S)
    clock.t += DAY_S  # a new day
    assert lim.admit("k", {"tokensPerDay": 150}) is None


def test_a_restarted_limiter_takes_todays_stored_usage():
    clock = Clock()
    lim = Limiter(clock)
    lim.load_day("k", int(clock.t // DAY_S), 500)
    assert lim.admit("k", {"tokensPerDay": 500}).limit == "tokensPerDay"


def test_budget_reached():
    assert budget_reached(79, 100) is None
    assert budget_reached(80, 100) == "warning"
    assert budget_reached(120, 100) == "exhausted"  # not "nearing" it as well
    assert budget_reached(10**6, None) is None


# ------------------------------------------------------------ a request, metered


def _request(body: dict) -> Request:
    async def receive():
        return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}

    return Request({"type": "http", "headers": [], "state": {}}, receive)


def dep_access(**fields) -> DeploymentAccess:
    """A deployment as the data plane is given it (`fields` over a served one's)."""
    base = dict(
        deployment_id="dep-1",
        name="m",
        created=0,
        status="DEPLOYED",
        serving=True,
        timeout_s=60,
        defaults={},
        keys={},
    )
    return DeploymentAccess(**(base | fields))


async def _engine(payload):
    for i in range(3):
        finish = "length" if i == 2 else None
        ev = {"index": 0, "text": f"t{i}", "logprobs": [], "finish_reason": finish}
        yield [ev | {"prompt_tokens": 7, "completion_tokens": 3}]


def _counts(meter: ReplicaMeter) -> dict:
    return {(name, labels): v for (name, labels), v in meter.pending.counters.items()}


def test_a_request_counts_its_status_tokens_latencies_and_usage():
    meter = ReplicaMeter(None)

    async def main():
        resp = await complete(
            "completion", _request({"prompt": "x"}), dep_access(), "key-1", _engine, meter
        )
        return json.loads(resp.body)

    body = asyncio.run(main())
    counts = _counts(meter)
    keyed = ("dep-1", "", "key-1")
    assert counts[("raydock_requests_total", (*keyed, "200"))] == 1
    assert counts[("raydock_prompt_tokens_total", keyed)] == body["usage"]["prompt_tokens"] == 7
    assert counts[("raydock_completion_tokens_total", keyed)] == 3
    assert [row for row in meter.pending.usage.values()] == [[1, 7, 3]]
    hist = meter.pending.histograms
    for metric in (M.TTFT, M.E2E, M.TPOT):
        assert hist[(metric.name, ("dep-1", ""))][-1] == 1


def test_refusals_and_streams_cut_by_the_client_are_counted():
    meter = ReplicaMeter(None)

    async def main():
        with pytest.raises(ApiError):
            await complete(
                "completion",
                _request({"prompt": "x", "n": 99}),
                dep_access(),
                "key-1",
                _engine,
                meter,
            )
        resp = await complete(
            "completion",
            _request({"prompt": "x", "stream": True}),
            dep_access(),
            "key-1",
            _engine,
            meter,
        )
        async for _ in resp.body_iterator:
            break  # the client reads one message and goes
        await resp.body_iterator.aclose()

    asyncio.run(main())
    counts = _counts(meter)
    assert counts[("raydock_requests_total", ("dep-1", "", "key-1", "400"))] == 1
    closed = ("raydock_requests_total", ("dep-1", "", "key-1", str(CLIENT_CLOSED)))
    assert counts[closed] == 1
    # what it streamed before the cut is counted: the first batch's one token
    assert counts[("raydock_completion_tokens_total", ("dep-1", "", "key-1"))] >= 1


def _unfinished_engine(ending):
    """vLLM-like: several tokens per event, a long prompt, and no end: `ending` instead."""

    async def engine(payload):
        ev = {"index": 0, "text": "abcd", "logprobs": [], "finish_reason": None}
        yield [ev | {"token_ids": [1, 2, 3, 4], "prompt_tokens": 500, "completion_tokens": 4}]
        yield [ev | {"token_ids": [5, 6], "prompt_tokens": 500, "completion_tokens": 6}]
        await ending()

    return engine


async def _hang():
    await asyncio.Event().wait()


async def _fail():
    raise RuntimeError("engine died")


def test_a_stream_that_never_finishes_is_charged_its_prompt_and_streamed_tokens():
    meter = ReplicaMeter(None)

    async def main():
        resp = await complete(
            "completion",
            _request({"prompt": "x", "stream": True}),
            dep_access(),
            "k",
            _unfinished_engine(_hang),
            meter,
        )
        async for _ in resp.body_iterator:
            break  # the first message (4 tokens); the client goes
        await resp.body_iterator.aclose()
        with pytest.raises(RuntimeError):
            await complete(
                "completion",
                _request({"prompt": "x"}),
                dep_access(),
                "k",
                _unfinished_engine(_fail),
                meter,
            )

    asyncio.run(main())
    counts = _counts(meter)
    keyed = ("dep-1", "", "k")
    assert counts[("raydock_requests_total", (*keyed, str(CLIENT_CLOSED)))] == 1
    assert counts[("raydock_requests_total", (*keyed, "500"))] == 1
    assert counts[("raydock_prompt_tokens_total", keyed)] == 500 + 500
    assert counts[("raydock_completion_tokens_total", keyed)] == 4 + 6
    assert sorted(row for row in meter.pending.usage.values()) == [[2, 1000, 10]]


# ------------------------------------------------------------ a prompt charged once admitted


def _taken_then(*batches, prompt: int = 900, wait=None):
    """A replica's events: its prompt taken into a batch (`prompt` tokens), `wait()` (its
    prefill), then `batches`."""

    async def engine(payload=None):
        yield prompt_taken(prompt)
        if wait is not None:
            await wait()
        for batch in batches:
            yield batch

    return engine


def _events(finish_at: int = 2, prompt: int = 900) -> list[list[dict]]:
    return [
        [
            {
                "index": 0,
                "text": f"t{i}",
                "logprobs": [],
                "finish_reason": "length" if i == finish_at else None,
                "prompt_tokens": prompt,
                "completion_tokens": i + 1,
            }
        ]
        for i in range(finish_at + 1)
    ]


def test_a_request_cut_before_its_first_token_is_charged_its_prompt():
    """The engine admitted a long prompt into a batch (its prefill runs), then the client
    went away: the prompt is charged, in the counters and the key's usage."""
    meter = ReplicaMeter(None)
    call = meter.start("dep-1", "k")

    async def main():
        watched = meter.watch(_taken_then(wait=_hang)(), call)
        reading = asyncio.ensure_future(anext(watched))
        await asyncio.sleep(0.05)  # the prompt is taken; no token yet
        assert not reading.done()
        reading.cancel()  # the client goes: its request's task is cancelled
        with pytest.raises(asyncio.CancelledError):
            await reading
        await watched.aclose()

    asyncio.run(main())
    counts = _counts(meter)
    keyed = ("dep-1", "", "k")
    assert counts[("raydock_requests_total", (*keyed, str(CLIENT_CLOSED)))] == 1
    assert counts[("raydock_prompt_tokens_total", keyed)] == 900
    assert ("raydock_completion_tokens_total", keyed) not in counts
    assert list(meter.pending.usage.values()) == [[1, 900, 0]]
    assert call.first_token is None  # the prompt taken is no token


@pytest.mark.parametrize("cut", ["client", "deadline"])
def test_a_stream_cut_before_its_first_token_is_charged_its_prompt_through_complete(cut):
    meter = ReplicaMeter(None)

    async def main():
        ask = complete(
            "completion",
            _request({"prompt": "x", "stream": True}),
            dep_access(timeout_s=1),
            "k",
            _taken_then(wait=_hang),
            meter,
        )
        if cut == "deadline":
            with pytest.raises(ApiError) as refused:
                await ask
            assert refused.value.status == 504
            return
        task = asyncio.ensure_future(ask)
        await asyncio.sleep(0.05)  # the response waits for the first token
        task.cancel()  # the client went away before it
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    keyed = ("dep-1", "", "k")
    status = "504" if cut == "deadline" else str(CLIENT_CLOSED)
    counts = _counts(meter)
    assert counts[("raydock_requests_total", (*keyed, status))] == 1
    assert counts[("raydock_prompt_tokens_total", keyed)] == 900
    assert list(meter.pending.usage.values()) == [[1, 900, 0]]


@pytest.mark.parametrize("metering", [True, False], ids=["metering on", "metering off"])
def test_the_prompt_taken_reaches_no_consumer(metering):
    meter = ReplicaMeter(None, enabled=metering)
    events = _events(prompt=7)

    async def watched():
        call = meter.start("dep-1", "k")
        return [b async for b in meter.watch(_taken_then(*events, prompt=7)(), call)]

    async def answers():
        out = []
        for stream, interval in ((False, 0.0), (True, 0.0), (True, 0.01)):
            resp = await complete(
                "completion",
                _request({"prompt": "x", "stream": stream}),
                dep_access(),
                "k",
                _taken_then(*events, prompt=7),
                meter,
                stream_interval_s=interval,
            )
            if stream:
                out.append("".join([m async for m in resp.body_iterator]))
            else:
                out.append(json.loads(resp.body))
        return out

    assert asyncio.run(watched()) == events
    plain, streamed, paced = asyncio.run(answers())
    assert plain["choices"][0]["text"] == "t0t1t2"
    assert plain["usage"]["prompt_tokens"] == 7
    for sse in (streamed, paced):
        chunks = [json.loads(line[6:]) for line in sse.split("\n\n") if line[6:7] == "{"]
        assert "".join(c["choices"][0]["text"] for c in chunks) == "t0t1t2", sse
        assert not any("error" in c for c in chunks), sse
        assert sse.endswith("data: [DONE]\n\n")
    if metering:
        assert list(meter.pending.usage.values()) == [[4, 28, 12]]
    else:
        assert not meter.pending


def test_time_to_first_token_is_not_taken_from_the_prompt_taken():
    meter = ReplicaMeter(None)

    async def prefill():
        await asyncio.sleep(0.3)

    async def main():
        resp = await complete(
            "completion",
            _request({"prompt": "x"}),
            dep_access(),
            "k",
            _taken_then(*_events(), wait=prefill),
            meter,
        )
        assert resp.status_code == 200

    asyncio.run(main())
    sum_at = -2  # a histogram: bucket counts, then the sum and the count
    ttft = meter.pending.histograms[(M.TTFT.name, ("dep-1", ""))]
    assert ttft[-1] == 1 and ttft[sum_at] >= 0.3  # the first token came after the prefill


# ------------------------------------------------------------ the replica's side


class _Engine:
    """What EngineServer.generate asks of an engine: one character a token. A sequence waits
    for `slot` before it joins the batch, where it says so (`announce_admission`)."""

    max_batch_size = 2
    max_context = 4096
    longest_token_chars = 4
    vocab_size = 256
    unsupported_params = frozenset()

    def __init__(self) -> None:
        self.slot: asyncio.Event | None = None  # None: a slot is free

    def text_prompt(self, prompt: str) -> list[int]:
        return [ord(c) % 256 for c in prompt]

    async def generate(self, ids, params, regex=None, announce_admission=False, **options):
        from raydock.serve_apps.engines.base import StepEvent

        if self.slot is not None:
            await self.slot.wait()
        if announce_admission:
            yield []
        for i in range(params.max_tokens):
            finish = "length" if i == params.max_tokens - 1 else None
            yield [StepEvent("a", [97], [], finish, len(ids), i + 1)]


def _replica(engine: _Engine, tokenizing, requests: int = 0):
    """EngineServer's request methods on a plain object (no model, no Serve)."""
    from raydock.serve_apps.engine_app import EngineServer

    methods = ("generate", "_generate", "_prompt", "_check_params", "_check_constraint")
    cls = EngineServer.func_or_class
    server = type("Replica", (), {name: getattr(cls, name) for name in methods})()
    server.engine, server.queue_limit, server.tokenizing = engine, 1, tokenizing
    server.requests, server.taken, server.thinks = requests, 0, False
    return server


def test_a_replica_sends_the_prompt_taken_when_its_engine_admits_it_never_before():
    """Nothing while the engine holds the prompt waiting for a slot; once it admits it, the
    prompt taken, then the steps (each choice's, with n); a refusal is one error event."""
    from raydock.serve_apps.metering import is_prompt_taken

    engine = _Engine()

    async def first(server, request, then=0):
        stream = server.generate(request)
        batches = [await anext(stream)]
        batches += [b async for b in stream][:then]
        return batches

    async def queued_then_admitted(server, request):
        engine.slot = asyncio.Event()  # every batch slot taken
        stream = server.generate(request)
        ahead = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.05)
        assert not ahead.done()  # tokenized and queued: nothing sent yet
        engine.slot.set()
        return [await ahead] + [b async for b in stream]

    params = {"max_tokens": 2}
    with ThreadPoolExecutor(1) as tokenizing:
        server = _replica(engine, tokenizing)
        batches = asyncio.run(queued_then_admitted(server, {"prompt": "hello", "params": params}))
        assert is_prompt_taken(batches[0]) and batches[0][0]["prompt_tokens"] == 5
        assert [ev["completion_tokens"] for b in batches[1:] for ev in b] == [1, 2]
        assert not any(is_prompt_taken(b) for b in batches[1:])
        two = asyncio.run(first(server, {"prompt": "hi", "params": params, "n": 2}, 10))
        assert is_prompt_taken(two[0])
        steps = sorted((ev["index"], ev["completion_tokens"]) for b in two[1:] for ev in b)
        assert steps == [(0, 1), (0, 2), (1, 1), (1, 2)]
        assert all(is_prompt_taken(b) or all("text" in ev for ev in b) for b in two)  # no marker
        # refusals stay one error event: a full queue (429), a prompt too long (400)
        busy = _replica(engine, tokenizing, requests=3)
        full = asyncio.run(first(busy, {"prompt": "x", "params": params}))
        assert [ev["status"] for ev in full[0]] == [429] and len(full) == 1
        long = {"prompt": "x" * 5000, "params": params}
        refused = asyncio.run(first(server, long, 5))
        assert [ev.get("status") for b in refused for ev in b] == [400]


class _Staggered(_Engine):
    """Choice `i` of a request (its seed, from 0) joins the batch 50 ms after choice `i - 1`."""

    async def generate(self, ids, params, regex=None, announce_admission=False, **options):
        await asyncio.sleep(0.05 * (params.seed or 0))
        async for steps in super().generate(ids, params, regex, announce_admission, **options):
            yield steps


def test_a_replica_sends_the_prompt_taken_once_however_staggered_its_choices_join():
    """n choices share one prompt: charged once, when the first choice joins a batch, though
    the others join later (in other rounds of the replica's loop)."""
    from raydock.serve_apps.metering import is_prompt_taken

    async def main(server) -> list[list[dict]]:
        request = {"prompt": "hi", "params": {"max_tokens": 2, "seed": 0}, "n": 3}
        return [b async for b in server.generate(request)]

    with ThreadPoolExecutor(1) as tokenizing:
        batches = asyncio.run(main(_replica(_Staggered(), tokenizing)))
    assert [is_prompt_taken(b) for b in batches].count(True) == 1
    assert is_prompt_taken(batches[0]) and batches[0][0]["prompt_tokens"] == 2
    steps = sorted((ev["index"], ev["completion_tokens"]) for b in batches[1:] for ev in b)
    assert steps == [(i, k) for i in range(3) for k in (1, 2)]


def _used(replica: ReplicaMeter, key: str, tokens: int) -> None:
    call = replica.start("dep-1", key)
    call.prompt_tokens, call.finished = tokens, 1
    replica.finish(call, 200)


def test_usage_outlives_a_gauge_collection_that_fails():
    """The report's gauges come from the engine; when that raised, the batch swapped out for
    the report (its usage: what keys are charged for) was lost."""

    def broken(batch) -> None:
        raise RuntimeError("engine stats unavailable")

    replica = ReplicaMeter(None, collect=broken)
    _used(replica, "k", 300)
    asyncio.run(replica.flush())  # no meter to report to: kept for the next report
    [(_, row)] = replica.pending.usage.items()
    assert row[1] == 300


def _meter() -> Meter:
    """A meter without its background loop (its history asks Serve, which needs Ray)."""
    meter = Meter()
    meter._started = asyncio.get_running_loop().create_future()
    return meter


def test_scrapes_at_once_share_one_rendering(monkeypatch):
    """Every scrape asked Serve's controller and rendered every series on the loop that also
    answers the replicas' admits (a replica waits 1 s, then serves unchecked): scrapes within
    half a second of each other now get one text. Serve's controller is stood in for."""
    from raydock.platform import lifecycle

    asked: list[int] = []

    async def serve_details() -> dict:
        asked.append(1)
        await asyncio.sleep(0.05)
        return {"applications": {}}

    monkeypatch.setattr(lifecycle, "serve_details", serve_details)

    async def scenario() -> list[bytes]:
        meter = _meter()
        replica = ReplicaMeter(None)
        _used(replica, "k", 5)
        await meter.report("r1", replica.pending)
        return await asyncio.gather(*(meter.exposition() for _ in range(5)))

    texts = asyncio.run(scenario())
    assert len(set(texts)) == 1 and b"raydock_requests_total" in texts[0]
    assert len(asked) == 1


def test_a_replica_serve_no_longer_lists_leaves_metrics(monkeypatch):
    """Every replica an autoscaled deployment ever ran kept its own series in /metrics for
    ever; after REPLICA_SERIES_GRACE_S unlisted by Serve they go. Serve's controller is stood
    in for."""
    from raydock.platform import lifecycle, meter

    monkeypatch.setattr(meter, "EXPOSITION_TTL_S", 0)
    monkeypatch.setattr(meter, "REPLICA_SERIES_GRACE_S", 0.05)

    async def serve_details() -> dict:
        engine = {"replicas": [{"replica_id": "r-new", "state": "RUNNING"}]}
        app = {"status": "RUNNING", "deployments": {"engine": engine}}
        return {"applications": {"dep-dp-1": app}}

    monkeypatch.setattr(lifecycle, "serve_details", serve_details)

    async def scenario() -> list[set[str]]:
        m = _meter()
        batch = Batch()
        for replica in ("r-old", "r-new"):
            batch.inc(M.REPLICA_REQUESTS, ("dp-1", replica), 3)
        await m.report("r1", batch)
        seen = []
        for _ in range(2):
            text = (await m.exposition()).decode()
            seen.append({r for r in ("r-old", "r-new") if f'replica="{r}"' in text})
            await asyncio.sleep(0.1)
        return seen

    assert asyncio.run(scenario()) == [{"r-old", "r-new"}, {"r-new"}]


def test_a_removed_budget_notifies_no_more():
    """Without limits a replica never asks the meter at admission: its report says so."""
    replica = ReplicaMeter(None)
    budget = {"tokensPerDay": 1000}

    async def scenario():
        meter = _meter()
        assert await meter.admit("k", "dep-1", budget) is None  # the replica's actor call
        await replica.admit("dep-1", "k", budget)
        _used(replica, "k", 900)
        await meter.report("r1", replica.pending)
        replica.pending = Batch()
        await replica.admit("dep-1", "k", None)  # PATCH limits to null: no meter call
        _used(replica, "k", 200)
        await meter.report("r1", replica.pending)
        return meter

    meter = asyncio.run(scenario())
    assert meter.limiter.day_tokens("k") == 1100
    # 80 % was told; "exhausted" (requests refused) would be false: there is no budget now
    assert {told[2] for told in meter.notified} == {"warning"}


def test_a_restarted_meter_does_not_tell_a_threshold_again():
    """The told thresholds are memory only: a new meter (today's usage loaded: 900 of 1000)
    tells only what a charge crosses from now on."""
    replica = ReplicaMeter(None)

    async def scenario():
        meter = _meter()
        meter.limiter.load_day("k", day_of(time.time()), 900)
        for tokens in (10, 100):  # 910: still past 80 %; 1010: exhausted, crossed now
            await replica.admit("dep-1", "k", {"tokensPerDay": 1000})
            _used(replica, "k", tokens)
            await meter.report("r1", replica.pending)
            replica.pending = Batch()
        return meter

    assert [t[2] for t in asyncio.run(scenario()).notified] == ["exhausted"]


def test_a_budget_changed_during_the_day_is_told_about_anew():
    """Raised after it was exhausted: its new 80 % and end are told; lowered below what
    was used: the key is refused, and told so at the next charge."""
    replica = ReplicaMeter(None)

    async def charge(meter: Meter, tokens: int, budget: int) -> None:
        await replica.admit("dep-1", "k", {"tokensPerDay": budget})
        _used(replica, "k", tokens)
        await meter.report("r1", replica.pending)
        replica.pending = Batch()

    async def scenario():
        meter = _meter()
        await charge(meter, 59, 50)
        await charge(meter, 60, 200)  # raised to 200: 119 used
        await charge(meter, 60, 200)  # 179: 80 %
        await charge(meter, 60, 200)  # 239: exhausted
        await charge(meter, 10, 100)  # lowered to 100 below the 249 used
        return meter

    told = sorted((t[3], t[2]) for t in asyncio.run(scenario()).notified)
    assert told == [(50, "exhausted"), (100, "exhausted"), (200, "exhausted"), (200, "warning")]


def test_a_restarted_meter_adds_todays_stored_usage_to_what_it_charged_first(monkeypatch):
    saved: list[list] = []

    class Registry:  # the registry actor's answers (the database holds 900 for today)
        async def _tokens_since(self, start):
            return {"k": 900 + sum(row[-2] + row[-1] for row in saved)}

        async def _record_usage(self, rows):
            saved.extend(rows)

        def __init__(self):
            self.tokens_since = SimpleNamespace(remote=self._tokens_since)
            self.record_usage = SimpleNamespace(remote=self._record_usage)

    monkeypatch.setattr(ray, "get_actor", lambda *a, **k: Registry())
    replica = ReplicaMeter(None)

    async def scenario():
        meter = _meter()
        _used(replica, "k", 300)
        await meter.report("r1", replica.pending)  # reaches a new meter before it loads
        flush = asyncio.create_task(meter.flush_usage())  # GET /usage meanwhile
        await asyncio.sleep(0.01)
        assert saved == []  # not saved yet: loading would count it twice
        await meter._load_today()
        await flush
        return meter.limiter.day_tokens("k")

    assert asyncio.run(scenario()) == 1200
    assert len(saved) == 1


# ------------------------------------------------------------ the registry's part


@pytest.fixture
def reg(db_url):
    """On SQLite and on PostgreSQL (tests/unit/conftest.py)."""
    registry = Registry(db_url)
    yield registry
    registry.close()


def _registry_with_key(reg, limits=None):
    model = reg.create_model("m", "file", "u")
    reg.set_model_status(model["modelId"], "VALIDATING")
    reg.set_model_status(model["modelId"], "READY")
    dep = reg.create_deployment(model["modelId"], {"name": "d"}, "u")
    key = reg.create_deployment_key(dep["deploymentId"], "k", "u", limits)
    return reg, dep["deploymentId"], key


def test_limits_reach_the_access_snapshot_and_change(reg):
    reg, dep_id, key = _registry_with_key(reg, {"requestsPerMinute": 3})
    assert key["limits"] == {"requestsPerMinute": 3, "tokensPerMinute": None, "tokensPerDay": None}
    snap = reg.access_snapshots([dep_id])[dep_id]
    assert snap["limits"] == {key["keyId"]: {"requestsPerMinute": 3}}
    changed = reg.set_key_limits(dep_id, key["keyId"], {"tokensPerDay": 1000})
    assert changed["limits"]["requestsPerMinute"] == 3  # left out: kept
    assert changed["limits"]["tokensPerDay"] == 1000
    reg.set_key_limits(dep_id, key["keyId"], {"requestsPerMinute": None, "tokensPerDay": None})
    assert reg.access_snapshots([dep_id])[dep_id]["limits"] == {}
    reg.delete_deployment_key(dep_id, key["keyId"])  # its limits go with it


def test_usage_is_added_per_minute_and_filtered(reg):
    reg, dep_id, key = _registry_with_key(reg)
    minute = 1_800_000_000 // 60 * 60
    rows = [(minute, dep_id, "", key["keyId"], 2, 10, 20)]
    reg.record_usage(rows)
    reg.record_usage(rows + [(minute + 60, dep_id, "", "key-gone", 1, 1, 1)])
    got = reg.usage_rows(deployment_id=dep_id, key_id=key["keyId"])
    assert [(r["requests"], r["promptTokens"], r["completionTokens"]) for r in got] == [(4, 20, 40)]
    assert got[0]["keyName"] == "k" and got[0]["deploymentName"] == "d"
    assert len(reg.usage_rows()) == 2

    def at(epoch: int) -> datetime:
        return datetime.fromtimestamp(epoch, UTC).replace(tzinfo=None)

    later = at(minute + 60)
    assert [r["keyId"] for r in reg.usage_rows(start=later)] == ["key-gone"]
    assert reg.tokens_since(at(minute)) == {key["keyId"]: 60, "key-gone": 2}


def test_usage_times_at_the_ends_of_the_calendar_do_not_overflow():
    from pydantic import TypeAdapter

    from raydock.platform.api_usage import IsoTime, as_utc

    parse = TypeAdapter(IsoTime).validate_python
    assert as_utc(parse("9999-12-31T23:59:59-23:59")) == datetime.max
    assert as_utc(parse("0001-01-01T00:00:00+23:59")) == datetime.min
    assert as_utc(parse("2026-12-01T08:00:00+02:00")) == datetime(2026, 12, 1, 6)
    assert as_utc(parse("2026-12-01")) == datetime(2026, 12, 1)


def test_usage_by_minute_or_hour_covers_a_bounded_period(reg, tmp_path, monkeypatch):
    """One answer by minute covers at most 2 days, by hour 92 (the registry builds an answer
    alone, every API request waiting): without a start, the last ones; a longer period, or a
    start not before the end, is a 400 naming `start`."""
    from fastapi.testclient import TestClient

    from raydock.config import load_settings
    from raydock.platform import api_deps
    from raydock.platform.api import app
    from tests.unit.registry_handle import RegistryHandle

    reg, dep_id, key = _registry_with_key(reg)
    now = int(time.time()) // 60 * 60
    days = 86_400
    reg.record_usage(
        [(now - ago, dep_id, "", key["keyId"], 1, 1, 1) for ago in (60, 3 * days, 100 * days)]
    )
    monkeypatch.setattr(api_deps.ctx, "settings", load_settings(home=str(tmp_path)), raising=False)
    monkeypatch.setattr(api_deps.ctx, "registry", RegistryHandle(reg), raising=False)
    admin = {"X-api-key": reg.ensure_admin()}
    with TestClient(app, base_url="http://raydock.test", headers=admin) as http:

        def usage(**params) -> dict:
            r = http.get("/public/usage", params=params)
            assert r.status_code == 200, r.text
            return r.json()

        assert usage(groupBy="minute")["totals"]["requests"] == 1  # the last 2 days
        assert usage(groupBy="hour")["totals"]["requests"] == 2  # the last 92 days
        assert usage(groupBy="day")["totals"]["requests"] == 3  # all of it
        recent = usage(groupBy="minute")
        start, end = datetime.fromisoformat(recent["start"]), recent["end"]
        assert end is None and abs(start.timestamp() + 2 * days - time.time()) < 120
        week = {"start": "2026-01-01", "end": "2026-01-08"}
        r = http.get("/public/usage", params={"groupBy": "minute", **week})
        assert r.status_code == 400 and r.json()["error"]["param"] == "start"
        assert "groupBy=minute covers at most 2 days" in r.json()["error"]["message"]
        assert usage(groupBy="hour", **week)["rows"] == []
        r = http.get("/public/usage", params={"start": "2026-01-08", "end": "2026-01-01"})
        assert (r.status_code, r.json()["error"]["param"]) == (400, "start")
        # the ends of the calendar: no overflow
        assert usage(groupBy="minute", end="0001-01-01")["rows"] == []


def test_retention_deletes_old_usage_finished_deliveries_and_jobs_only(reg):
    from datetime import timedelta

    from raydock.platform.registry import NotFound

    reg, dep_id, key = _registry_with_key(reg)
    day = 86_400
    old, recent = 1_800_000_000 // 60 * 60, 1_800_000_000 // 60 * 60 + 3 * day
    reg.record_usage([(old, dep_id, "", key["keyId"], 1, 5, 5)])
    reg.record_usage([(recent, dep_id, "", key["keyId"], 2, 7, 7)])
    event = {"id": "ev-1", "kind": "deployment.deployed", "createdAt": "", "data": {}}
    done = reg.record_delivery(event, "email", "ops@example.test")
    failed = reg.record_delivery(event, "webhook", "https://h.test/x")
    pending = reg.record_delivery(event, "webhook", "https://h.test/y")
    reg.update_delivery(done["deliveryId"], "delivered", 1, None)
    reg.update_delivery(failed["deliveryId"], "failed", 5, "HTTP 500")
    model_id = reg.get_deployment(dep_id)["modelId"]
    gone_model = reg.create_model("gone", "file", "u")["modelId"]
    jobs = {
        name: reg.create_job(action, model, "u", dep)["dockStatusId"]
        for name, action, model, dep in [
            ("deployed", "DEPLOY", model_id, dep_id),
            ("imported", "IMPORT", model_id, None),  # its model exists: kept
            ("gone model's import", "IMPORT", gone_model, None),
            ("running", "UNDEPLOY", model_id, dep_id),  # not ended: kept
        ]
    }
    reg.delete_model(gone_model)  # which fails its import job
    for name in ("deployed", "imported"):
        reg.update_job(jobs[name], status="SUCCESS", percentage=100)

    nothing = {"usage": None, "deliveries": None, "jobs": None}
    assert reg.prune_history(nothing) == {"usage": 0, "deliveries": 0, "jobs": 0}
    cutoff = datetime.fromtimestamp(old + day, UTC).replace(tzinfo=None)
    soon = datetime.now(UTC).replace(tzinfo=None) + timedelta(seconds=5)
    before = {"usage": cutoff, "deliveries": soon, "jobs": soon}
    assert reg.prune_history(before) == {"usage": 1, "deliveries": 2, "jobs": 2}
    assert [r["requests"] for r in reg.usage_rows(deployment_id=dep_id)] == [2]
    assert [d["deliveryId"] for d in reg.list_deliveries()] == [pending["deliveryId"]]
    for name, job_id in jobs.items():
        if name in ("imported", "running"):
            assert reg.get_job(job_id)["status"] in ("SUCCESS", "IN_PROGRESS")
        else:
            with pytest.raises(NotFound):
                reg.get_job(job_id)
    assert reg.prune_history(before) == {"usage": 0, "deliveries": 0, "jobs": 0}  # idempotent


def test_retention_cutoffs_follow_the_settings():
    from datetime import timedelta

    from raydock.config import SettingsError, load_settings
    from raydock.platform.retention import cutoffs

    now = datetime(2026, 12, 2, 12)
    settings = load_settings(usage_retention_days=30, delivery_retention_days=0)
    month, quarter = now - timedelta(days=30), now - timedelta(days=90)
    assert cutoffs(settings, now) == {"usage": month, "deliveries": None, "jobs": quarter}
    with pytest.raises(SettingsError, match="usage_retention_days is -1; it must be between 0"):
        load_settings(usage_retention_days=-1)


def test_usage_is_summed_per_period_by_the_database(reg):
    """Per day, hour, minute or in total, on SQLite and PostgreSQL alike (the grouping was
    done in the registry actor, over every stored minute)."""
    reg, dep_id, key = _registry_with_key(reg)
    t = int(datetime(2026, 12, 1, 8, 5, tzinfo=UTC).timestamp())
    reg.record_usage(
        [
            (t, dep_id, "", key["keyId"], 1, 10, 1),
            (t + 60, dep_id, "", key["keyId"], 2, 20, 2),  # the same hour
            (t + 3600, dep_id, "", key["keyId"], 4, 40, 4),  # the next hour, same day
            (t + 86_400, dep_id, "", key["keyId"], 8, 80, 8),  # the next day
        ]
    )

    def summed(by: str) -> list[tuple]:
        return [(r["period"], r["requests"], r["totalTokens"]) for r in reg.usage_rows(by=by)]

    assert summed("day") == [("2026-12-01", 7, 77), ("2026-12-02", 8, 88)]
    assert summed("hour") == [
        ("2026-12-01T08:00Z", 3, 33),
        ("2026-12-01T09:00Z", 4, 44),
        ("2026-12-02T08:00Z", 8, 88),
    ]
    assert summed("minute")[:2] == [("2026-12-01T08:05Z", 1, 11), ("2026-12-01T08:06Z", 2, 22)]
    assert summed("total") == [(None, 15, 165)]
    (row,) = reg.usage_rows(by="total")
    assert (row["keyName"], row["deploymentName"], row["adapterId"]) == ("k", "d", None)
