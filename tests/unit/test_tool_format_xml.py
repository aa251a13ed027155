"""Tool calls in Qwen3-Coder's XML format (`<tool_call>` around `<function=NAME>`
`<parameter=P>` value `</parameter>` ... `</function>`), without Ray: which templates teach
it, the grammar the engine replica makes for such a template, the OpenAI answer the service
makes of such output (values typed by the tool's schema, whole and streamed), and the next
turn as the template renders it."""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path

import jsonschema
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from raydock.serve_apps import chat_render, protocol, structured
from raydock.serve_apps.engine_app import native_tool_grammar
from raydock.serve_apps.guided.grammars import JSON_BODY, XML_BODY, TagTokens
from raydock.serve_apps.openai_service import _collect, _sse, chat_events, native_tool_calls
from tests.unit.test_chat_render import QWEN3_TEMPLATE, QWEN25_TEMPLATE
from tests.unit.test_guided import _accepts, decoder

#: Qwen3-Coder-30B-A3B-Instruct's chat template (as its tokenizer_config.json ships it)
QWEN3_CODER_TEMPLATE = (Path(__file__).parent / "qwen3_coder_chat_template.jinja").read_text()

RECORD = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer", "minimum": 1},
                "metric": {"type": "boolean"},
                "ratio": {"type": "number"},
                "units": {"enum": ["c", "f"]},
                "where": {"type": "object", "properties": {"lat": {"type": "number"}}},
                "tags": {"type": "array", "items": {"type": "string"}},
                "code": {"type": "string", "pattern": "^[A-Z]{3}$"},
                "limit": {"type": ["integer", "null"]},
            },
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}
TOOLS = [RECORD, TIME]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def _call(name: str, *params: tuple[str, str]) -> str:
    """A call as Qwen3-Coder's template writes one (each value as its text)."""
    body = "".join(f"<parameter={p}>\n{value}\n</parameter>\n" for p, value in params)
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


PARIS = _call("get_weather", ("city", "Paris"), ("days", "3"))
NOW = _call("get_time")
TWO_CALLS = f"{PARIS}\n{NOW}"
# every kind of value: a string of digits stays a string, the others are JSON of their schema
TYPED = _call(
    "get_weather",
    ("city", "007"),
    ("days", "3"),
    ("metric", "true"),
    ("ratio", "2.5"),
    ("units", "f"),
    ("where", '{"lat":48.8}'),
    ("tags", '["a","b"]'),
    ("code", "CDG"),
    ("limit", "null"),
)
TYPED_ARGUMENTS = {
    "city": "007",
    "days": 3,
    "metric": True,
    "ratio": 2.5,
    "units": "f",
    "where": {"lat": 48.8},
    "tags": ["a", "b"],
    "code": "CDG",
    "limit": None,
}
# a string's raw text may hold `<`, tags of its own and newlines (not `</parameter>`)
MARKUP = "a <b>bold</b> line\n<parameter=x> and\n\n{not json}"


def _tokenizer(template: str):
    tok = copy.copy(decoder()[0])
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def xml_wrapper():
    return chat_render.tool_call_wrapper(_tokenizer(QWEN3_CODER_TEMPLATE))


@pytest.fixture(scope="module")
def json_wrapper():
    return chat_render.tool_call_wrapper(_tokenizer(QWEN25_TEMPLATE))


def test_qwen3_coders_template_teaches_the_xml_body_qwens_others_the_json_one():
    assert "<function=" in QWEN3_CODER_TEMPLATE and "<parameter=" in QWEN3_CODER_TEMPLATE
    coder = chat_render.tool_call_wrapper(_tokenizer(QWEN3_CODER_TEMPLATE))
    assert (coder.open, coder.close, coder.body) == ("<tool_call>", "</tool_call>", XML_BODY)
    for template in (QWEN25_TEMPLATE, QWEN3_TEMPLATE):
        assert chat_render.tool_call_wrapper(_tokenizer(template)).body == JSON_BODY
    assert chat_render.tool_call_wrapper(_tokenizer("{{ messages }}")) is None


def _grammar(wrapper, tool_choice="auto", thinks: bool = False, tools=TOOLS, **request) -> str:
    """The grammar the engine replica decodes a chat request with `tools` under, for a
    template that teaches `wrapper`."""
    req = protocol.ChatRequest(
        messages=[{"role": "user", "content": "hi"}],
        tools=tools,
        tool_choice=tool_choice,
        **request,
    )
    constraint = structured.constraint_for(None, req.tools, req.tool_choice)
    payload = {
        "grammar": constraint.grammar,
        "native_tool_calls": native_tool_calls(constraint, req),
    }
    return native_tool_grammar(payload, wrapper, False, TagTokens(), thinks)["grammar"]


JSON_CALL = '{"name":"get_weather","arguments":{"city":"Paris"}}'


@pytest.mark.parametrize(
    "text",
    [
        PARIS,
        TWO_CALLS,
        TYPED,
        _call("get_weather", ("city", MARKUP)),
        _call("get_weather", ("city", "")),
        f"\n{PARIS}\n",
        f"<think>\nParis, then the time.\n</think>\n\n{TWO_CALLS}",  # auto may think first
        JSON_CALL,  # raydock's own bare call, as on every template
        "It is sunny.",
    ],
)
def test_the_xml_grammar_takes_qwen3_coders_calls(xml_wrapper, text):
    assert _accepts(_grammar(xml_wrapper), text)


@pytest.mark.parametrize(
    "text",
    [
        f"<tool_call>\n{JSON_CALL}\n</tool_call>",  # a JSON body: not this template's
        _call("get_forecast", ("city", "Paris")),  # not one of the tools
        _call("get_weather", ("city", "Paris"), ("zip", "75001")),  # not one of its parameters
        _call("get_weather", ("days", "3")),  # the required city left out
        _call("get_weather", ("days", "3"), ("city", "Paris")),  # not in the declared order
        _call("get_weather", ("city", "Paris"), ("city", "Lyon")),  # twice
        _call("get_weather", ("city", "a</parameter>b")),  # a string cannot close early
        _call("get_weather", ("city", "Paris"), ("days", "three")),  # not JSON of an integer
        _call("get_weather", ("city", "Paris"), ("days", "0")),  # below its minimum
        _call("get_weather", ("city", "Paris"), ("days", '"3"')),  # a JSON string, not 3
        _call("get_weather", ("city", "Paris"), ("units", "k")),  # not in its enum
        _call("get_weather", ("city", "Paris"), ("code", "cdg")),  # not its pattern
        _call("get_weather", ("city", "x" * 49)),  # longer than the bound on strings
        "<tool_call>\n<function=get_weather>\n<parameter=city>Paris</parameter>\n"
        "</function>\n</tool_call>",  # the template's newlines around a value
        f"{PARIS} and text",
    ],
)
def test_the_xml_grammar_refuses_what_is_not_a_valid_call(xml_wrapper, text):
    assert not _accepts(_grammar(xml_wrapper), text)


def test_required_named_and_single_calls_hold_in_the_xml_format(xml_wrapper):
    required = _grammar(xml_wrapper, "required")
    assert _accepts(required, TWO_CALLS) and not _accepts(required, "It is sunny.")
    named = _grammar(xml_wrapper, NAMED)
    assert _accepts(named, PARIS)
    assert not _accepts(named, NOW) and not _accepts(named, f"{PARIS}\n{PARIS}")
    single = _grammar(xml_wrapper, parallel_tool_calls=False)
    assert _accepts(single, PARIS) and not _accepts(single, TWO_CALLS)
    thinking = _grammar(xml_wrapper, "required", thinks=True)  # a model that thinks
    assert _accepts(thinking, f"<think>\nfirst Paris\n</think>\n\n{PARIS}")


def test_parameters_that_refer_to_their_own_defs_hold_in_the_xml_format(xml_wrapper):
    from tests.unit.test_guided import MOVE

    grammar = _grammar(xml_wrapper, "required", tools=[MOVE, RECORD])
    assert _accepts(grammar, _call("move", ("home", '{"city":"Oslo"}')))
    assert not _accepts(grammar, _call("move", ("home", '{"town":"Oslo"}')))


def test_json_body_templates_keep_their_format(json_wrapper):
    grammar = _grammar(json_wrapper)
    assert _accepts(grammar, f"<tool_call>\n{JSON_CALL}\n</tool_call>")
    assert not _accepts(grammar, PARIS)
    assert "<function=" not in grammar


def _events(text: str, finish: str = "stop", size: int = 7) -> list[list[dict]]:
    parts = [text[i : i + size] for i in range(0, len(text), size)]
    return [
        [
            {
                "index": 0,
                "text": part,
                "logprobs": [],
                "finish_reason": finish if k == len(parts) - 1 else None,
                "prompt_tokens": 12,
                "completion_tokens": len(parts),
            }
        ]
        for k, part in enumerate(parts)
    ]


async def _source(batches):
    for b in batches:
        yield b


def _answer(text: str, finish: str = "stop") -> ChatCompletion:
    events = chat_events(_source(_events(text, finish)), "tool_calls", True, TOOLS)
    body = asyncio.run(_collect(protocol.Formatter("chat", "m"), events, 1))
    return ChatCompletion.model_validate(body)


def _streamed(text: str, finish: str = "stop"):
    """The streamed reply as the openai SDK puts it together."""

    async def lines() -> list[str]:
        events = chat_events(_source(_events(text, finish)), "tool_calls", True, TOOLS)
        fmt = protocol.Formatter("chat", "m")
        return [line async for line in _sse(fmt, None, events, False, "req-1")]

    data = [d.removeprefix("data: ") for d in "".join(asyncio.run(lines())).split("\n\n") if d]
    chunks = [ChatCompletionChunk.model_validate_json(d) for d in data[:-1]]
    state = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(chunk)
    return chunks, state.current_completion_snapshot.choices[0]


def _both(text: str, finish: str = "stop"):
    """The reply whole and streamed; a reply of calls streams no content (no markup)."""
    chunks, streamed = _streamed(text, finish)
    if streamed.message.tool_calls:
        assert not any(c.choices and c.choices[0].delta.content for c in chunks)
    return [_answer(text, finish).choices[0], streamed]


def test_xml_calls_answer_as_tool_calls_typed_by_their_schema():
    for choice in _both(TYPED):
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == TYPED_ARGUMENTS
        jsonschema.validate(TYPED_ARGUMENTS, RECORD["function"]["parameters"])


def test_parallel_xml_calls_are_several_tool_calls():
    for choice in _both(f"\n{TWO_CALLS}\n"):
        calls = choice.message.tool_calls
        assert [c.function.name for c in calls] == ["get_weather", "get_time"]
        assert [json.loads(c.function.arguments) for c in calls] == [
            {"city": "Paris", "days": 3},
            {},
        ]
        assert len({c.id for c in calls}) == 2


def test_a_string_keeps_its_markup_and_newlines():
    for choice in _both(_call("get_weather", ("city", MARKUP), ("tags", '["</parameter>"]'))):
        arguments = json.loads(choice.message.tool_calls[0].function.arguments)
        assert arguments == {"city": MARKUP, "tags": ["</parameter>"]}


def test_a_named_xml_call_ends_with_stop_after_thinking():
    text = f"<think>\nParis it is.\n</think>\n\n{PARIS}"
    events = chat_events(_source(_events(text)), "stop", True, TOOLS)
    body = asyncio.run(_collect(protocol.Formatter("chat", "m"), events, 1))
    (choice,) = ChatCompletion.model_validate(body).choices
    assert choice.finish_reason == "stop" and not choice.message.content
    assert json.loads(choice.message.tool_calls[0].function.arguments) == {
        "city": "Paris",
        "days": 3,
    }


def test_an_xml_call_cut_by_max_tokens_is_a_tool_call_so_far():
    cut = PARIS + "\n" + _call("get_weather", ("city", "Lyon"), ("days", "4"))[:-40]
    for choice in _both(cut, "length"):
        assert choice.finish_reason == "length"
        calls = choice.message.tool_calls
        assert [c.function.name for c in calls] == ["get_weather", "get_weather"]
        assert calls[0].function.arguments == '{"city":"Paris","days":3}'
        assert calls[1].function.arguments == '{"city":"Lyon"'  # the whole values, left open


@pytest.mark.parametrize("cut_at", ["</function>\n", "</function>\n</tool_ca"])
def test_an_xml_call_cut_after_its_function_closed_has_its_whole_arguments(cut_at):
    """Cut by max_tokens after `</function>`, before or inside `</tool_call>` (a tokenizer
    without the tag as one token): the call is whole, as a JSON body's would be."""
    lyon = _call("get_weather", ("city", "Lyon"), ("days", "4"))
    cut = PARIS + "\n" + lyon[: lyon.index("</function>")] + cut_at
    for choice in _both(cut, "length"):
        calls = choice.message.tool_calls
        assert [json.loads(c.function.arguments) for c in calls] == [
            {"city": "Paris", "days": 3},
            {"city": "Lyon", "days": 4},
        ]


def test_text_that_is_no_call_stays_text():
    for choice in _both("I could write <tool_call> for that."):
        assert choice.message.content == "I could write <tool_call> for that."
        assert not choice.message.tool_calls


def test_the_template_renders_the_next_turn_as_its_model_wrote_it():
    """The calls the service returned go back as OpenAI messages; the template writes them
    in its own format (from the arguments as an object), the results as tool responses."""
    (call,) = _answer(PARIS).choices[0].message.tool_calls
    messages = [
        {"role": "user", "content": "Weather in Paris for 3 days?"},
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 21}'},
    ]
    prompt = chat_render.render(_tokenizer(QWEN3_CODER_TEMPLATE), messages, TOOLS)
    assert PARIS in prompt  # exactly as the model wrote it
    assert '<tool_response>\n{"celsius": 21}\n</tool_response>' in prompt
    assert "<name>get_weather</name>" in prompt  # the tools, in the template's own listing
    assert chat_render.TOOLS_PREAMBLE not in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_parameters_given_by_local_refs_are_read_by_what_they_name():
    """A parameter's schema behind `$ref`s (`#/$defs/...`, a ref to a ref): a string is raw
    text, an integer JSON, as if written in place."""
    defs = {
        "City": {"type": "string", "maxLength": 9},
        "N": {"$ref": "#/$defs/M"},
        "M": {"type": "integer"},
    }
    parameters = {
        "type": "object",
        "$defs": defs,
        "properties": {"where": {"$ref": "#/$defs/City"}, "n": {"$ref": "#/$defs/N"}},
        "required": ["where"],
    }
    tools = [{"type": "function", "function": {"name": "f", "parameters": parameters}}]
    reply = _call("f", ("where", "Paris"), ("n", "3"))
    (call,) = structured.as_tool_calls(reply, tools)
    assert json.loads(call["function"]["arguments"]) == {"where": "Paris", "n": 3}
