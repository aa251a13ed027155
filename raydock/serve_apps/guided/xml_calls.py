"""Tool calls whose body is XML, as Qwen3-Coder's chat template teaches (the wrapper
`grammars.TOOL_CALL_WRAPPERS` names with `body=XML_BODY`):

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    <parameter=days>
    3
    </parameter>
    </function>
    </tool_call>

A parameter's value is raw text when its schema takes only strings of a form a regex can
hold (`type: string` with lengths and a pattern anchored at its ends or not at all, or an
enum / const of strings), else JSON of its schema. Raw text cannot hold `</parameter>`;
the newline after the opening tag and the one before the closing tag are the template's and
not the value's (vLLM's qwen3_coder parser strips them too). The parameters come in the
order the schema declares them, the required ones present, only declared ones.

Both halves read a tool's parameters from its *normalized* schema (`schema.normalize`):
the grammar the engine replica builds (`call_rules`, from the bare call's `%json` rule) and
the parse the API replica makes of the output (`whole_calls`, `cut_calls`, by the
request's tools), so that both decide a value's form alike.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from raydock.serve_apps.guided.schema import UnsupportedSchema, normalize, resolve_ref

FUNCTION_OPEN, FUNCTION_CLOSE = "<function=", "</function>"
PARAMETER_OPEN, PARAMETER_CLOSE = "<parameter=", "</parameter>"

#: what a template's source holds besides the wrapper's tag when it teaches this body
SIGNS = (FUNCTION_OPEN, PARAMETER_OPEN)

#: keys a string's normalized schema may carry and still be written as raw text
_RAW_STRING_KEYS = frozenset({"type", "minLength", "maxLength", "pattern"})
# a value's text: the template's newline, the value, its newline and the closing tag, which
# the value cannot hold (the lexeme includes its end: one open to more text never ends)
_RAW_END = r"\n<\/parameter>"
_NO_INNER_CLOSE = r"~/[\s\S]*<\/parameter>[\s\S]+/"


@dataclass(frozen=True)
class Parameter:
    name: str
    schema: dict[str, Any]  # normalized, its `$defs` / `definitions` carried along
    required: bool
    # a raw value: the regexes its text matches (all of them), or the literals it may be;
    # neither: a JSON value
    text: tuple[str, ...] = ()
    literals: tuple[str, ...] = ()

    @property
    def raw(self) -> bool:
        return bool(self.text or self.literals)


@dataclass(frozen=True)
class Function:
    name: str
    parameters: tuple[Parameter, ...]  # in the order the schema declares them


# ------------------------------------------------------------------------------ the grammar


def call_rules(call_rule: str) -> list[str]:
    """The Lark rules of one call in XML, `xcall`, for the tools a `grammars.tools_grammar`
    call rule (`call: %json {...}`) allows: each function by name, its parameters as
    the module docstring says, with the bare call's bounds and whitespace."""
    try:
        schema = json.loads(call_rule.split("%json", 1)[1])
        functions = _functions(schema)
    except (IndexError, KeyError, TypeError, AttributeError) as exc:  # not a bare-call rule
        raise ValueError(f"not the call rule of a tools grammar: {exc!r}") from None
    rules = [f"xcall: {' | '.join(f'xfn_{i}' for i in range(len(functions)))}"]
    for i, fn in enumerate(functions):
        rules += _function_rules(i, fn, schema.get("x-guidance"))
    return rules


def _function_rules(i: int, fn: Function, whitespace: Any) -> list[str]:
    items, rules = [], []
    for k, p in enumerate(fn.parameters):
        items.append(f"(WS? xp_{i}_{k})" + ("" if p.required else "?"))
        rules.append(_parameter_rule(f"xp_{i}_{k}", f"XS_{i}_{k}", p, whitespace))
    head = _literal(f"{FUNCTION_OPEN}{fn.name}>")
    body = " ".join([head, *items, "WS?", _literal(FUNCTION_CLOSE)])
    return [f"xfn_{i}: {body}", *rules]


def _parameter_rule(rule: str, terminal: str, p: Parameter, whitespace: Any) -> str:
    opening = f"{PARAMETER_OPEN}{p.name}>"
    if p.text:
        regex = " & ".join([*(f"/\\n(?:{r}){_RAW_END}/" for r in p.text), _NO_INNER_CLOSE])
        return f"{rule}: {_literal(opening)} {terminal}\n{terminal}: {regex}"
    closing = _literal(f"\n{PARAMETER_CLOSE}")
    if p.literals:
        values = " | ".join(map(_literal, p.literals))
        return f"{rule}: {_literal(opening + chr(10))} ({values}) {closing}"
    value = json.dumps({**p.schema, "x-guidance": whitespace or {}})
    return f"{rule}: {_literal(opening + chr(10))} %json {value} {closing}"


def _literal(text: str) -> str:
    return json.dumps(text)


# ----------------------------------------------------------------- a tool's parameters, read


def _functions(call_schema: dict[str, Any]) -> list[Function]:
    """The functions a normalized bare-call schema (`grammars.tool_call_schema`) allows;
    the copies of parameters it keeps for their references go along with each."""
    branches = call_schema.get("anyOf", [call_schema])
    kept = call_schema.get("$defs") or {}
    return [
        _function(b["properties"]["name"]["const"], b["properties"]["arguments"], kept)
        for b in branches
    ]


def _function(name: str, arguments: dict[str, Any], kept: dict[str, Any] | None = None) -> Function:
    defs = {k: arguments[k] for k in ("$defs", "definitions") if k in arguments}
    if kept:
        defs["$defs"] = {**defs.get("$defs", {}), **kept}
    arguments = _resolved(arguments, defs)
    required = set(arguments.get("required", ()))
    parameters = []
    for pname, schema in (arguments.get("properties") or {}).items():
        schema = _resolved(schema, defs)
        text, literals = _raw_form(schema)
        parameters.append(Parameter(pname, {**schema, **defs}, pname in required, text, literals))
    return Function(name, tuple(parameters))


def _resolved(schema: Any, defs: dict[str, Any]) -> dict[str, Any]:
    """`schema`, or what its local `$ref` (`#/$defs/X`, `#/definitions/X`) names."""
    schema = resolve_ref(schema, defs, hops=32)
    return schema if isinstance(schema, dict) else {}


def _raw_form(schema: dict[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """How a value of `schema` is written raw: the regexes its text matches, or the literals
    it may be; neither when it is JSON (a schema that takes other than strings, or strings
    that these regexes cannot hold)."""
    json_value: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
    if "enum" in schema or "const" in schema:
        values = schema["enum"] if "enum" in schema else [schema["const"]]
        extra = set(schema) - {"enum", "const", "type"}
        strings = [v for v in values if isinstance(v, str) and PARAMETER_CLOSE not in v]
        if extra or schema.get("type", "string") != "string" or len(strings) != len(values):
            return json_value
        return (), tuple(strings)
    if schema.get("type") != "string" or set(schema) - _RAW_STRING_KEYS:
        return json_value
    low, high = schema.get("minLength", 0), schema.get("maxLength")
    length = rf"[\s\S]{{{low},{'' if high is None else high}}}"
    if "pattern" not in schema:
        return (length,), ()
    pattern = _pattern_regex(schema["pattern"])
    return json_value if pattern is None else ((length, pattern), ())


def _pattern_regex(pattern: str) -> str | None:
    """A JSON schema `pattern` (a search, anchored by `^` / `$` at its ends or not at all) as
    a regex of the whole text, `/` escaped for Lark; None for other anchors, which Lark's
    regexes do not have."""
    start, end = pattern.startswith("^"), pattern.endswith("$") and not pattern.endswith("\\$")
    body = pattern[1 if start else 0 : len(pattern) - 1 if end else len(pattern)]
    bare = re.sub(r"\\.|\[(?:\\.|[^\]\\])*\]", "", body)  # escapes and classes left out
    if "^" in bare or "$" in bare:
        return None
    body = re.sub(r"(\\.)|/", lambda m: m.group(1) or r"\/", body)
    anywhere = r"[\s\S]*"
    return f"{'' if start else anywhere}(?:{body}){'' if end else anywhere}"


@lru_cache(maxsize=256)
def _tool_functions(tools_json: str) -> dict[str, Function]:
    functions = {}
    for tool in json.loads(tools_json):
        fn = tool.get("function") or {}
        params = fn.get("parameters")
        arguments = {"type": "object", "additionalProperties": False} if params is None else params
        try:
            functions[fn["name"]] = _function(fn["name"], normalize(arguments))
        except UnsupportedSchema:  # refused before any call (`structured.constraint_for`)
            continue
    return functions


def functions_of(tools: list[dict[str, Any]] | None) -> dict[str, Function]:
    """The request's tools by name, their parameters read as the grammar reads them."""
    if not tools:
        return {}
    return _tool_functions(json.dumps(tools, sort_keys=True))


# ----------------------------------------------------------------------------- the output


def opens_call(body: str) -> bool:
    """Whether a wrapper's body (after its opening tag and whitespace) is, or may still be,
    an XML call."""
    return body.startswith(FUNCTION_OPEN) or FUNCTION_OPEN.startswith(body)


def whole_calls(
    text: str, open_tag: str, close_tag: str, tools: list[dict[str, Any]] | None, space: str
) -> list[tuple[str, dict[str, Any]]] | None:
    """The calls (name, arguments) a whole reply of XML calls in `open_tag` ... `close_tag`
    holds, `space` around them; None when it is anything else (a call of an unknown tool or
    parameter, a value not of its form, text after the calls)."""
    calls, rest, cut = _parse(text, open_tag, close_tag, tools, space)
    return calls if calls and not rest and cut is None else None


def cut_calls(
    text: str, open_tag: str, close_tag: str, tools: list[dict[str, Any]] | None, space: str
) -> list[tuple[str, str]]:
    """The calls of a reply `max_tokens` cut (name, arguments as JSON text): the whole ones,
    then the cut one, if its name was whole, with the parameters written whole so far as a
    JSON object left open (not valid JSON, as a cut bare call's arguments)."""
    calls, _, cut = _parse(text, open_tag, close_tag, tools, space)
    out = [(name, compact(arguments)) for name, arguments in calls]
    if cut is not None:
        name, arguments, closed = cut
        out.append((name, compact(arguments) if closed else compact(arguments)[:-1]))
    return out


def compact(arguments: dict[str, Any]) -> str:
    """A call's arguments as the JSON text raydock's tool calls carry."""
    return json.dumps(arguments, separators=(",", ":"))


def _parse(
    text: str, open_tag: str, close_tag: str, tools: list[dict[str, Any]] | None, space: str
) -> tuple[list[tuple[str, dict[str, Any]]], str, tuple[str, dict[str, Any], bool] | None]:
    """The calls `text` holds, each `open_tag` XML call `close_tag` with `space` around: the
    whole ones as (name, arguments), what follows them, and the call that was cut (its name,
    the parameters written whole, and whether its function was closed: the text ends before
    or inside `close_tag`), if the text ends inside one after its name."""
    functions = functions_of(tools)
    calls: list[tuple[str, dict[str, Any]]] = []
    rest = text
    while rest.startswith(open_tag):
        body = rest[len(open_tag) :].lstrip(space)
        fn = next((f for f in functions.values() if body.startswith(_fn_open(f))), None)
        if fn is None:
            return calls, rest, None
        arguments, after, whole = _parameters(body[len(_fn_open(fn)) :], fn, space)
        if not whole:
            return calls, rest, (fn.name, arguments, False)
        after = after.lstrip(space)
        if not after.startswith(close_tag):  # cut before it or inside it, or astray
            return calls, rest, (fn.name, arguments, True) if close_tag.startswith(after) else None
        calls.append((fn.name, arguments))
        rest = after[len(close_tag) :].lstrip(space)
    return calls, rest, None


def _fn_open(fn: Function) -> str:
    return f"{FUNCTION_OPEN}{fn.name}>"


_DECODER = json.JSONDecoder()


def _parameters(text: str, fn: Function, space: str) -> tuple[dict[str, Any], str, bool]:
    """The parameters of `fn` at the start of `text` up to FUNCTION_CLOSE: (arguments, the
    text after FUNCTION_CLOSE, True), or (the parameters written whole, "", False) where the
    text ends or goes astray first."""
    arguments: dict[str, Any] = {}
    rest = text.lstrip(space)
    while not rest.startswith(FUNCTION_CLOSE):
        p = next((p for p in fn.parameters if rest.startswith(_param_open(p))), None)
        if p is None or p.name in arguments:
            return arguments, "", False
        value = rest[len(_param_open(p)) :]
        if not value.startswith("\n"):
            return arguments, "", False
        found = _value(value[1:], p)
        if found is None:
            return arguments, "", False
        arguments[p.name], rest = found[0], found[1].lstrip(space)
    return arguments, rest[len(FUNCTION_CLOSE) :], True


def _param_open(p: Parameter) -> str:
    return f"{PARAMETER_OPEN}{p.name}>"


def _value(text: str, p: Parameter) -> tuple[Any, str] | None:
    """A parameter's value at the start of `text` (after its opening newline) and the text
    after its PARAMETER_CLOSE; None when it is not whole."""
    closing = f"\n{PARAMETER_CLOSE}"
    if p.raw:  # raw text runs to the first closing tag (it holds none)
        end = text.find(PARAMETER_CLOSE)
        if end < 1 or text[end - 1] != "\n":
            return None
        return text[: end - 1], text[end + len(PARAMETER_CLOSE) :]
    try:  # JSON: its own end, not the next closing tag (a string may hold one)
        value, end = _DECODER.raw_decode(text)
    except json.JSONDecodeError:
        return None
    if not text[end:].startswith(closing):
        return None
    return value, text[end + len(closing) :]
