"""raydock.serve_apps.guided without a model: random walks through every corpus schema's
matcher (each step a random allowed token) must only ever end in valid JSON; refusals name
the keyword; the rewrites are exact or sound; bounds hold."""

from __future__ import annotations

import functools
import json
import random
import re

import pytest
from jsonschema import Draft202012Validator

from raydock.serve_apps import guided
from raydock.serve_apps.guided import (
    BoundExceeded,
    GuidedDecoder,
    UnsupportedSchema,
    grammar_of,
    json_grammar,
    normalize,
    tools_grammar,
)
from tests.guided_checks import corpus, refused_corpus, validator_for

WALKS = int(__import__("os").environ.get("GUIDED_WALKS", "4"))
MAX_STEPS = 1000


@functools.cache
def decoder() -> tuple:
    from transformers import AutoTokenizer

    from raydock.modelgen import cached_model_dir

    tok = AutoTokenizer.from_pretrained(cached_model_dir("tiny"))
    return tok, GuidedDecoder(tok, {tok.eos_token_id}, len(tok))


def walk(grammar: str, seed: int) -> str | None:
    """A random path through the grammar: the text when it ended (EOS), else None. EOS is
    taken half the time it is allowed, so walks end."""
    tok, dec = decoder()
    rng = random.Random(seed)
    m = guided.Matcher(dec.compile_sync(grammar).deep_copy())
    out: list[int] = []
    for _ in range(MAX_STEPS):
        allowed = dec.masks([m])[0].nonzero().flatten().tolist()
        assert allowed, "a live matcher always allows something"
        ends = [t for t in allowed if t in dec.eos]
        if ends and (len(ends) == len(allowed) or rng.random() < 0.5):
            return tok.decode(out)
        token = rng.choice([t for t in allowed if t not in dec.eos])
        m.advance(token)
        assert not m.failed, m.error
        out.append(token)
    return None


def test_corpus_is_well_formed():
    cases, refused = corpus(), refused_corpus()
    assert len(cases) >= 80 and len(refused) >= 5
    for name, schema in cases:
        assert re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name)
        # the meta-schema without format checks: Python's re cannot read \p{L}
        Draft202012Validator(Draft202012Validator.META_SCHEMA).validate(schema)
    text = json.dumps([s for _, s in cases])
    for keyword in (
        "maxProperties",
        "minProperties",
        "multipleOf",
        '"uri"',
        '"hostname"',
        "contains",
        "dependentRequired",
        "propertyNames",
        '"not"',
        "uniqueItems",
        "\\\\p{L}",
        "definitions",
        "$schema",
        "deprecated",
        "readOnly",
    ):
        assert keyword in text, keyword


@pytest.mark.parametrize(
    ("fmt", "good", "bad"),
    [
        ("uri", "https://example.com/a?b=1#c", ["example.com/no-scheme", "http://exa mple.com"]),
        ("uri-reference", "../a/b?c#d", ["http://[::1", "a b", "%zz"]),
        ("hostname", "api.example.com", ["-bad-.example.com", "under_score.com", "a" * 64 + ".io"]),
        ("duration", "P1Y2M3DT4H5M6S", ["P1H", "PT", "1 hour"]),
    ],
    ids=["uri", "uri-reference", "hostname", "duration"],
)
def test_outputs_are_checked_against_their_format(fmt, good, bad):
    """validator_for checks these formats only with jsonschema's format packages installed
    (the `test` extra's jsonschema[format-nongpl]); without them it passes any string, and
    guided outputs in these formats would go unchecked."""
    assert fmt in validator_for({}).format_checker.checkers, f"{fmt}: its package is missing"
    validator = validator_for({"type": "string", "format": fmt})
    assert validator.is_valid(good)
    for value in bad:
        errors = list(validator.iter_errors(value))
        assert [e.validator for e in errors] == ["format"], (fmt, value)


@pytest.mark.parametrize("name", [n for n, _ in corpus()])
def test_random_walks_only_end_in_valid_documents(name):
    schema = dict(corpus())[name]
    grammar = grammar_of("grammar", json_grammar(schema))
    validator = validator_for(schema)
    ended = 0
    for seed in range(WALKS):
        text = walk(grammar, seed)
        if text is None:
            continue
        ended += 1
        value = json.loads(text)
        errors = [e.message for e in validator.iter_errors(value)]
        assert not errors, (text, errors)
        assert not re.search(r"\s", re.sub(r'"(\\.|[^"\\])*"', "", text)), f"not compact: {text}"
    assert ended, "no walk ended within the step budget (bounds too loose)"


@pytest.mark.parametrize("name", [n for n, *_ in refused_corpus()])
def test_refused_schemas_name_the_keyword(name):
    (schema, keyword) = {n: (s, k) for n, s, k in refused_corpus()}[name]
    _, dec = decoder()
    with pytest.raises((UnsupportedSchema, guided.matcher.ConstraintError)) as exc:
        dec.compile_sync(grammar_of("grammar", json_grammar(schema)))
    assert keyword in str(exc.value) or getattr(exc.value, "keyword", None) == keyword


def test_annotations_never_refuse():
    schema = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "$id": "urn:x",
        "$comment": "c",
        "title": "t",
        "description": "d",
        "examples": [1],
        "default": 1,
        "deprecated": True,
        "readOnly": True,
        "writeOnly": False,
        "definitions": {"n": {"type": "integer", "title": "n"}},
        "$ref": "#/definitions/n",
    }
    _, dec = decoder()
    dec.compile_sync(grammar_of("grammar", json_grammar(schema)))


def test_huge_counts_are_refused_or_capped_before_compile():
    with pytest.raises(BoundExceeded, match="max_count"):
        normalize({"type": "array", "minItems": 1_000_000})
    with pytest.raises(BoundExceeded, match="minProperties"):
        normalize({"type": "object", "minProperties": 10**7})
    assert normalize({"type": "array", "maxItems": 10**9})["maxItems"] == 10_000


def test_dependent_required_is_exact():
    schema = {
        "type": "object",
        "properties": {"a": {"const": 1}, "b": {"const": 2}},
        "dependentRequired": {"a": ["b"]},
    }
    tok, dec = decoder()
    grammar = grammar_of("grammar", json_grammar(schema))
    for text, ok in (('{"a":1,"b":2}', True), ('{"b":2}', True), ("{}", True), ('{"a":1}', False)):
        m = dec.compile_sync(grammar).deep_copy()
        good = m.consume_tokens(tok.encode(text, add_special_tokens=False)) and m.is_accepting()
        assert good == ok, text


def test_oneof_needs_exclusive_branches():
    with pytest.raises(UnsupportedSchema, match="oneOf"):
        normalize({"oneOf": [{"type": "integer"}, {"type": "number"}]})
    normalize({"oneOf": [{"type": "string"}, {"type": "integer"}]})


def test_unique_items_keeps_a_sound_subset():
    assert normalize({"type": "array", "uniqueItems": True})["maxItems"] == 1
    with pytest.raises(UnsupportedSchema, match="uniqueItems"):
        normalize({"type": "array", "uniqueItems": True, "minItems": 2})


def test_tools_auto_is_a_call_or_text():
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    tok, dec = decoder()
    grammar = grammar_of("grammar", tools_grammar(tools, auto=True))
    for text, ok in (
        ('{"name":"get_weather","arguments":{"city":"Oslo"}}', True),
        ("hello", True),
        ('{"name":"other","arguments":{}}', False),
    ):
        m = dec.compile_sync(grammar).deep_copy()
        good = m.consume_tokens(tok.encode(text, add_special_tokens=False)) and m.is_accepting()
        assert good == ok, text


def _accepts(grammar: str, text: str) -> bool:
    tok, dec = decoder()
    m = dec.compile_sync(grammar_of("grammar", grammar)).deep_copy()
    return m.consume_tokens(tok.encode(text, add_special_tokens=False)) and m.is_accepting()


def test_not_over_a_few_strings_is_exact():
    grammar = json_grammar({"type": "string", "not": {"enum": ["", "Cancel"]}})
    for text, ok in (
        ('""', False),
        ('"Cancel"', False),
        ('"Cance"', True),
        ('"Cancel!"', True),
        ('"cancel"', True),
        ('"X"', True),
    ):
        assert _accepts(grammar, text) == ok, text


def test_property_names_and_required_undeclared():
    grammar = json_grammar(
        {
            "type": "object",
            "additionalProperties": {"type": "integer"},
            "propertyNames": {"pattern": "^[a-z]{1,3}$"},
            "required": ["id"],
        }
    )
    assert _accepts(grammar, '{"id":1,"ab":2}')
    assert not _accepts(grammar, '{"id":1,"ABC":2}')
    assert not _accepts(grammar, '{"ab":2}')


def test_building_grammars_does_not_load_torch():
    """API replicas build grammars only; torch and transformers stay out of them."""
    import subprocess
    import sys

    code = (
        "import sys; from raydock.serve_apps import structured; "
        "structured.constraint_for({'type': 'json_object'}, None, None); "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_a_discriminator_separates_oneof_branches_only_among_objects():
    branch = [{"properties": {"k": {"const": i}}, "required": ["k"]} for i in (1, 2)]
    with pytest.raises(UnsupportedSchema, match="oneOf"):  # a string satisfies both
        normalize({"oneOf": branch})
    normalize({"type": "object", "oneOf": branch})
    normalize({"oneOf": [{"const": "x"}, {"type": "integer"}]})


def test_a_huge_enum_is_a_refusal_naming_the_bound():
    _, dec = decoder()
    grammar = grammar_of("grammar", json_grammar({"enum": [f"v{i}" for i in range(100_000)]}))
    with pytest.raises(guided.matcher.ConstraintError, match="initial_lexer_fuel"):
        dec.compile_sync(grammar)


def _fn(name: str, parameters: dict) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


@pytest.mark.parametrize(
    ("response_format", "tools", "param"),
    [
        (
            {"type": "json_schema", "json_schema": {"schema": {"type": 5}}},
            None,
            "response_format.json_schema.schema",
        ),
        (
            {"type": "json_schema", "json_schema": {"schema": {"minLength": "3"}}},
            None,
            "response_format.json_schema.schema",
        ),
        (None, [_fn("f", {"type": "object", "required": "a"})], "tools.0.function.parameters"),
        (None, [_fn("f", {}), _fn("f", {})], "tools.1.function.name"),  # which one is f?
    ],
)
def test_a_schema_that_is_not_one_is_a_400_naming_it(response_format, tools, param):
    """A malformed keyword value reached the grammar builder and came back as a 500."""
    from raydock.serve_apps import structured

    with pytest.raises(structured.StructuredError) as refused:
        structured.constraint_for(response_format, tools, "required" if tools else None)
    assert refused.value.param == param
