"""The Responses API's translation (serve_apps/responses_api.py): a Responses request into the
chat request raydock serves, and chat's answer (built by protocol.Formatter, as the chat path
sends it) back into the Responses object and event sequence, checked against the OpenAI SDK's
own types and its stream accumulator."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import get_args

import pytest
import ray
from fastapi.responses import StreamingResponse
from openai import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent
from starlette.requests import Request

from raydock.errors import ApiError
from raydock.platform.access_hub import AccessHub
from raydock.serve_apps import protocol
from raydock.serve_apps.access import Auth
from raydock.serve_apps.metering import ReplicaMeter
from raydock.serve_apps.openai_service import complete
from raydock.serve_apps.responses_api import (
    ChatStreamReader,
    ResponsesRequest,
    chat_body,
    from_chat_completion,
    parse,
    renamed,
    respond,
)
from tests.unit.test_access import _HubHandle, snapshot
from tests.unit.test_metering import dep_access

#: each Responses event type's SDK class
EVENTS = {
    get_args(cls.model_fields["type"].annotation)[0]: cls
    for cls in get_args(get_args(ResponseStreamEvent)[0])
}
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    "strict": True,
}


def refusal(body: dict) -> ApiError:
    with pytest.raises(ApiError) as exc:
        parse(body)
    assert exc.value.status == 400
    return exc.value


# ------------------------------------------------------------------ served on the chat path

ADAPTERS = {"m-1": {"name": "legal", "rank": 8, "prefix": "models/legal", "digest": "d"}}
DEP = dep_access(name="hub", adapters=ADAPTERS)


async def engine(payload: dict):
    """The engine (the edge here): its answer says which weights answered."""
    adapter = payload["adapter"]
    text = f"from {adapter['name'] if adapter else 'the base'}"
    ev = {"index": 0, "text": text, "logprobs": [], "finish_reason": "stop"}
    yield [ev | {"prompt_tokens": 3, "completion_tokens": 2}]


def http_request(body: dict) -> Request:
    async def receive():
        return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}

    return Request({"type": "http", "headers": [], "state": {"request_id": "req-1"}}, receive)


def served(body: dict, by_model: bool = False) -> dict:
    """The Responses object a deployment's route (by_model: /v1) answers for `body`: respond
    on chat's `complete`, as engine_app and the gateway serve it."""

    async def chat(body_of):
        req = http_request(body)
        meter = ReplicaMeter(None)
        return await complete(
            "chat", req, DEP, "key-1", engine, meter, by_model=by_model, body_of=body_of
        )

    return json.loads(asyncio.run(respond(chat, "req-1")).body)


def served_refusal(body: dict, by_model: bool = False) -> ApiError:
    with pytest.raises(ApiError) as exc:
        served(body, by_model)
    return exc.value


def test_a_requested_adapter_answers_on_the_deployment_route_and_on_v1():
    assert served({"input": "x"})["output"][0]["content"][0]["text"] == "from the base"
    on_route = served({"input": "x", "adapter": "legal"})
    assert on_route["output"][0]["content"][0]["text"] == "from legal"
    assert on_route["model"] == "hub:legal"
    on_v1 = served({"model": "hub:legal", "input": "x"}, by_model=True)
    assert on_v1["output"][0]["content"][0]["text"] == "from legal"
    err = served_refusal({"input": "x", "adapter": "medical"})
    assert (err.status, err.param) == (404, "adapter") and "legal" in err.message
    err = served_refusal({"input": "x", "adapter": ""})
    assert (err.status, err.param) == (400, "adapter")


# ------------------------------------------------------------------ requests


def test_a_string_input_with_instructions_is_a_system_then_a_user_message():
    body = chat_body(
        parse(
            {
                "model": "dep",
                "input": "Hi",
                "instructions": "Be brief",
                "max_output_tokens": 7,
                "temperature": 0.5,
                "top_p": 0.9,
                "user": "u1",
                "metadata": {"a": "b"},
                "store": True,
            }
        )
    )
    assert body == {
        "messages": [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"}],
        "model": "dep",
        "temperature": 0.5,
        "top_p": 0.9,
        "user": "u1",
        "max_tokens": 7,
    }
    # the translated body is one the chat path accepts
    protocol.parse(protocol.ChatRequest, body)


def test_items_become_chat_messages_with_tool_calls_and_results():
    req = parse(
        {
            "input": [
                {"role": "developer", "content": "Use tools"},
                {
                    "type": "message",
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "Weather"},
                        {"type": "input_text", "text": " in Oslo?"},
                    ],
                },
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "Checking.", "annotations": []}],
                },
                {
                    "type": "function_call",
                    "call_id": "call_1",
                    "name": "get_weather",
                    "arguments": '{"city":"Oslo"}',
                    "id": "fc_1",
                    "status": "completed",
                },
                {
                    "type": "function_call",
                    "call_id": "call_2",
                    "name": "get_weather",
                    "arguments": '{"city":"Bergen"}',
                },
                {"type": "function_call_output", "call_id": "call_1", "output": "rain"},
                {
                    "type": "function_call_output",
                    "call_id": "call_2",
                    "output": [{"type": "input_text", "text": "sun"}],
                },
            ],
            "tools": [WEATHER],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "parallel_tool_calls": False,
        }
    )
    body = chat_body(req)
    call = lambda i, city: {  # noqa: E731
        "id": f"call_{i}",
        "type": "function",
        "function": {
            "name": "get_weather",
            "arguments": json.dumps({"city": city}, separators=(",", ":")),
        },
    }
    assert body["messages"] == [
        {"role": "developer", "content": "Use tools"},
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [call(1, "Oslo"), call(2, "Bergen")],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
        {"role": "tool", "tool_call_id": "call_2", "content": "sun"},
    ]
    assert body["tools"] == [
        {
            "type": "function",
            "function": {k: WEATHER[k] for k in ("name", "description", "parameters", "strict")},
        }
    ]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["parallel_tool_calls"] is False
    protocol.parse(protocol.ChatRequest, body)


def test_a_function_call_with_no_assistant_message_before_it_makes_one():
    req = parse(
        {
            "input": [
                {"role": "user", "content": "Weather?"},
                {"type": "function_call", "call_id": "c", "name": "get_weather", "arguments": "{}"},
            ]
        }
    )
    assert chat_body(req)["messages"][1]["role"] == "assistant"
    assert chat_body(req)["messages"][1]["tool_calls"][0]["id"] == "c"


@pytest.mark.parametrize(
    ("fmt", "response_format"),
    [
        ({"type": "text"}, {"type": "text"}),
        ({"type": "json_object"}, {"type": "json_object"}),
        (
            {"type": "json_schema", "name": "p", "schema": {"type": "object"}, "strict": True},
            {
                "type": "json_schema",
                "json_schema": {"name": "p", "schema": {"type": "object"}, "strict": True},
            },
        ),
        (  # OpenAI requires a name; raydock does not need one
            {"type": "json_schema", "schema": {"type": "object"}},
            {
                "type": "json_schema",
                "json_schema": {"name": "response", "schema": {"type": "object"}},
            },
        ),
    ],
)
def test_text_format_becomes_response_format(fmt, response_format):
    assert (
        chat_body(parse({"input": "x", "text": {"format": fmt}}))["response_format"]
        == response_format
    )


def test_a_stream_asks_chat_for_its_usage():
    body = chat_body(parse({"input": "x", "stream": True}))
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        (
            {"input": "x", "previous_response_id": "resp_1"},
            "previous_response_id",
            "stores no responses",
        ),
        ({"input": "x", "conversation": "conv_1"}, "conversation", "stores no conversations"),
        ({"input": "x", "background": True}, "background", "background"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools.0.type", "function tools only"),
        (
            {
                "input": [
                    {"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}
                ]
            },
            "input.0.content.0.type",
            "text only",
        ),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0.type", "stores no items"),
        ({"input": [{"type": "compaction", "summary": []}]}, "input.0.type", "not supported"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input", "only reasoning items"),
        ({"input": [{"type": {}, "role": "user", "content": ""}]}, "input.0.type", "a string"),
        ({"input": []}, "input", "at least one item"),
        ({"input": [{"role": "tool", "content": "x"}]}, "input.0.role", "invalid"),
        (
            {"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
            "input.0.call_id",
            "required",
        ),
        (
            {"input": [{"type": "function_call_output", "call_id": "c"}]},
            "input.0.output",
            "required",
        ),
        ({"input": "x", "max_output_tokens": 513}, "max_output_tokens", "512"),
        ({"input": "x", "temperature": 3}, "temperature", "2"),
        (
            {"input": "x", "tools": [WEATHER], "tool_choice": {"type": "function"}},
            "tool_choice.name",
            "required",
        ),
        (
            {"input": "x", "text": {"format": {"type": "json_schema"}}},
            "text.format.schema",
            "required",
        ),
        ({"input": "x", "text": {"format": {"type": "xml"}}}, "text.format.type", "xml"),
        ({"input": "x", "text": {"format": {}}}, "text.format.type", "required"),
        ({"input": "x", "top_logprobs": 3}, "top_logprobs", "no log probabilities"),
        ({"input": "x", "top_logprobs": False}, "top_logprobs", "not supported"),
        ({"input": "x", "tools": [{"type": "function"}]}, "tools.0.name", "required"),
        ({"input": "x", "metadata": {"k": 5}}, "metadata.k", "string"),
        ({"input": 5}, "input", "valid"),
        ({}, "input", "required"),
    ],
)
def test_what_raydock_cannot_honour_is_a_400_naming_the_field(body, param, words):
    err = refusal(body)
    assert err.param == param and words in err.message, (err.param, err.message)


def test_store_and_background_false_are_accepted():
    assert chat_body(parse({"input": "x", "store": True, "background": False}))
    assert chat_body(parse({"input": "x", "top_logprobs": 0}))  # asks for none: nothing lost


def test_a_tool_choice_without_tools_is_refused_by_chat_naming_tool_choice():
    """One rule, chat's: the translated body is refused naming the field the client sent."""
    for tools in ({}, {"tools": []}):
        for choice in ("required", {"type": "function", "name": "f"}):
            err = served_refusal({"input": "x", "tool_choice": choice} | tools)
            assert (err.status, err.param) == (400, "tool_choice") and "needs tools" in err.message


@pytest.mark.parametrize(
    ("chat_param", "param"),
    [
        ("max_tokens", "max_output_tokens"),
        ("response_format.json_schema.schema", "text.format.schema"),
        ("response_format", "text.format"),
        ("tools.1.function.parameters", "tools.1.parameters"),
        ("tool_choice", "tool_choice"),
        ("messages.3.content", "input"),
        ("messages", "input"),
        ("model", "model"),
    ],
)
def test_chat_errors_name_the_responses_field(chat_param, param):
    err = renamed(ApiError(400, f"invalid {chat_param}: bad", chat_param, "unsupported_schema"))
    assert (err.param, err.message, err.code) == (
        param,
        f"invalid {param}: bad",
        "unsupported_schema",
    )


# ------------------------------------------------------------------ answers


def chat_reply(text: str, finish: str, tool_calls: list | None = None) -> dict:
    fmt = protocol.Formatter("chat", "tiny")
    choice = {"index": 0, "text": text, "logprobs": [], "finish_reason": finish}
    if tool_calls:
        choice["tool_calls"] = tool_calls
    return fmt.final([choice], 11, 5)


def call(k: int, name: str = "get_weather", args: str = '{"city":"Oslo"}') -> dict:
    return {
        "index": k,
        "id": f"call_{k}",
        "type": "function",
        "function": {"name": name, "arguments": args},
    }


def test_a_chat_completion_becomes_a_response_object():
    req = parse(
        {
            "model": "tiny",
            "input": "Hi",
            "max_output_tokens": 5,
            "metadata": {"a": "b"},
            "store": True,
        }
    )
    out = from_chat_completion(req, chat_reply("Hello there", "stop"))
    resp = Response.model_validate(out)
    assert resp.id.startswith("resp_") and resp.object == "response" and resp.status == "completed"
    assert resp.output_text == "Hello there" and resp.model == "tiny"
    (item,) = resp.output
    assert (
        item.type == "message"
        and item.role == "assistant"
        and item.content[0].type == "output_text"
    )
    assert (
        resp.usage.input_tokens == 11
        and resp.usage.output_tokens == 5
        and resp.usage.total_tokens == 16
    )
    assert resp.max_output_tokens == 5 and resp.metadata == {"a": "b"} and resp.store is False
    assert resp.incomplete_details is None


def test_a_reply_cut_by_max_output_tokens_is_incomplete():
    out = from_chat_completion(parse({"input": "Hi"}), chat_reply("Hel", "length"))
    resp = Response.model_validate(out)
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    assert resp.output[0].status == "incomplete"


def test_tool_calls_become_function_call_items():
    req = parse({"input": "Weather?", "tools": [WEATHER]})
    out = from_chat_completion(
        req, chat_reply("", "tool_calls", [call(0), call(1, args='{"city":"Rome"}')])
    )
    resp = Response.model_validate(out)
    assert [i.type for i in resp.output] == ["function_call", "function_call"]
    first = resp.output[0]
    assert (
        first.call_id == "call_0"
        and first.name == "get_weather"
        and json.loads(first.arguments) == {"city": "Oslo"}
    )
    assert first.id.startswith("fc_") and first.status == "completed"
    assert resp.tools[0].name == "get_weather" and resp.tool_choice == "auto"


def test_an_empty_reply_is_an_empty_message():
    resp = Response.model_validate(
        from_chat_completion(parse({"input": "x"}), chat_reply("", "stop"))
    )
    assert resp.output[0].type == "message" and resp.output_text == ""


# ------------------------------------------------------------------ streams


def chat_sse(
    pieces: list[tuple[str, str | None, list | None]], error: dict | None = None
) -> list[str]:
    """The `data` values a chat stream sends for `pieces` (text, finish_reason, tool calls),
    with its usage chunk and [DONE] (openai_service._sse's order)."""
    fmt = protocol.Formatter("chat", "tiny")
    out = [
        json.dumps(fmt.chunk(0, text, [], finish, k == 0, calls))
        for k, (text, finish, calls) in enumerate(pieces)
    ]
    if error is not None:
        return [*out, json.dumps({"error": error}), "[DONE]"]
    return [*out, json.dumps(fmt.usage_chunk(11, 5)), "[DONE]"]


def events_of(req: ResponsesRequest, data: list[str]) -> list[dict]:
    reader = ChatStreamReader(req)
    events = [e for d in data for e in reader.take(d)]
    for e in events:  # every event is one the SDK's types accept, as it is
        EVENTS[e["type"]].model_validate(e)
    return events


def sdk_accumulates(events: list[dict]) -> ResponseStreamState:
    """Feed the events to the OpenAI SDK's own stream state (what client.responses.stream
    runs): it raises on a sequence it cannot follow."""
    state = ResponseStreamState(input_tools=[WEATHER], text_format=omit)
    for e in events:
        state.handle_event(EVENTS[e["type"]].model_validate(e))
    return state


def test_a_text_stream_is_the_responses_event_sequence():
    req = parse({"input": "Hi", "stream": True})
    events = events_of(req, chat_sse([("Hel", None, None), ("lo", None, None), ("", "stop", None)]))
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-2]["item"]["content"][0]["text"] == "Hello"
    done = events[-1]["response"]
    assert done["usage"]["output_tokens"] == 5 and done["status"] == "completed"
    assert (
        events[0]["response"]["status"] == "in_progress"
        and events[0]["response"]["model"] == "tiny"
    )
    final = sdk_accumulates(events)._completed_response
    assert final.output_text == "Hello"


def test_a_stream_cut_by_max_output_tokens_ends_incomplete():
    events = events_of(
        parse({"input": "Hi"}), chat_sse([("Hel", None, None), ("lo", "length", None)])
    )
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    sdk_accumulates(events)


def test_streamed_tool_calls_are_function_call_events():
    req = parse({"input": "Weather?", "tools": [WEATHER]})
    pieces = [("", None, [call(0)]), ("", "tool_calls", [call(1, args='{"city":"Rome"}')])]
    events = events_of(req, chat_sse(pieces))
    one_call = [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
    ]
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        *one_call,
        *one_call,
        "response.completed",
    ]
    assert events[5]["item"]["call_id"] == "call_0" and events[4]["arguments"] == '{"city":"Oslo"}'
    assert [e["output_index"] for e in events if e["type"] == "response.output_item.done"] == [0, 1]
    final = sdk_accumulates(events)._completed_response
    assert [o.arguments for o in final.output] == ['{"city":"Oslo"}', '{"city":"Rome"}']


def test_thinking_text_before_a_call_is_a_message_then_the_call():
    req = parse({"input": "Weather?", "tools": [WEATHER]})
    events = events_of(
        req, chat_sse([("<think>hm</think>", None, None), ("", "tool_calls", [call(0)])])
    )
    final = sdk_accumulates(events)._completed_response
    assert [o.type for o in final.output] == ["message", "function_call"]


def test_an_error_after_the_stream_began_is_an_error_event_then_response_failed():
    error = protocol_error = {
        "message": "the request did not complete within the deployment's 60 s timeout",
        "type": "timeout_error",
        "param": None,
        "code": "timeout",
    }
    events = events_of(
        parse({"input": "Hi"}), chat_sse([("Hel", None, None)], error=protocol_error)
    )
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert events[-2]["code"] == "timeout" and events[-2]["message"] == error["message"]
    failed = events[-1]["response"]
    # response.error.code is one of OpenAI's; the error event keeps raydock's own code
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    sdk_accumulates(events)


def test_a_call_cut_by_max_output_tokens_is_incomplete_in_its_event_and_the_response():
    req = parse({"input": "Weather?", "tools": [WEATHER]})
    cut = call(1, args='{"ci')
    events = events_of(req, chat_sse([("", None, [call(0)]), ("", "length", [cut])]))
    done = [e["item"]["status"] for e in events if e["type"] == "response.output_item.done"]
    final = events[-1]["response"]
    assert events[-1]["type"] == "response.incomplete"
    assert done == [item["status"] for item in final["output"]] == ["completed", "incomplete"]
    whole = from_chat_completion(req, chat_reply("", "length", [call(0), cut]))
    assert [item["status"] for item in whole["output"]] == done  # streamed and whole agree
    sdk_accumulates(events)
    # as raydock's chat streams them: the finish_reason in a chunk of its own after the calls
    apart = chat_sse([("", None, [call(0)]), ("", None, [cut]), ("", "length", None)])
    events = events_of(req, apart)
    assert [e["item"]["status"] for e in events if e["type"] == "response.output_item.done"] == (
        done
    )


def sse_events(text: str) -> list[dict]:
    return [
        json.loads(line.removeprefix("data: "))
        for line in text.splitlines()
        if line.startswith("data: ")
    ]


def test_a_translation_failure_mid_stream_ends_with_an_error_then_response_failed(caplog):
    """The events the client reads, and the log line an operator finds by request id."""
    chunk = protocol.Formatter("chat", "tiny").chunk
    broken_call = [{"index": 0, "id": "x"}]  # no function: the translation cannot read it

    async def chat_stream():
        yield f"data: {json.dumps(chunk(0, 'hi', [], None, True, None))}\n\n"
        yield f"data: {json.dumps(chunk(0, '', [], None, False, broken_call))}\n\n"
        yield "data: [DONE]\n\n"

    async def chat(body_of):
        body_of(json.dumps({"input": "x", "stream": True}).encode())
        return StreamingResponse(chat_stream(), media_type="text/event-stream")

    async def read() -> str:
        answer = await respond(chat, "req-7")
        return "".join([m async for m in answer.body_iterator])

    with caplog.at_level(logging.ERROR, "raydock.responses_api"):
        events = sse_events(asyncio.run(read()))
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    error, failed = events[-2], events[-1]["response"]
    assert error["code"] == "internal_error" and "req-7" in error["message"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert failed["output"][0]["content"][0]["text"] == "hi"  # what came before stays
    assert "req-7" in caplog.text and "KeyError" in caplog.text
    for e in events:  # the SDK reads every event, the failure too
        EVENTS[e["type"]].model_validate(e)


def test_retrieving_a_response_on_the_deployment_route_is_a_404_and_refusals_count(
    monkeypatch,
):
    from fastapi.testclient import TestClient

    from raydock.serve_apps import engine_app

    hub = AccessHub()
    hub._loaded = True
    asyncio.run(hub.publish({"a": snapshot("a", {"ka": ""})}))
    monkeypatch.setattr(ray, "get_actor", lambda *a, **k: _HubHandle(hub))
    monkeypatch.setattr(engine_app.ctx, "auth", Auth(("hub", "ns"), ("r", "ns"), "a"), False)
    monkeypatch.setattr(engine_app.ctx, "meter", ReplicaMeter(None), raising=False)
    monkeypatch.setattr(engine_app.ctx, "deployment_id", "a", raising=False)
    monkeypatch.setattr(engine_app.ctx, "max_request_bytes", 1 << 20, raising=False)
    with TestClient(engine_app.engine_http) as client:
        got = client.get("/v1/responses/resp_1", headers={"authorization": "Bearer ka"})
        assert got.status_code == 404 and got.json()["error"]["code"] == "response_not_found"
        assert client.get("/v1/responses/resp_1").status_code == 401
    counted = engine_app.ctx.meter.pending.counters
    assert counted[("raydock_requests_total", ("a", "", "", "401"))] == 1


def test_an_in_band_error_names_the_responses_field():
    error = {
        "message": "invalid max_tokens: x",
        "type": "invalid_request_error",
        "param": "max_tokens",
        "code": "c",
    }
    events = events_of(parse({"input": "Hi"}), chat_sse([("a", None, None)], error=error))
    assert (
        events[-2]["param"] == "max_output_tokens"
        and events[-2]["message"] == "invalid max_output_tokens: x"
    )


# ------------------------------------------------------------------ the OpenAPI document


@pytest.fixture(scope="module")
def documented():
    jsonschema = pytest.importorskip("jsonschema")
    from raydock.platform import openapi_doc

    doc = openapi_doc.combined()
    for path in ("/v1/responses", "/deployments/{deployment_id}/v1/responses"):
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert "ResponsesRequest" in json.dumps(body), path
    schema = {"$ref": "#/components/schemas/ResponsesRequest", "components": doc["components"]}
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize(
    "body",
    [
        {"input": "x"},
        {"input": []},
        {"input": [{"role": "user", "content": "x"}]},
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
        {"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}]},
        {"input": [{"type": "function_call", "call_id": "c", "name": "f"}]},
        {"input": [{"type": "function_call_output", "call_id": "c", "output": "r"}]},
        {"input": [{"type": "item_reference", "id": "x"}]},
        {"input": [{"type": "reasoning", "id": "rs_1", "summary": [], "content": []}]},
        {"input": [{"type": "reasoning", "summary": []}, {"role": "user", "content": "x"}]},
        {"input": "x", "include_reasoning": False},
        {"input": "x", "include_reasoning": "no"},
        {"input": "x", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "f"}},
        {"input": "x", "tools": [{"type": "web_search"}]},
        {"input": "x", "tools": [], "tool_choice": "auto"},
        {"input": "x", "tool_choice": "none"},
        {"input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}},
        {"input": "x", "text": {"format": {"type": "json_schema", "schema": {}}}},
        {"input": "x", "previous_response_id": "resp_1"},
        {"input": "x", "background": False},
        {"input": "x", "background": True},
        {"input": "x", "metadata": {"k" * 65: "v"}},
        {"input": "x", "max_output_tokens": 0},
        {"input": "x", "text": {"format": {}}},
        {"input": "x", "top_logprobs": 0},
        {"input": "x", "top_logprobs": 2},
        {"input": "x", "adapter": "legal"},
        {"input": "x", "adapter": ""},
    ],
)
def test_the_document_accepts_what_parse_accepts(documented, body):
    """schemathesis holds the server to the document: a body it documents as valid must not
    be refused, one it documents as invalid must be."""
    try:
        protocol.parse(protocol.ChatRequest, chat_body(parse(body)))
        parsed = True
    except (ApiError, protocol.BadParam):
        parsed = False
    assert documented.is_valid(body) == parsed, body


def test_retrieving_a_response_is_not_in_the_document(documented):
    from raydock.platform import openapi_doc

    assert "/v1/responses/{response_id}" not in openapi_doc.combined()["paths"]
