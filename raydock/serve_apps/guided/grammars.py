"""Requests' output formats as Lark grammars in llguidance's dialect: one representation that
raydock's own matchers and vLLM's guidance backend (`structured_outputs.grammar`) both take.
JSON schemas are embedded with `%json`, after `schema.normalize` (bounds and rewrites)."""

from __future__ import annotations

import json
from typing import Any

from raydock.serve_apps.guided.schema import Bounds, UnsupportedSchema, normalize

# auto tool choice: plain text that does not start like a tool call
_TEXT_NOT_JSON = r"/[^{][\s\S]*/"


def json_grammar(schema: Any, bounds: Bounds | None = None) -> str:
    return "start: %json " + json.dumps(normalize(schema, bounds))


def json_object_grammar(bounds: Bounds | None = None) -> str:
    return json_grammar({"type": "object"}, bounds)


def choice_grammar(choices: list[str]) -> str:
    return "start: " + " | ".join(json.dumps(c) for c in choices)


def tool_call_schema(tools: list[dict[str, Any]]) -> dict[str, Any]:
    """{"name": <tool>, "arguments": <its parameters>} for any one of the OpenAI tools."""
    calls = []
    for tool in tools:
        fn = tool.get("function", {})
        params = fn.get("parameters")
        args = {"type": "object", "additionalProperties": False} if params is None else params
        calls.append(
            {
                "type": "object",
                "properties": {"name": {"const": fn["name"]}, "arguments": args},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    if not calls:
        raise UnsupportedSchema("tools", "no tools given")
    # the names differ, so the calls exclude each other: anyOf is exact
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def tools_grammar(tools: list[dict[str, Any]], auto: bool, bounds: Bounds | None = None) -> str:
    """A tool call; with `auto`, or plain text that does not start with '{'."""
    call = "%json " + json.dumps(normalize(tool_call_schema(tools), bounds))
    if not auto:
        return f"start: {call}"
    return f"start: call | text\ncall: {call}\ntext: {_TEXT_NOT_JSON}"
