"""Requests' output formats as Lark grammars in llguidance's dialect: one representation that
raydock's own matchers and vLLM's guidance backend (`structured_outputs.grammar`) both take.
JSON schemas are embedded with `%json`, after `schema.normalize` (bounds and rewrites)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from raydock.serve_apps.guided import xml_calls
from raydock.serve_apps.guided.schema import Bounds, UnsupportedSchema, normalize

#: a wrapper's body: the call as JSON `{"name": ..., "arguments": ...}` (Qwen2 / 2.5 / 3,
#: Hermes), or as XML `<function=NAME>` `<parameter=P>` value `</parameter>` ... `</function>`
#: (Qwen3-Coder: `xml_calls`)
JSON_BODY, XML_BODY = "json", "xml"


@dataclass(frozen=True)
class ToolCallWrapper:
    """How a chat template tells its model to write a tool call: `open`, the call in its
    `body` format (JSON_BODY or XML_BODY), `close`; parallel calls are several such blocks.
    A template whose source holds `open` and every one of `signs` uses it
    (`chat_render.tool_call_wrapper`), with the ids of the vocabulary's own tokens for the
    tags where it has them (Qwen's do): llguidance counts every added token as special,
    which no text literal matches."""

    open: str
    close: str
    open_token: int | None = None
    close_token: int | None = None
    body: str = JSON_BODY
    signs: tuple[str, ...] = ()  # what else the template's source holds when it teaches it

    def taught_by(self, source: str) -> bool:
        """Whether a chat template's `source` teaches this wrapper."""
        return all(tag in source for tag in (self.open, *self.signs))


@dataclass(frozen=True)
class TagTokens:
    """The vocabulary's own tokens for the tags a tools grammar knows, where it has them
    (`chat_render.tag_tokens`), whatever the template's call format: THINK_OPEN's and
    THINK_CLOSE's (Qwen3's, DeepSeek-R1's) and those of every known wrapper's tags
    (`call_opens`, `call_closes`: Qwen's `<tool_call>` and `</tool_call>`). llguidance counts
    every added token as special, which no text literal matches: the grammar names them, so
    that a tag the model writes as its token is taken in thinking and text as the same tag
    spelled out is (a call's JSON strings take only text)."""

    think_open: int | None = None
    think_close: int | None = None
    call_opens: frozenset[int] = frozenset()
    call_closes: frozenset[int] = frozenset()


#: The native tool-call formats raydock knows: the one place to add another (its grammar,
#: detection, stream holding and parsing follow from it). Of those a template teaches, the
#: one with the most signs wins (the first among equals); the output is read by its body:
#: a reply that opens with a tag two wrappers share is read as the one whose body it holds.
TOOL_CALL_WRAPPERS: tuple[ToolCallWrapper, ...] = (
    ToolCallWrapper("<tool_call>", "</tool_call>"),  # Qwen2 / 2.5 / 3, Hermes, many others
    # Qwen3-Coder (30B-A3B, 480B, Next): the same tags around an XML body
    ToolCallWrapper("<tool_call>", "</tool_call>", body=XML_BODY, signs=xml_calls.SIGNS),
)

#: A reasoning model's thinking (Qwen3, QwQ, DeepSeek-R1): under tool_choice "auto" a reply
#: may open with one such block, and under "required" or a named function too where the
#: engine replica knows the model thinks (`with_native_calls`; else the call comes at once:
#: a model that never closes a block it was let open would never call), or start inside one
#: its chat template opened (`starting_in_thinking`); what follows its first THINK_CLOSE is
#: the reply proper: calls, or under "auto" text (`structured.thinking_length` reads it back).
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
_START = "start: think? reply\n"  # the reply may open with a thinking block
_CALL_AT_ONCE = "start: reply\n"
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


#: where the bare call's schema keeps tool i's parameters when they hold references: theirs
#: (`#/$defs/X`, `#`), which name places in the parameters, are rewritten to point there,
#: and the call's `arguments` is a reference to them
TOOL_DEFS = "raydock-tool-{}"
#: keywords whose values are JSON data, not schemas: a `$ref` inside them is not a reference
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})


def _rebased(schema: Any, base: str) -> Any:
    """`schema` with each local `$ref` ("#..." : a pointer into `schema` itself) made a
    pointer into `base` (a pointer to where a copy of `schema` is kept)."""
    if isinstance(schema, list):
        return [_rebased(item, base) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in _DATA_KEYWORDS else _rebased(v, base) for k, v in schema.items()}
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        out["$ref"] = base + ref[1:]
    return out


def tool_call_schema(tools: list[dict[str, Any]]) -> dict[str, Any]:
    """{"name": <tool>, "arguments": <its parameters>} for any one of the OpenAI tools."""
    calls, defs = [], {}
    for i, tool in enumerate(tools):
        fn = tool.get("function", {})
        params = fn.get("parameters")
        args = {"type": "object", "additionalProperties": False} if params is None else params
        if '"$ref"' in json.dumps(args):  # references relative to the parameters, not to us
            key = TOOL_DEFS.format(i)
            defs[key] = _rebased(args, f"#/$defs/{key}")
            args = {"$ref": f"#/$defs/{key}"}
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
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return {**schema, "$defs": defs} if defs else schema


def tools_grammar(tools: list[dict[str, Any]], auto: bool, bounds: Bounds | None = None) -> str:
    """A tool call of `tools` at once (tool_choice "required", or one function named); with
    `auto`, a call or plain text that (after whitespace) starts neither with '{' nor with a
    wrapper's opening tag, either after one thinking block the reply may open with. The
    engine replica fits it to the model's template, vocabulary and thinking
    (`with_native_calls`)."""
    call = "call: %json " + json.dumps(normalize(tool_call_schema(tools), bounds))
    return _assemble(call, auto)


def with_native_calls(
    grammar: str,
    wrapper: ToolCallWrapper | None,
    max_calls: int,
    tags: TagTokens = TagTokens(),
    thinks: bool = False,
) -> str:
    """A `tools_grammar` fitted to a model: it also takes 1 to `max_calls` calls each written
    in the chat template's own `wrapper` (None: the template teaches none), `<tool_call>` ws
    call ws `</tool_call>`, with whitespace between: the same `call` rule, so the wrapped JSON
    is as constrained as a bare call (an XML body: the same tools, parameters and bounds,
    `xml_calls.call_rules`); the tags written as the vocabulary's own tokens (`tags`;
    the wrapper's own tags as its tokens), in thinking and text; and where the model `thinks`
    (`chat_render.thinks`), one thinking block before the call "required" or a named function
    asks for, as "auto" always takes."""
    call, auto = _parts(grammar)
    return _assemble(call, auto, wrapper, max_calls, tags, may_think=auto or thinks)


def _parts(grammar: str) -> tuple[str, bool]:
    """The call rule of a `tools_grammar` and whether it is an "auto" one."""
    call = next((line for line in grammar.split("\n") if line.startswith("call: ")), "")
    for auto in (True, False):
        if call and grammar == _assemble(call, auto):
            return call, auto
    raise ValueError("not a tools grammar of tools_grammar")


def _assemble(
    call: str,
    auto: bool,
    wrapper: ToolCallWrapper | None = None,
    max_calls: int = 0,
    tags: TagTokens = TagTokens(),
    may_think: bool | None = None,
) -> str:
    """A tools grammar: one thinking block the reply may open with (`may_think`; by default
    under `auto` only), then the reply proper: a bare `call`, 1 to `max_calls` calls in the
    template's `wrapper`, or with `auto` text."""
    may_think = auto if may_think is None else may_think
    replies = ["WS? call"]
    rules = [call]
    if wrapper is not None and max_calls > 0:
        more = f" (WS? wrapped){{0,{max_calls - 1}}}" if max_calls > 1 else ""
        open_, close = (
            _tag(wrapper.open, wrapper.open_token),
            _tag(wrapper.close, wrapper.close_token),
        )
        body = "xcall" if wrapper.body == XML_BODY else "call"
        replies.append("WS? calls")
        rules += [f"calls: wrapped{more} WS?", f"wrapped: {open_} WS? {body} WS? {close}"]
        if wrapper.body == XML_BODY:
            rules += xml_calls.call_rules(call)
    if auto:
        replies.append("text")
        rules += _text_rules(tags)
    if may_think:
        rules += _thinking_rules(tags)
    head = [(_START if may_think else _CALL_AT_ONCE).rstrip("\n"), f"reply: {' | '.join(replies)}"]
    return "\n".join([*head, *rules, f"WS: {_WRAPPER_SPACE}"])


def _thinking_rules(tags: TagTokens) -> list[str]:
    """The thinking block a reply may open with: its tags spelled out, or the vocabulary's own
    tokens for them. Its text may name the vocabulary's other tag tokens (a model mentions
    them), and ends at its first THINK_CLOSE."""
    inner = _token_set(tags.think_open, *tags.call_opens, *tags.call_closes)
    ends = "THINKING"
    if tags.think_close is not None:
        ends = f"(THINKING | THINKING_OPEN? <[{tags.think_close}]>)"
    thinking = f"thinking: (THINKING_OPEN? {inner})* {ends}" if inner else f"thinking: {ends}"
    rules = [f"think: {_tag(THINK_OPEN, tags.think_open)} thinking", thinking, _THINKING]
    if inner or tags.think_close is not None:
        rules.append(_THINKING_OPEN)
    return rules


def _text_rules(tags: TagTokens) -> list[str]:
    """The text of an "auto" reply, which starts like no call nor thinking. The vocabulary's
    own tag tokens are taken where the same tags spelled out are: anywhere after its start,
    and at its start the tags that start nothing (THINK_CLOSE, a wrapper's closing tag)."""
    first = _token_set(tags.think_close, *tags.call_closes)
    anywhere = _token_set(tags.think_open, tags.think_close, *tags.call_opens, *tags.call_closes)
    text = "text: SPACE? TEXT"
    if anywhere:
        start = f"(TEXT | {first} TEXT_ON?)" if first else "TEXT"
        text = f"text: SPACE? {start} ({anywhere} TEXT_ON?)*"
    rules = [text, f"TEXT: /{_TEXT_START}/", "SPACE: /[ \\t\\r\\n]+/"]
    if anywhere:
        rules.append(r"TEXT_ON: /[\s\S]+/")
    return rules


def _token_set(*ids: int | None) -> str:
    """The tokens of `ids` (None: none) as one llguidance token set, or "" when none."""
    known = sorted({i for i in ids if i is not None})
    return f"<[{','.join(map(str, known))}]>" if known else ""


def starting_in_thinking(grammar: str) -> str:
    """A tools grammar whose reply may open with thinking ("auto"'s, or a "required" or named
    one `with_native_calls` fitted to a model that thinks) for a prompt whose chat template
    opened the thinking block itself (`chat_render.opens_thinking`): the output starts inside
    it, with no THINK_OPEN of its own, runs to its first THINK_CLOSE (spelled out, or the
    vocabulary's token for it where the grammar names one), then the reply as before: under
    "required" or a named function, the call comes after the thinking, never inside it."""
    if not grammar.startswith(_START):
        raise ValueError("not a tools grammar that may open with thinking")
    return f"start: thinking reply\n{grammar[len(_START) :]}"


def _tag(text: str, token: int | None) -> str:
    """A wrapper's tag as text, or as the vocabulary's one token for it (`<[id]>`)."""
    return json.dumps(text) if token is None else f"({json.dumps(text)} | <[{token}]>)"
