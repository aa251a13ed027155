"""When a request's prompt is charged: once the engine admits it into a batch (its prefill
begins), never while it only waits for a slot. The real continuous-batching engines on the
tiny generated model behind the replica's request path and the OpenAI service, metered as
served, in-process (no Ray)."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from raydock.errors import ApiError
from raydock.modelgen import cached_model_dir
from raydock.serve_apps.engines.transformers_engine import TransformersEngine
from raydock.serve_apps.metering import CLIENT_CLOSED, ReplicaMeter
from raydock.serve_apps.openai_service import complete
from raydock.serve_apps.sampling import SamplingParams
from tests.unit.test_metering import _replica, _request, dep_access

#: a prompt of a few hundred tokens: the work a caller would pay for
LONG = "the tide comes in and the tide goes out " * 20


def _transformers():
    return TransformersEngine(str(cached_model_dir("tiny")), num_threads=1, max_batch_size=1)


def _ctranslate2(tmp_path_factory):
    pytest.importorskip("ctranslate2")
    from raydock.optimizers import ctranslate2 as ct2
    from raydock.serve_apps.engines.ctranslate2_engine import CTranslate2Engine

    path = tmp_path_factory.mktemp("ct2") / "float32"
    ct2.convert(cached_model_dir("tiny"), path, "float32")
    return CTranslate2Engine(str(path), num_threads=1, max_batch_size=1, compute_type="float32")


@pytest.fixture(scope="module")
def transformers_engine() -> TransformersEngine:
    """The default engine, of one batch slot: a second request waits for it."""
    return _transformers()


@pytest.fixture(scope="module", params=["transformers", "ctranslate2"])
def engine(request, tmp_path_factory, transformers_engine):
    """Each engine that can tell when it admits a sequence, of one batch slot."""
    if request.param == "transformers":
        return transformers_engine
    return _ctranslate2(tmp_path_factory)


async def _until(condition, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.01)


def _usage_by_key(meter: ReplicaMeter) -> dict[str, list[int]]:
    """[requests, prompt tokens, completion tokens] per key, as the usage API sums them."""
    out: dict[str, list[int]] = {}
    for (_, _, _, key), row in meter.pending.usage.items():
        total = out.setdefault(key, [0, 0, 0])
        for i, v in enumerate(row):
            total[i] += v
    return out


def _statuses(meter: ReplicaMeter) -> dict[str, set[str]]:
    """The `status` labels of each key's `raydock_requests_total` samples."""
    out: dict[str, set[str]] = {}
    for (name, labels), _ in meter.pending.counters.items():
        if name == "raydock_requests_total":
            out.setdefault(labels[2], set()).add(labels[3])
    return out


def _prompt_metric(meter: ReplicaMeter, key: str) -> float:
    return sum(
        v
        for (name, labels), v in meter.pending.counters.items()
        if name == "raydock_prompt_tokens_total" and labels[2] == key
    )


def test_a_request_abandoned_while_it_waits_for_a_batch_slot_is_charged_no_prompt(
    transformers_engine,
):
    """`decoding` holds the only batch slot; `waiting` (a long prompt, tokenized and queued
    for the engine) waits behind it and its client goes before it is admitted: one request
    (499), no token charged. `refused` finds the replica's queue full: 429, nothing charged.
    `decoding`'s client then goes mid-stream: its prompt and the tokens streamed are.
    (CTranslate2 decodes the tiny model's 512 tokens in a third of a second: too short a
    wait to watch; the engine test below shows it admits as this one does.)"""
    engine, meter = transformers_engine, ReplicaMeter(None)

    with ThreadPoolExecutor(1) as tokenizing:
        replica = _replica(engine, tokenizing)

        def ask(key: str, body: dict):
            return complete(
                "completion", _request(body), dep_access(), key, replica.generate, meter
            )

        async def main() -> tuple[int, int]:
            long_run = {"max_tokens": 512, "ignore_eos": True, "stream": True}
            decoding = await ask("decoding", {"prompt": "go"} | long_run)
            chunks = decoding.body_iterator
            read = [await anext(chunks)]
            waiting = asyncio.ensure_future(ask("waiting", {"prompt": LONG, "max_tokens": 4}))
            await _until(lambda: engine.stats()["waiting"] == 1)
            with pytest.raises(ApiError) as refused:
                await ask("refused", {"prompt": LONG, "max_tokens": 4})
            assert refused.value.status == 429
            await asyncio.sleep(0.3)
            assert engine.stats()["waiting"] == 1 and not waiting.done()  # still queued
            waiting.cancel()  # its client goes before a slot frees
            with pytest.raises(asyncio.CancelledError):
                await waiting
            read += [await anext(chunks) for _ in range(3)]
            await chunks.aclose()  # the decoding one's client goes mid-stream
            seen = sum(m.count("data: {") for m in read)  # tokens the client received
            # the same long prompt served to its end: its response's prompt tokens
            served = await ask("served", {"prompt": LONG, "max_tokens": 2})
            return seen, json.loads(served.body)["usage"]["prompt_tokens"]

        seen, long_prompt = asyncio.run(main())

    usage = _usage_by_key(meter)
    assert usage["waiting"] == [1, 0, 0], usage
    assert _prompt_metric(meter, "waiting") == 0
    assert _statuses(meter)["waiting"] == {str(CLIENT_CLOSED)}
    assert usage["refused"] == [1, 0, 0], usage
    assert _statuses(meter)["refused"] == {"429"}
    requests, prompt, completion = usage["decoding"]
    assert requests == 1 and prompt == len(engine.text_prompt("go"))
    assert completion >= seen > 0  # what it streamed, at least what the client read
    assert _statuses(meter)["decoding"] == {str(CLIENT_CLOSED)}
    assert usage["served"] == [1, long_prompt, 2] and long_prompt > 100


def test_an_engine_tells_when_it_admits_a_sequence_only_to_a_caller_that_asks(engine):
    """With `announce_admission`, an empty list comes first, once, when the sequence joins
    a batch, not while it waits for a slot; without it, the steps as always."""
    params = SamplingParams(max_tokens=3, temperature=1.0, seed=1, ignore_eos=True)

    async def main() -> tuple[list[list], list[list]]:
        holder = engine.generate(
            engine.text_prompt("go"), SamplingParams(max_tokens=512, ignore_eos=True)
        )
        await anext(holder)  # it holds the only batch slot
        queued = engine.generate(engine.text_prompt("hi"), params, announce_admission=True)
        admitted = asyncio.ensure_future(anext(queued))
        await asyncio.sleep(0.05)
        assert not admitted.done()  # waiting for the slot: nothing said yet
        await holder.aclose()  # its caller goes: the slot frees
        announced = [await admitted] + [b async for b in queued]
        plain = engine.generate(engine.text_prompt("hi"), params)
        return announced, [b async for b in plain]

    announced, plain = asyncio.run(main())
    assert announced[0] == [] and all(announced[1:])
    assert all(plain)
    steps = [ev.completion_tokens for b in announced for ev in b]
    assert steps == [ev.completion_tokens for b in plain for ev in b] == [1, 2, 3]


def test_a_request_admitted_whose_client_goes_before_its_first_token_is_charged_its_prompt(
    transformers_engine,
):
    """The engine has admitted the long prompt (its prefill began) and the client goes before
    any token reaches it: one request (499), its prompt charged, no completion token. The
    replica's real stream is held after its `prompt_taken` batch, as a slow prefill holds it."""
    from raydock.serve_apps.metering import is_prompt_taken

    engine, meter = transformers_engine, ReplicaMeter(None)

    with ThreadPoolExecutor(1) as tokenizing:
        replica = _replica(engine, tokenizing)

        async def main() -> None:
            admitted = asyncio.Event()

            async def held_after_admission(request: dict):
                stream = replica.generate(request)
                try:
                    batch = await anext(stream)
                    assert is_prompt_taken(batch)
                    yield batch
                    admitted.set()
                    await asyncio.Event().wait()  # no token comes before the client goes
                finally:
                    await stream.aclose()

            body = {"prompt": LONG, "max_tokens": 4}
            gone = asyncio.ensure_future(
                complete(
                    "completion", _request(body), dep_access(), "gone", held_after_admission, meter
                )
            )
            await asyncio.wait_for(admitted.wait(), 10)
            gone.cancel()  # its client goes
            with pytest.raises(asyncio.CancelledError):
                await gone

        asyncio.run(main())

    assert _usage_by_key(meter)["gone"] == [1, len(engine.text_prompt(LONG)), 0]
    assert _prompt_metric(meter, "gone") == len(engine.text_prompt(LONG)) > 100
    assert _statuses(meter)["gone"] == {str(CLIENT_CLOSED)}


def test_ctranslate2_announces_a_request_once_however_often_it_is_paused_and_resumed(
    tmp_path_factory,
):
    """Guided sequences in CTranslate2 pause (a rejected sample) and resume in later runs of
    its one batch slot: each is announced once, first, however many runs it joins."""
    engine = _ctranslate2(tmp_path_factory)
    grammar = 'start: "{\\"a\\": " /[0-9]{1,6}/ "}"'

    async def one(seed: int) -> list[list]:
        params = SamplingParams(max_tokens=20, temperature=1.0, seed=seed)
        stream = engine.generate(
            engine.text_prompt("hi"), params, grammar=grammar, announce_admission=True
        )
        return [b async for b in stream]

    async def main() -> list[list[list]]:
        return await asyncio.gather(*(one(seed) for seed in range(3)))

    for batches in asyncio.run(main()):
        assert batches[0] == [] and all(batches[1:])
        assert json.loads("".join(ev.text for b in batches for ev in b))["a"] >= 0
    assert engine.counters["runs"] > engine.counters["finished"] == 3  # resumed in later runs
