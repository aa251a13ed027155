"""Sampling, stop sequences and incremental detokenization, without a model."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from raydock.serve_apps import protocol
from raydock.serve_apps.detok import TextTracker
from raydock.serve_apps.sampling import SamplingParams, adjust, choose, make_generator

VOCAB = ["a", "b", "c", "S", "T", "O", "P", "é"]


def decode(ids):
    return "".join(VOCAB[i] for i in ids)


def test_stop_sequence_is_cut_and_never_emitted():
    t = TextTracker(decode, ("STOP",))
    out = "".join(t.add(i) for i in [0, 1, 3, 4, 5])  # a b S T O
    assert out == "ab"  # "STO" is held back: it may become STOP
    assert t.add(6) == "" and t.stopped and t.text == "ab"


def test_held_back_text_is_released_when_it_is_not_a_stop():
    t = TextTracker(decode, ("STOP",))
    out = "".join(t.add(i) for i in [3, 4, 0])
    assert out == "" and not t.stopped  # "STa" could not be a stop prefix any more... held
    assert out + t.flush() == "STa"


def test_greedy_and_seeded_sampling():
    logits = torch.tensor([0.1, 3.0, 0.2, 2.9])
    greedy = SamplingParams(max_tokens=1, temperature=0)
    assert choose(logits, greedy, make_generator(0)).token == 1
    p = SamplingParams(max_tokens=1, temperature=1.5, top_p=0.9)
    a = [choose(logits, p, make_generator(42)).token for _ in range(5)]
    b = [choose(logits, p, make_generator(42)).token for _ in range(5)]
    assert a == b


def test_top_k_one_and_top_p_restrict_choices():
    logits = torch.tensor([1.0, 5.0, 4.9, 0.0])
    gen = make_generator(1)
    only = {choose(logits, SamplingParams(1, temperature=2, top_k=1), gen).token for _ in range(20)}
    assert only == {1}
    nucleus = SamplingParams(1, temperature=1, top_p=0.5)
    assert {choose(logits, nucleus, gen).token for _ in range(30)} == {1}


def test_logprobs_are_log_softmax():
    logits = torch.tensor([0.0, 0.0])
    c = choose(
        logits, SamplingParams(1, temperature=0, logprobs=True, top_logprobs=2), make_generator(0)
    )
    assert c.logprob == pytest.approx(-0.6931, abs=1e-3) and len(c.top) == 2


def test_presence_and_frequency_penalties_count_the_output_only():
    p = SamplingParams(1, presence_penalty=0.25, frequency_penalty=0.5)
    out = adjust(torch.zeros(5), p, prompt=[3, 4], output=[1, 1, 2])
    assert out.tolist() == [0.0, -1.25, -0.75, 0.0, 0.0]


def test_repetition_penalty_shrinks_what_prompt_or_output_hold():
    p = SamplingParams(1, repetition_penalty=2.0)
    out = adjust(torch.tensor([2.0, -2.0, 1.0, 3.0]), p, prompt=[0], output=[1])
    assert out.tolist() == [1.0, -4.0, 1.0, 3.0]


def test_logit_bias_is_added_after_penalties():
    p = SamplingParams(1, frequency_penalty=1.0, logit_bias=((0, -100.0), (2, 5.0)))
    out = adjust(torch.zeros(3), p, prompt=[], output=[2])
    assert out.tolist() == [-100.0, 0.0, 4.0]


def test_penalties_change_the_choice_not_the_reported_logprob():
    logits = torch.tensor([0.0, 1.0, 0.5])
    p = SamplingParams(1, temperature=0, logprobs=True, frequency_penalty=1.0)
    c = choose(logits, p, make_generator(0), prompt=[], output=[1])
    assert c.token == 2
    assert c.logprob == pytest.approx(float(torch.log_softmax(logits, -1)[2]))


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}], "temperature": 2.5}, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 9999}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "top_p": 2}, "top_p"),
        ({"prompt": "x", "frequency_penalty": -2.5}, "frequency_penalty"),
        ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
        ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
        ({"prompt": "x", "logit_bias": {"7": 101}}, "logit_bias.7"),
        ({"prompt": "x", "logit_bias": {"seven": 1}}, "logit_bias.seven"),
        # at most 300 token ids, as OpenAI
        ({"prompt": "x", "logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        # values of another JSON type than the document's are refused, not converted
        ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
        ({"messages": [{"role": "user", "content": "x"}], "logprobs": 0}, "logprobs"),
        ({"prompt": "x", "echo": "true"}, "echo"),
        ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
        ({"prompt": "x", "n": True}, "n"),
        ({"prompt": "x", "temperature": "0.5"}, "temperature"),
        # a union's member is not part of the name; the member that got furthest speaks
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ({"prompt": "x", "stop": 5}, "stop"),
        ({"prompt": "x", "stop": ["a", 1]}, "stop.1"),
        # what each role's message must carry, as OpenAI
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
        ({"messages": [{"role": "system", "content": None}]}, "messages.0.content"),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]},
            "messages.1.content",
        ),
        ({"messages": [{"role": "tool", "content": "21"}]}, "messages.0.tool_call_id"),
        ({"messages": [{"role": "tool", "tool_call_id": "c1"}]}, "messages.0.content"),
        # as OpenAI: top_logprobs only with logprobs (it was ignored)
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
        # known parameters raydock cannot honour are refused, not ignored
        (
            {"messages": [{"role": "user", "content": "x"}], "functions": [{"name": "f"}]},
            "functions",
        ),
        ({"prompt": "x", "suffix": " END"}, "suffix"),
        ({"prompt": "x", "best_of": 3}, "best_of"),
        ({"prompt": "x", "min_tokens": 5}, "min_tokens"),
        ({"prompt": "x", "stop_token_ids": [5]}, "stop_token_ids"),
        ({"prompt": "x", "min_p": 0.9}, "min_p"),
        ({"prompt": "x", "min_p": False}, "min_p"),  # JSON's false is no 0
        # the engines read text: an image part is refused, not dropped
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages.0.content.0.type",
        ),
    ],
)
def test_bad_openai_parameters_name_the_parameter(body, param):
    with pytest.raises(protocol.BadParam) as exc:
        model = protocol.ChatRequest if "messages" in body else protocol.CompletionRequest
        protocol.parse(model, body)
    assert exc.value.param == param


def test_a_validators_refusal_reads_in_its_own_words():
    with pytest.raises(protocol.BadParam) as exc:
        protocol.parse(protocol.CompletionRequest, {"prompt": "x", "stop": ["a", ""]})
    assert str(exc.value) == "invalid stop: stop sequences must be non-empty"


def test_logit_bias_holds_up_to_300_ids():
    bias = {str(i): 1 for i in range(300)}
    req = protocol.parse(protocol.CompletionRequest, {"prompt": "x", "logit_bias": bias})
    assert len(req.logit_bias) == 300
    with pytest.raises(protocol.BadParam, match="at most 300"):
        protocol.parse(protocol.CompletionRequest, {"prompt": "x", "logit_bias": bias | {"300": 1}})


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_unknown_fields_are_ignored(kind):
    """Fields raydock does not know (OpenAI's newer ones, other servers' extras) are accepted
    and change nothing: the engine request is the one without them."""
    from types import SimpleNamespace

    from raydock.serve_apps.openai_service import _constraint, engine_request

    known = {"messages": [{"role": "user", "content": "x"}]} if kind == "chat" else {"prompt": "x"}
    known |= {"max_tokens": 7, "temperature": 0.5}
    unknown = {
        "metadata": {"a": 1},
        "store": True,
        "service_tier": "auto",
        "reasoning_effort": "low",
        "some_vendor_option": [1, {"x": None}],
    }
    if kind == "chat":  # unknown fields of a message too
        unknown["messages"] = [{"role": "user", "content": "x", "cache_control": {"t": 1}}]
    model = protocol.ChatRequest if kind == "chat" else protocol.CompletionRequest
    plain, extra = protocol.parse(model, known), protocol.parse(model, known | unknown)
    dep = SimpleNamespace(defaults={})
    assert engine_request(kind, extra, dep) == engine_request(kind, plain, dep)
    assert _constraint(kind, extra) == _constraint(kind, plain)
    assert (extra.max_tokens, extra.temperature) == (7, 0.5)


def test_json_numbers_and_token_id_keys_still_parse():
    body = {"prompt": "x", "temperature": 1, "max_tokens": 5.0, "logit_bias": {"7": 2}}
    req = protocol.parse(protocol.CompletionRequest, body)
    assert req.temperature == 1.0 and req.logit_bias == {7: 2.0}
    assert req.max_tokens == 5 and isinstance(req.max_tokens, int)  # 5.0: a JSON integer


@pytest.mark.parametrize(
    ("body", "hyper"),
    [({"top_p": 0}, {}), ({}, {"topP": 0}), ({"top_p": 0.0, "temperature": 1.5}, {})],
)
def test_top_p_zero_is_greedy(body, hyper):
    """A nucleus of no mass keeps just the likeliest token (sampling from it was a 500)."""
    from types import SimpleNamespace

    from raydock.serve_apps.openai_service import engine_request

    req = protocol.parse(protocol.CompletionRequest, {"prompt": "x", **body})
    dep = SimpleNamespace(defaults=hyper)
    params = engine_request("completion", req, dep)["params"]
    assert (params["temperature"], params["top_p"]) == (0.0, 1.0)
    logits = torch.tensor([0.1, 3.0, -1.0])
    pick = choose(logits, SamplingParams(**params), make_generator(0))
    assert pick.token == 1


@pytest.mark.parametrize("top_p", [0.0, 2.2250738585e-313, 1e-46])
def test_the_likeliest_token_survives_any_top_p(top_p):
    """A top_p that float32 rounds to 0 kept no token: sampling from NaNs was a 500."""
    logits = torch.tensor([0.1, 3.0, -1.0])
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=top_p)
    assert choose(logits, params, make_generator(0)).token == 1


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_a_logprob_of_minus_infinity_is_reported_as_json(kind):
    """A top_logprobs entry for a token the output format excludes is -inf, which JSON cannot
    carry (the reply was a 500, a stream's chunk invalid JSON)."""
    import json

    items = [("a", float("-inf"), [("a", -0.25), ("b", float("-inf"))])]
    fmt = protocol.Formatter(kind, "m")
    final = fmt.final([{"index": 0, "text": "a", "logprobs": items, "finish_reason": "stop"}], 1, 1)
    chunk = fmt.chunk(0, "a", items, None, True)
    text = json.dumps([final, chunk], allow_nan=False)
    assert str(protocol.MIN_LOGPROB) in text and "-0.25" in text


def test_completion_text_offsets_and_echo_whole_and_streamed():
    """`text_offset` places each token in the choice's text (after an echoed prompt), and a
    stream's offsets go on from the text its earlier chunks carried."""
    tokens = [("Once", -0.1, []), (" upon", -0.2, []), (" a", -0.3, [])]
    fmt = protocol.Formatter("completion", "m", echo="Tell: ")
    whole = fmt.final(
        [{"index": 0, "text": "Once upon a", "logprobs": tokens, "finish_reason": "length"}], 2, 3
    )["choices"][0]
    assert whole["text"] == "Tell: Once upon a"
    assert whole["logprobs"]["text_offset"] == [6, 10, 15]
    fmt = protocol.Formatter("completion", "m", echo="Tell: ")
    first = fmt.chunk(0, "Once", tokens[:1], None, True)["choices"][0]
    rest = fmt.chunk(0, " upon a", tokens[1:], "length", False)["choices"][0]
    assert first["text"] + rest["text"] == "Tell: Once upon a"
    assert first["logprobs"]["text_offset"] + rest["logprobs"]["text_offset"] == [6, 10, 15]
    plain = protocol.Formatter("completion", "m").chunk(0, "Once", tokens[:1], None, True)
    assert plain["choices"][0]["logprobs"]["text_offset"] == [0]
    # text held back (a possible stop string): the scores go ahead, their offsets stay right
    fmt = protocol.Formatter("completion", "m")
    first = fmt.chunk(0, "", tokens[:1], None, True)["choices"][0]
    rest = fmt.chunk(0, "Once upon a", tokens[1:], "length", False)["choices"][0]
    assert first["logprobs"]["text_offset"] + rest["logprobs"]["text_offset"] == [0, 4, 9]


def test_completion_top_logprobs_hold_the_sampled_token():
    tokens = [("Once", -0.1, [("Twice", -0.05)]), (" upon", -0.2, [(" upon", -0.2)])]
    got = protocol.completion_logprobs(tokens)["top_logprobs"]
    assert got == [{"Twice": -0.05, "Once": -0.1}, {" upon": -0.2}]


def test_known_parameters_asked_as_null_or_best_of_n_are_fine():
    req = protocol.parse(
        protocol.CompletionRequest, {"prompt": "x", "n": 2, "best_of": 2, "suffix": None}
    )
    assert req.n == 2
    neutral = {"min_p": 0.0, "min_tokens": 0, "stop_token_ids": [], "functions": []}
    protocol.parse(protocol.ChatRequest, {"messages": [{"role": "user", "content": "x"}]} | neutral)
    protocol.parse(
        protocol.CompletionRequest, {"prompt": "x", "stream": True, "stream_options": {}}
    )


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", "4300"),
        (b'{"prompt": "hi \\ud800"}', "surrogate"),
        (b'{"prompt": "x", "response_format": {"pattern": "\\udfff"}}', "surrogate"),
    ],
)
def test_json_no_engine_can_read_is_a_400(raw, words):
    from raydock.errors import ApiError
    from raydock.serve_apps.openai_service import read_json

    with pytest.raises(ApiError) as exc:
        read_json(raw)
    assert exc.value.status == 400 and exc.value.code == "invalid_json"
    assert words in exc.value.message


def test_a_surrogate_pair_is_one_character():
    from raydock.serve_apps.openai_service import read_json

    assert read_json(b'{"prompt": "\\ud83d\\ude00"}') == {"prompt": "\U0001f600"}


def test_legacy_completions_take_no_max_completion_tokens():
    """Not a completions parameter: it once bypassed max_tokens' range (2000 tokens; "abc" a
    500)."""
    from raydock.serve_apps.access import DeploymentAccess
    from raydock.serve_apps.openai_service import engine_request

    dep = DeploymentAccess.from_dict(
        {
            "deploymentId": "d",
            "name": "n",
            "created": 0,
            "status": "DEPLOYED",
            "serving": True,
            "timeoutS": 60,
            "defaults": {"maxTokens": 16},
            "keys": {},
            "limits": {},
        }
    )
    for value in (2000, "abc", [1]):
        req = protocol.parse(
            protocol.CompletionRequest, {"prompt": "x", "max_completion_tokens": value}
        )
        assert engine_request("completion", req, dep)["params"]["max_tokens"] == 16


def _schema_request(properties: int, pattern: bool = False) -> protocol.ChatRequest:
    prop = {"type": "string", **({"pattern": "^[a-z]+$"} if pattern else {})}
    schema = {"type": "object", "properties": {f"p{i}": dict(prop) for i in range(properties)}}
    body = {
        "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    }
    return protocol.parse(protocol.ChatRequest, body)


def test_an_output_format_too_large_is_refused_before_compiling():
    from raydock.errors import ApiError
    from raydock.serve_apps import openai_service, structured

    req = _schema_request(structured.MAX_FORMAT_VALUES)  # two values per property
    with pytest.raises(ApiError) as exc:
        asyncio.run(openai_service._constraint_of("chat", req))
    assert exc.value.status == 400 and exc.value.param == "response_format"
    assert str(structured.MAX_FORMAT_VALUES) in exc.value.message


def test_compiling_a_large_schema_leaves_the_event_loop_serving():
    """Every stream of a replica (and on /v1, of the gateway) shares its event loop: a
    schema's compile ran on it and froze them all (5.4 s for 5,000 patterned properties)."""
    from raydock.serve_apps import openai_service

    req = _schema_request(1200, pattern=True)  # under the size kept compiled

    async def main():
        gaps, last = [], time.monotonic()

        async def tick():
            nonlocal last
            while True:
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        ticker = asyncio.create_task(tick())
        started = time.monotonic()
        await openai_service._constraint_of("chat", req)
        took = time.monotonic() - started
        again = time.monotonic()
        await openai_service._constraint_of("chat", req)  # the same format: kept
        ticker.cancel()
        return took, max(gaps), time.monotonic() - again

    took, longest, second = asyncio.run(main())
    assert longest < took / 3, (took, longest)
    assert second < took / 10, (took, second)


def _sentencepiece_tokenizer():
    """A tokenizer with Llama 2's / Mistral's normalizer and decoder chain: the decoder
    strips the leading space of what it decodes."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁The": 3, "▁capital": 4, "▁is": 5, "▁Paris": 6}
    vocab |= {".": 7, "▁": 8}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")


def test_a_sentencepiece_output_keeps_its_first_space():
    """ "The capital is" + " Paris." read "The capital isParis." (and the logprob token
    "Paris"): the output is decoded after the prompt's last tokens, as vLLM does."""
    from raydock.serve_apps.engines.base import token_text

    tok = _sentencepiece_tokenizer()
    prompt = tok("The capital is")["input_ids"]
    tracker = TextTracker(lambda ids: tok.decode(ids, skip_special_tokens=True), (), prompt)
    assert "".join(tracker.add(t) for t in (6, 7)) + tracker.flush() == " Paris."
    assert token_text(tok, prompt[-1], 6) == " Paris" and token_text(tok, 6, 7) == "."
    assert token_text(tok, None, 6) == "Paris"  # nothing before it: as decoded alone


def test_only_formats_of_modest_size_are_kept_compiled():
    """Each kept constraint holds its grammar: 256 large ones pinned gigabytes per replica."""
    from raydock.serve_apps import openai_service

    big = _schema_request(3000)  # over _KEPT_FORMAT_CHARS as JSON
    small = _schema_request(7)
    before = len(openai_service._compiled)
    asyncio.run(openai_service._constraint_of("chat", big))
    assert len(openai_service._compiled) == before
    asyncio.run(openai_service._constraint_of("chat", small))
    assert len(openai_service._compiled) == before + 1
    assert all(len(k) == 64 for k in openai_service._compiled)  # hashes, not the formats
