"""The previous JSON schema → regex path (outlines-core), kept only so that
benchmarks/guided_corpus.py measures old and new guided decoding in one run.

The regex is the whole contract between a `response_format` schema and the token masks, so
it is built to two rules:

* every text it fullmatches is JSON that validates against the schema (we emit a subset of
  the valid documents when the exact set cannot be written as a regex, and refuse with
  `UnsupportedSchema` when even a useful subset cannot be guaranteed);
* its language is finite and small, because the model may be weak or random: compact JSON
  (no whitespace), bounded digits, strings, arrays, free-form objects and nesting, so any
  walk through the automaton closes the document within a few hundred characters.

The dialect is the intersection of Python `re` and Rust regex-automata (what outlines-core
compiles): no lookaround, no backreferences, only non-capturing groups and explicit classes.
Every function returns a fragment with no top-level `|`, so fragments concatenate safely.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from decimal import Decimal
from fractions import Fraction
from re import _constants as _sre
from re import _parser as _sre_parse
from typing import Any
from urllib.parse import unquote

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError


class UnsupportedSchema(ValueError):
    """The schema uses `keyword` in a way raydock cannot enforce through a regex."""

    def __init__(self, keyword: str, message: str):
        super().__init__(message)
        self.keyword = keyword


class _RecursionLimit(UnsupportedSchema):
    """A $ref recursion (or a container-less ref/allOf cycle) ran past the depth limit.
    Callers that can leave the value out (optional property, anyOf branch, empty array)
    catch it and do so."""


class _Unsatisfiable(UnsupportedSchema):
    """No value satisfies this (sub)schema: `false`, an empty enum, min > max, ..."""


_DROPPABLE = (_RecursionLimit, _Unsatisfiable)


@dataclass(frozen=True)
class Bounds:
    """Limits used where the schema sets none (and caps where it sets huge ones)."""

    max_string: int = 48  # characters when no maxLength
    max_items: int = 6  # when no maxItems; halved for each enclosing array
    max_int_digits: int = 12
    max_frac_digits: int = 6
    max_depth: int = 6  # containers deep; beyond it optional properties are omitted
    max_free_keys: int = 4  # free-form objects ({"type": "object"} / json_object)


# --------------------------------------------------------------------------- keywords

ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "$schema",
        "$id",
        "$comment",
        "deprecated",
        "readOnly",
        "writeOnly",
        "$defs",
        "definitions",
        "$anchor",
        "$dynamicAnchor",
        "$vocabulary",
        "contentEncoding",
        "contentMediaType",
        "contentSchema",
    }
)
SUPPORTED = frozenset(
    {
        "type",
        "enum",
        "const",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "prefixItems",
        "minItems",
        "maxItems",
        "uniqueItems",
        "minLength",
        "maxLength",
        "pattern",
        "format",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "anyOf",
        "oneOf",
        "allOf",
        "$ref",
    }
)
REFUSED = frozenset(
    {
        "not",
        "if",
        "then",
        "else",
        "dependentRequired",
        "dependentSchemas",
        "dependencies",
        "patternProperties",
        "propertyNames",
        "minProperties",
        "maxProperties",
        "contains",
        "minContains",
        "maxContains",
        "unevaluatedProperties",
        "unevaluatedItems",
        "multipleOf",
        "$dynamicRef",
        "$recursiveRef",
    }
)
# Keywords that constrain the instance (the rest are annotations or vendor extensions,
# which validators ignore, so we may ignore them too).
_CONSTRAINTS = SUPPORTED | REFUSED
_TYPES = ("null", "boolean", "object", "array", "number", "integer", "string")

# --------------------------------------------------------------------------- primitives

# One character of a JSON string: anything but quote, backslash and controls, or a short
# escape. \u escapes are left out: they would let a random walk spell surrogates.
_CHAR = r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt])'
_CHAR_NO_NEWLINE = r'(?:[^"\\\x00-\x1f]|\\["\\/bfrt])'  # Python's "." in a pattern
# outlines-core builds its DFA with an unanchored start too (regex-automata's default), and
# determinizing that blows up when text inside a long string can restart the whole regex:
# every restart is a live thread with its own counters. So free-form strings and keys (those
# of untyped values: json_object, {"type": "object"}, ...) leave out raw "{" and "[", and a
# document that may itself be a string leaves out the \" escape (see _Compiler.quote).
_FREE_CHAR = r'(?:[^"\\\x00-\x1f{\[]|\\["\\/bfnrt])'
_NO_QUOTE = {  # the same without \"
    _CHAR: r'(?:[^"\\\x00-\x1f]|\\[\\/bfnrt])',
    _CHAR_NO_NEWLINE: r'(?:[^"\\\x00-\x1f]|\\[\\/bfrt])',
    _FREE_CHAR: r'(?:[^"\\\x00-\x1f{\[]|\\[\\/bfnrt])',
}
_NULL = "null"
_BOOLEAN = "(?:true|false)"

_META = set(r"\.+*?()|[]{}^$#&-~")  # Rust's escapable metacharacters (Python accepts them)
_JSON_ESCAPES = {  # decoded char -> regex for its JSON spelling
    0x22: r"\\\"",
    0x5C: r"\\\\",
    0x08: r"\\b",
    0x09: r"\\t",
    0x0A: r"\\n",
    0x0C: r"\\f",
    0x0D: r"\\r",
}


def _escape_char(c: str) -> str:
    if c in _META:
        return "\\" + c
    if ord(c) < 0x20 or ord(c) == 0x7F:
        return f"\\x{ord(c):02x}"
    return c


def _escape(text: str) -> str:
    """A regex matching exactly `text` (both dialects)."""
    return "".join(_escape_char(c) for c in text)


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _alt(parts: list[str]) -> str:
    unique = list(dict.fromkeys(parts))
    return unique[0] if len(unique) == 1 else "(?:" + "|".join(unique) + ")"


def _count(lo: int, hi: int) -> str:
    if lo == hi:
        return "" if lo == 1 else f"{{{lo}}}"
    return f"{{{lo},{hi}}}"


def _quoted(char: str, lo: int, hi: int) -> str:
    """A JSON string of lo..hi characters."""
    return '"' + ("" if hi == 0 else char + _count(lo, hi)) + '"'


def _list(item: str, lo: int, hi: int) -> str:
    """lo..hi comma-separated copies of `item` (no brackets)."""
    if hi == 0:
        return ""
    if lo == 0:
        return f"(?:{_list(item, 1, hi)})?"
    tail = f"(?:,{item}){_count(lo - 1, hi - 1)}" if hi > 1 else ""
    return item + tail


# --------------------------------------------------------------------------- integers


def _digit_class(a: int, b: int) -> str:
    return str(a) if a == b else f"[{a}-{b}]"


def _digits(n: int) -> str:
    return "" if n == 0 else "[0-9]" + _count(n, n)


def _same_length(lo: str, hi: str) -> list[str]:
    """Digit strings of len(lo) between lo and hi (leading zeros allowed: the caller makes
    sure lo has none when they matter)."""
    if lo == hi:
        return [lo]
    if len(lo) == 1:
        return [_digit_class(int(lo), int(hi))]
    if lo[0] == hi[0]:
        return [lo[0] + _alt(_same_length(lo[1:], hi[1:]))]
    rest = len(lo) - 1
    first, last = int(lo[0]), int(hi[0])
    out = []
    if lo[1:] != "0" * rest:  # lo's leading digit, with the rest from lo up to 99..9
        out.append(lo[0] + _alt(_same_length(lo[1:], "9" * rest)))
        first += 1
    tail = []
    if hi[1:] != "9" * rest:  # hi's leading digit, with the rest from 00..0 up to hi
        tail.append(hi[0] + _alt(_same_length("0" * rest, hi[1:])))
        last -= 1
    if first <= last:  # whole decades in between
        out.append(_digit_class(first, last) + _digits(rest))
    return out + tail


def _nonneg_range(a: int, b: int) -> list[str]:
    """Alternatives for the integers a..b (0 <= a <= b), no leading zeros."""
    out: list[str] = []
    full: list[int] = []  # runs of whole digit-lengths collapse into [1-9][0-9]{m,n}

    def flush() -> None:
        if full:
            out.append("[1-9][0-9]" + _count(full[0] - 1, full[-1] - 1))
            full.clear()

    for n in range(len(str(a)), len(str(b)) + 1):
        seg_lo, seg_hi = max(a, 10 ** (n - 1) if n > 1 else 0), min(b, 10**n - 1)
        if n > 1 and seg_lo == 10 ** (n - 1) and seg_hi == 10**n - 1:
            full.append(n)
            continue
        flush()
        out.extend(_same_length(str(seg_lo), str(seg_hi)))
    flush()
    return out


def integer_range_regex(lo: int, hi: int) -> str:
    """Regex for the decimal integers lo..hi inclusive (canonical: no "+", "-0" or 007)."""
    if lo > hi:
        raise ValueError(f"empty range {lo}..{hi}")
    alts = []
    if lo < 0:
        alts.append("-" + _alt(_nonneg_range(max(1, -hi), -lo)))
    if hi >= 0:
        alts.extend(_nonneg_range(max(lo, 0), hi))
    return _alt(alts)


def _window(lo: Fraction | None, hi: Fraction | None, digits: int):
    """Close open sides and clamp huge ranges so literals stay within ~`digits` digits."""
    lim = 10**digits - 1
    if lo is None:
        lo = Fraction(min(-lim, math.floor(hi) - lim)) if hi is not None else Fraction(-lim)
    if hi is None:
        hi = Fraction(max(lim, math.ceil(lo) + lim))
    return max(lo, min(hi, 0) - lim), min(hi, max(lo, 0) + lim)


def _fraction_digits(glo: Fraction, glo_ex: bool, ghi: Fraction, ghi_ex: bool, n: int):
    """Digits f (1..n of them) after the point with glo <= 0.f <= ghi (or <), 0 < 0.f < 1."""
    alts = []
    for length in range(1, n + 1):
        scale = 10**length
        k_lo = math.floor(glo * scale) + 1 if glo_ex else math.ceil(glo * scale)
        k_hi = math.ceil(ghi * scale) - 1 if ghi_ex else math.floor(ghi * scale)
        k_lo, k_hi = max(k_lo, 1), min(k_hi, scale - 1)
        if k_lo <= k_hi:
            alts.append(_alt(_same_length(str(k_lo).zfill(length), str(k_hi).zfill(length))))
    return alts


def _fraction_literals(lo, lo_ex, hi, hi_ex, frac_digits: int) -> list[str]:
    """Non-negative literals "P.f" (f ≠ 0, so P < value < P+1) inside the bounds."""
    # ≤ 15 significant digits in all: such decimals map to distinct doubles in order, so
    # comparisons jsonschema makes on the parsed float agree with our exact ones.
    p_max = 10 ** (15 - frac_digits) - 1
    if hi <= 0:
        return []
    alts = []
    i_lo, i_hi = max(0, math.ceil(lo)), min(p_max, math.floor(hi) - 1)
    if i_lo <= i_hi:  # lo <= P and P+1 <= hi: every fraction is fine
        alts.append(integer_range_regex(i_lo, i_hi) + rf"\.[0-9]{{0,{frac_digits - 1}}}[1-9]")
    for p in sorted({max(0, math.floor(lo)), math.ceil(hi) - 1}):
        if i_lo <= p <= i_hi or not 0 <= p <= p_max:
            continue
        glo, glo_ex = (lo - p, lo_ex) if lo > p else (Fraction(0), True)
        ghi, ghi_ex = (hi - p, hi_ex) if hi < p + 1 else (Fraction(1), True)
        fracs = _fraction_digits(glo, glo_ex, ghi, ghi_ex, frac_digits)
        if fracs:
            alts.append(rf"{p}\." + _alt(fracs))
    return alts


def number_range_regex(lo, lo_ex: bool, hi, hi_ex: bool, bounds: Bounds = Bounds()) -> str:
    """Regex for JSON numbers (no exponent) within exact rational bounds (None: open)."""
    lo, hi = _window(lo, hi, bounds.max_int_digits)
    alts = []
    a = math.floor(lo) + 1 if lo_ex else math.ceil(lo)
    b = math.ceil(hi) - 1 if hi_ex else math.floor(hi)
    if a <= b:
        alts.append(integer_range_regex(a, b))
    alts += _fraction_literals(lo, lo_ex, hi, hi_ex, bounds.max_frac_digits)
    negative = _fraction_literals(-hi, hi_ex, -lo, lo_ex, bounds.max_frac_digits)
    if negative:
        alts.append("-" + _alt(negative))
    if not alts:
        raise _Unsatisfiable("minimum", f"no number lies between {lo} and {hi}")
    return _alt(alts)


# --------------------------------------------------------------------------- string formats

_DAY = "(?:0[1-9]|1[0-9]|2[0-8])"  # 29-31 left out so every date exists
_DATE = rf"(?:19|20)[0-9]{{2}}-(?:0[1-9]|1[0-2])-{_DAY}"
_HOUR = "(?:[01][0-9]|2[0-3])"
_TIME = rf"{_HOUR}:[0-5][0-9]:[0-5][0-9](?:\.[0-9]{{1,6}})?(?:Z|[+\-]{_HOUR}:[0-5][0-9])"
_OCTET = integer_range_regex(0, 255)
# format: (regex inside the quotes, min length, max length)
FORMATS = {
    "date": (_DATE, 10, 10),
    "time": (_TIME, 9, 21),
    "date-time": (_DATE + "T" + _TIME, 20, 32),
    "email": (
        r"[a-z0-9]{1,16}(?:\.[a-z0-9]{1,8})?@[a-z0-9]{1,16}(?:\-[a-z0-9]{1,8})?\.[a-z]{2,6}",
        6,
        58,
    ),
    "uuid": (r"[0-9a-f]{8}\-[0-9a-f]{4}\-[0-9a-f]{4}\-[0-9a-f]{4}\-[0-9a-f]{12}", 36, 36),
    "ipv4": (rf"{_OCTET}(?:\.{_OCTET}){{3}}", 7, 15),
}


# --------------------------------------------------------------------------- patterns
#
# A user's `pattern` is parsed with Python's own parser (jsonschema validates with Python
# `re.search`) into a small tree, then re-emitted: every character matcher is rewritten to
# the JSON spelling of the characters it accepts, unbounded repeats get a cap, and the
# result sits inside the quotes. Matching the whole string is a subset of `re.search`.

_AT_START = {_sre.AT_BEGINNING, _sre.AT_BEGINNING_STRING}
_AT_END = {_sre.AT_END, _sre.AT_END_STRING}
_CATEGORIES = {
    _sre.CATEGORY_DIGIT: r"\d",
    _sre.CATEGORY_NOT_DIGIT: r"\D",
    _sre.CATEGORY_SPACE: r"\s",
    _sre.CATEGORY_NOT_SPACE: r"\S",
    _sre.CATEGORY_WORD: r"\w",
    _sre.CATEGORY_NOT_WORD: r"\W",
}
# Characters a class is tested against: printable ASCII plus the escapable controls.
# (Negated classes and categories are thus limited to ASCII, a safe subset.)
_UNIVERSE = [*range(0x20, 0x7F), 0x08, 0x09, 0x0A, 0x0C, 0x0D]


def _py_char(c: int) -> str:
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}" if c < 0x10000 else f"\\U{c:08x}"


def _class_regex(codes: set[int], extra: list[tuple[int, int]]) -> str | None:
    """Regex for the JSON spelling of one character out of `codes` ∪ `extra` ranges."""
    plain = sorted(c for c in codes if 0x20 <= c < 0x7F and c not in _JSON_ESCAPES)
    ranges: list[tuple[int, int]] = []
    for c in plain:
        if ranges and ranges[-1][1] == c - 1:
            ranges[-1] = (ranges[-1][0], c)
        else:
            ranges.append((c, c))
    ranges += extra
    alts = []
    if len(ranges) == 1 and ranges[0][0] == ranges[0][1]:
        alts.append(_escape_char(chr(ranges[0][0])))
    elif ranges:
        body = "".join(
            _escape_char(chr(a)) + ("" if a == b else "-" + _escape_char(chr(b))) for a, b in ranges
        )
        alts.append(f"[{body}]")
    alts += [_JSON_ESCAPES[c] for c in sorted(codes) if c in _JSON_ESCAPES]
    return _alt(alts) if alts else None


def _non_ascii(a: int, b: int) -> list[tuple[int, int]]:
    """The part of a..b that may be written raw (not ASCII, not a surrogate)."""
    out = []
    for lo, hi in ((max(a, 0x80), min(b, 0xD7FF)), (max(a, 0xE000), b)):
        if lo <= hi:
            out.append((lo, hi))
    return out


def _char_set(op, av, flags: int, quote: bool = True) -> str:
    """Regex for a class / negated literal, decided by Python's own matcher (`quote`
    False: leaving '"' out)."""
    if op is _sre.NOT_LITERAL:
        items, negated = [(_sre.LITERAL, av)], True
    else:
        negated = bool(av) and av[0][0] is _sre.NEGATE
        items = av[1:] if negated else av
    text, extra = [], []
    for kind, value in items:
        if kind is _sre.LITERAL:
            text.append(_py_char(value))
            extra += _non_ascii(value, value)
        elif kind is _sre.RANGE:
            text.append(_py_char(value[0]) + "-" + _py_char(value[1]))
            extra += _non_ascii(*value)
        elif kind is _sre.CATEGORY:
            text.append(_CATEGORIES[value])
        else:
            raise UnsupportedSchema("pattern", f"unsupported class item {kind}")
    test = re.compile("[" + ("^" if negated else "") + "".join(text) + "]", flags)
    codes = {c for c in _UNIVERSE if test.fullmatch(chr(c)) and (quote or c != 0x22)}
    regex = _class_regex(codes, [] if negated else extra)
    if regex is None:
        raise UnsupportedSchema("pattern", "a character class has no JSON-writable character")
    return regex


def _json_literal(c: int) -> str:
    if c in _JSON_ESCAPES:
        return _JSON_ESCAPES[c]
    if c < 0x20 or 0xD800 <= c <= 0xDFFF:
        raise UnsupportedSchema("pattern", f"character {c:#x} needs a \\u escape")
    return _escape_char(chr(c))


# Pattern tree: ("chars", regex) | ("seq", [nodes]) | ("alt", [nodes]) | ("rep", lo, hi, node)
# (hi None: unbounded).


def _convert(sub, flags: int, first: bool, last: bool, quote: bool = True):
    items = list(sub)
    nodes = []
    for i, (op, av) in enumerate(items):
        starts = first and all(o is _sre.AT for o, _ in items[:i])
        ends = last and all(o is _sre.AT for o, _ in items[i + 1 :])
        if op is _sre.AT:
            if (av in _AT_START and starts) or (av in _AT_END and ends):
                continue
            raise UnsupportedSchema("pattern", "anchors or \\b inside a pattern")
        if op is _sre.LITERAL:
            nodes.append(("chars", _json_literal(av)))
        elif op is _sre.ANY:
            nodes.append(("chars", _CHAR_NO_NEWLINE if quote else _NO_QUOTE[_CHAR_NO_NEWLINE]))
        elif op in (_sre.IN, _sre.NOT_LITERAL):
            class_flags = flags & (re.IGNORECASE | re.ASCII)
            nodes.append(("chars", _char_set(op, av, class_flags, quote)))
        elif op is _sre.BRANCH:
            nodes.append(("alt", [_convert(b, flags, starts, ends, quote) for b in av[1]]))
        elif op is _sre.SUBPATTERN:
            _, add, remove, body = av
            nodes.append(_convert(body, (flags | add) & ~remove, starts, ends, quote))
        elif op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT):
            lo, hi, body = av
            hi = None if hi == _sre.MAXREPEAT else hi
            nodes.append(("rep", lo, hi, _convert(body, flags, False, False, quote)))
        elif op in (_sre.ASSERT, _sre.ASSERT_NOT):
            raise UnsupportedSchema("pattern", "lookaround assertions cannot be enforced")
        elif op in (_sre.GROUPREF, _sre.GROUPREF_EXISTS):
            raise UnsupportedSchema("pattern", "backreferences cannot be enforced")
        else:
            raise UnsupportedSchema("pattern", f"regex construct {op} is not supported")
    return nodes[0] if len(nodes) == 1 else ("seq", nodes)


def _rep_hi(lo: int, hi: int | None, cap: int) -> int:
    """Upper count a repeat gets: its own, but never above max(lo, cap)."""
    return max(lo, cap) if hi is None else min(hi, max(lo, cap))


def _width(node, cap: int) -> tuple[int, int]:
    kind = node[0]
    if kind == "chars":
        return 1, 1
    if kind == "rep":
        _, lo, hi, body = node
        a, b = _width(body, cap)
        return a * lo, b * _rep_hi(lo, hi, cap)
    widths = [_width(n, cap) for n in node[1]]
    if kind == "seq":
        return sum(w[0] for w in widths), sum(w[1] for w in widths)
    return min(w[0] for w in widths), max(w[1] for w in widths)


def _emit(node, cap: int) -> str:
    kind = node[0]
    if kind == "chars":
        return node[1]
    if kind == "seq":
        return "".join(_emit(n, cap) for n in node[1])
    if kind == "alt":
        return _alt([_emit(n, cap) for n in node[1]])
    _, lo, hi, body = node
    top = _rep_hi(lo, hi, cap)
    if top == 0:
        return ""
    inner = _emit(body, cap)
    return f"(?:{inner}){'?' if (lo, top) == (0, 1) else _count(lo, top)}"


def _tighten(node, min_len: int, max_len: int, cap: int):
    """Narrow the counts of top-level single-character repeats towards min_len..max_len
    (a subset of the pattern's language)."""
    items = list(node[1]) if node[0] == "seq" else [node]
    for i, item in enumerate(items):
        if item[0] != "rep" or _width(item[3], cap) != (1, 1):
            continue
        lo, hi = item[1], _rep_hi(item[1], item[2], cap)
        total_lo, total_hi = _width(("seq", items), cap)
        if total_lo < min_len:
            lo = min(lo + min_len - total_lo, hi if item[2] is None else item[2])
            hi = max(hi, lo)
        if total_hi > max_len:
            hi = max(lo, hi - (total_hi - max_len))
        items[i] = ("rep", lo, hi, item[3])
    return ("seq", items)


def pattern_regex(
    pattern: str, min_len: int, max_len: int | None, bounds: Bounds, quote: bool = True
) -> str:
    """Regex (inside the quotes) for strings matching `pattern` within the length bounds
    (`quote` False: no '"' from classes and ".")."""
    try:
        parsed = _sre_parse.parse(pattern)
    except re.error as exc:
        raise UnsupportedSchema("pattern", f"invalid pattern {pattern!r}: {exc}") from None
    tree = _convert(parsed, parsed.state.flags, True, True, quote)
    limit = max_len if max_len is not None else max(bounds.max_string, min_len)
    cap = next((c for c in range(bounds.max_string, 0, -1) if _width(tree, c)[1] <= limit), 1)
    lo, hi = _width(tree, cap)
    if lo < min_len or (max_len is not None and hi > max_len):
        tree = _tighten(tree, min_len, limit, cap)
        lo, hi = _width(tree, cap)
    if lo < min_len:
        raise UnsupportedSchema("minLength", f"cannot combine pattern {pattern!r} with minLength")
    if max_len is not None and hi > max_len:
        raise UnsupportedSchema("maxLength", f"cannot combine pattern {pattern!r} with maxLength")
    return _emit(tree, cap)


# --------------------------------------------------------------------------- oneOf helpers
#
# What a schema accepts, coarsely: None (anything), ("types", {...}) or ("values", [...]).
# Two oneOf branches are exclusive when the intersection is provably empty.


def _canon(v: Any):
    if isinstance(v, bool) or v is None:
        return ("b", v)
    if isinstance(v, int | float):
        return ("n", v)
    if isinstance(v, list):
        return ("l", tuple(_canon(x) for x in v))
    if isinstance(v, dict):
        return ("d", frozenset((k, _canon(x)) for k, x in v.items()))
    return ("s", v)


def _json_type(v: Any) -> str:
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer()):
        return "integer"
    if isinstance(v, float):
        return "number"
    return {str: "string", type(None): "null", list: "array", dict: "object"}[type(v)]


def _type_set(t) -> frozenset[str]:
    names = set([t] if isinstance(t, str) else t)
    if "number" in names:
        names.add("integer")  # every integer is a number
    return frozenset(names)


def _intersect(a, b):
    if a is None or b is None:
        return b if a is None else a
    if a[0] == "types" and b[0] == "types":
        return ("types", a[1] & b[1])
    if a[0] == "types":
        a, b = b, a
    if b[0] == "types":
        return ("values", [v for v in a[1] if _json_type(v) in b[1]])
    keep = {_canon(v) for v in b[1]}
    return ("values", [v for v in a[1] if _canon(v) in keep])


def _union(accs):
    if any(a is None for a in accs):
        return None
    if all(a[0] == "values" for a in accs):
        return ("values", [v for a in accs for v in a[1]])
    types: set[str] = set()
    for a in accs:
        types |= a[1] if a[0] == "types" else {_json_type(v) for v in a[1]}
    return ("types", frozenset(types))


# --------------------------------------------------------------------------- compiler


@dataclass(frozen=True)
class _Ctx:
    depth: int = 0  # enclosing objects/arrays
    arrays: int = 0  # enclosing arrays (each halves the default item cap)
    refs: tuple[str, ...] = ()  # $refs being expanded
    hops: int = 0  # $ref/allOf/anyOf expansions since the last container

    def enter(self, array: bool = False) -> _Ctx:
        return replace(self, depth=self.depth + 1, arrays=self.arrays + array, hops=0)


_MAX_HOPS = 32


class _Compiler:
    def __init__(self, root: dict | bool, bounds: Bounds, quote: bool = True):
        self.root = root
        self.b = bounds
        self.quote = quote  # False: strings never spell the \" escape (see _FREE_CHAR)
        self.top_string = False  # set when the document itself may be a free-text string
        self._validator = None
        self._generic: dict[int, str] = {}

    def char(self, char: str) -> str:
        """`char` (one of _NO_QUOTE's keys), without \" when self.quote is False."""
        return char if self.quote else _NO_QUOTE[char]

    # -- dispatch --------------------------------------------------------------------

    def compile(self, schema: Any, ctx: _Ctx) -> str:
        if schema is True:
            return self.any_value(ctx)
        if schema is False:
            raise _Unsatisfiable("false", "the schema `false` accepts no value")
        if not isinstance(schema, dict):
            raise UnsupportedSchema("type", f"a schema must be an object, not {schema!r}")
        if "enum" in schema or "const" in schema:
            return self.enum(schema)  # exact whatever else is there: values are filtered
        for key in schema:
            if key in REFUSED:
                raise UnsupportedSchema(key, f"'{key}' cannot be enforced by a regex")
        if "$ref" in schema:
            return self.ref(schema, ctx)
        if "allOf" in schema:
            return self.all_of(schema, ctx)
        if "anyOf" in schema or "oneOf" in schema:
            return self.choice(schema, ctx, "anyOf" if "anyOf" in schema else "oneOf")
        types = self.types(schema)
        if types is None:
            return self.any_value(ctx)
        kinds = {
            "null": lambda s, c: _NULL,
            "boolean": lambda s, c: _BOOLEAN,
            "integer": self.integer,
            "number": self.number,
            "string": self.string,
            "object": self.object,
            "array": self.array,
        }
        alts, error = [], None
        for t in types:
            try:
                alts.append(kinds[t](schema, ctx))
            except _DROPPABLE as exc:
                error = error or exc
        if not alts:
            raise error
        return _alt(alts)

    def types(self, schema: dict) -> list[str] | None:
        """The instance types to generate; None means any JSON value."""
        t = schema.get("type")
        if t is not None:
            names = [t] if isinstance(t, str) else list(t)
            for name in names:
                if name not in _TYPES:
                    raise UnsupportedSchema("type", f"unknown type {name!r}")
            if not names:
                raise _Unsatisfiable("type", "empty type list")
            if "number" in names and "integer" in names:
                names.remove("integer")  # number already covers it
            return names
        inferred = [  # no type: generate what the present keywords talk about
            kind
            for kind, keys in (
                ("object", ("properties", "required", "additionalProperties")),
                ("array", ("items", "prefixItems", "minItems", "maxItems", "uniqueItems")),
                ("string", ("minLength", "maxLength", "pattern", "format")),
                ("number", ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")),
            )
            if any(k in schema for k in keys)
        ]
        return inferred or None

    # -- references and combinators ----------------------------------------------------

    def resolve(self, ref: Any) -> Any:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise UnsupportedSchema("$ref", f"only local '#/...' references work, not {ref!r}")
        fragment = unquote(ref[1:])
        if not fragment:
            return self.root
        if not fragment.startswith("/"):
            raise UnsupportedSchema("$ref", f"anchor references ({ref!r}) are not supported")
        node = self.root
        for part in fragment[1:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise UnsupportedSchema("$ref", f"{ref!r} does not resolve inside the schema")
        return node

    def _hop(self, ctx: _Ctx, keyword: str) -> _Ctx:
        if ctx.hops >= _MAX_HOPS:
            raise _RecursionLimit(keyword, f"'{keyword}' expansions loop without nesting")
        return replace(ctx, hops=ctx.hops + 1)

    def ref(self, schema: dict, ctx: _Ctx) -> str:
        ref = schema["$ref"]
        target = self.resolve(ref)
        if ref in ctx.refs and (
            ctx.depth > self.b.max_depth or ctx.refs.count(ref) > 4 * self.b.max_depth
        ):
            raise _RecursionLimit(
                "$ref", f"{ref} is required to recurse deeper than max_depth={self.b.max_depth}"
            )
        siblings = {k: v for k, v in schema.items() if k != "$ref" and k in _CONSTRAINTS}
        sub = self.merge(target, siblings, "$ref") if siblings else target
        ctx = self._hop(ctx, "$ref")
        return self.compile(sub, replace(ctx, refs=(*ctx.refs, ref)))

    def all_of(self, schema: dict, ctx: _Ctx) -> str:
        parts = schema["allOf"]
        if not isinstance(parts, list) or not parts:
            raise UnsupportedSchema("allOf", "allOf must be a non-empty list")
        merged: Any = {k: v for k, v in schema.items() if k != "allOf"}
        for part in parts:
            merged = self.merge(merged, part, "allOf")
        return self.compile(merged, self._hop(ctx, "allOf"))

    def choice(self, schema: dict, ctx: _Ctx, key: str) -> str:
        branches = schema[key]
        if not isinstance(branches, list) or not branches:
            raise UnsupportedSchema(key, f"{key} must be a non-empty list")
        siblings = {k: v for k, v in schema.items() if k != key and k in _CONSTRAINTS}
        merged = []
        for branch in branches:  # the siblings hold for every branch: fold them in
            try:
                merged.append(self.merge(siblings, branch, key) if siblings else branch)
            except _Unsatisfiable:
                merged.append(None)  # no instance can take this branch
        if key == "oneOf":
            live = [(i, m) for i, m in enumerate(merged) if m is not None]
            for n, (i, a) in enumerate(live):
                for j, b in live[n + 1 :]:
                    if not self.exclusive(a, b):
                        raise UnsupportedSchema(
                            "oneOf", f"oneOf branches {i} and {j} may both match one value"
                        )
        alts, error = [], None
        inner = self._hop(ctx, key)
        for branch in merged:
            if branch is None:
                continue
            try:
                alts.append(self.compile(branch, inner))
            except _DROPPABLE as exc:  # a too-deep or empty branch: the others remain
                error = error or exc
        if not alts:
            raise error or _Unsatisfiable(key, f"no {key} branch can be satisfied")
        return _alt(alts)

    # -- allOf / sibling merging (an intersection of simple schemas) -------------------

    def deref(self, schema: Any, keyword: str, fuel: int = _MAX_HOPS) -> Any:
        while isinstance(schema, dict) and "$ref" in schema:
            if fuel <= 0:
                raise _RecursionLimit("$ref", "$ref chain loops")
            target = self.resolve(schema["$ref"])
            rest = {k: v for k, v in schema.items() if k != "$ref" and k in _CONSTRAINTS}
            schema = self.merge(target, rest, keyword, fuel - 1) if rest else target
            fuel -= 1
        return schema

    def merge(self, a: Any, b: Any, keyword: str, fuel: int = _MAX_HOPS) -> Any:
        """A schema accepting exactly what both accept (or UnsupportedSchema(keyword))."""
        if fuel <= 0:
            raise _RecursionLimit(keyword, f"'{keyword}' nests too deeply")
        a, b = self.deref(a, keyword, fuel - 1), self.deref(b, keyword, fuel - 1)
        if a is False or b is False:
            raise _Unsatisfiable(keyword, "one side is `false`")
        if not isinstance(a, dict) or not isinstance(b, dict):
            return b if a is True else a
        out = dict(a)
        for key, value in b.items():
            if key not in out:
                out[key] = value
            elif out[key] != value and key in _CONSTRAINTS:
                out[key] = self._merge_keyword(key, out[key], value, keyword, fuel - 1)
        self._merge_additional(out, a, b, keyword, fuel - 1)
        return out

    def _merge_keyword(self, key: str, x: Any, y: Any, keyword: str, fuel: int) -> Any:
        if key == "type":
            tx, ty = _type_set(x), _type_set(y)
            names = [t for t in _TYPES if t in tx and t in ty]
            if not names:
                raise _Unsatisfiable(keyword, f"types {x} and {y} do not overlap")
            return names
        if key == "required":
            return list(x) + [n for n in y if n not in x]
        if key == "properties":
            out = dict(x)
            for name, sub in y.items():
                out[name] = self.merge(out[name], sub, keyword, fuel) if name in out else sub
            return out
        if key in ("minimum", "exclusiveMinimum", "minLength", "minItems"):
            return max(x, y)
        if key in ("maximum", "exclusiveMaximum", "maxLength", "maxItems"):
            return min(x, y)
        if key == "enum":
            keep = {_canon(v) for v in y}
            values = [v for v in x if _canon(v) in keep]
            if not values:
                raise _Unsatisfiable(keyword, "the enums do not overlap")
            return values
        if key == "const":
            raise _Unsatisfiable(keyword, f"const {x!r} and {y!r} differ")
        if key == "allOf":
            return list(x) + list(y)
        if key == "uniqueItems":
            return bool(x or y)
        if key in ("items", "additionalProperties"):
            if x is False or y is False:
                return False
            return self.merge(x, y, keyword, fuel)
        raise UnsupportedSchema(keyword, f"cannot intersect two different '{key}' values")

    def _merge_additional(self, out: dict, a: dict, b: dict, keyword: str, fuel: int) -> None:
        """Properties one side declares fall under the other side's additionalProperties."""
        for own, other in ((a, b), (b, a)):
            extra = own.get("additionalProperties", True)
            names = [n for n in other.get("properties", {}) if n not in own.get("properties", {})]
            if extra is True or not names:
                continue
            props = out["properties"] = dict(out["properties"])
            for name in names:
                if extra is False:
                    if name in out.get("required", []):
                        raise _Unsatisfiable(keyword, f"'{name}' is both required and forbidden")
                    del props[name]
                else:
                    props[name] = self.merge(props[name], extra, keyword, fuel)

    # -- oneOf exclusivity ---------------------------------------------------------------

    def accepts(self, schema: Any, depth: int = 0):
        if depth > 16 or schema is True or not isinstance(schema, dict | bool):
            return None
        if schema is False:
            return ("values", [])
        acc = None
        if "$ref" in schema:
            acc = self.accepts(self.resolve(schema["$ref"]), depth + 1)
        if "const" in schema:
            acc = _intersect(acc, ("values", [schema["const"]]))
        if isinstance(schema.get("enum"), list):
            acc = _intersect(acc, ("values", schema["enum"]))
        if "type" in schema:
            acc = _intersect(acc, ("types", _type_set(schema["type"])))
        for sub in schema.get("allOf", []):
            acc = _intersect(acc, self.accepts(sub, depth + 1))
        for key in ("anyOf", "oneOf"):
            if isinstance(schema.get(key), list):
                acc = _intersect(acc, _union([self.accepts(s, depth + 1) for s in schema[key]]))
        return acc

    def exclusive(self, a: Any, b: Any, depth: int = 0) -> bool:
        """True when no value can satisfy both schemas (as far as we can prove)."""
        both = _intersect(self.accepts(a), self.accepts(b))
        if both is not None and not both[1]:
            return True
        if depth > 4:
            return False
        # objects told apart by a required property (a discriminator)
        try:
            a, b = self.deref(a, "oneOf"), self.deref(b, "oneOf")
        except UnsupportedSchema:
            return False
        if not (self._plain_object(a) and self._plain_object(b)):
            return False
        pa, pb = a.get("properties", {}), b.get("properties", {})
        common = [n for n in a.get("required", []) if n in b.get("required", [])]
        return any(n in pa and n in pb and self.exclusive(pa[n], pb[n], depth + 1) for n in common)

    @staticmethod
    def _plain_object(s: Any) -> bool:
        """Compiles to objects only, whose properties/required apply as written."""
        return (
            isinstance(s, dict)
            and s.get("type", "object") in ("object", ["object"])
            and "properties" in s
            and not any(k in s for k in ("anyOf", "oneOf", "allOf", "enum", "const"))
        )

    # -- values ----------------------------------------------------------------------

    def enum(self, schema: dict) -> str:
        values = [schema["const"]] if "const" in schema else schema["enum"]
        if not isinstance(values, list):
            raise UnsupportedSchema("enum", "enum must be a list")
        if self._validator is None:
            self._validator = Draft202012Validator(
                self.root, format_checker=Draft202012Validator.FORMAT_CHECKER
            )
        check = self._validator.evolve(schema=schema)  # keeps the root for $ref
        try:  # any other keyword is enforced exactly by keeping only the valid values
            kept = [v for v in values if check.is_valid(v)]
        except Exception as exc:  # an unresolvable $ref and the like
            raise UnsupportedSchema("$ref", f"cannot check enum values: {exc}") from None
        if not kept:
            key = "const" if "const" in schema else "enum"
            raise _Unsatisfiable(key, f"no {key} value satisfies the rest of the schema")
        return _alt([_escape(_dump(v)) for v in kept])

    def _bound(self, schema: dict, key: str, integer: bool) -> Fraction | None:
        value = schema.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UnsupportedSchema(key, f"'{key}' must be a number")
        if isinstance(value, int) or value.is_integer():
            return Fraction(int(value))
        if integer:  # integers compare exactly against the float
            return Fraction(value)
        # Numbers: exact decimal reasoning is sound only for short decimals (see
        # _fraction_literals); longer ones cannot be enforced exactly.
        exact = Decimal(repr(value))
        digits = exact.as_tuple()
        if -digits.exponent > self.b.max_frac_digits or len(digits.digits) > 15:
            raise UnsupportedSchema(key, f"cannot enforce the fractional bound {key}={value}")
        return Fraction(exact)

    def _range(self, schema: dict, integer: bool):
        """(lo, lo_exclusive, hi, hi_exclusive) from the four bound keywords."""
        lo, lo_ex = self._bound(schema, "minimum", integer), False
        xlo = self._bound(schema, "exclusiveMinimum", integer)
        if xlo is not None and (lo is None or xlo >= lo):
            lo, lo_ex = xlo, True
        hi, hi_ex = self._bound(schema, "maximum", integer), False
        xhi = self._bound(schema, "exclusiveMaximum", integer)
        if xhi is not None and (hi is None or xhi <= hi):
            hi, hi_ex = xhi, True
        return lo, lo_ex, hi, hi_ex

    def integer(self, schema: dict, ctx: _Ctx) -> str:
        lo, lo_ex, hi, hi_ex = self._range(schema, integer=True)
        if schema.get("format") == "int32":
            lo = max(lo, Fraction(-(2**31))) if lo is not None else Fraction(-(2**31))
            hi = min(hi, Fraction(2**31 - 1)) if hi is not None else Fraction(2**31 - 1)
        if lo is None and hi is None:
            return f"-?(?:0|[1-9][0-9]{{0,{self.b.max_int_digits - 1}}})"
        lo, hi = _window(lo, hi, self.b.max_int_digits)
        a = math.floor(lo) + 1 if lo_ex else math.ceil(lo)
        b = math.ceil(hi) - 1 if hi_ex else math.floor(hi)
        if a > b:
            raise _Unsatisfiable("minimum", f"no integer lies in the range {lo}..{hi}")
        return integer_range_regex(a, b)

    def number(self, schema: dict, ctx: _Ctx) -> str:
        lo, lo_ex, hi, hi_ex = self._range(schema, integer=False)
        if lo is None and hi is None:
            return (
                f"-?(?:0|[1-9][0-9]{{0,{self.b.max_int_digits - 1}}})"
                f"(?:\\.[0-9]{{1,{self.b.max_frac_digits}}})?"
            )
        return number_range_regex(lo, lo_ex, hi, hi_ex, self.b)

    def _length(self, schema: dict, key: str) -> int | None:
        value = schema.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise UnsupportedSchema(key, f"'{key}' must be a non-negative integer")
        return value

    def string(self, schema: dict, ctx: _Ctx) -> str:
        lo = self._length(schema, "minLength") or 0
        hi = self._length(schema, "maxLength")
        if hi is not None and hi < lo:
            raise _Unsatisfiable("maxLength", "maxLength is below minLength")
        fmt, pattern = schema.get("format"), schema.get("pattern")
        if fmt is not None:
            if fmt not in FORMATS:
                raise UnsupportedSchema("format", f"string format {fmt!r} is not supported")
            if pattern is not None:
                raise UnsupportedSchema("pattern", "pattern together with format")
            regex, shortest, longest = FORMATS[fmt]
            if lo > shortest:
                raise UnsupportedSchema("minLength", f"minLength with format {fmt!r}")
            if hi is not None and hi < longest:
                raise UnsupportedSchema("maxLength", f"maxLength with format {fmt!r}")
            return f'"{regex}"'
        self.top_string |= ctx.depth == 0
        if pattern is not None:
            if not isinstance(pattern, str):
                raise UnsupportedSchema("pattern", "pattern must be a string")
            return '"' + pattern_regex(pattern, lo, hi, self.b, self.quote) + '"'
        top = max(lo, self.b.max_string)
        return _quoted(self.char(_CHAR), lo, top if hi is None else min(hi, top))

    # -- containers ------------------------------------------------------------------

    def object(self, schema: dict, ctx: _Ctx) -> str:
        props = schema.get("properties")
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(n, str) for n in required):
            raise UnsupportedSchema("required", "required must be a list of names")
        if props is None:
            if required:
                raise UnsupportedSchema("required", "required names need 'properties'")
            return self.free_object(schema.get("additionalProperties", True), ctx)
        if not isinstance(props, dict):
            raise UnsupportedSchema("properties", "properties must be an object")
        missing = [n for n in required if n not in props]
        if missing:
            raise UnsupportedSchema("required", f"required {missing} not in 'properties'")
        inner = ctx.enter()
        fields = []
        for name, sub in props.items():  # declaration order; optional ones too (valid)
            needed = name in required
            if not needed and ctx.depth >= self.b.max_depth:
                continue  # deep enough: leave optional properties out
            try:
                value = self.compile(sub, inner)
            except _DROPPABLE:
                if needed:
                    raise
                continue
            fields.append(_escape(_dump(name)) + ":" + value)
        return r"\{" + ",".join(fields) + r"\}"

    def free_object(self, values: Any, ctx: _Ctx) -> str:
        """An object with arbitrary (bounded) keys; values follow `values`."""
        if values is False or ctx.depth >= self.b.max_depth:
            return r"\{\}"
        try:
            value = self.compile(values, ctx.enter())
        except _DROPPABLE:
            return r"\{\}"
        key = _quoted(self.char(_FREE_CHAR), 1, min(16, self.b.max_string))
        return r"\{" + _list(f"{key}:{value}", 0, self.b.max_free_keys) + r"\}"

    def array(self, schema: dict, ctx: _Ctx) -> str:
        lo = self._length(schema, "minItems") or 0
        hi_kw = self._length(schema, "maxItems")
        if hi_kw is not None and hi_kw < lo:
            raise _Unsatisfiable("maxItems", "maxItems is below minItems")
        # Nested arrays multiply automaton states, so the default cap halves per level.
        cap = 0 if ctx.depth >= self.b.max_depth else max(1, self.b.max_items >> ctx.arrays)
        hi = max(lo, cap) if hi_kw is None else min(hi_kw, max(lo, cap))
        if schema.get("uniqueItems") is True and hi > 1:
            raise UnsupportedSchema("uniqueItems", "uniqueItems cannot be enforced by a regex")
        prefix, items = schema.get("prefixItems", []), schema.get("items")
        if isinstance(items, list):
            raise UnsupportedSchema("items", "array-form 'items'; use prefixItems")
        inner = ctx.enter(array=True)
        fixed = []
        for i, sub in enumerate(prefix[:hi]):
            try:
                fixed.append(self.compile(sub, inner))
            except _DROPPABLE:
                if i < lo:
                    raise
                hi = i
                break
        extra_lo = max(0, lo - len(fixed))
        if items is False or (prefix and items is None):
            extra_hi = extra_lo  # nothing beyond the tuple unless minItems asks
        else:
            extra_hi = max(extra_lo, hi - len(fixed)) if len(fixed) == len(prefix) else 0
        if items is False and extra_lo:
            raise _Unsatisfiable("minItems", "minItems exceeds prefixItems with items false")
        tail = ""
        if extra_hi:
            try:
                item = self.compile(True if items is None else items, inner)
            except _DROPPABLE:
                if extra_lo:
                    raise
                extra_hi = 0
            if extra_hi and fixed:
                tail = f"(?:,{item}){_count(extra_lo, extra_hi)}"
            elif extra_hi:
                tail = _list(item, extra_lo, extra_hi)
        return r"\[" + ",".join(fixed) + tail + r"\]"

    def any_value(self, ctx: _Ctx) -> str:
        """Any JSON value, nested at most 2 levels (and never past max_depth)."""
        self.top_string |= ctx.depth == 0
        return self.generic(min(2, max(0, self.b.max_depth - ctx.depth)))

    def generic(self, levels: int) -> str:
        if levels not in self._generic:
            b = self.b
            char = self.char(_FREE_CHAR)
            scalars = [
                _quoted(char, 0, b.max_string),
                self.number({}, _Ctx()),
                _BOOLEAN,
                _NULL,
            ]
            if levels > 0:
                inner = self.generic(levels - 1)
                key = _quoted(char, 1, min(16, b.max_string))
                n = min(b.max_items, b.max_free_keys)
                scalars.append(r"\[" + _list(inner, 0, n) + r"\]")
                scalars.append(r"\{" + _list(f"{key}:{inner}", 0, b.max_free_keys) + r"\}")
            self._generic[levels] = _alt(scalars)
        return self._generic[levels]


# --------------------------------------------------------------------------- public API


def _check(schema: Any) -> None:
    if not isinstance(schema, dict | bool):
        raise UnsupportedSchema("type", "a schema must be a JSON object or boolean")
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        keyword = next((p for p in reversed(exc.path) if isinstance(p, str)), "schema")
        raise UnsupportedSchema(keyword, f"invalid schema: {exc.message}") from None


def schema_to_regex(schema: dict | bool, bounds: Bounds = Bounds()) -> str:
    """A regex whose every full match is compact JSON valid against `schema`."""
    _check(schema)
    compiler = _Compiler(schema, bounds)
    regex = compiler.compile(schema, _Ctx())
    if compiler.top_string:  # the document may open with '"': no \" anywhere (_FREE_CHAR)
        regex = _Compiler(schema, bounds, quote=False).compile(schema, _Ctx())
    return regex


def _json_object_regex(bounds: Bounds = Bounds()) -> str:
    compiler = _Compiler(True, bounds)
    key = _quoted(_FREE_CHAR, 1, min(16, bounds.max_string))
    entry = f"{key}:{compiler.generic(2)}"  # the object itself is the third level
    return r"\{" + _list(entry, 0, bounds.max_free_keys) + r"\}"


JSON_OBJECT_REGEX: str = _json_object_regex()


def choice_regex(choices: list[str]) -> str:
    """A regex matching exactly one of `choices` (vLLM's guided choice)."""
    return _alt([_escape(c) for c in choices])


def tool_call_regex(tools: list[dict], bounds: Bounds = Bounds()) -> str:
    """{"name":"<tool>","arguments":<its parameters>} for any one of the OpenAI tools."""
    alts = []
    for tool in tools:
        fn = tool.get("function", {})
        params = fn.get("parameters")
        args = r"\{\}" if params is None else schema_to_regex(params, bounds)
        alts.append(r'\{"name":' + _escape(_dump(fn["name"])) + ',"arguments":' + args + r"\}")
    if not alts:
        raise UnsupportedSchema("tools", "no tools given")
    return _alt(alts)
