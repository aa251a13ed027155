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


@dataclass(frozen=True)
class ThinkTokens:
    """The vocabulary's own tokens for THINK_OPEN and THINK_CLOSE, where it has them (Qwen3's,
    DeepSeek-R1's: `chat_render.think_tokens`), whatever the template's call format."""

    open: int | None = None
    close: int | None = None


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
# a thinking block's text up to its first THINK_CLOSE, spelled out; or, before a tag that is
# the vocabulary's own token, text without THINK_CLOSE
_THINKING = r"THINKING: /[\s\S]*<\/think>/ & ~/[\s\S]*<\/think>[\s\S]+/"
_THINKING_OPEN = r"THINKING_OPEN: /[\s\S]+/ & ~/[\s\S]*<\/think>[\s\S]*/"


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
    return f"{_AUTO_HEAD}call: {call}\n{_auto_tail(ThinkTokens())}"


def _auto_tail(think: ThinkTokens, wrapper: ToolCallWrapper | None = None) -> str:
    """The rules an auto grammar ends with: the text, the thinking block a reply may open
    with (`thinking`: its tags spelled out, or also as the vocabulary's own `think` tokens)
    and the whitespace before a call. The vocabulary's own tag tokens (THINK_OPEN's and the
    `wrapper`'s) are no text to llguidance: the thinking and the text name them, so a model
    may mention them there; the thinking still ends at its first THINK_CLOSE, and the text
    still starts like no call nor thinking."""
    inner = _token_set(think.open, *((wrapper.open_token, wrapper.close_token) if wrapper else ()))
    ends = "THINKING"
    if think.close is not None:
        ends = f"(THINKING | THINKING_OPEN? <[{think.close}]>)"
    text, thinking = "text: SPACE? TEXT", f"thinking: {ends}"
    if inner:
        first = _token_set(wrapper.close_token if wrapper else None)  # it starts nothing
        start = f"(TEXT | {first} TEXT_ON?)" if first else "TEXT"
        text = f"text: SPACE? {start} ({inner} TEXT_ON?)*"
        thinking = f"thinking: (THINKING_OPEN? {inner})* {ends}"
    rules = [text, f"TEXT: /{_TEXT_START}/", "SPACE: /[ \\t\\r\\n]+/"]
    rules += [f"think: {_tag(THINK_OPEN, think.open)} thinking", thinking, _THINKING]
    if inner:
        rules.append(r"TEXT_ON: /[\s\S]+/")
    if inner or think.close is not None:
        rules.append(_THINKING_OPEN)
    return "\n".join([*rules, f"WS: {_WRAPPER_SPACE}"])


def _token_set(*ids: int | None) -> str:
    """The tokens of `ids` (None: none) as one llguidance token set, or "" when none."""
    known = sorted({i for i in ids if i is not None})
    return f"<[{','.join(map(str, known))}]>" if known else ""


def _auto_middle(grammar: str) -> str:
    """The call rule of an auto `tools_grammar`, between its head and its tail."""
    tail = _auto_tail(ThinkTokens())
    if not (grammar.startswith(_AUTO_HEAD) and grammar.endswith(tail)):
        raise ValueError("not a tool_choice 'auto' grammar of tools_grammar")
    return grammar[len(_AUTO_HEAD) : -len(tail)]


def with_think_tokens(grammar: str, think: ThinkTokens) -> str:
    """An auto `tools_grammar` whose thinking tags may be the vocabulary's own `think` tokens,
    for a template without a wrapper (DeepSeek-R1's): else the model's own first token,
    `<think>`, would be refused."""
    return _AUTO_HEAD + _auto_middle(grammar) + _auto_tail(think)


def with_native_calls(
    grammar: str, wrapper: ToolCallWrapper, max_calls: int, think: ThinkTokens = ThinkTokens()
) -> str:
    """An auto `tools_grammar` that also takes 1 to `max_calls` calls each written in the
    chat template's own `wrapper`, `<tool_call>` ws call ws `</tool_call>`, with whitespace
    between: the same `call` rule, so the wrapped JSON is as constrained as a bare call. The
    tags, and the thinking block's (`think`), may be the vocabulary's own tokens."""
    middle = _auto_middle(grammar)
    more = f" (WS? wrapped){{0,{max_calls - 1}}}" if max_calls > 1 else ""
    open_, close = _tag(wrapper.open, wrapper.open_token), _tag(wrapper.close, wrapper.close_token)
    return (
        _NATIVE_HEAD
        + middle
        + f"calls: wrapped{more} WS?"
        + f"\nwrapped: {open_} WS? call WS? {close}\n"
        + _auto_tail(think, wrapper)
    )


def starting_in_thinking(grammar: str) -> str:
    """An auto grammar (`tools_grammar`'s, `with_think_tokens`' or `with_native_calls`') for a
    prompt whose chat template opened the thinking block itself (`chat_render.opens_thinking`):
    the output starts inside it, with no THINK_OPEN of its own, runs to its first THINK_CLOSE
    (spelled out, or the vocabulary's token for it where the grammar names one), then the
    reply as before."""
    if not grammar.startswith(_START):
        raise ValueError("not a tool_choice 'auto' grammar of tools_grammar")
    return f"start: thinking reply\n{grammar[len(_START) :]}"


def _tag(text: str, token: int | None) -> str:
    """A wrapper's tag as text, or as the vocabulary's one token for it (`<[id]>`)."""
    return json.dumps(text) if token is None else f"({json.dumps(text)} | <[{token}]>)"
