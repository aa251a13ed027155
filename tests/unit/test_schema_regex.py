"""schema_regex: every text the regex admits is compact JSON valid against the schema.

Each corpus schema (tests/schemas/*.json) is compiled, turned into an outlines-core Index
over a byte-level vocabulary, and walked at random: every document a walk produces must
parse, validate (jsonschema Draft 2020-12 with format checking) and close within a bounded
number of steps; the automaton itself must be acyclic (a finite language). Schemas the
compiler cannot enforce (tests/schemas/unsupported/*.json) must raise UnsupportedSchema
naming the keyword. No Ray, no model.
"""

from __future__ import annotations

import datetime
import functools
import json
import random
import re
import time
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator, FormatChecker
from outlines_core import Guide, Index, Vocabulary

from raydock.serve_apps.schema_regex import (
    FORMATS,
    JSON_OBJECT_REGEX,
    REFUSED,
    SUPPORTED,
    Bounds,
    UnsupportedSchema,
    integer_range_regex,
    number_range_regex,
    pattern_regex,
    schema_to_regex,
    tool_call_regex,
)

pytestmark = pytest.mark.timeout(300)

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"
CASE_FILES = sorted(SCHEMAS.glob("*.json"))
UNSUPPORTED_FILES = sorted((SCHEMAS / "unsupported").glob("*.json"))
CASES = {p.stem: json.loads(p.read_text()) for p in CASE_FILES}
UNSUPPORTED = {p.stem: json.loads(p.read_text()) for p in UNSUPPORTED_FILES}

WALKS = 24  # seeded random walks per regex
MAX_STEPS = 2000  # tokens; every walk must have closed its document by then
# Longest text an automaton admits at all (the most adversarial walk). Free-form values
# nest three levels of 4 items around 48-character strings: JSON_OBJECT_REGEX reaches ~18 KB.
MAX_BYTES = 32_000

# --------------------------------------------------------------------------- vocabulary

# Byte-level, like a GPT-2 style BPE: every single byte (so partial UTF-8 and raw control
# characters are on offer and must be refused by the automaton), plus a few merged tokens.
EOS = 0
TOKENS: dict[bytes, int] = {bytes([b]): b + 1 for b in range(256)}
for merged in (b'{"', b'":', b'",', b'":"', b"},{", b"true", b"false", b"null", b"00"):
    TOKENS[merged] = len(TOKENS) + 1
for char in ("é", "日本", "😀", "\u2028"):
    TOKENS[char.encode()] = len(TOKENS) + 1
TEXT = {i: t for t, i in TOKENS.items()}
VOCAB = Vocabulary(EOS, {t: [i] for t, i in TOKENS.items()})


@functools.cache
def index_for(regex: str) -> Index:
    return Index(regex, VOCAB)


@functools.cache
def python_regex(regex: str) -> re.Pattern:
    return re.compile(regex)


def walk(index: Index, seed: int) -> str:
    """One random walk; returns the document. Seeds ≡ 0 (mod 3) pick uniformly among the
    allowed tokens (long documents); the others also stop early when they may (short ones)."""
    rng = random.Random(seed)
    stop = (seed % 3) * 0.3
    guide = Guide(index)
    out = bytearray()
    for _ in range(MAX_STEPS):
        allowed = guide.get_tokens()
        assert allowed, f"dead end after {bytes(out)!r}"
        assert (EOS in allowed) == guide.is_finished(), f"eos offered wrongly at {bytes(out)!r}"
        if EOS in allowed and (len(allowed) == 1 or rng.random() < stop):
            return out.decode("utf-8")
        token = rng.choice(allowed)
        if token == EOS:
            return out.decode("utf-8")
        out += TEXT[token]
        guide.advance(token, return_tokens=False)
    pytest.fail(f"walk {seed} did not close within {MAX_STEPS} tokens: {bytes(out)[:200]!r}")


def longest_text(index: Index) -> int:
    """Bytes in the longest text the automaton admits; fails on a cycle (infinite language).

    Every byte is a token, so the longest path in edges is the longest text in bytes (an edge
    of a merged token only skips states of the byte path)."""
    succ = {}
    for state, out in index.get_transitions().items():
        out = dict(out)
        out.pop(EOS, None)  # final states loop on eos
        succ[state] = set(out.values())
    start = index.get_initial_state()
    order, seen, on_path = [], {start}, {start}
    stack = [(start, iter(succ.get(start, ())))]
    while stack:  # iterative DFS; postorder puts successors first
        state, children = stack[-1]
        for child in children:
            assert child not in on_path, "the automaton has a cycle: unbounded output"
            if child not in seen:
                seen.add(child)
                on_path.add(child)
                stack.append((child, iter(succ.get(child, ()))))
                break
        else:
            stack.pop()
            on_path.discard(state)
            order.append(state)
    best: dict[int, int] = {}
    for state in order:
        best[state] = max((1 + best[c] for c in succ.get(state, ())), default=0)
    return best[start]


# --------------------------------------------------------------------------- validation

# jsonschema checks "date-time" and "time" only with rfc3339-validator installed, and
# "email" barely: check those strictly here too.
STRICT = FormatChecker(formats=())
STRICT.checkers = dict(Draft202012Validator.FORMAT_CHECKER.checkers)
_RFC3339_TIME = (
    r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]+)?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
)


@STRICT.checks("date-time", raises=ValueError)
def _date_time(value) -> bool:
    if not isinstance(value, str):
        return True
    if not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T" + _RFC3339_TIME, value):
        return False
    datetime.datetime.fromisoformat(value)  # month/day ranges
    return True


@STRICT.checks("time", raises=ValueError)
def _time(value) -> bool:
    return not isinstance(value, str) or re.fullmatch(_RFC3339_TIME, value) is not None


@STRICT.checks("email")
def _email(value) -> bool:
    if not isinstance(value, str):
        return True
    local, _, domain = value.partition("@")
    return bool(local) and "." in domain and "@" not in domain and " " not in value


@functools.cache
def validators(schema_json: str) -> tuple[Draft202012Validator, Draft202012Validator]:
    schema = json.loads(schema_json)
    return (
        Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER),
        Draft202012Validator(schema, format_checker=STRICT),
    )


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def check_document(doc: str, schema, regex: str) -> object:
    """doc is compact JSON, valid against schema, and matched by the Python regex too."""
    assert python_regex(regex).fullmatch(doc), f"Python re disagrees with outlines: {doc!r}"
    value = json.loads(doc)
    outside_strings = _STRING.sub("", doc)
    assert not re.search(r"\s", outside_strings), f"not compact: {doc!r}"
    for validator in validators(json.dumps(schema)):
        errors = [e.message for e in validator.iter_errors(value)]
        assert not errors, f"{doc!r} is invalid: {errors}"
    return value


def walk_and_check(regex: str, schema, walks: int = WALKS) -> list[object]:
    index = index_for(regex)
    assert longest_text(index) <= MAX_BYTES
    return [check_document(walk(index, seed), schema, regex) for seed in range(walks)]


# --------------------------------------------------------------------------- the corpus


def test_corpus_is_well_formed():
    assert len(CASES) >= 45 and len(UNSUPPORTED) >= 6
    for stem, case in {**CASES, **UNSUPPORTED}.items():
        assert case["name"] == stem and re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", stem)
        assert isinstance(case["schema"], dict)
        Draft202012Validator.check_schema(case["schema"])
    objects = [c for c in CASES.values() if c["schema"].get("type") == "object"]
    assert len(objects) > len(CASES) / 2
    # every supported string format has a case
    used = {m for c in CASES.values() for m in re.findall(r'"format": "([^"]+)"', json.dumps(c))}
    assert set(FORMATS) <= used


@pytest.mark.parametrize("name", sorted(CASES))
def test_corpus_walks_are_valid(name):
    schema = CASES[name]["schema"]
    regex = schema_to_regex(schema)
    python_regex(regex)  # the Python dialect accepts it too
    values = walk_and_check(regex, schema)
    assert len(values) == WALKS


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_names_the_keyword(name):
    case = UNSUPPORTED[name]
    with pytest.raises(UnsupportedSchema) as exc:
        schema_to_regex(case["schema"])
    assert exc.value.keyword == case["keyword"], str(exc.value)


_REFUSED_SAMPLES = {
    "not": {"type": "string"},
    "if": {"required": ["a"]},
    "then": {"required": ["a"]},
    "else": {"required": ["a"]},
    "dependentRequired": {"a": ["b"]},
    "dependentSchemas": {"a": {"required": ["b"]}},
    "dependencies": {"a": ["b"]},
    "patternProperties": {"^x": {"type": "integer"}},
    "propertyNames": {"maxLength": 3},
    "minProperties": 1,
    "maxProperties": 2,
    "contains": {"type": "integer"},
    "minContains": 1,
    "maxContains": 2,
    "unevaluatedProperties": False,
    "unevaluatedItems": False,
    "multipleOf": 3,
    "$dynamicRef": "#node",
    "$recursiveRef": "#",
}


@pytest.mark.parametrize("keyword", sorted(REFUSED))
def test_every_refused_keyword_is_refused(keyword):
    schema = {"type": "object", "properties": {"v": {keyword: _REFUSED_SAMPLES[keyword]}}}
    with pytest.raises(UnsupportedSchema) as exc:
        schema_to_regex(schema)
    assert exc.value.keyword == keyword
    assert keyword not in SUPPORTED


def test_enum_is_exact_even_next_to_refused_keywords():
    schema = {"enum": [1, 2, 3, 4], "not": {"const": 2}, "multipleOf": 2}
    assert schema_to_regex(schema) == "4"


# Known-valid documents within the compiled subset (declared properties all present, in
# order; default bounds), which the regex must match; and invalid ones it must not.
VALID = {
    "string_enum": ['{"color":"green"}'],
    "string_enum_escaping": ['{"token":"a\\"b"}', '{"token":"new\\nline"}', '{"token":"ünï"}'],
    "string_pattern_sku": ['{"sku":"ABC-1234"}'],
    # (?i) is not applied to literals: a subset, lowercase only
    "string_pattern_alternation_ignorecase": ['{"answer":"yes"}', '{"answer":"maybe"}'],
    "string_format_date": ['{"day":"2024-02-28"}', '{"day":"1999-12-01"}'],
    "string_format_date_time": [
        '{"at":"2024-02-28T23:59:59.123456+05:30"}',
        '{"at":"1999-12-01T00:00:00Z"}',
    ],
    "string_format_time": ['{"when":"08:15:00Z"}', '{"when":"23:59:59.5-11:00"}'],
    "string_format_email": ['{"email":"jane.doe@example-mail.com"}', '{"email":"a1@b2.io"}'],
    "string_format_uuid": ['{"id":"123e4567-e89b-12d3-a456-426614174000"}'],
    "string_format_ipv4": ['{"ip":"192.168.0.255"}', '{"ip":"0.0.0.0"}'],
    "string_min_max_length": [
        '{"name":"Al","code":"abc","note":"","free":"say \\"hi\\" {to} [all] ünï"}'
    ],
    "number_unbounded": ['{"x":-123.456}', '{"x":0}', '{"x":100000000000}'],
    "number_probability": ['{"p":0}', '{"p":1}', '{"p":0.5}', '{"p":0.999999}'],
    "number_exclusive_bounds": ['{"pct":0.000001}', '{"pct":99.999999}', '{"pct":50}'],
    "number_fractional_bounds": ['{"v":-1.5}', '{"v":2.25}', '{"v":-1.25}', '{"v":0}'],
    "number_only_maximum_negative": ['{"temp":-273.15}', '{"temp":-1000.5}'],
    "integer_min_max": ['{"age":0}', '{"age":120}', '{"age":42}'],
    "integer_negative_range": ['{"offset":-50}', '{"offset":-10}', '{"offset":-33}'],
    "integer_exclusive": ['{"n":4}', '{"n":16}'],
    "integer_unbounded_int32": ['{"a":-123456789012,"b":2147483647}', '{"a":0,"b":-2147483648}'],
    "boolean_and_null": ['{"flag":true,"nothing":null}', '{"flag":false,"nothing":null}'],
    "nullable_types": [
        '{"maybe_name":null,"num_or_str":9}',
        '{"maybe_name":"Bob","num_or_str":"x"}',
    ],
    "object_nested_three_levels": ['{"a":{"b":{"c":7,"d":"y"}}}'],
    "object_free_form": ['{"meta":{"k":[1,"x",{"z":null}]},"counts":{"a":1,"b":2},"empty":{}}'],
    "object_property_names_escaped": ['{"a.b":true,"quo\\"te":3,"ünï":null,"back\\\\slash":1}'],
    "array_prefix_items_tuple": ['{"pair":[1.5,-2]}'],
    "array_prefix_items_open": ['{"row":["ab",3,true,false]}', '{"row":["",0]}'],
    "array_nested_matrix": ['{"matrix":[[0,0.5],[1]]}', '{"matrix":[]}'],
    "enum_top_level_mixed": ['{"k":[1,2]}', '[3,"x"]', "null", "2.5", '"a"'],
    "const_top_level": ['{"status":"ok","code":200}'],
    "anyOf_scalar": ['{"value":"hello"}', '{"value":99}', '{"value":null}'],
    "oneOf_discriminated": ['{"shape":{"kind":"rect","w":3,"h":50}}'],
    "oneOf_types": ['{"id":7}', '{"id":"123e4567-e89b-12d3-a456-426614174000"}'],
    "allOf_ref_with_bounds": ['{"score":5}', '{"score":4.5}'],
    "anyOf_with_sibling_type": ['{"v":3}', '{"v":104}'],
    "ref_recursive_tree": [
        '{"value":1,"children":[{"value":2,"children":[]},'
        '{"value":3,"children":[{"value":4,"children":[]}]}]}'
    ],
    "ref_recursive_linked_list": ['{"list":{"head":"a","tail":{"head":"b","tail":null}}}'],
    "typical_order": [
        '{"order_id":"123e4567-e89b-12d3-a456-426614174000",'
        '"customer":{"name":"Ann","email":"ann@shop.io"},'
        '"items":[{"sku":"AB12","quantity":2,"unit_price":9.99},'
        '{"sku":"ZZ99XY","quantity":1,"unit_price":0}],"status":"paid","note":null}'
    ],
    "typical_classification": ['{"label":"neutral","confidence":0.87}'],
    "typical_person": [
        '{"name":"Ada Lovelace","age":36,"email":"ada@math.org","is_member":true,'
        '"tags":["math","poetry"]}'
    ],
    "typical_product": [
        '{"sku":"AB123456","title":"Kettle","price":24.99,"currency":"EUR","in_stock":false}'
    ],
    "typical_event": [
        '{"id":"00000000-0000-4000-8000-000000000000","title":"Standup",'
        '"start":"2025-03-14T09:30:00+01:00","day":"2025-03-14","attendees":12}'
    ],
    "top_level_string": ['"plain text"', '""', '"a {brace} and [bracket]"'],
    "top_level_any_value": ["1", '"x"', '[true,{"a":null}]', "{}"],
    "top_level_free_object": ["{}", '{"a":1,"b":[true,null,"x"],"c":{"d":-1.5}}'],
    "top_level_array_of_records": ['[{"id":1,"label":"one"},{"id":999,"label":""}]', "[]"],
}
INVALID = {
    "string_enum": ['{"color":"purple"}', '{ "color":"red"}'],
    "string_pattern_sku": ['{"sku":"AB-1234"}', '{"sku":"ABC-12345"}'],
    "string_format_date": ['{"day":"2024-13-01"}', '{"day":"2023-02-30"}'],
    "string_format_ipv4": ['{"ip":"256.1.1.1"}', '{"ip":"01.2.3.4"}'],
    "number_probability": ['{"p":1.01}', '{"p":-0.1}', '{"p":-0}', '{"p":1e0}'],
    "number_exclusive_bounds": ['{"pct":0}', '{"pct":100}'],
    "number_fractional_bounds": ['{"v":-1.51}', '{"v":2.26}'],
    "integer_min_max": ['{"age":121}', '{"age":-1}', '{"age":007}', '{"age":1.0}'],
    "integer_exclusive": ['{"n":3}', '{"n":17}'],
    "typical_classification": ['{"label":"neutral","confidence":1.5}', '{"label":"neutral"}'],
    "const_top_level": ['{"status":"ok","code":201}'],
    "ref_recursive_tree": ['{"value":10,"children":[]}'],
    "top_level_string": ["'single'", '"\x01"'],
}


@pytest.mark.parametrize("name", sorted(VALID))
def test_known_valid_documents_match(name):
    schema = CASES[name]["schema"]
    regex = schema_to_regex(schema)
    for doc in VALID[name]:
        check_document(doc, schema, regex)  # the example itself is right
    for doc in INVALID.get(name, []):
        assert not python_regex(regex).fullmatch(doc), doc


def test_regexes_are_not_trivially_small():
    sizes = {name: len(schema_to_regex(case["schema"])) for name, case in CASES.items()}
    assert min(sizes.values()) >= 4
    assert sum(sizes.values()) > 20 * len(sizes)


# --------------------------------------------------------------------------- regression


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object"},
        {"type": "string"},
        {"type": ["string", "null"]},
        {},
        {
            "anyOf": [
                {"type": "string"},
                {"type": "object", "properties": {"s": {"type": "string"}}},
            ]
        },
        {"type": "string", "pattern": "^.{0,40}$"},
    ],
    ids=json.dumps,
)
def test_index_builds_without_blowup(schema):
    """outlines-core also determinizes the unanchored search automaton, so text inside a long
    string that could restart the whole regex ('{' in a json_object string, '\\"' in a
    document that may be a string) used to blow up past any time or state limit."""
    started = time.monotonic()
    index = index_for(schema_to_regex(schema))
    assert time.monotonic() - started < 30
    assert longest_text(index) <= MAX_BYTES
    assert schema_to_regex({"type": "object"}) == JSON_OBJECT_REGEX


# --------------------------------------------------------------------------- integers


def _ints_checked(lo: int, hi: int, window: range) -> None:
    pattern = re.compile(integer_range_regex(lo, hi))
    for n in window:
        assert bool(pattern.fullmatch(str(n))) == (lo <= n <= hi), (lo, hi, n)
    for bad in ("-0", "+1", "00", "01", f"0{abs(lo)}", "1.0", " 1", ""):
        assert not pattern.fullmatch(bad), (lo, hi, bad)


def test_integer_range_regex_brute_force_small():
    for lo in range(-25, 26):
        for hi in range(lo, 26):
            _ints_checked(lo, hi, range(-40, 41))


def test_integer_range_regex_brute_force_random():
    rng = random.Random(7)
    for _ in range(150):
        a, b = sorted(rng.randint(-2000, 2000) for _ in range(2))
        _ints_checked(a, b, range(-2100, 2101))
    for a, b in ((0, 10**6 - 1), (1, 10**6), (999, 100_001), (-98_765, 123), (10, 10)):
        pattern = re.compile(integer_range_regex(a, b))
        probes = {a - 1, a, a + 1, b - 1, b, b + 1, 0, -1, 1, 10**6, -(10**6)}
        probes |= {rng.randint(a - 1000, b + 1000) for _ in range(3000)}
        for n in probes:
            assert bool(pattern.fullmatch(str(n))) == (a <= n <= b), (a, b, n)
    with pytest.raises(ValueError):
        integer_range_regex(3, 2)


# --------------------------------------------------------------------------- numbers


def _canonical(value: Fraction) -> str:
    text = format(Decimal(value.numerator) / Decimal(value.denominator), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


_NUMBER_BOUNDS = [
    (Fraction(0), False, Fraction(1), False),
    (Fraction(0), True, Fraction(1), True),
    (Fraction(-3, 2), False, Fraction(9, 4), False),
    (Fraction(-3, 4), True, Fraction(1, 2), True),
    (Fraction(1, 100), False, None, False),
    (None, False, Fraction(-27315, 100), False),
    (Fraction(-5), True, Fraction(-2), False),
    (Fraction(5, 2), False, Fraction(5, 2), False),
    (Fraction(-1, 1000), False, Fraction(1, 1000), True),
    (Fraction(37, 10), True, Fraction(371, 100), False),
]


@pytest.mark.parametrize("bounds", _NUMBER_BOUNDS, ids=str)
def test_number_range_regex_brute_force(bounds):
    lo, lo_ex, hi, hi_ex = bounds
    pattern = re.compile(number_range_regex(lo, lo_ex, hi, hi_ex))

    def inside(v: Fraction) -> bool:
        above = lo is None or (v > lo if lo_ex else v >= lo)
        below = hi is None or (v < hi if hi_ex else v <= hi)
        return above and below

    grid = {Fraction(k, 1000) for k in range(-6000, 6001, 7)}
    grid |= {Fraction(k, 100) for k in range(-600, 601)}
    grid |= {
        b + d
        for b in (lo, hi)
        if b is not None
        for d in (0, Fraction(1, 10**6), -Fraction(1, 10**6))
    }
    grid |= {Fraction(-27315, 100) + Fraction(k, 10) for k in range(-30, 30)}
    for value in grid:
        text = _canonical(value)
        assert bool(pattern.fullmatch(text)) == inside(value), (bounds, text)
    # what it matches is canonical JSON, whose float lands inside the bounds too
    index = index_for(pattern.pattern)
    for seed in range(60):
        text = walk(index, seed)
        assert re.fullmatch(r"-?(0|[1-9][0-9]*)(\.[0-9]*[1-9])?", text) and text != "-0", text
        assert inside(Fraction(Decimal(text))), (bounds, text)
        number, flo, fhi = json.loads(text), lo and float(lo), hi and float(hi)  # as jsonschema
        assert (lo is None or (number > flo if lo_ex else number >= flo)) and (
            hi is None or (number < fhi if hi_ex else number <= fhi)
        ), (bounds, text)
    for bad in ("1.0", "00.5", ".5", "1.", "+1", "1e0", "-0"):
        assert not pattern.fullmatch(bad), bad


def test_number_range_regex_unsatisfiable():
    with pytest.raises(UnsupportedSchema):
        number_range_regex(Fraction(1), True, Fraction(1), True)
    with pytest.raises(UnsupportedSchema):
        schema_to_regex({"type": "integer", "minimum": 1.2, "maximum": 1.8})


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_format_walks_are_valid(fmt):
    regex, shortest, longest = FORMATS[fmt]
    schema = {"type": "string", "format": fmt}
    assert schema_to_regex(schema) == f'"{regex}"'
    for value in walk_and_check(f'"{regex}"', schema, walks=60):
        assert shortest <= len(value) <= longest, (fmt, value)
    with pytest.raises(UnsupportedSchema) as exc:
        schema_to_regex({"type": "string", "format": fmt, "maxLength": longest - 1})
    assert exc.value.keyword == "maxLength"


def test_pattern_regex_respects_lengths_and_json_spelling():
    bounds = Bounds()
    assert re.fullmatch(pattern_regex("^a+$", 2, 3, bounds), "aaa")
    assert not re.fullmatch(pattern_regex("^a+$", 2, 3, bounds), "aaaa")
    quoted = pattern_regex('^"[\\\\n]$', 0, None, bounds)  # a quote, then backslash or n
    assert re.fullmatch(quoted, '\\"\\\\') and re.fullmatch(quoted, '\\"n')
    with pytest.raises(UnsupportedSchema) as exc:
        pattern_regex("^a{5}$", 0, 3, bounds)
    assert exc.value.keyword == "maxLength"


# --------------------------------------------------------------------------- json_object / tools


def test_json_object_walks_yield_objects():
    values = walk_and_check(JSON_OBJECT_REGEX, {"type": "object"})
    assert all(isinstance(v, dict) for v in values) and any(values)


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": json.loads((SCHEMAS / "typical_tool_arguments.json").read_text())[
                "schema"
            ],
        },
    },
    {"type": "function", "function": {"name": "now"}},
    {
        "type": "function",
        "function": {
            "name": "search",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string", "minLength": 1, "maxLength": 30},
                    "sources": {
                        "type": "array",
                        "items": {"enum": ["web", "news", "docs"]},
                        "maxItems": 2,
                    },
                    "limit": {"type": "integer", "minimum": 1, "maximum": 20},
                },
                "required": ["query"],
                "additionalProperties": False,
            },
        },
    },
]


def test_tool_call_walks_name_a_tool_with_valid_arguments():
    regex = tool_call_regex(TOOLS)
    params = {t["function"]["name"]: t["function"].get("parameters") for t in TOOLS}
    call_schema = {
        "type": "object",
        "properties": {"name": {"enum": list(params)}, "arguments": {"type": "object"}},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }
    seen = set()
    for call in walk_and_check(regex, call_schema, walks=40):
        seen.add(call["name"])
        schema = params[call["name"]]
        if schema is None:
            assert call["arguments"] == {}
        else:
            errors = list(validators(json.dumps(schema))[1].iter_errors(call["arguments"]))
            assert not errors, (call, errors)
    assert seen == set(params)
    doc = '{"name":"get_weather","arguments":{"location":"Paris","unit":"celsius","days":3}}'
    assert re.fullmatch(regex, doc)
    assert re.fullmatch(regex, '{"name":"now","arguments":{}}')


def test_tool_call_regex_refusals():
    with pytest.raises(UnsupportedSchema) as exc:
        tool_call_regex([])
    assert exc.value.keyword == "tools"
    bad = {"type": "object", "properties": {"x": {"type": "integer", "multipleOf": 5}}}
    with pytest.raises(UnsupportedSchema) as exc:
        tool_call_regex([{"type": "function", "function": {"name": "f", "parameters": bad}}])
    assert exc.value.keyword == "multipleOf"
