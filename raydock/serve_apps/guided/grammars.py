"""Requests' output formats as Lark grammars in llguidance's dialect: one representation that
raydock's own matchers and vLLM's guidance backend (`structured_outputs.grammar`) both take.
JSON schemas are embedded with `%json`, after `schema.normalize` (bounds and rewrites)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from raydock.serve_apps.guided.schema import Bounds, UnsupportedSchema, normalize


@dataclass(frozen=True)
class ToolCallWrapper:
    """How a chat template tells its model to write a tool call: `open`, the call's JSON
    `{"name": ..., "arguments": ...}`, `close`; parallel calls are several such blocks. A
    template whose source holds `open` uses it (`chat_render.tool_call_wrapper`), with the
    ids of the vocabulary's own tokens for the tags where it has them (Qwen's do): llguidance
    counts every added token as special, which no text literal matches."""

    open: str
    close: str
    open_token: int | None = None
    close_token: int | None = None
    # the vocabulary's own tokens for THINK_OPEN and THINK_CLOSE, where it has them (Qwen3's)
    think_open_token: int | None = None
    think_close_token: int | None = None


#: The native tool-call formats raydock knows, the first found in a template wins: the one
#: place to add another (its grammar, detection, stream holding and parsing follow from it).
TOOL_CALL_WRAPPERS: tuple[ToolCallWrapper, ...] = (
    ToolCallWrapper("<tool_call>", "</tool_call>"),  # Qwen2 / 2.5 / 3, Hermes, many others
)

#: A reasoning model's thinking (Qwen3, QwQ, DeepSeek-R1): under tool_choice "auto" a reply
#: may open with one such block, or start inside one its chat template opened
#: (`starting_in_thinking`); what follows its first THINK_CLOSE is the reply proper, a call
#: or text (`structured.thinking_length` reads it back).
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

#: whitespace allowed before a call and around and between wrapped calls (bounded: a weak
#: model cannot loop)
_WRAPPER_SPACE = r"/[ \t\r\n]{1,4}/"
#: the whitespace the grammars allow before a call (str.lstrip() alone strips more: a reply
#: starting with a no-break space then `{` is text to the grammar, and must stay text)
CALL_SPACE = " \t\r\n"


def _regex_char(ch: str) -> str:
    """One character as a regex literal that means itself anywhere (in a class too): escapes
    like `\\<` mean something else in the Rust dialect, and `/` would end a Lark regex."""
    return ch if ch.isascii() and (ch.isalnum() or ch == "_") else f"\\x{{{ord(ch):X}}}"


def not_starting_with(prefixes: list[str], not_first: str = "") -> str:
    """A regex of the non-empty texts that start with none of `prefixes` (the start of one,
    `<tool`, is such a text) nor with a character of `not_first`: a trie of the prefixes,
    each branch either leaves it by another character, stops, or goes on with the prefix's
    next character."""
    trie: dict = {}
    for prefix in prefixes:
        node = trie
        for ch in prefix:
            node = node.setdefault(ch, {})
        node[None] = True  # a whole prefix: the text may not go through here

    def alternatives(node: dict, excluded: str = "") -> str:
        chars = sorted(c for c in node if c is not None)
        alts = [f"[^{''.join(map(_regex_char, chars + sorted(excluded)))}][\\s\\S]*"]
        for c in chars:
            if None not in node[c]:
                alts.append(f"{_regex_char(c)}({alternatives(node[c])})?")
        return "|".join(alts)

    return alternatives(trie, not_first)


# auto tool choice: plain text that, after any whitespace, starts neither like a bare call, a
# wrapped one nor a thinking block, on every template (so an output that starts with a wrapper
# was constrained as a call). Its leading whitespace is a lexeme of its own: one regex for
# all of it would run on greedily past the whitespace that may precede a call.
_TEXT_START = not_starting_with(
    ["{", THINK_OPEN, *(w.open for w in TOOL_CALL_WRAPPERS)], CALL_SPACE
)
_START = "start: think? reply\n"
_AUTO_HEAD = _START + "reply: WS? call | text\n"
_NATIVE_HEAD = _START + "reply: WS? call | WS? calls | text\n"
# a thinking block's text up to its first THINK_CLOSE, spelled out; or, before that tag as
# the vocabulary's own token, text without it
_THINKING = r"THINKING: /[\s\S]*<\/think>/ & ~/[\s\S]*<\/think>[\s\S]+/"
_WITHOUT_CLOSE = r"/[\s\S]+/ & ~/[\s\S]*<\/think>[\s\S]*/"
_THINKING_OPEN = f"THINKING_OPEN: {_WITHOUT_CLOSE}"


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
    """A tool call; with `auto`, or plain text that (after whitespace) starts neither with
    '{' nor with a wrapper's opening tag, either after one thinking block the reply may open
    with (`with_native_calls` adds the template's wrapped calls)."""
    call = "%json " + json.dumps(normalize(tool_call_schema(tools), bounds))
    if not auto:
        return f"start: {call}"
    return f"{_AUTO_HEAD}call: {call}\n{_auto_tail(None, None)}"


def _auto_tail(think_open: int | None, think_close: int | None) -> str:
    """The rules an auto grammar ends with: the text, the thinking block a reply may open
    with (its tags spelled out, or also as the vocabulary's own tokens) and the whitespace
    before a call."""
    thinking = f"THINKING\n{_THINKING}"
    if think_close is not None:
        thinking = f"(THINKING | THINKING_OPEN? <[{think_close}]>)\n{_THINKING}\n{_THINKING_OPEN}"
    return (
        f"text: SPACE? TEXT\nTEXT: /{_TEXT_START}/\nSPACE: /[ \\t\\r\\n]+/\n"
        f"think: {_tag(THINK_OPEN, think_open)} {thinking}\nWS: {_WRAPPER_SPACE}"
    )


def with_native_calls(grammar: str, wrapper: ToolCallWrapper, max_calls: int) -> str:
    """An auto `tools_grammar` that also takes 1 to `max_calls` calls each written in the
    chat template's own `wrapper`, `<tool_call>` ws call ws `</tool_call>`, with whitespace
    between: the same `call` rule, so the wrapped JSON is as constrained as a bare call. The
    tags, and the thinking block's, may be the vocabulary's own tokens."""
    tail = _auto_tail(None, None)
    if not (grammar.startswith(_AUTO_HEAD) and grammar.endswith(tail)):
        raise ValueError("not a tool_choice 'auto' grammar of tools_grammar")
    more = f" (WS? wrapped){{0,{max_calls - 1}}}" if max_calls > 1 else ""
    open_, close = _tag(wrapper.open, wrapper.open_token), _tag(wrapper.close, wrapper.close_token)
    return (
        _NATIVE_HEAD
        + grammar[len(_AUTO_HEAD) : -len(tail)]
        + f"calls: wrapped{more} WS?"
        + f"\nwrapped: {open_} WS? call WS? {close}\n"
        + _auto_tail(wrapper.think_open_token, wrapper.think_close_token)
    )


def starting_in_thinking(grammar: str, think_close_token: int | None) -> str:
    """An auto grammar (`tools_grammar`'s or `with_native_calls`') for a prompt whose chat
    template opened the thinking block itself (`chat_render.opens_thinking`): the output starts
    inside it, with no THINK_OPEN of its own, runs to its first THINK_CLOSE (spelled out, or
    `think_close_token`, the vocabulary's token for it), then the reply as before."""
    if not grammar.startswith(_START):
        raise ValueError("not a tool_choice 'auto' grammar of tools_grammar")
    thought = "thought: THINKING"
    if think_close_token is not None:  # its own terminal: THINKING_OPEN may be defined already
        thought = f"thought: THINKING | THOUGHT? <[{think_close_token}]>\nTHOUGHT: {_WITHOUT_CLOSE}"
    return f"start: thought reply\n{grammar[len(_START) :]}\n{thought}"


def _tag(text: str, token: int | None) -> str:
    """A wrapper's tag as text, or as the vocabulary's one token for it (`<[id]>`)."""
    return json.dumps(text) if token is None else f"({json.dumps(text)} | <[{token}]>)"
