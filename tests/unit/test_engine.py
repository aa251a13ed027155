"""The continuous-batching engine on the tiny generated model, in-process (no Ray)."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from raydock.modelgen import cached_model_dir
from raydock.serve_apps.engines.base import ConstraintError
from raydock.serve_apps.engines.transformers_engine import TransformersEngine
from raydock.serve_apps.sampling import SamplingParams
from tests.guided_checks import corpus_check, hostile_bounds_check


@pytest.fixture(scope="module")
def engine() -> TransformersEngine:
    return TransformersEngine(str(cached_model_dir("tiny")), num_threads=1, max_batch_size=4)


def run(coro):
    return asyncio.run(coro)


async def text_of(engine, prompt, **params):
    out, finish = "", None
    async for steps in engine.generate(engine.text_prompt(prompt), SamplingParams(**params)):
        for ev in steps:
            out += ev.text
            finish = ev.finish_reason or finish
    return out, finish


def test_batched_output_equals_alone(engine):
    params = dict(max_tokens=24, temperature=1.0, seed=5, ignore_eos=True)

    async def main():
        alone = await text_of(engine, "the lighthouse", **params)
        crowd = await asyncio.gather(
            text_of(engine, "the lighthouse", **params),
            text_of(engine, "a much longer prompt about bread and tides and chess", **params),
            text_of(engine, "x", max_tokens=5, seed=1),
        )
        return alone, crowd

    alone, crowd = run(main())
    assert crowd[0] == alone  # left padding and joins do not change a sequence's tokens
    assert alone[1] == "length"
    assert engine.stats()["max_batch"] >= 2


def test_more_requests_than_batch_slots_all_finish(engine):
    async def main():
        return await asyncio.gather(
            *(text_of(engine, f"p{i}", max_tokens=6, seed=i, ignore_eos=True) for i in range(9))
        )

    assert all(finish == "length" for _, finish in run(main()))
    assert engine.stats()["max_batch"] <= 4 and engine.stats()["running"] == 0


def test_cancelled_sequence_leaves_the_batch(engine):
    async def main():
        before = engine.stats()["cancelled"]
        stream = engine.generate(
            engine.text_prompt("go"), SamplingParams(max_tokens=400, ignore_eos=True)
        )
        await stream.__anext__()
        await stream.aclose()
        await text_of(engine, "next", max_tokens=2)  # one more step runs the removal
        return engine.stats()["cancelled"] - before

    assert run(main()) == 1
    assert engine.stats()["running"] == 0


def test_guided_output_matches_regex(engine):
    regex = r'\{"n":(0|[1-9][0-9]{0,2}),"ok":(true|false)\}'

    async def main():
        ids = engine.text_prompt("json please")
        outs = []
        for seed in range(5):
            text, finish = "", None
            async for steps in engine.generate(
                ids, SamplingParams(max_tokens=64, seed=seed), regex
            ):
                for ev in steps:
                    text += ev.text
                    finish = ev.finish_reason or finish
            outs.append((text, finish))
        return outs

    for text, finish in run(main()):
        assert finish == "stop" and re.fullmatch(regex, text), text
        assert isinstance(json.loads(text)["ok"], bool)


@pytest.mark.parametrize("regex", [r"(?=a)b", r"(a)\1", r"[a-z]+("])
def test_a_regex_outside_the_dialect_is_refused_before_decoding(engine, regex):
    with pytest.raises(ConstraintError, match="look-arounds, backreferences"):
        run(engine.check_regex(regex))
    run(engine.check_regex(r"[a-z]{2,5}"))  # what the dialect has passes


def test_grammar_cache_evicts_the_least_recently_used(engine, monkeypatch):
    from raydock.serve_apps.guided import grammar_of

    monkeypatch.setattr(engine.guided, "_cache", type(engine.guided._cache)())
    monkeypatch.setattr(engine.guided, "_cache_size", 2)
    for regex in ("x{3}", "y{3}", "x{3}", "z{3}"):  # x is used again before z comes
        run(engine.check_regex(regex))
    assert list(engine.guided._cache) == [grammar_of("regex", r) for r in ("x{3}", "z{3}")]


def test_hostile_constraints_are_bounded(engine):
    hostile_bounds_check(engine)


def test_corpus_is_enforced(engine):
    corpus_check(engine, "transformers")


def test_burst_larger_than_one_prefill_pass(engine, monkeypatch):
    """A burst wider than PREFILL_TOKENS is prefilled in several passes, same outputs."""
    from raydock.serve_apps.engines import transformers_engine

    prompts = ["the lighthouse", "bread and tides", "a much longer prompt about chess and rain"]
    params = dict(max_tokens=8, temperature=1.0, seed=3, ignore_eos=True)

    async def burst():
        return await asyncio.gather(*(text_of(engine, p, **params) for p in prompts))

    together = run(burst())
    monkeypatch.setattr(transformers_engine, "PREFILL_TOKENS", 1)  # one prompt per pass
    assert run(burst()) == together


def test_penalties_make_greedy_output_repeat_less(engine):
    def tokens(**penalties):
        async def main():
            ids = []
            params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, **penalties)
            async for steps in engine.generate(engine.text_prompt("the tide"), params):
                ids += [t for ev in steps for t in ev.token_ids]
            return ids

        return run(main())

    plain = tokens()
    penalized = tokens(frequency_penalty=2.0, presence_penalty=2.0)
    assert len(plain) == len(penalized) == 40
    # the random tiny model repeats itself greedily; penalties push it to new tokens
    assert len(set(penalized)) > len(set(plain))
    assert len(set(tokens(repetition_penalty=2.0))) > len(set(plain))
    # a bias of -100 bans a token: the greedy favourite never appears again
    favourite = max(set(plain), key=plain.count)
    assert favourite not in tokens(logit_bias=((favourite, -100.0),))


def test_tool_call_is_a_declared_tool_with_valid_arguments(engine):
    from jsonschema import validate

    from raydock.serve_apps import structured

    params = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer"}},
        "required": ["city"],
    }
    tools = [
        {"type": "function", "function": {"name": "forecast", "parameters": params}},
        {"type": "function", "function": {"name": "now"}},
    ]
    c = structured.constraint_for(None, tools, "required")

    async def main():
        outs = []
        for seed in range(4):
            text, finish = "", None
            async for steps in engine.generate(
                engine.text_prompt("call"),
                SamplingParams(max_tokens=80, seed=seed),
                None,
                grammar=c.grammar,
            ):
                for ev in steps:
                    text += ev.text
                    finish = ev.finish_reason or finish
            outs.append((text, finish))
        return outs

    for text, finish in run(main()):
        if finish != "stop":
            continue
        calls = structured.as_tool_calls(text)
        assert calls is not None and len(calls) == 1, text
        [call] = calls
        args = json.loads(call["function"]["arguments"])
        if call["function"]["name"] == "forecast":
            validate(args, params)
        else:
            assert call["function"]["name"] == "now" and args == {}


def test_a_step_over_a_bound_ends_with_length_never_stop(engine, monkeypatch):
    """A mask step that runs out of lexer fuel fails its matcher: the sequence ends with
    "length" (its text may be incomplete), the others carry on."""
    from raydock.serve_apps.guided import GuidedDecoder, Limits, json_grammar

    tight = GuidedDecoder(
        engine.tokenizer, engine.eos, engine.model.config.vocab_size, Limits(step_lexer_fuel=100)
    )
    monkeypatch.setattr(engine, "guided", tight)
    grammar = json_grammar(
        {"type": "object", "properties": {"a": {"type": "string", "pattern": "^[a-z]{3,40}$"}}}
    )

    async def main():
        finish, produced = None, 0
        async for steps in engine.generate(
            engine.text_prompt("x"), SamplingParams(max_tokens=200, seed=1), None, grammar=grammar
        ):
            finish = steps[-1].finish_reason or finish
            produced = steps[-1].completion_tokens
        return finish, produced

    finish, produced = run(main())
    assert finish == "length" and produced < 200  # ended by the bound, not the budget


def test_a_model_of_a_longer_context_is_served_with_the_context_the_memory_check_sized(tmp_path):
    """A model whose config allows 8,192 tokens: the engine serves 2,048 (what the deploy's
    memory estimate reserved per sequence, and what vLLM serves), so a longer prompt is the
    same 400 on every engine, not a batch padded past the replica's memory."""
    import shutil

    from raydock.model_memory import MAX_SERVING_CONTEXT

    model = tmp_path / "long"
    shutil.copytree(cached_model_dir("tiny"), model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 8192}))
    long = TransformersEngine(str(model), num_threads=1, max_batch_size=2)
    assert long.max_context == MAX_SERVING_CONTEXT == 2048
