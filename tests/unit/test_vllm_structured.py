"""vLLM-style structured output fields (structured_outputs, guided_*) as constraints."""

from __future__ import annotations

import functools

import pytest

from raydock.errors import ApiError
from raydock.serve_apps import protocol
from raydock.serve_apps.openai_service import _constraint


def constraint(**body):
    return _constraint(
        "completion", protocol.parse(protocol.CompletionRequest, {"prompt": "x", **body})
    )


@functools.cache
def _decoder():
    from transformers import AutoTokenizer

    from raydock.modelgen import cached_model_dir
    from raydock.serve_apps.guided import GuidedDecoder

    tok = AutoTokenizer.from_pretrained(cached_model_dir("tiny"))
    return tok, GuidedDecoder(tok, {tok.eos_token_id}, len(tok))


def accepts(grammar: str, text: str) -> bool:
    """Whether the grammar matches `text` exactly (it may end after it)."""
    from raydock.serve_apps.guided import grammar_of

    tok, decoder = _decoder()
    m = decoder.compile_sync(grammar_of("grammar", grammar)).deep_copy()
    return m.consume_tokens(tok.encode(text, add_special_tokens=False)) and m.is_accepting()


def refusal(**body) -> ApiError | protocol.BadParam:
    """A 400 naming the field: from parsing (a shape the document states) or from the
    constraint (what only compiling it can tell)."""
    with pytest.raises((ApiError, protocol.BadParam)) as exc:
        constraint(**body)
    assert getattr(exc.value, "status", 400) == 400
    return exc.value


@pytest.mark.parametrize(
    "body",
    [
        {"structured_outputs": {"choice": ["yes", "no (maybe)", "a.b*"]}},
        {"guided_choice": ["yes", "no (maybe)", "a.b*"]},
    ],
)
def test_choice_matches_exactly_the_choices(body):
    c = constraint(**body)
    for text in ("yes", "no (maybe)", "a.b*"):
        assert accepts(c.grammar, text)
    for text in ("ye", "no maybe", "a.bbb", "yesno", ""):
        assert not accepts(c.grammar, text)


def test_json_schema_as_object_or_string_is_the_response_format_grammar():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    expected = constraint(response_format=fmt).grammar
    assert constraint(guided_json=schema).grammar == expected
    assert (
        constraint(
            guided_json='{"type": "object", "properties": {"a": {"type": "integer"}}, '
            '"required": ["a"]}'
        ).grammar
        == expected
    )
    assert constraint(structured_outputs={"json": schema}).grammar == expected


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"guided_regex": ""}, "guided_regex"),
        ({"structured_outputs": {"regex": "a" * 10_001}}, "structured_outputs.regex"),
        (
            {"structured_outputs": {"whitespace_pattern": " "}},
            "structured_outputs.whitespace_pattern",
        ),
        ({"structured_outputs": {"grammar": "  "}}, "structured_outputs.grammar"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        ({"guided_choice": ["a"], "guided_json": {"type": "string"}}, "guided_choice"),
        (
            {"guided_choice": ["a"], "response_format": {"type": "json_object"}},
            "guided_choice",
        ),
    ],
)
def test_what_cannot_be_enforced_is_a_400_naming_the_field(body, param):
    assert refusal(**body).param == param


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"guided_regex": r"[0-9]{3}-[a-z]+"}, "guided_regex"),
        ({"structured_outputs": {"regex": r"[0-9]{3}-[a-z]+"}}, "structured_outputs.regex"),
    ],
)
def test_a_regex_is_passed_on_as_is_naming_its_field(body, param):
    c = constraint(**body)
    assert (c.mode, c.regex, c.param) == ("regex", r"[0-9]{3}-[a-z]+", param)


def test_false_and_none_mean_not_asked():
    assert constraint(structured_outputs={"json_object": False, "regex": None}).mode == "text"
    c = constraint(structured_outputs={"json_object": False, "choice": ["a", "b"]})
    assert (c.mode, c.param) == ("choice", "structured_outputs.choice")


def test_a_grammar_is_passed_on_instead_of_a_regex():
    c = constraint(guided_grammar='start: "yes" | "no"')
    assert (c.mode, c.regex, c.grammar, c.param) == (
        "grammar",
        None,
        'start: "yes" | "no"',
        "guided_grammar",
    )


def test_json_object_true_asks_for_any_json_object():
    c = constraint(structured_outputs={"json_object": True})
    assert (c.mode, c.regex, c.param) == ("json", None, "structured_outputs.json_object")
    # the same constraint as OpenAI's response_format json_object
    assert c.grammar == constraint(response_format={"type": "json_object"}).grammar
    # any object within the free-form bounds (README: 4 keys, 2 levels deep)
    for text in ('{"a":1}', '{"a":{"b":1},"c":true}', '{"a":[1,"x",null]}', "{}"):
        assert accepts(c.grammar, text), text
    for text in ("[1,2]", '"x"', "1", "null", '{"a":', ""):
        assert not accepts(c.grammar, text), text
