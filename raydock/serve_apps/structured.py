"""What a request's `response_format` and `tools` (or vLLM's `structured_outputs`) ask of the
output, as a regex to enforce, and how the constrained text turns back into OpenAI message
fields.

Tools take precedence over response_format (the seed: "tool calls take precedence and the
schema is ignored").
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from raydock.serve_apps.schema_regex import (
    JSON_OBJECT_REGEX,
    UnsupportedSchema,
    choice_regex,
    schema_to_regex,
    tool_call_regex,
)

#: A user regex or grammar longer than this is refused before any compile (a regex's DFA
#: grows with it).
MAX_PATTERN_CHARS = 10_000

# auto: either a tool call, or plain text that does not start like one
_TEXT_NOT_JSON = r"[^{][\s\S]*"


class StructuredError(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Constraint:
    mode: str  # "text" | "json" | "choice" | "regex" | "grammar" | "tools"
    regex: str | None = None
    # the request field the constraint comes from: an engine that cannot enforce it names it
    param: str | None = None
    grammar: str | None = None  # a Lark or GBNF grammar (vLLM engines only), instead of a regex


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
        by_name[name] = tool
    return by_name


def _tools_regex(tools: list[dict[str, Any]], param: str) -> str:
    try:
        return tool_call_regex(tools)
    except UnsupportedSchema as exc:
        raise StructuredError(
            param, f"tool parameters use '{exc.keyword}', which raydock cannot enforce: {exc}"
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
            return Constraint("tools", _tools_regex(tools, "tools"), "tools")
        elif choice == "auto":
            regex = f"({_tools_regex(tools, 'tools')})|({_TEXT_NOT_JSON})"
            return Constraint("tools", regex, "tools")
        elif isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name")
            if name not in by_name:
                raise StructuredError(
                    "tool_choice", f"tool_choice names {name!r}, not one of {sorted(by_name)}"
                )
            return Constraint("tools", _tools_regex([by_name[name]], "tools"), "tools")
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
        return Constraint("json", JSON_OBJECT_REGEX, "response_format")
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
    try:
        return Constraint("json", schema_to_regex(schema), param)
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
        return Constraint("json", JSON_OBJECT_REGEX, param)
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise StructuredError(param, f"{param} must be a non-empty list of strings")
        return Constraint("choice", choice_regex(value), param)
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


def as_tool_call(text: str) -> dict[str, Any] | None:
    """The OpenAI tool_call an output stands for, or None when it is plain text."""
    if not text.startswith("{"):
        return None
    try:
        call = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or "name" not in call:
        return None
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {
            "name": call["name"],
            "arguments": json.dumps(call.get("arguments", {}), separators=(",", ":")),
        },
    }
