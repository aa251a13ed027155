"""OpenAI's Responses API (`POST /v1/responses`) on the chat path: its shapes and the
translation both ways, in one place.

A Responses request becomes the chat request raydock already serves (`chat_body`), so the
engine, guided decoding, tools, metering, limits, timeouts and errors are chat's; the chat
reply (a chat.completion, or its SSE chunks) becomes the Responses object or its event
sequence (`ResponseBuilder`). raydock stores no responses: a request carries its whole
conversation in `input`; what would need a stored one (`previous_response_id`,
`conversation`, `background`) is refused, and `store` is accepted and answered `false`.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

import jsonschema
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from raydock import errors, params
from raydock.errors import ApiError
from raydock.jsontypes import JsonInt, refuse_non_json_integers
from raydock.serve_apps.openai_service import read_json
from raydock.serve_apps.protocol import (
    MAX_TEXT_CHARS,
    STRICT,
    TOOL_CHOICE_NEEDS_TOOLS,
    BadParam,
    ChatRequest,
    TokenId,
    check_shape,
    null_is_default,
    refusal,
)

log = logging.getLogger("raydock.responses_api")

# ------------------------------------------------------------------ request shapes

_TEXT_PART = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {
        "type": {"enum": ["input_text", "output_text"]},
        "text": {"type": "string", "maxLength": MAX_TEXT_CHARS},
    },
}
_TEXT = {
    "anyOf": [
        {"type": "string", "maxLength": MAX_TEXT_CHARS},
        {"type": "array", "items": _TEXT_PART},
    ]
}
_ID = {"type": "string", "minLength": 1, "maxLength": 256}

#: The input items raydock reads, by `type` (a message may leave it out). The engines read
#: text only: an image, file or audio part is refused, as in chat.
INPUT_ITEMS: dict[str, dict[str, Any]] = {
    "message": {
        "type": "object",
        "required": ["role", "content"],
        "properties": {
            "type": {"const": "message"},
            "role": {"enum": ["user", "system", "developer", "assistant"]},
            "content": _TEXT,
        },
    },
    "function_call": {
        "type": "object",
        "required": ["type", "call_id", "name", "arguments"],
        "properties": {
            "type": {"const": "function_call"},
            "call_id": _ID,
            "name": _ID,
            "arguments": {"type": "string", "maxLength": MAX_TEXT_CHARS},
        },
    },
    "function_call_output": {
        "type": "object",
        "required": ["type", "call_id", "output"],
        "properties": {
            "type": {"const": "function_call_output"},
            "call_id": _ID,
            "output": _TEXT,
        },
    },
    # a reply's thinking sent back with its output (`input += response.output`): accepted and
    # left out of the prompt, as thinking models' templates drop past thinking
    "reasoning": {
        "type": "object",
        "required": ["type"],
        "properties": {"type": {"const": "reasoning"}, "summary": {"type": "array"}},
    },
}

#: Responses' function tool (flat, not chat's `{"function": {...}}`); hosted tools (web
#: search, file search, ...) run at OpenAI and are refused
FUNCTION_TOOL = {
    "type": "object",
    "required": ["type", "name"],
    "properties": {
        "type": {"const": "function"},
        "name": {"type": "string", "minLength": 1, "maxLength": 256},
        "description": {"type": ["string", "null"]},
        "parameters": {"type": ["object", "null"]},
        "strict": {"type": ["boolean", "null"]},
    },
}

#: the JSON Schema of each free-form field: `parse` holds a request to them, and the OpenAPI
#: document shows them (ResponsesRequest's schema)
SHAPES: dict[str, dict[str, Any]] = {
    "tool_choice": {
        "anyOf": [
            {"enum": ["none", "auto", "required"]},
            {
                "type": "object",
                "required": ["type", "name"],
                "properties": {"type": {"const": "function"}, "name": {"type": "string"}},
            },
        ]
    },
    "text": {
        "type": "object",
        "properties": {
            "format": {
                "type": "object",
                "required": ["type"],
                "properties": {"type": {"enum": ["text", "json_object", "json_schema"]}},
                # without "required", a format with no type would be held to json_schema's
                "if": {"properties": {"type": {"const": "json_schema"}}, "required": ["type"]},
                "then": {
                    "required": ["schema"],
                    "properties": {
                        "name": {"type": "string"},
                        "schema": {"type": ["object", "boolean"]},
                        "strict": {"type": ["boolean", "null"]},
                        "description": {"type": ["string", "null"]},
                    },
                },
            }
        },
    },
    "metadata": {  # OpenAI's bounds
        "type": "object",
        "maxProperties": 16,
        "propertyNames": {"maxLength": 64},
        "additionalProperties": {"type": "string", "maxLength": 512},
    },
}
#: an input item that is no reasoning item: an input needs one (thinking alone asks nothing)
_NOT_REASONING = {"not": {"required": ["type"], "properties": {"type": {"const": "reasoning"}}}}
_CHECKS = {name: jsonschema.Draft202012Validator(s) for name, s in SHAPES.items()}
_ITEM_CHECKS = {kind: jsonschema.Draft202012Validator(s) for kind, s in INPUT_ITEMS.items()}
_TOOL_CHECK = jsonschema.Draft202012Validator(FUNCTION_TOOL)

#: what raydock cannot honour, refused (400 naming the field) unless null (or these values)
NOT_HONOURED: dict[str, tuple[str, tuple]] = {
    "previous_response_id": (
        "raydock stores no responses: send the whole conversation in input",
        (),
    ),
    "conversation": ("raydock stores no conversations: send the whole conversation in input", ()),
    "background": ("raydock answers while the request is open (no background responses)", (False,)),
    "top_logprobs": (
        "the Responses API of raydock returns no log probabilities (chat completions do: "
        "logprobs and top_logprobs on /v1/chat/completions)",
        (0,),
    ),
}


def _neutral(value: Any, neutral: tuple) -> bool:
    """`value` is one of `neutral` as JSON tells values apart (false is not 0)."""
    return any(value == n and isinstance(value, bool) == isinstance(n, bool) for n in neutral)


def _document(schema: dict[str, Any]) -> None:
    """ResponsesRequest's JSON schema as `parse` holds requests to it (the OpenAPI document)."""
    props = schema["properties"]
    item = {
        "type": "object",
        "properties": {"type": {"enum": list(INPUT_ITEMS)}},
        "allOf": [
            {
                "if": {"properties": {"type": {"const": kind}}, "required": ["type"]},
                "then": shape,
            }
            for kind, shape in INPUT_ITEMS.items()
        ]
        + [{"if": {"not": {"required": ["type"]}}, "then": INPUT_ITEMS["message"]}],
    }
    props["input"] = {
        "anyOf": [
            {"type": "string", "maxLength": MAX_TEXT_CHARS},
            {"type": "array", "minItems": 1, "items": item, "contains": _NOT_REASONING},
        ],
        "description": "The conversation: a user message's text, or a list of items",
    }
    props["tools"]["anyOf"] = [{"type": "array", "items": FUNCTION_TOOL}, {"type": "null"}]
    for name, shape in SHAPES.items():
        props[name]["anyOf"] = [shape, {"type": "null"}]
    for name, (why, neutral) in NOT_HONOURED.items():
        props[name] = {"enum": [None, *neutral], "description": f"Not supported: {why}."}
    schema["allOf"] = [copy.deepcopy(TOOL_CHOICE_NEEDS_TOOLS)]  # chat's rule


class ResponsesRequest(BaseModel):
    """The fields of OpenAI's Responses request that raydock reads; unknown fields are
    ignored, as OpenAI-compatible servers do."""

    model_config = STRICT | ConfigDict(extra="allow", json_schema_extra=_document)

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    max_output_tokens: JsonInt | None = params.MAX_TOKENS.field("Tokens to generate", None)
    temperature: float | None = params.TEMPERATURE.field("Sampling temperature", None)
    top_p: float | None = params.TOP_P.field("Nucleus sampling mass", None)
    stream: bool | None = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None
    # an adapter of the deployment's base model, on /deployments/{id}/v1/responses; chat's
    # field (on /v1: `model: "<deployment>:<adapter>"`)
    adapter: str | None = copy.copy(ChatRequest.model_fields["adapter"])
    store: bool | None = None  # accepted; nothing is stored (answered false)
    # vLLM's: false leaves a thinking model's reasoning item out (chat's field)
    include_reasoning: bool | None = copy.copy(ChatRequest.model_fields["include_reasoning"])
    # vLLM's Responses extras, chat's fields
    seed: JsonInt | None = copy.copy(ChatRequest.model_fields["seed"])
    logit_bias: dict[TokenId, Annotated[float, Field(ge=-100, le=100)]] | None = copy.copy(
        ChatRequest.model_fields["logit_bias"]
    )
    previous_response_id: Any = None
    conversation: Any = None
    background: Any = None
    top_logprobs: Any = None

    @field_validator("*", mode="before")
    @classmethod
    def _json_integers(cls, value: Any, info: ValidationInfo) -> Any:
        return refuse_non_json_integers(cls, null_is_default(cls, value, info), info)


def _bad(status: int, param: str, message: str, code: str = "invalid_parameter") -> ApiError:
    return ApiError(status, message, param, code)


def _check(validator: jsonschema.Draft202012Validator, value: Any, param: str) -> None:
    try:
        check_shape(validator, value, param)
    except BadParam as exc:
        raise _bad(400, exc.param, str(exc)) from None


def parse(body: Any) -> ResponsesRequest:
    """Validate a Responses request; a 400 naming the offending field."""
    if not isinstance(body, dict):
        raise _bad(400, "body", "the request body must be a JSON object")
    try:
        req = ResponsesRequest.model_validate(body)
    except ValidationError as exc:
        bad = refusal(ResponsesRequest, exc)
        raise _bad(400, bad.param, str(bad)) from None
    for name, (why, neutral) in NOT_HONOURED.items():
        value = getattr(req, name)
        if value is not None and not _neutral(value, neutral):
            raise _bad(400, name, f"{name} is not supported: {why}", "unsupported_parameter")
    for name, validator in _CHECKS.items():
        if (value := getattr(req, name)) is not None:
            _check(validator, value, name)
    if isinstance(req.input, list):
        _check_items(req.input)
    for i, tool in enumerate(req.tools or []):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if isinstance(kind, str) and kind != "function":
            raise _bad(
                400,
                f"tools.{i}.type",
                f"tools.{i}.type {kind!r} is not supported: raydock serves function tools only "
                "(hosted tools run at OpenAI)",
                "unsupported_parameter",
            )
        _check(_TOOL_CHECK, tool, f"tools.{i}")
    # a tool_choice without tools: chat's rule refuses it, naming tool_choice
    return req


def _check_items(items: list[dict[str, Any]]) -> None:
    if not items:
        raise _bad(400, "input", "invalid input: the list must hold at least one item")
    for i, item in enumerate(items):
        kind = item.get("type", "message")
        if not isinstance(kind, str):
            raise _bad(400, f"input.{i}.type", f"invalid input.{i}.type: must be a string")
        if kind not in INPUT_ITEMS:
            why = (
                "raydock stores no items: send them in full"
                if kind == "item_reference"
                else "raydock reads message, function_call, function_call_output and "
                "reasoning items"
            )
            raise _bad(
                400,
                f"input.{i}.type",
                f"input.{i}.type {kind!r} is not supported: {why}",
                "unsupported_parameter",
            )
        content = item.get("content") if kind == "message" else item.get("output")
        for k, part in enumerate(content if isinstance(content, list) else []):
            part_type = part.get("type") if isinstance(part, dict) else None
            if part_type not in (None, "input_text", "output_text"):
                field = "content" if kind == "message" else "output"
                where = f"input.{i}.{field}.{k}.type"
                raise _bad(
                    400,
                    where,
                    f"{where} {part_type!r} is not supported: the engines read text only",
                    "unsupported_parameter",
                )
        _check(_ITEM_CHECKS[kind], item, f"input.{i}")
    if all(item.get("type") == "reasoning" for item in items):
        raise _bad(400, "input", "invalid input: it holds only reasoning items, nothing to answer")


# ------------------------------------------------------------------ request translation


def _text(content: str | list[dict[str, Any]]) -> str:
    return content if isinstance(content, str) else "".join(p["text"] for p in content)


def chat_messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's conversation as chat messages (`conversation_messages`)."""
    return conversation_messages(req.instructions, req.input)


def conversation_messages(
    instructions: str | None, items: str | list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """`instructions` (a system message first) and `input` as chat messages: function_call
    items join the assistant message before them (or make one), function_call_output items
    become tool messages. The values are a parsed request's: others may raise (the prefix
    router, which reads raw bodies, catches that)."""
    messages: list[dict[str, Any]] = []
    if instructions is not None:
        messages.append({"role": "system", "content": instructions})
    if isinstance(items, str):
        return [*messages, {"role": "user", "content": items}]
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            messages.append({"role": item["role"], "content": _text(item["content"])})
        elif kind == "function_call":
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            last = messages[-1] if messages else None
            if last is None or last["role"] != "assistant":
                last = {"role": "assistant", "content": None}
                messages.append(last)
            last.setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            messages.append(
                {"role": "tool", "tool_call_id": item["call_id"], "content": _text(item["output"])}
            )
    return messages


def _chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    fields = ("name", "description", "parameters", "strict")
    function = {f: tool[f] for f in fields if tool.get(f) is not None}
    return {"type": "function", "function": function}


def _response_format(fmt: dict[str, Any]) -> dict[str, Any]:
    if fmt["type"] != "json_schema":
        return {"type": fmt["type"]}
    spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
    return {"type": "json_schema", "json_schema": {"name": "response", **spec}}


def chat_body(req: ResponsesRequest) -> dict[str, Any]:
    """The chat completion request that answers `req`."""
    body: dict[str, Any] = {"messages": chat_messages(req)}
    same = ("model", "adapter", "temperature", "top_p", "user", "parallel_tool_calls")
    body |= {f: getattr(req, f) for f in same if getattr(req, f) is not None}
    if req.max_output_tokens is not None:
        body["max_tokens"] = req.max_output_tokens
    if not req.include_reasoning:
        body["include_reasoning"] = False
    if req.seed is not None:
        body["seed"] = req.seed
    if req.logit_bias is not None:  # token ids as chat reads them: JSON object keys
        body["logit_bias"] = {str(token): bias for token, bias in req.logit_bias.items()}
    if req.tools:
        body["tools"] = [_chat_tool(t) for t in req.tools]
    if isinstance(req.tool_choice, dict):
        body["tool_choice"] = {"type": "function", "function": {"name": req.tool_choice["name"]}}
    elif req.tool_choice is not None:
        body["tool_choice"] = req.tool_choice
    if fmt := (req.text or {}).get("format"):
        body["response_format"] = _response_format(fmt)
    if req.stream:  # the usage chunk: response.completed carries usage
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


#: chat's parameter names as a Responses request calls them (errors name the field sent)
_RENAMES = (
    (re.compile(r"^max_tokens\b"), "max_output_tokens"),
    (re.compile(r"^response_format(\.json_schema)?\b"), "text.format"),
    (re.compile(r"^tools\.(\d+)\.function\b"), r"tools.\1"),
    (re.compile(r"^tool_choice\.function\b"), "tool_choice"),
    (re.compile(r"^messages\b.*"), "input"),  # its indexes differ (instructions, merged calls)
)


def responses_param(param: str | None) -> str | None:
    """The Responses field a chat error's `param` means."""
    for pattern, name in _RENAMES:
        if param and pattern.match(param):
            return pattern.sub(name, param, count=1)
    return param


def renamed(err: ApiError) -> ApiError:
    """`err` naming the Responses field instead of chat's."""
    param = responses_param(err.param)
    if param == err.param:
        return err
    message = err.message.replace(err.param, param) if err.param else err.message
    return ApiError(err.status, message, param, err.code, err.headers)


# ------------------------------------------------------------------ the Responses object


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


#: a chat error's `type` as the `code` of a failed response (OpenAI's list of them)
_FAILED_CODES = {
    "rate_limit_error": "rate_limit_exceeded",
    "invalid_request_error": "invalid_prompt",
}


class ResponseBuilder:
    """One Responses object, built from the chat reply's pieces in order (text, tool calls,
    the end), with the stream events that announce each piece (each numbered by
    `sequence_number`). A non-streaming answer drops the events and keeps the object."""

    def __init__(self, req: ResponsesRequest) -> None:
        self.req = req
        self.id = _id("resp")
        self.created_at = int(time.time())
        self.model = req.model or ""
        self.output: list[dict[str, Any]] = []
        self.message: dict[str, Any] | None = None  # the message item text goes into now
        self.thinking: dict[str, Any] | None = None  # the reasoning item reasoning goes into
        self.status = "in_progress"
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.sequence = 0

    # -- events

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def start(self, model: str | None = None) -> list[dict[str, Any]]:
        self.model = model or self.model
        return [
            self._event("response.created", response=self.response()),
            self._event("response.in_progress", response=self.response()),
        ]

    def reasoning(self, delta: str) -> list[dict[str, Any]]:
        """A piece of the thinking: a `reasoning` item's `reasoning_text` (vLLM's shape)."""
        events = [] if self.thinking is not None else self._open_reasoning()
        part = self.thinking["content"][0]
        part["text"] += delta
        where = self._where(self.thinking) | {"content_index": 0}
        return events + [self._event("response.reasoning_text.delta", **where, delta=delta)]

    def text(self, delta: str) -> list[dict[str, Any]]:
        events = self._close_reasoning()
        events += [] if self.message is not None else self._open_message()
        part = self.message["content"][0]
        part["text"] += delta
        where = self._where(self.message) | {"content_index": 0}
        return events + [
            self._event("response.output_text.delta", **where, delta=delta, logprobs=[])
        ]

    def tool_call(self, call: dict[str, Any], status: str = "completed") -> list[dict[str, Any]]:
        """A whole chat tool call (raydock sends each call whole), its item ending `status`."""
        events = self._close_reasoning() + self._close_message()
        function = call["function"]
        item = {
            "id": _id("fc"),
            "type": "function_call",
            "status": "in_progress",
            "call_id": call["id"],
            "name": function["name"],
            "arguments": "",
        }
        self.output.append(item)
        where = self._where(item)
        events.append(
            self._event(
                "response.output_item.added", output_index=where["output_index"], item=dict(item)
            )
        )
        item["arguments"] = function["arguments"]
        events.append(
            self._event(
                "response.function_call_arguments.delta", **where, delta=function["arguments"]
            )
        )
        events.append(
            self._event(
                "response.function_call_arguments.done",
                **where,
                name=item["name"],
                arguments=item["arguments"],
            )
        )
        item["status"] = status
        events.append(
            self._event(
                "response.output_item.done", output_index=where["output_index"], item=dict(item)
            )
        )
        return events

    def finish(
        self, finish_reason: str | None, usage: dict[str, Any] | None
    ) -> list[dict[str, Any]]:
        """The end of the reply: `response.completed`, or `response.incomplete` when
        max_output_tokens cut it."""
        cut = finish_reason == "length"
        ending = "incomplete" if cut else "completed"
        # an empty reply is still a message, as OpenAI's (thinking alone has none, as vLLM's)
        events = self._close_reasoning(ending)
        events += [] if self.output else self._open_message()
        events += self._close_message(ending)
        if usage is not None:
            self.usage = _usage(usage)
        self.status = "incomplete" if cut else "completed"
        return events + [self._event(f"response.{self.status}", response=self.response())]

    def fail(self, error: dict[str, Any]) -> list[dict[str, Any]]:
        """An error after the stream began: an `error` event, then `response.failed`."""
        param = responses_param(error.get("param"))
        message = error.get("message", "internal error")
        if error.get("param") and param != error.get("param"):
            message = message.replace(error["param"], param)
        code = error.get("code") or error.get("type") or "server_error"
        self.status = "failed"
        # response.error.code is one of OpenAI's codes; the error event names raydock's own
        failed_code = _FAILED_CODES.get(error.get("type"), "server_error")
        self.error = {"code": failed_code, "message": message}
        return [
            self._event("error", code=code, message=message, param=param),
            self._event("response.failed", response=self.response()),
        ]

    def _where(self, item: dict[str, Any]) -> dict[str, Any]:
        return {"item_id": item["id"], "output_index": self.output.index(item)}

    def _open_message(self) -> list[dict[str, Any]]:
        self.message = {
            "id": _id("msg"),
            "type": "message",
            "role": "assistant",
            "status": "in_progress",
            "content": [],
        }
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return self._open(self.message, part)

    def _open_reasoning(self) -> list[dict[str, Any]]:
        self.thinking = {
            "id": _id("rs"),
            "type": "reasoning",
            "summary": [],
            "content": [],
            "status": "in_progress",
        }
        return self._open(self.thinking, {"type": "reasoning_text", "text": ""})

    def _open(self, item: dict[str, Any], part: dict[str, Any]) -> list[dict[str, Any]]:
        """`item` added to the output, then its one content `part`: their events."""
        self.output.append(item)
        where = self._where(item)
        added = self._event(
            "response.output_item.added",
            output_index=where["output_index"],
            item=copy.deepcopy(item),
        )
        item["content"].append(part)
        return [
            added,
            self._event("response.content_part.added", **where, content_index=0, part=dict(part)),
        ]

    def _close_reasoning(self, status: str = "completed") -> list[dict[str, Any]]:
        thinking, self.thinking = self.thinking, None
        return self._close(thinking, status, "response.reasoning_text.done")

    def _close_message(self, status: str = "completed") -> list[dict[str, Any]]:
        message, self.message = self.message, None
        return self._close(message, status, "response.output_text.done", logprobs=[])

    def _close(
        self, item: dict[str, Any] | None, status: str, done: str, **extra: Any
    ) -> list[dict[str, Any]]:
        """The end of an open `item` (none: nothing), `status`: its text's `done` event (with
        `extra`), its part's, its own."""
        if item is None:
            return []
        item["status"] = status
        part = item["content"][0]
        where = self._where(item) | {"content_index": 0}
        return [
            self._event(done, **where, text=part["text"], **extra),
            self._event("response.content_part.done", **where, part=dict(part)),
            self._event(
                "response.output_item.done",
                output_index=where["output_index"],
                item=copy.deepcopy(item),
            ),
        ]

    # -- the object

    def response(self) -> dict[str, Any]:
        """The Responses object as it stands, echoing the request's settings as OpenAI does
        (what the request left out is null: the deployment's defaults applied)."""
        req = self.req
        fmt = (req.text or {}).get("format") or {"type": "text"}
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": self.status,
            "background": False,
            "error": self.error,
            "incomplete_details": (
                {"reason": "max_output_tokens"} if self.status == "incomplete" else None
            ),
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "metadata": req.metadata or {},
            "model": self.model,
            "output": copy.deepcopy(self.output),
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": None,
            "store": False,  # nothing is stored, whatever the request asked
            "temperature": req.temperature,
            "text": {"format": fmt},
            "tool_choice": req.tool_choice if req.tool_choice is not None else "auto",
            "tools": [_tool_echo(t) for t in req.tools or []],
            "top_p": req.top_p,
            "truncation": "disabled",
            "usage": self.usage,
            "user": req.user,
        }


def _tool_echo(tool: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "function",
        "name": tool["name"],
        "description": tool.get("description"),
        "parameters": tool.get("parameters"),
        "strict": tool.get("strict"),
    }


def _usage(chat: dict[str, Any]) -> dict[str, Any]:
    return {
        "input_tokens": chat["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": chat["completion_tokens"],
        "output_tokens_details": {
            "reasoning_tokens": (chat.get("completion_tokens_details") or {}).get(
                "reasoning_tokens", 0
            )
        },
        "total_tokens": chat["total_tokens"],
    }


# ------------------------------------------------------------------ answers


def from_chat_completion(req: ResponsesRequest, reply: dict[str, Any]) -> dict[str, Any]:
    """The Responses object of a chat.completion."""
    builder = ResponseBuilder(req)
    builder.start(reply.get("model"))
    choice = reply["choices"][0]
    message = choice["message"]
    if message.get("reasoning"):
        builder.reasoning(message["reasoning"])
    if message.get("content"):
        builder.text(message["content"])
    calls = message.get("tool_calls") or []
    for call, status in zip(calls, _call_statuses(calls, choice["finish_reason"]), strict=True):
        builder.tool_call(call, status)
    builder.finish(choice["finish_reason"], reply.get("usage"))
    return builder.response()


def _call_statuses(calls: list[dict[str, Any]], finish_reason: str | None) -> list[str]:
    """Each call's item status: the last call of a reply max_output_tokens cut is
    incomplete (the chat.completion's, or the finishing chunk's, finish_reason says)."""
    statuses = ["completed"] * len(calls)
    if calls and finish_reason == "length":
        statuses[-1] = "incomplete"
    return statuses


class ChatStreamReader:
    """Responses events from a chat stream's SSE chunks (openai_service's `_sse`), in order."""

    def __init__(self, req: ResponsesRequest) -> None:
        self.builder = ResponseBuilder(req)
        self.started = False
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.call: dict[str, Any] | None = None  # the last tool call, until the next chunk
        self.ended = False

    def take(self, data: str) -> list[dict[str, Any]]:
        """The events for one SSE `data` value."""
        if self.ended:
            return []
        if data == "[DONE]":
            events = self._started() + self._end_call(self.finish_reason)
            self.ended = True
            return events + self.builder.finish(self.finish_reason, self.usage)
        chunk = json.loads(data)
        if "error" in chunk:
            return self.fail(chunk["error"])
        events = self._started(chunk.get("model"))
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices", []):
            delta = choice.get("delta") or {}
            finish_reason = choice.get("finish_reason")
            if delta.get("reasoning"):
                events += self.builder.reasoning(delta["reasoning"])
            if delta.get("content"):
                events += self.builder.text(delta["content"])
            for call in delta.get("tool_calls") or []:
                events += self._end_call(None)  # a call after it: the one before is whole
                self.call = call
            if finish_reason:
                events += self._end_call(finish_reason)
            self.finish_reason = finish_reason or self.finish_reason
        return events

    def _end_call(self, finish_reason: str | None) -> list[dict[str, Any]]:
        """The item of the call held until the chunk after it (the one that finishes the
        choice says whether max_output_tokens cut it)."""
        if self.call is None:
            return []
        [status] = _call_statuses([self.call], finish_reason)
        call, self.call = self.call, None
        return self.builder.tool_call(call, status)

    def fail(self, error: dict[str, Any]) -> list[dict[str, Any]]:
        """The events that end the stream with `error` (a chat error body's `error`); none
        once it has ended."""
        if self.ended:
            return []
        self.ended = True
        return self._started() + self.builder.fail(error)

    def _started(self, model: str | None = None) -> list[dict[str, Any]]:
        if self.started:
            return []
        self.started = True
        return self.builder.start(model)


def sse_event(event: dict[str, Any]) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"


async def _events(
    req: ResponsesRequest, chat_sse: AsyncIterator[str | bytes], request_id: str | None
) -> AsyncIterator[str]:
    reader = ChatStreamReader(req)
    events: list[dict[str, Any]] = []
    try:
        async for message in chat_sse:
            text = message.decode() if isinstance(message, bytes) else message
            for block in text.split("\n\n"):
                if block.startswith("data: "):
                    events += reader.take(block.removeprefix("data: "))
            if events:
                yield "".join(sse_event(e) for e in events)
                events = []
    except Exception as exc:  # headers are sent: end in-band, as chat's _sse does
        # what the message translated before the failure goes first
        events += reader.fail(_stream_error(exc, request_id))
        if events:
            yield "".join(sse_event(e) for e in events)
    finally:  # a client that went away closes the chat stream, which stops the engine
        await chat_sse.aclose()


def _stream_error(exc: Exception, request_id: str | None) -> dict[str, Any]:
    """The error body's `error` for an exception in a stream: its own message when it is meant
    for the user, else a 500 naming the request id (the traceback goes to the log)."""
    err = errors.as_api_error(exc)
    if err is None:
        log.error("responses stream %s failed", request_id, exc_info=exc)
        err = ApiError(500, f"internal error (request id {request_id})", None, "internal_error")
    return errors.error_body(err.status, err.message, err.param, err.code, request_id)["error"]


# (a function that reads the raw body into the chat body) -> the chat answer
ChatServer = Callable[[Callable[[bytes], Any]], Awaitable[Response]]


async def respond(serve_chat: ChatServer, request_id: str | None) -> Response:
    """Answer a Responses request through `serve_chat` (the chat path, handed the body
    translation so that it meters and limits the request as chat) and translate its answer
    (`request_id`: the one a stream's internal error names)."""
    parsed: list[ResponsesRequest] = []

    def body_of(raw: bytes) -> dict[str, Any]:
        parsed.append(parse(read_json(raw)))
        return chat_body(parsed[0])

    try:
        answer = await serve_chat(body_of)
    except ApiError as exc:
        raise renamed(exc) from None
    req = parsed[0]
    if isinstance(answer, StreamingResponse):
        events = _events(req, answer.body_iterator, request_id)
        return StreamingResponse(events, media_type="text/event-stream")
    return JSONResponse(from_chat_completion(req, json.loads(answer.body)))


def not_stored(response_id: str) -> ApiError:
    """GET /v1/responses/{id}: raydock keeps no responses to retrieve."""
    return ApiError(
        404,
        f"response {response_id!r} is not stored: raydock stores no responses (store is "
        "accepted and ignored); keep the response the request returned",
        "response_id",
        "response_not_found",
    )
