"""A thinking model's reasoning apart from its answer (`serve_apps/reasoning.py`), as chat
(`message.reasoning`, `delta.reasoning`, usage) and the Responses API (a `reasoning` item)
answer it, on any engine: what a client reads of the engine's events."""

from __future__ import annotations

import asyncio
import json

import pytest
from openai import omit
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response
from starlette.requests import Request

from raydock.serve_apps.metering import ReplicaMeter
from raydock.serve_apps.openai_service import complete
from raydock.serve_apps.responses_api import respond
from raydock.serve_apps.structured import IN_THINKING, THINKS
from tests.unit.test_metering import dep_access
from tests.unit.test_responses_api import EVENTS, WEATHER

THOUGHT = "The user greets me; a short answer will do."
ANSWER = "Hello! How can I help?"
QWEN3 = f"<think>\n{THOUGHT}\n</think>\n\n{ANSWER}"  # a block of its own (Qwen3, R1-0528)
OPENED = f"{THOUGHT}\n</think>\n\n{ANSWER}"  # after a template's `<think>\n` (QwQ, R1)
READ = f"\n{THOUGHT}\n"  # the reasoning a client reads of QWEN3's block (no tags)

DEP = dep_access(name="tiny")


def scripted(
    replies: list[str],
    size: int = 3,
    in_thinking: bool = False,
    finish: str = "stop",
    thinks: bool = True,
):
    """An engine whose choice k writes `replies[k]` in events of `size` characters, one token
    each (its logprob with it), then ends with an empty event (an EOS) that says `finish`;
    marked as the replica marks a model that `thinks`, and with `in_thinking`, a prompt whose
    template opened the thinking."""

    async def engine(payload: dict):
        mark = {IN_THINKING: True} if in_thinking else {THINKS: True} if thinks else {}
        for k, reply in enumerate(replies[: payload["n"]]):
            parts = [reply[i : i + size] for i in range(0, len(reply), size)]
            for t, part in enumerate(parts):
                lp = [(part, -0.5, [(part, -0.5)])] if payload["params"]["logprobs"] else []
                ev = {"index": k, "text": part, "token_ids": [t], "logprobs": lp}
                yield [ev | {"finish_reason": None, "prompt_tokens": 7, **mark}]
            end = {"index": k, "text": "", "token_ids": [], "logprobs": [], "finish_reason": finish}
            yield [end | {"prompt_tokens": 7, "completion_tokens": len(parts) + 1, **mark}]

    return engine


def _request(body: dict) -> Request:
    async def receive():
        return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}

    return Request({"type": "http", "headers": [], "state": {"request_id": "req-1"}}, receive)


async def _answer(body: dict, engine):
    return await complete("chat", _request(body), DEP, "key-1", engine, ReplicaMeter(None))


def chat(body: dict, engine) -> dict:
    """The chat.completion a client gets."""
    return json.loads(
        asyncio.run(_answer({"messages": [{"role": "user", "content": "hi"}]} | body, engine)).body
    )


def stream(body: dict, engine) -> list[dict]:
    """The chunks of the chat stream a client gets (`[DONE]` last, left out)."""

    async def lines() -> str:
        body_ = {"messages": [{"role": "user", "content": "hi"}], "stream": True} | body
        answer = await _answer(body_ | {"stream_options": {"include_usage": True}}, engine)
        return "".join([part async for part in answer.body_iterator])

    data = [d.removeprefix("data: ") for d in asyncio.run(lines()).split("\n\n") if d]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def assembled(chunks: list[dict], index: int = 0):
    """The choice the OpenAI SDK puts together of a stream."""
    state = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    return state.current_completion_snapshot.choices[index]


def _deltas(chunks: list[dict], field: str, index: int = 0) -> list[str]:
    return [
        c["choices"][0]["delta"][field]
        for c in chunks
        if c["choices"] and c["choices"][0]["index"] == index and field in c["choices"][0]["delta"]
    ]


# ------------------------------------------------------------------ chat


@pytest.mark.parametrize("size", [1, 2, 3, 5, 9, 100])
def test_the_thinking_is_reasoning_and_the_answer_alone_the_content(size):
    """Whatever the chunking (`</think>` split across events included), the reasoning comes
    apart, without its tags, and the content is what follows the thinking."""
    engine = scripted([QWEN3], size)
    message = ChatCompletion.model_validate(chat({}, engine)).choices[0].message
    assert message.content == f"\n\n{ANSWER}" and message.reasoning == READ
    chunks = stream({}, engine)
    assert "".join(_deltas(chunks, "reasoning")) == READ
    assert "".join(_deltas(chunks, "content")) == f"\n\n{ANSWER}"
    assert not any("think>" in d for d in _deltas(chunks, "reasoning") + _deltas(chunks, "content"))
    choice = assembled(chunks)
    assert choice.message.reasoning == READ and choice.message.content == f"\n\n{ANSWER}"


def test_reasoning_streams_as_it_comes_before_any_content():
    chunks = stream({}, scripted([QWEN3], 4))
    kinds = [
        next(k for k in ("reasoning", "content") if k in c["choices"][0]["delta"])
        for c in chunks
        if c["choices"] and c["choices"][0]["delta"].keys() - {"role"}
    ]
    first_content = kinds.index("content")
    assert (
        kinds[:first_content] == ["reasoning"] * first_content
        and "reasoning" not in kinds[first_content:]
    )
    assert first_content > 5  # piece by piece, not held to the end of the thinking
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"


def test_thinking_the_template_opened_is_reasoning():
    body = chat({}, scripted([OPENED], 4, in_thinking=True))
    message = body["choices"][0]["message"]
    assert message == {"role": "assistant", "content": f"\n\n{ANSWER}", "reasoning": f"{THOUGHT}\n"}
    chunks = stream({}, scripted([OPENED], 4, in_thinking=True))
    assert "".join(_deltas(chunks, "reasoning")) == f"{THOUGHT}\n"


@pytest.mark.parametrize(
    "reply", ["It is sunny.", "<b>Sunny</b>", "<thinking> is a word", "</think> stray"]
)
def test_a_reply_without_thinking_answers_as_before(reply):
    """No block: the content is the whole reply; `reasoning` is null, as vLLM's server
    answers; nothing of it streams as reasoning."""
    body = chat({}, scripted([reply]))
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": reply,
        "reasoning": None,
    }
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": 0}
    chunks = stream({}, scripted([reply], 1))
    assert "".join(_deltas(chunks, "content")) == reply and not _deltas(chunks, "reasoning")


def test_a_model_that_does_not_think_keeps_its_think_tags_as_text():
    """Only a model that thinks (its vocabulary or template knows `<think>`) has its output
    read for reasoning, as vLLM's server only with a reasoning parser: another model's reply
    that happens to start with the tag is its answer, whole, under include_reasoning false
    too."""
    reply = "<think> tags are used by reasoning models.</think> Yes."
    for body in ({}, {"include_reasoning": False}):
        message = chat(body, scripted([reply], thinks=False))["choices"][0]["message"]
        assert message["content"] == reply and message["reasoning"] is None
    chunks = stream({}, scripted([reply], thinks=False))
    assert "".join(_deltas(chunks, "content")) == reply and not _deltas(chunks, "reasoning")


@pytest.mark.parametrize("in_thinking", [False, True])
def test_thinking_cut_by_max_tokens_is_reasoning_without_content(in_thinking):
    text = OPENED if in_thinking else QWEN3
    cut = text[: text.index("</think>") - 5]  # max_tokens reached inside the thinking
    engine = scripted([cut], 3, in_thinking, finish="length")
    choice = chat({}, engine)["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["content"] is None
    assert choice["message"]["reasoning"] == cut.removeprefix("<think>")
    chunks = stream({}, engine)
    assert "".join(_deltas(chunks, "reasoning")) == cut.removeprefix("<think>")
    assert not _deltas(chunks, "content")
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    # every token was thinking
    assert (
        chunks[-1]["usage"]["completion_tokens_details"]["reasoning_tokens"]
        == chunks[-1]["usage"]["completion_tokens"]
    )


def test_include_reasoning_false_leaves_the_reasoning_out_and_the_content_alone():
    engine = scripted([QWEN3], 4)
    body = chat({"include_reasoning": False}, engine)
    message = body["choices"][0]["message"]
    assert message["content"] == f"\n\n{ANSWER}" and message["reasoning"] is None
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0  # still counted
    chunks = stream({"include_reasoning": False}, engine)
    assert not _deltas(chunks, "reasoning")
    assert "".join(_deltas(chunks, "content")) == f"\n\n{ANSWER}"
    # the first chunk goes out as the thinking begins (as OpenAI's: role, empty content)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    cut = stream({"include_reasoning": False}, scripted([QWEN3[:20]], 4, finish="length"))
    assert [c["choices"][0]["finish_reason"] for c in cut if c["choices"]] == [None, "length"]
    assert "".join(_deltas(cut, "content")) == ""


def test_usage_counts_the_thinkings_tokens():
    """One token per event here: the thinking's tokens are those up to the event `</think>`
    ends in."""
    tokens = -(-(QWEN3.index("</think>") + len("</think>")) // 3)  # 3-character events
    body = chat({}, scripted([QWEN3], 3))
    usage = body["usage"]
    assert usage["completion_tokens_details"] == {"reasoning_tokens": tokens}
    assert usage["completion_tokens"] == -(-len(QWEN3) // 3) + 1
    chunks = stream({}, scripted([QWEN3], 3))
    assert chunks[-1]["usage"] == usage


def test_n_choices_are_split_each_on_its_own():
    engine = scripted([QWEN3, "No thinking here.", OPENED.replace("</think>", "")], 3)
    body = chat({"n": 2}, engine)
    first, second = (c["message"] for c in body["choices"])
    assert (first["reasoning"], first["content"]) == (READ, f"\n\n{ANSWER}")
    assert (second["reasoning"], second["content"]) == (None, "No thinking here.")
    chunks = stream({"n": 2}, engine)
    assert assembled(chunks, 0).message.reasoning == READ
    assert not _deltas(chunks, "reasoning", 1)
    assert "".join(_deltas(chunks, "content", 1)) == "No thinking here."


def test_logprobs_cover_every_token_the_thinkings_with_the_reasoning():
    engine = scripted([QWEN3], 5)
    body = chat({"logprobs": True, "top_logprobs": 1}, engine)
    tokens = [t["token"] for t in body["choices"][0]["logprobs"]["content"]]
    assert "".join(tokens) == QWEN3  # every token, in order, tags included
    chunks = stream({"logprobs": True}, engine)
    thinking = "".join(
        t["token"]
        for c in chunks
        if c["choices"] and "reasoning" in c["choices"][0]["delta"] and c["choices"][0]["logprobs"]
        for t in c["choices"][0]["logprobs"]["content"]
    )
    assert thinking.startswith("<think>") and QWEN3.startswith(thinking)
    assert "</think>" in thinking  # the token the thinking ends in goes with it
    hidden = chat({"logprobs": True, "include_reasoning": False}, engine)
    shown = "".join(t["token"] for t in hidden["choices"][0]["logprobs"]["content"])
    assert "think" not in shown and ANSWER in shown  # the reasoning's leave with it


def test_stop_strings_end_the_content_the_engine_cut():
    """The engine ends the reply at a stop string (its text cut there): the split reads what
    came, so the content stops there and the reasoning stays whole."""
    engine = scripted([QWEN3[: QWEN3.index("How")]], 3)
    message = chat({"stop": ["How"]}, engine)["choices"][0]["message"]
    assert message["reasoning"] == READ and message["content"] == "\n\nHello! "


# ------------------------------------------------------------------ Responses API


def responses(body: dict, engine):
    """The Responses object (or the stream's events) a client gets for `body`."""

    async def run():
        async def serve_chat(body_of):
            return await complete(
                "chat", _request(body), DEP, "key-1", engine, ReplicaMeter(None), body_of=body_of
            )

        answer = await respond(serve_chat, "req-1")
        if not body.get("stream"):
            return json.loads(answer.body)
        text = "".join([part async for part in answer.body_iterator])
        return [json.loads(b.split("data: ", 1)[1]) for b in text.split("\n\n") if b]

    return asyncio.run(run())


def test_a_response_has_the_reasoning_item_before_the_message():
    out = Response.model_validate(responses({"input": "hi"}, scripted([QWEN3], 4)))
    assert [item.type for item in out.output] == ["reasoning", "message"]
    thinking = out.output[0]
    assert thinking.summary == [] and [(c.type, c.text) for c in thinking.content] == [
        ("reasoning_text", READ)
    ]
    assert out.output_text == f"\n\n{ANSWER}"
    assert out.usage.output_tokens_details.reasoning_tokens == -(
        -(QWEN3.index("</think>") + 8) // 4
    )
    plain = Response.model_validate(responses({"input": "hi"}, scripted([ANSWER])))
    assert [item.type for item in plain.output] == ["message"]
    assert plain.usage.output_tokens_details.reasoning_tokens == 0
    hidden = responses({"input": "hi", "include_reasoning": False}, scripted([QWEN3], 4))
    assert [item["type"] for item in hidden["output"]] == ["message"]


def test_a_json_schema_answer_after_thinking_is_the_output_text_alone():
    answer = '{"city":"Oslo"}'
    out = responses(
        {
            "input": "hi",
            "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}}},
        },
        scripted([f"{THOUGHT}\n</think>{answer}"], 4, in_thinking=True),
    )
    assert json.loads(Response.model_validate(out).output_text) == {"city": "Oslo"}


def test_a_streamed_response_sends_the_reasoning_items_events_first():
    events = responses({"input": "hi", "stream": True}, scripted([QWEN3], 4))
    for e in events:
        EVENTS[e["type"]].model_validate(e)
    types = [e["type"] for e in events]
    first_text = types.index("response.output_text.delta")
    assert types[:5] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
    ]
    assert types[first_text - 5 : first_text] == [
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert "response.reasoning_text.delta" not in types[first_text:]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    indexes = {
        e["type"]: e["output_index"]
        for e in events
        if "output_index" in e and "reasoning" in e["type"]
    }
    assert set(indexes.values()) == {0}
    assert all(
        e["output_index"] == 1 for e in events if e["type"].startswith("response.output_text")
    )
    assert events[first_text - 5]["text"] == READ
    state = ResponseStreamState(input_tools=[WEATHER], text_format=omit)
    for e in events:
        state.handle_event(EVENTS[e["type"]].model_validate(e))
    final = state._completed_response
    assert final.output_text == f"\n\n{ANSWER}"
    assert [item.type for item in final.output] == ["reasoning", "message"]


def test_a_stream_cut_inside_the_thinking_ends_incomplete_with_the_reasoning_alone():
    cut = QWEN3[:30]
    events = responses({"input": "hi", "stream": True}, scripted([cut], 4, finish="length"))
    assert events[-1]["type"] == "response.incomplete"
    output = events[-1]["response"]["output"]
    assert [(item["type"], item["status"]) for item in output] == [("reasoning", "incomplete")]
    assert output[0]["content"][0]["text"] == cut.removeprefix("<think>")


def test_a_reasoning_item_sent_back_is_accepted_and_left_out_of_the_prompt():
    seen = []

    async def engine(payload: dict):
        seen.append(payload["messages"])
        async for batch in scripted([ANSWER])(payload):
            yield batch

    first = responses({"input": "hi"}, scripted([QWEN3], 4))
    again = [
        {"role": "user", "content": "hi"},
        *first["output"],
        {"role": "user", "content": "and?"},
    ]
    responses({"input": again}, engine)
    assert [m["role"] for m in seen[0]] == ["user", "assistant", "user"]
    assert seen[0][1]["content"] == f"\n\n{ANSWER}"


# ------------------------------------------------ through the engine replica's request path


def _through_the_replica(template: str, reply: str, response_format: dict | None = None):
    """The chat.completion for a model with chat `template` that writes `reply`, through the
    engine replica's request path (`EngineServer`, no Serve: it renders the prompt and marks
    an output that starts inside the thinking its template opened) and the service's."""
    from raydock.serve_apps import protocol, structured
    from raydock.serve_apps.openai_service import _collect, chat_events
    from tests.unit.test_native_tool_calls import _replica, _Scripted, _steps, _tokenizer

    class Free(_Scripted):  # the scripted model, free where the request sets no format
        async def generate(self, ids, params, regex=None, grammar=None, **options):
            if grammar is None:
                grammar = "start: /[\\s\\S]*/"
            async for steps in super().generate(ids, params, regex, grammar, **options):
                yield steps

    server = _replica(Free(_tokenizer(template, False), reply), None)  # tags spelled out
    constraint = structured.constraint_for(response_format, None, None)
    request = {
        "messages": [{"role": "user", "content": "hi"}],
        "params": {"max_tokens": 300},
        "grammar": constraint.grammar,
    }
    try:
        fmt = protocol.Formatter("chat", "m")
        body = asyncio.run(_collect(fmt, chat_events(_steps(server, request), None), 1))
    finally:
        server.tokenizing.shutdown()
    return ChatCompletion.model_validate(body).choices[0].message


def test_the_replica_marks_thinking_its_template_opened_and_the_service_splits_it():
    from tests.unit.test_native_tool_calls import QWEN3_THINKING_TEMPLATE, R1_TEMPLATE

    for template in (QWEN3_THINKING_TEMPLATE, R1_TEMPLATE):
        message = _through_the_replica(template, OPENED)
        assert message.reasoning == f"{THOUGHT}\n" and message.content == f"\n\n{ANSWER}"


def test_json_schema_after_a_template_that_opens_thinking_is_the_content():
    """The grammar has the JSON from the first token (no thinking): the replica does not mark
    it, so the content is the JSON, which json.loads reads."""
    from tests.unit.test_native_tool_calls import QWEN3_THINKING_TEMPLATE

    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": schema}}
    message = _through_the_replica(QWEN3_THINKING_TEMPLATE, '{"city":"Oslo"}', fmt)
    assert json.loads(message.content) == {"city": "Oslo"} and message.reasoning is None
