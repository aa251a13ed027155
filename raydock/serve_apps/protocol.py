"""OpenAI protocol: request models with their allowed ranges, and response shapes.

Every OpenAI shape raydock emits is built here, so chat/completions, streaming and
non-streaming stay consistent.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

import jsonschema
from annotated_types import Ge, Le
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from raydock import params
from raydock.jsontypes import NOT_BLANK, JsonInt, refuse_non_json_integers
from raydock.serve_apps.structured import MAX_PATTERN_CHARS

MAX_TOKENS_LIMIT = params.MAX_TOKENS.hi
MAX_TEXT_CHARS = 4 * 2**20  # one message's text or tool arguments; the body limit binds first


#: A token id as a JSON object key has it: digits only (int() would also read " 5", "+5",
#: "5_0"), read as a number
TokenId = Annotated[str, Field(pattern=r"^[0-9]+$"), AfterValidator(int)]

#: Values must have the type the document gives them, as JSON decodes them: pydantic's lax
#: mode would read "yes" or 1 as a boolean and "5" as a number, which the document refuses
#: (integers are JsonInt: 5.0 is one)
STRICT = ConfigDict(strict=True)


#: fields typed `X | None` only because OpenAI's clients send a parameter set to None as null:
#: null means the field's default (a request never holds None there)
NULL_IS_DEFAULT = {"n", "stream", "ignore_eos", "logprobs", "echo", "include_reasoning"}


def null_is_default(model: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    """A field's value before validation, its default for a null in a NULL_IS_DEFAULT field."""
    if value is None and info.field_name in NULL_IS_DEFAULT:
        return model.model_fields[info.field_name].default
    return value


class _Request(BaseModel):
    # Unknown OpenAI fields are accepted and ignored, as OpenAI-compatible servers do.
    model_config = STRICT | ConfigDict(extra="allow")

    model: str | None = None
    # an adapter of the deployment's base model (its name or id); on /v1 also
    # `model: "<deployment>:<adapter>"`
    adapter: str | None = Field(None, min_length=1, max_length=200)
    max_tokens: JsonInt | None = params.MAX_TOKENS.field("Tokens to generate", default=None)
    temperature: float | None = params.TEMPERATURE.field("Sampling temperature", default=None)
    top_p: float | None = params.TOP_P.field("Nucleus sampling mass", default=None)
    top_k: JsonInt | None = params.REQUEST_TOP_K.field("Top-k filtering (0 or -1: off)")
    n: JsonInt | None = params.N.field("Choices to generate")
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    # vLLM's range, and its -1: no seed
    seed: JsonInt | None = Field(None, ge=-(2**63), le=2**63 - 1)
    user: str | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, ge=0.01, le=2)  # vLLM-compatible extra
    # token id (a JSON key: a string of digits, read as a number) -> bias added to its logit
    logit_bias: dict[TokenId, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, max_length=300
    )
    ignore_eos: bool | None = False  # vLLM-compatible extra body field
    response_format: dict[str, Any] | None = None
    # vLLM's structured outputs (extra body: {"json": schema} or {"choice": [...]}) and its
    # older names for them, which vLLM itself now ignores without a word
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_choice: list[str] | None = None
    guided_regex: str | None = None
    guided_grammar: str | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _json_integers(cls, value: Any, info: ValidationInfo) -> Any:
        return refuse_non_json_integers(cls, null_is_default(cls, value, info), info)

    @field_validator("top_k", "seed")
    @classmethod
    def _minus_one_is_off(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v == -1:  # vLLM's "off" for both
            return 0 if info.field_name == "top_k" else None
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > params.MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {params.MAX_STOP_SEQUENCES} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return v

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class FunctionCall(BaseModel):
    model_config = STRICT
    name: str = Field(..., min_length=1, max_length=256)
    arguments: str = Field(..., max_length=MAX_TEXT_CHARS)  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = STRICT | ConfigDict(extra="allow")
    id: str = Field(..., min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class TextPart(BaseModel):
    """An OpenAI content part. The engines read text only: an image, audio or file part is
    refused (naming its `type`), never silently dropped."""

    model_config = STRICT | ConfigDict(extra="allow")
    type: Literal["text"]
    text: str = Field(..., max_length=MAX_TEXT_CHARS)


class ChatMessage(BaseModel):
    model_config = STRICT | ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=256)
    tool_calls: list[ToolCall] | None = Field(None, max_length=64)  # an assistant's calls
    tool_call_id: str | None = Field(None, max_length=256)  # the call a tool message answers

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it: role, text content and the tool fields."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [
                c.model_dump(include={"id", "type", "function"}) for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


#: What a message of each role must carry, as OpenAI requires: content, and for a tool result
#: the call it answers. An assistant's message may carry tool_calls instead of content.
MESSAGE_NEEDS: dict[str, tuple[str, ...]] = {
    "system": ("content",),
    "developer": ("content",),
    "user": ("content",),
    "tool": ("content", "tool_call_id"),
    "assistant": (),
}


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: JsonInt | None = params.MAX_TOKENS.field(
        "Tokens to generate", default=None
    )
    logprobs: bool | None = False
    top_logprobs: JsonInt | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    # false: at most one call per choice (a bare call is always one; a template's own
    # wrapper, tool_choice "auto", may hold several)
    parallel_tool_calls: bool | None = None
    # vLLM's: false leaves a thinking model's reasoning out of the reply (it is still
    # generated and counted); the content is the answer alone either way
    include_reasoning: bool | None = Field(
        True, description="Whether a thinking model's reasoning comes back (vLLM's field)"
    )


class CompletionRequest(_Request):
    prompt: str | list[str]
    logprobs: JsonInt | None = Field(None, ge=0, le=5)
    echo: bool | None = False


class BadParam(Exception):
    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


# ------------------------------------------------------------------ shapes of free-form fields

# vLLM's structured_outputs: null and false mean "not asked"
_NOT_ASKED = {"enum": [None, False]}
_CHOICES = {"type": "array", "minItems": 1, "items": {"type": "string"}}
_PATTERN = {"type": "string", "pattern": NOT_BLANK, "maxLength": MAX_PATTERN_CHARS}
_FUNCTION = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}

#: The JSON Schema of each field typed as free JSON above: `parse` holds a request to them and
#: the OpenAPI document shows them (openapi_doc). What a shape cannot state (whether a JSON
#: schema, regex or grammar can be enforced, two output formats at once, a tool_choice naming
#: no declared tool) structured.py and the replica refuse with code `unsupported_schema`.
SHAPES: dict[str, dict[str, Any]] = {
    "response_format": {
        "type": "object",
        "properties": {"type": {"enum": ["text", "json_object", "json_schema"]}},
        "if": {"properties": {"type": {"const": "json_schema"}}, "required": ["type"]},
        "then": {
            "required": ["json_schema"],
            "properties": {
                "json_schema": {
                    "type": "object",
                    "required": ["schema"],
                    "properties": {"schema": {"type": ["object", "boolean"]}},
                }
            },
        },
    },
    "structured_outputs": {
        "type": "object",
        "properties": {
            "json": {"type": ["object", "boolean", "string", "null"]},
            "choice": {"anyOf": [_CHOICES, _NOT_ASKED]},
            "regex": {"anyOf": [_PATTERN, _NOT_ASKED]},
            "grammar": {"anyOf": [_PATTERN, _NOT_ASKED]},
            "json_object": {"enum": [True, False, None]},
        },
        "additionalProperties": _NOT_ASKED,  # options raydock does not support
    },
    "guided_choice": _CHOICES,
    "guided_regex": _PATTERN,
    "guided_grammar": _PATTERN,
    "tools": {
        "type": "array",
        "items": {
            "type": "object",
            "required": ["type", "function"],
            "properties": {
                "type": {"const": "function"},
                "function": _FUNCTION
                | {"properties": {"name": {"type": "string", "minLength": 1}}},
            },
        },
    },
    "tool_choice": {
        "anyOf": [
            {"enum": ["none", "auto", "required"]},
            {"type": "object", "required": ["function"], "properties": {"function": _FUNCTION}},
        ]
    },
}
_REASONS = {
    "pattern": "must not be blank",
    "minItems": "must not be empty",
    "maxLength": "must be at most {} characters long",
}
_SHAPE_CHECKS = {name: jsonschema.Draft202012Validator(s) for name, s in SHAPES.items()}


#: `_check_shapes`' "tool_choice needs tools" as JSON Schema, for the documents of the requests
#: that hold it (chat's, and the Responses API's, which is served as chat)
TOOL_CHOICE_NEEDS_TOOLS: dict[str, Any] = {
    "if": {
        "required": ["tool_choice"],
        "properties": {"tool_choice": {"not": {"enum": [None, "none"]}}},
    },
    "then": {
        "required": ["tools"],
        "properties": {"tools": {"type": "array", "minItems": 1}},
    },
}


def check_shape(validator: jsonschema.protocols.Validator, value: Any, param: str) -> None:
    """A BadParam naming the field of `value` (the request's `param`) its JSON Schema refuses
    most plainly (a missing field: that field), if it refuses any."""
    err = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if err is None:
        return
    path = [param, *map(str, err.absolute_path)]
    if err.validator == "required":  # name the missing field itself
        path.append(next(f for f in err.validator_value if f not in err.instance))
    where = ".".join(path)
    template = _REASONS.get(err.validator)
    reason = template.format(err.validator_value) if template else err.message
    if len(reason) > 200:  # the message quotes the value
        reason = f"fails {err.validator} {json.dumps(err.validator_value, default=str)[:100]}"
    raise BadParam(where, f"invalid {where}: {reason}")


def _check_shapes(req: _Request) -> None:
    for name, validator in _SHAPE_CHECKS.items():
        value = getattr(req, name, None)
        if value is not None:
            check_shape(validator, value, name)
    if isinstance(req, ChatRequest) and not req.tools and req.tool_choice not in (None, "none"):
        raise BadParam("tool_choice", "tool_choice needs tools")
    if isinstance(req, ChatRequest) and req.top_logprobs is not None and not req.logprobs:
        raise BadParam("top_logprobs", "top_logprobs needs logprobs: true")  # as OpenAI
    if req.stream_options is not None and not req.stream:
        raise BadParam("stream_options", "stream_options needs stream: true")  # as OpenAI
    for name, why in NOT_HONOURED.items():
        value = (req.model_extra or {}).get(name)
        # as JSON compares: false is no 0
        neutral = not isinstance(value, bool) and (
            value in NEUTRAL.get(name, ()) or (name == "best_of" and value == req.n)
        )
        if value is not None and not neutral:
            raise BadParam(name, f"{name} is not supported: {why}")


#: OpenAI's and vLLM's parameters that raydock knows but does not honour: refused (a 400
#: naming them), never ignored, since a client relies on what they ask (unknown fields are
#: ignored, as OpenAI servers do)
NOT_HONOURED: dict[str, str] = {
    "functions": "use tools (functions is OpenAI's deprecated form of it)",
    "function_call": "use tool_choice (function_call is OpenAI's deprecated form of it)",
    "suffix": "raydock does not fill in the middle",
    "best_of": "each choice is returned (set n instead)",
    "min_tokens": "ask with max_tokens and ignore_eos instead",
    "min_p": "use top_p or top_k",
    "stop_token_ids": "use stop",
    "prompt_logprobs": "the engines do not score the prompt",
}
#: values of them that ask for nothing (clients that send vLLM's defaults explicitly)
NEUTRAL: dict[str, tuple] = {
    "functions": ([],),
    "min_tokens": (0,),
    "min_p": (0, 0.0),
    "stop_token_ids": ([],),
}


def _check_messages(messages: list[ChatMessage]) -> None:
    for i, m in enumerate(messages):
        for field in MESSAGE_NEEDS[m.role]:
            if getattr(m, field) is None:
                param = f"messages.{i}.{field}"
                raise BadParam(param, f"invalid {param}: a {m.role} message needs {field}")
        called = m.tool_calls is not None or (m.model_extra or {}).get("function_call") is not None
        if m.role == "assistant" and m.content is None and not called:  # function_call: the
            param = f"messages.{i}.content"  # deprecated form of tool_calls
            raise BadParam(
                param, f"invalid {param}: an assistant message needs content or tool_calls"
            )


def _bounds(model: type[BaseModel], name: str) -> str:
    info = model.model_fields.get(name)
    lo = next((m.ge for m in getattr(info, "metadata", []) if isinstance(m, Ge)), None)
    hi = next((m.le for m in getattr(info, "metadata", []) if isinstance(m, Le)), None)
    return f" (allowed range {lo}–{hi})" if lo is not None and hi is not None else ""


#: what pydantic puts in an error's location besides field names and indexes: the member of
#: a union that was tried (`str`, `list[...]`, `function-after[...]`) or a dict's key marker
_TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


def _param(loc: tuple) -> str:
    """The request parameter an error's location names: `messages.0.content`, not
    `messages.0.content.str`."""
    path = [
        str(p)
        for p in loc
        if not (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p or "-" in p))
    ]
    return ".".join(path) or "body"


def refusal(model: type[BaseModel], exc: ValidationError) -> BadParam:
    """The BadParam of a request body `model` refused: the parameter it names, in the
    validator's own words, with the field's allowed range."""
    # of a union's failed members, the one that got furthest says what is wrong
    # (an image part in a content list, not "content should be a string")
    err = max(exc.errors(), key=lambda e: len(e["loc"]))
    param = _param(err["loc"])
    top = str(err["loc"][0]) if err["loc"] else ""
    # a validator's own words, without pydantic's "Value error, " before them
    msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    return BadParam(param, f"invalid {param}: {msg}{_bounds(model, top)}")


def parse(model: type[_Request], body: Any) -> _Request:
    """Validate a request body; raise BadParam naming the offending parameter."""
    if not isinstance(body, dict):
        raise BadParam("body", "the request body must be a JSON object")
    try:
        req = model.model_validate(body)
    except ValidationError as exc:
        raise refusal(model, exc) from None
    _check_shapes(req)
    if isinstance(req, ChatRequest):
        _check_messages(req.messages)
    return req


# ------------------------------------------------------------------ responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def chat_usage(prompt: int, completion: int, reasoning: int) -> dict[str, Any]:
    """Chat's usage: also how many completion tokens were thinking (OpenAI's shape, which
    vLLM's server with a reasoning parser answers too)."""
    return usage(prompt, completion) | {
        "completion_tokens_details": {"reasoning_tokens": reasoning}
    }


#: The logprob reported for a token the output format excludes (-inf: JSON has no infinity,
#: and a top_logprobs list can name such a token); vLLM's OpenAI server reports the same.
MIN_LOGPROB = -9999.0


def _logprob(value: float) -> float:
    return max(value, MIN_LOGPROB)


def chat_logprobs(items: list) -> dict[str, Any] | None:
    if not items:
        return None
    return {
        "content": [
            {
                "token": tok,
                "logprob": _logprob(lp),
                "bytes": list(tok.encode()),
                "top_logprobs": [
                    {"token": t, "logprob": _logprob(v), "bytes": list(t.encode())} for t, v in alts
                ],
            }
            for tok, lp, alts in items
        ]
    }


def _with_sampled(token: str, logprob: float, alts: list) -> dict[str, float]:
    top = {t: _logprob(v) for t, v in alts}
    top.setdefault(token, _logprob(logprob))
    return top


def completion_logprobs(items: list, offset: int = 0) -> dict[str, Any] | None:
    """`text_offset`: where each token starts in the choice's text, the first at `offset`
    (the text earlier chunks of a stream carried)."""
    if not items:
        return None
    starts = []
    for tok, _, _ in items:
        starts.append(offset)
        offset += len(tok)
    return {
        "tokens": [t for t, _, _ in items],
        "token_logprobs": [_logprob(lp) for _, lp, _ in items],
        # as OpenAI: the sampled token is always among them (up to logprobs + 1 entries)
        "top_logprobs": [_with_sampled(tok, lp, alts) for tok, lp, alts in items],
        "text_offset": starts,
    }


class Formatter:
    """Builds chat or completion objects / chunks for one request."""

    def __init__(self, kind: Literal["chat", "completion"], model: str, echo: str = ""):
        """`echo`: the prompt, which a completion's text begins with (`echo: true`)."""
        self.kind, self.model, self.echo = kind, model, echo
        self.id = new_id("chatcmpl" if kind == "chat" else "cmpl")
        self.created = int(time.time())
        # characters of token text each choice's streamed logprobs covered (the text itself
        # may lag behind: a possible stop string or a split character is held back)
        self._scored: dict[int, int] = {}

    def _envelope(self, obj: str, choices: list[dict], extra: dict | None = None) -> dict:
        out = {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        return out | (extra or {})

    def chunk(
        self,
        index: int,
        text: str,
        logprobs: list,
        finish: str | None,
        first: bool,
        tool_calls: list[dict[str, Any]] | None = None,
        reasoning: str | None = None,
    ) -> dict[str, Any]:
        """`tool_calls`: OpenAI's tool call deltas, each with its `index` in the reply;
        `reasoning`: a piece of the thinking (`delta.reasoning`, vLLM's), which comes alone."""
        if self.kind == "chat":
            delta: dict[str, Any] = {"content": text} if text or not finish else {}
            if tool_calls:
                delta = {"tool_calls": tool_calls}
            elif reasoning is not None:
                delta = {"reasoning": reasoning} if reasoning or not finish else {}
            if first:
                delta = {"role": "assistant", **delta}
            choice = {
                "index": index,
                "delta": delta,
                "logprobs": chat_logprobs(logprobs),
                "finish_reason": finish,
            }
            return self._envelope("chat.completion.chunk", [choice])
        if first:
            text = self.echo + text
        offset = self._scored.get(index, len(self.echo))
        self._scored[index] = offset + sum(len(tok) for tok, _, _ in logprobs or ())
        choice = {
            "index": index,
            "text": text,
            "logprobs": completion_logprobs(logprobs, offset),
            "finish_reason": finish,
        }
        return self._envelope("text_completion", [choice])

    def _usage(self, prompt: int, completion: int, reasoning_tokens: int) -> dict[str, Any]:
        return (
            chat_usage(prompt, completion, reasoning_tokens)
            if self.kind == "chat"
            else usage(prompt, completion)
        )

    def usage_chunk(self, prompt: int, completion: int, reasoning_tokens: int = 0) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        usage_ = self._usage(prompt, completion, reasoning_tokens)
        return self._envelope(obj, [], {"usage": usage_})

    def final(
        self,
        choices: list[dict[str, Any]],
        prompt: int,
        completion: int,
        reasoning_tokens: int = 0,
    ) -> dict:
        """choices: [{index, text, reasoning, logprobs, finish_reason, tool_calls}] collected
        from the stream (the calls with their stream `index`, which a message does not show;
        `reasoning`: the thinking, None where there was none or it was left out);
        `reasoning_tokens`: the tokens of the choices' thinking."""
        out = []
        for c in choices:
            if self.kind == "chat":
                # as vLLM's server: `reasoning` is always there, null without any; a reply
                # that thought or called has no empty content (null)
                plain = c.get("reasoning") is None and not c.get("tool_calls")
                message: dict[str, Any] = {
                    "role": "assistant",
                    "content": c["text"] if plain else c["text"] or None,
                    "reasoning": c.get("reasoning") or None,
                }
                if c.get("tool_calls"):
                    message["tool_calls"] = [
                        {k: v for k, v in tc.items() if k != "index"} for tc in c["tool_calls"]
                    ]
                out.append(
                    {
                        "index": c["index"],
                        "message": message,
                        "logprobs": chat_logprobs(c["logprobs"]),
                        "finish_reason": c["finish_reason"],
                    }
                )
            else:
                out.append(
                    {
                        "index": c["index"],
                        "text": self.echo + c["text"],
                        "logprobs": completion_logprobs(c["logprobs"], len(self.echo)),
                        "finish_reason": c["finish_reason"],
                    }
                )
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        usage_ = self._usage(prompt, completion, reasoning_tokens)
        return self._envelope(obj, out, {"usage": usage_})
