"""What a request's `response_format` and `tools` (or vLLM's `structured_outputs`) ask of the
output, as a grammar (or a user's regex) to enforce, and how the constrained text turns back
into OpenAI message fields.

Tools take precedence over response_format (the seed: "tool calls take precedence and the
schema is ignored").
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

import jsonschema

from raydock.serve_apps.guided import (
    UnsupportedSchema,
    choice_grammar,
    json_grammar,
    json_object_grammar,
    tools_grammar,
    xml_calls,
)
from raydock.serve_apps.guided.grammars import (
    CALL_SPACE,
    JSON_BODY,
    THINK_CLOSE,
    THINK_OPEN,
    TOOL_CALL_WRAPPERS,
    XML_BODY,
    ToolCallWrapper,
)

#: A user regex or grammar longer than this is refused before any compile (a cheap first
#: bound; the compile itself runs under `guided.Limits`).
MAX_PATTERN_CHARS = 10_000


#: JSON values (objects, arrays, scalars) one output format may hold: compiling one costs
#: ~0.3 ms per value (~1 ms per `pattern`), so this bounds a request's compile to about 3 s
#: of a replica's CPU (off its event loop). OpenAI's own bound: 5,000 object properties.
MAX_FORMAT_VALUES = 10_000

#: Calls one reply may hold in its chat template's own wrapper (`tool_choice` "auto" or
#: "required", `parallel_tool_calls` not false): a weak model that loops on calls still ends
MAX_NATIVE_CALLS = 8

#: the request fields that describe an output format
FORMAT_FIELDS = (
    "response_format",
    "tools",
    "structured_outputs",
    "guided_json",
    "guided_choice",
    "guided_regex",
    "guided_grammar",
)


def check_format_size(param: str, value: Any) -> None:
    """Refuse an output format too large to compile in reasonable time (StructuredError)."""
    count, stack = 0, [value]
    while stack:
        item = stack.pop()
        count += 1
        if count > MAX_FORMAT_VALUES:
            raise StructuredError(
                param, f"{param} holds more than {MAX_FORMAT_VALUES} JSON values; at most that many"
            )
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


class StructuredError(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Constraint:
    mode: str  # "text" | "json" | "choice" | "regex" | "grammar" | "tools"
    regex: str | None = None  # a user's regex (structured_outputs.regex)
    # the request field the constraint comes from: an engine that cannot enforce it names it
    param: str | None = None
    # a Lark (llguidance dialect) or GBNF grammar: schemas, tools and choices become one
    grammar: str | None = None
    # tools: how many calls in the chat template's own wrapper the engine replica, which knows
    # the template, adds to the grammar (`guided.grammars.with_native_calls`); it also fits
    # the grammar to the model's thinking
    native_calls: int = 0


def _check_tools(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    by_name: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise StructuredError(
                f"tools.{i}", "each tool must be {'type': 'function', 'function': {...}}"
            )
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise StructuredError(f"tools.{i}.function.name", "a function needs a name")
        if name in by_name:  # a named tool_choice could not say which one
            raise StructuredError(f"tools.{i}.function.name", f"two tools are named {name!r}")
        if "parameters" in fn:
            _check_schema(fn["parameters"], f"tools.{i}.function.parameters")
        by_name[name] = tool
    return by_name


def _check_schema(schema: Any, param: str) -> None:
    """A JSON schema as the 2020-12 metaschema defines it (`{"type": 5}` is none). Formats
    are not checked: a `pattern` is the Rust regex dialect (`\\p{Lu}`), not Python's."""
    try:
        jsonschema.Draft202012Validator.check_schema(schema, format_checker=None)
    except jsonschema.SchemaError as exc:
        where = "/".join(map(str, exc.absolute_path)) or "its root"
        raise StructuredError(
            param, f"{param} is not a valid JSON schema at {where}: {exc.message[:200]}"
        ) from None


def _tools(
    tools: list[dict[str, Any]], auto: bool, max_calls: int = MAX_NATIVE_CALLS
) -> Constraint:
    """Calls of `tools` (with `auto`, or text), at most `max_calls` in a template's wrapper."""
    try:
        return Constraint("tools", None, "tools", tools_grammar(tools, auto), max_calls)
    except UnsupportedSchema as exc:
        raise StructuredError(
            "tools", f"tool parameters use '{exc.keyword}', which raydock cannot enforce: {exc}"
        ) from None


def constraint_for(
    response_format: dict[str, Any] | None,
    tools: list[dict[str, Any]] | None,
    tool_choice: str | dict[str, Any] | None,
) -> Constraint:
    """The output constraint of a chat request; raises StructuredError (→ 400)."""
    if tools:
        by_name = _check_tools(tools)
        choice = "auto" if tool_choice is None else tool_choice
        if choice == "none":
            pass  # tools declared but not to be called: fall through to response_format
        elif choice == "required":
            return _tools(tools, auto=False)
        elif choice == "auto":
            return _tools(tools, auto=True)
        elif isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name")
            if name not in by_name:
                raise StructuredError(
                    "tool_choice", f"tool_choice names {name!r}, not one of {sorted(by_name)}"
                )
            return _tools([by_name[name]], auto=False, max_calls=1)  # that function, once
        else:
            raise StructuredError(
                "tool_choice", "tool_choice must be 'none', 'auto', 'required' or a function"
            )
    elif tool_choice not in (None, "none"):
        raise StructuredError("tool_choice", "tool_choice needs tools")
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return Constraint("text")
    if kind == "json_object":
        return Constraint("json", None, "response_format", grammar=json_object_grammar())
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict | bool):
            raise StructuredError(
                "response_format.json_schema", "json_schema needs a 'schema' object"
            )
        return _schema(spec["schema"], "response_format.json_schema.schema")
    raise StructuredError(
        "response_format.type", "response_format.type must be text, json_object or json_schema"
    )


def _schema(schema: Any, param: str) -> Constraint:
    _check_schema(schema, param)
    try:
        return Constraint("json", None, param, grammar=json_grammar(schema))
    except UnsupportedSchema as exc:
        raise StructuredError(
            param, f"schema keyword '{exc.keyword}' cannot be enforced by raydock: {exc}"
        ) from None


def vllm_constraint(kind: str, value: Any, param: str) -> Constraint:
    """vLLM's structured outputs (`structured_outputs.json` / `.choice` / `.regex` / `.grammar`,
    or its older `guided_*` fields) as the same kind of constraint; `param` names the field."""
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise StructuredError(param, f"{param} is not valid JSON: {exc}") from None
        if not isinstance(value, dict | bool):
            raise StructuredError(param, f"{param} must be a JSON schema")
        return _schema(value, param)
    if kind == "json_object" and value is True:
        return Constraint("json", None, param, grammar=json_object_grammar())
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise StructuredError(param, f"{param} must be a non-empty list of strings")
        return Constraint("choice", None, param, grammar=choice_grammar(value))
    if kind in ("regex", "grammar"):
        # the syntax is the engine's to judge (the Rust `regex` dialect; Lark or GBNF): what
        # it cannot build is a 400 from the replica, before any token
        if not isinstance(value, str) or not value.strip():
            raise StructuredError(param, f"{param} must be a non-empty string")
        if len(value) > MAX_PATTERN_CHARS:
            raise StructuredError(
                param, f"{param} has {len(value)} characters; at most {MAX_PATTERN_CHARS}"
            )
        if kind == "grammar":
            return Constraint("grammar", None, param, grammar=value)
        return Constraint("regex", value, param)
    raise StructuredError(
        param,
        f"{param} is not supported: raydock enforces JSON schemas, choices, regular "
        "expressions and grammars (structured_outputs.json / .choice / .regex / .grammar, "
        "or response_format)",
    )


#: The key of the engine events of an output that starts inside a thinking block its prompt
#: opened (the engine replica, which renders the prompt, fitted the grammar to it:
#: `guided.grammars.starting_in_thinking`): the service then reads the output as such.
IN_THINKING = "in_thinking"
#: The key of the engine events of a model that thinks (`chat_render.thinks`: its vocabulary
#: or template knows `<think>`): only such a model's output (or one under tools, whose grammar
#: takes a thinking block) is read for reasoning; another model's `<think>` is its text.
THINKS = "thinks"


def thinking_length(text: str, in_thinking: bool = False) -> int | None:
    """How much of a chat output (any tool_choice, or none) is the thinking block it opens with
    (`<think>` to the first `</think>`, as the grammar has it; `in_thinking`: the prompt
    opened the block, the output starts inside it and its text runs to the first `</think>`):
    0 when it opens none, None while it may still open one or is inside one. What follows is
    the reply proper (`reasoning.split_reasoning` sends the block as the reply's reasoning)."""
    if in_thinking:
        start = 0
    elif text.startswith(THINK_OPEN):
        start = len(THINK_OPEN)
    else:
        return None if THINK_OPEN.startswith(text) else 0
    end = text.find(THINK_CLOSE, start)
    return None if end < 0 else end + len(THINK_CLOSE)


def may_be_tool_call(reply: str) -> bool:
    """Whether a reply that begins with `reply` may still be a tool call: after any
    whitespace it starts like a bare call (`{`) or a known wrapper, or is the start of a
    wrapper's opening tag (`<tool`), or nothing yet."""
    head = reply.lstrip(CALL_SPACE)
    return head.startswith("{") or any(
        head.startswith(w.open) or w.open.startswith(head) for w in TOOL_CALL_WRAPPERS
    )


def as_tool_calls(
    reply: str, tools: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]] | None:
    """The OpenAI tool_calls a whole reply stands for: a bare call `{"name": ...,
    "arguments": ...}`, or one or more in a known wrapper (`<tool_call>` call `</tool_call>`,
    the call in the wrapper's body format: an XML one's values read by the `tools`' schemas),
    whitespace around; None when it is plain text. Only the start decides: text that mentions
    a wrapper later is text, as the grammar has it."""
    reply = reply.lstrip(CALL_SPACE)
    if reply.startswith("{"):
        try:
            call = _as_call(json.loads(reply))
        except json.JSONDecodeError:
            return None
        return None if call is None else [call]
    for wrapper in TOOL_CALL_WRAPPERS:  # wrappers that share a tag differ in their body
        if reply.startswith(wrapper.open) and (calls := _wrapped_calls(reply, wrapper, tools)):
            return calls
    return None


def as_cut_tool_calls(
    reply: str, tools: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """The tool_calls of a reply that `may_be_tool_call` and `max_tokens` cut short
    (finish_reason "length"), as OpenAI returns such a reply: the whole calls, then the cut one
    as far as it was written, its `arguments` the JSON text so far (not valid JSON); a call
    cut before its name was whole is left out. No wrapper tag shows."""
    reply = reply.lstrip(CALL_SPACE)
    if reply.startswith("{"):
        try:  # whole, the limit reached on its last token
            return [call] if (call := _as_call(_DECODER.raw_decode(reply)[0])) else []
        except json.JSONDecodeError:
            return _cut_call(reply)
    for xml in (w for w in TOOL_CALL_WRAPPERS if w.body == XML_BODY and reply.startswith(w.open)):
        if xml_calls.opens_call(reply[len(xml.open) :].lstrip(CALL_SPACE)):
            cut = xml_calls.cut_calls(reply, xml.open, xml.close, tools, CALL_SPACE)
            return [_new_call(name, arguments) for name, arguments in cut]
    json_wrappers = (w for w in TOOL_CALL_WRAPPERS if w.body == JSON_BODY)
    wrapper = next((w for w in json_wrappers if reply.startswith(w.open)), None)
    calls: list[dict[str, Any]] = []
    while wrapper is not None and reply.startswith(wrapper.open):
        body = reply[len(wrapper.open) :].lstrip(CALL_SPACE)
        try:
            value, end = _DECODER.raw_decode(body)
        except json.JSONDecodeError:  # the cut is in this call's JSON
            return calls + _cut_call(body)
        if (call := _as_call(value)) is None:  # not a call (the grammar makes none such)
            return calls
        calls.append(call)
        reply = body[end:].lstrip(CALL_SPACE).removeprefix(wrapper.close).lstrip(CALL_SPACE)
    return calls


# a call's JSON cut after its name: the name, then its arguments' text as far as written
_CUT_CALL = re.compile(
    r'\{\s*"name"\s*:\s*"(?P<name>(?:[^"\\]|\\.)*)"(?:\s*,\s*"arguments"\s*:\s*'
    r"(?P<arguments>.*))?",
    re.S,
)


def _cut_call(text: str) -> list[dict[str, Any]]:
    """The call a cut JSON text began, as far as written: none before its name was whole (as
    OpenAI, whose calls name a declared tool even when their arguments are cut)."""
    found = _CUT_CALL.match(text)
    if not found:
        return []
    return [_new_call(json.loads(f'"{found["name"]}"'), (found["arguments"] or "").rstrip())]


def _wrapped_calls(
    text: str, wrapper: ToolCallWrapper, tools: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]] | None:
    if wrapper.body == XML_BODY:
        found = xml_calls.whole_calls(text, wrapper.open, wrapper.close, tools, CALL_SPACE)
        return [_new_call(n, xml_calls.compact(a)) for n, a in found] if found else None
    calls: list[dict[str, Any]] = []
    rest = text
    while rest:
        if not rest.startswith(wrapper.open):
            return None
        body = rest[len(wrapper.open) :].lstrip(CALL_SPACE)
        try:  # the JSON's end, not the next close tag: a string may hold "</tool_call>"
            value, end = _DECODER.raw_decode(body)
        except json.JSONDecodeError:
            return None
        after = body[end:].lstrip(CALL_SPACE)
        call = _as_call(value)
        if call is None or not after.startswith(wrapper.close):
            return None
        calls.append(call)
        rest = after[len(wrapper.close) :].lstrip(CALL_SPACE)
    return calls or None


_DECODER = json.JSONDecoder()


def _as_call(call: Any) -> dict[str, Any] | None:
    if not isinstance(call, dict) or "name" not in call:
        return None
    return _new_call(call["name"], json.dumps(call.get("arguments", {}), separators=(",", ":")))


def _new_call(name: Any, arguments: str) -> dict[str, Any]:
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }
