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
    grammars,
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


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
CALL = '{"name":"get_weather","arguments":{"city":"Oslo"}}'
WRAPPED = f"<tool_call>\n{CALL}\n</tool_call>"


def _native(max_calls: int = 8) -> str:
    wrapper = grammars.TOOL_CALL_WRAPPERS[0]
    return grammars.with_native_calls(tools_grammar([WEATHER], auto=True), wrapper, max_calls)


@pytest.mark.parametrize(
    ("text", "plain", "native"),
    [
        (CALL, True, True),  # the bare call, as before
        ("hello", True, True),
        ("<b>bold</b> text", True, True),
        ("<tool", True, True),  # the start of the tag, then the end: text
        ("<tool_callx and more", True, True),
        ("I would use <tool_call> here", True, True),  # a mention later on stays text
        ("{", False, False),
        ("<tool_call>", False, False),  # never text, on any template
        ("<tool_call> no call inside", False, False),
        (WRAPPED, False, True),
        (f"<tool_call>{CALL}</tool_call>", False, True),
        (f"{WRAPPED}\n", False, True),
        (f"{WRAPPED}\n{WRAPPED}\n<tool_call>\n{CALL}</tool_call>", False, True),
        (f"{WRAPPED}{WRAPPED}", False, True),
        # the wrapped JSON is constrained as the bare call: name, arguments, schema
        ('<tool_call>{"name":"other","arguments":{}}</tool_call>', False, False),
        ('<tool_call>{"name":"get_weather","arguments":{}}</tool_call>', False, False),
        ('<tool_call>{"name":"get_weather","arguments":{"city":5}}</tool_call>', False, False),
        (f"<tool_call>\n{CALL}\n", False, False),  # not closed
        (f"{WRAPPED} and then text", False, False),
        (f"{WRAPPED}\n{CALL}", False, False),  # wrapped and bare calls do not mix
        (f"<tool_call>{CALL}{CALL}</tool_call>", False, False),
        (f"<tool_call>\n\n\n\n\n{CALL}</tool_call>", False, False),  # whitespace bounded
        # whitespace before a call: the call is constrained, never text
        (f"\n{WRAPPED}", False, True),
        (f"\n\n{WRAPPED}\n", False, True),
        (f" \n{CALL}", True, True),
        ("\n<tool_call> no call inside", False, False),
        ("\n{", False, False),
        ("\n\n\n\n\n\nhello", True, True),
        # a thinking block first (Qwen3), then the reply: calls constrained, or text
        (f"<think>\nweather: <tool_call> it\n</think>\n\n{WRAPPED}", False, True),
        (f"<think>hm</think>{CALL}", True, True),
        ("<think>\nhm\n</think>\n\nIt is sunny.", True, True),
        ('<think>x</think>\n<tool_call>{"name":"other","arguments":{}}</tool_call>', False, False),
        ("<think>hm</think>\n\n{", False, False),
        ("<think>hm</think>", False, False),  # a reply follows
        ("<think>hm", False, False),
        ("\n<think>hm</think>hi", False, False),  # the block opens the reply or is none
        ("<thinking> is text", True, True),
    ],
)
def test_tools_auto_takes_the_templates_wrapped_calls_only_where_added(text, plain, native):
    assert _accepts(tools_grammar([WEATHER], auto=True), text) == plain
    assert _accepts(_native(), text) == native


#: parameters as pydantic writes a nested model: a reference into their own `$defs`
MOVE = {
    "type": "function",
    "function": {
        "name": "move",
        "parameters": {
            "$defs": {
                "Addr": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                }
            },
            "type": "object",
            "properties": {"home": {"$ref": "#/$defs/Addr"}},
            "required": ["home"],
        },
    },
}
#: a tree: `#` is the parameters' root, not the call's
TREE = {
    "type": "function",
    "function": {
        "name": "tree",
        "parameters": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "kids": {"type": "array", "items": {"$ref": "#"}},
            },
            "required": ["name"],
        },
    },
}


@pytest.mark.parametrize(
    "text, taken",
    [
        ('{"name":"move","arguments":{"home":{"city":"Oslo"}}}', True),
        ('{"name":"move","arguments":{"home":{"town":"Oslo"}}}', False),
        ('{"name":"tree","arguments":{"name":"a","kids":[{"name":"b","kids":[]}]}}', True),
        ('{"name":"tree","arguments":{"name":"a","kids":[{"name":"move","arguments":{}}]}}', False),
    ],
)
def test_references_in_parameters_are_to_the_parameters_themselves(text, taken):
    assert _accepts(tools_grammar([MOVE, TREE], auto=False), text) == taken


def test_wrapped_calls_are_bounded_and_one_when_parallel_calls_are_off():
    assert _accepts(_native(3), "\n".join([WRAPPED] * 3))
    assert not _accepts(_native(3), "\n".join([WRAPPED] * 4))
    assert _accepts(_native(1), WRAPPED) and not _accepts(_native(1), WRAPPED * 2)


def test_required_and_named_take_the_call_at_once_or_after_thinking_where_the_model_thinks():
    """The API replica asks for the call at once (it does not know the model); the engine
    replica of a model that thinks lets the reply open with one thinking block, which ends at
    its first `</think>`; then it must call: a bare call, or once fitted to a template's
    wrapper its wrapped calls (one for a named function: `max_calls` 1). Never text."""
    required = tools_grammar([WEATHER], auto=False)
    wrapper = grammars.TOOL_CALL_WRAPPERS[0]
    thought = "<think>\nOslo: get_weather.\n</think>\n\n"
    at_once = (required, grammars.with_native_calls(required, wrapper, 8))
    for grammar in at_once:
        assert _accepts(grammar, CALL) and _accepts(grammar, f"\n{CALL}")
        for text in (f"{thought}{CALL}", f"<think></think>{CALL}", "<think>", "Sunny."):
            assert not _accepts(grammar, text), text
    assert _accepts(at_once[1], f"{WRAPPED}\n{WRAPPED}") and not _accepts(required, WRAPPED)
    thinking = grammars.with_native_calls(required, None, 0, thinks=True)
    for text in (CALL, f"\n{CALL}", f"{thought}{CALL}", f"<think></think>{CALL}"):
        assert _accepts(thinking, text), text
    for text in (
        "Sunny.",
        WRAPPED,
        f"{thought}Sunny.",
        thought,
        f"<think>a</think>b</think>{CALL}",
    ):
        assert not _accepts(thinking, text), text
    fitted = grammars.with_native_calls(required, wrapper, 8, thinks=True)
    assert _accepts(fitted, f"{thought}{WRAPPED}\n{WRAPPED}") and _accepts(fitted, CALL)
    assert not _accepts(fitted, f"{thought}Sunny.")
    named = grammars.with_native_calls(required, wrapper, 1, thinks=True)
    assert _accepts(named, f"{thought}{WRAPPED}") and not _accepts(named, f"{WRAPPED}\n{WRAPPED}")
    with pytest.raises(ValueError, match="tools grammar"):
        grammars.with_native_calls(json_grammar({"type": "object"}), wrapper, 8)


def test_a_wrapper_that_is_one_token_of_the_vocabulary_is_taken_as_that_token():
    """Qwen's vocabulary holds `<tool_call>` and `</tool_call>` as added (non-special) tokens,
    which llguidance counts as special: the grammar names them by id, beside the text."""
    import copy

    from raydock.serve_apps import chat_render

    tok = copy.deepcopy(decoder()[0])
    tok.add_tokens(["<tool_call>", "</tool_call>"])
    tok.chat_template = "{{ messages }} answer with <tool_call>{...}</tool_call>"
    wrapper = chat_render.tool_call_wrapper(tok)
    opening, closing = tok.convert_tokens_to_ids(["<tool_call>", "</tool_call>"])
    assert (wrapper.open_token, wrapper.close_token) == (opening, closing)
    dec = GuidedDecoder(tok, {tok.eos_token_id}, len(tok))
    one_token = tok.encode(WRAPPED, add_special_tokens=False)
    assert one_token[0] == opening and one_token[-1] == closing
    assert tok.decode(one_token, skip_special_tokens=True) == WRAPPED  # as the engines decode
    pieces = ["<", "tool", "_call", ">", f"\n{CALL}\n"]
    spelled = [t for p in pieces for t in tok.encode(p, add_special_tokens=False)] + [closing]

    def accepts(grammar: str, ids: list[int]) -> bool:
        m = dec.compile_sync(grammar_of("grammar", grammar)).deep_copy()
        return m.consume_tokens(ids) and m.is_accepting()

    auto = tools_grammar([WEATHER], auto=True)
    native = grammars.with_native_calls(auto, wrapper, 8)
    assert accepts(native, one_token) and accepts(native, spelled)
    assert not accepts(auto, one_token[:1])  # neither a call nor text without the wrapper
    textual = grammars.with_native_calls(auto, grammars.TOOL_CALL_WRAPPERS[0], 8)
    assert not accepts(textual, one_token[:1])  # the text literal alone misses the token


def test_a_thinking_models_own_tags_are_taken_as_their_tokens():
    """Qwen3's vocabulary holds `<think>` and `</think>` as added tokens, which llguidance
    counts as special: without their ids in the grammar the model could not think first."""
    import copy

    from raydock.serve_apps import chat_render

    tok = copy.deepcopy(decoder()[0])
    tok.add_tokens(["<tool_call>", "</tool_call>", "<think>", "</think>"])
    tok.chat_template = "{{ messages }} think, then answer with <tool_call>{...}</tool_call>"
    wrapper = chat_render.tool_call_wrapper(tok)
    think, unthink = tok.convert_tokens_to_ids(["<think>", "</think>"])
    opening, closing = tok.convert_tokens_to_ids(["<tool_call>", "</tool_call>"])
    tags = grammars.TagTokens(think, unthink, frozenset({opening}), frozenset({closing}))
    assert chat_render.tag_tokens(tok) == tags
    dec = GuidedDecoder(tok, {tok.eos_token_id}, len(tok))
    native = grammars.with_native_calls(
        tools_grammar([WEATHER], auto=True), wrapper, 8, chat_render.tag_tokens(tok)
    )
    textual = grammars.with_native_calls(
        tools_grammar([WEATHER], auto=True), grammars.TOOL_CALL_WRAPPERS[0], 8
    )

    def accepts(grammar: str, text: str) -> bool:
        m = dec.compile_sync(grammar_of("grammar", grammar)).deep_copy()
        return m.consume_tokens(tok.encode(text, add_special_tokens=False)) and m.is_accepting()

    reply = f"<think>\nThe weather in Oslo.\n</think>\n\n{WRAPPED}"
    assert tok.encode(reply, add_special_tokens=False)[0] == think  # as the model writes it
    assert accepts(native, reply) and not accepts(textual, reply)
    assert accepts(native, "<think></think>\n\nSunny.")  # Qwen3's empty block
    bad = '<think>x</think>\n<tool_call>{"name":"other","arguments":{}}</tool_call>'
    assert not accepts(native, bad)


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        # the model's own tag tokens inside its thinking, and later in its text
        (f"<think>\nI will emit <tool_call> now\n</think>\n\n{WRAPPED}", True),
        ("<think>a </tool_call> b <think> c</think>Sunny.", True),
        ("<think><tool_call></think>Sunny.", True),
        ("Sunny; I could write <tool_call> or </tool_call> or <think>.", True),
        ("Sunny <tool_call><tool_call>", True),
        # the thinking ends at its first `</think>`: a later one is text, as spelled out
        (f"<think>a</think>b</think>\n{CALL}", True),
        ("<think>a</think></think> stray", True),
        # the text starts like no call
        ("<think>a</think><tool_call> no call", False),
        ("\n<tool_call> no call", False),
        ("</tool_call> text", True),  # no call starts so: spelled out, as before
    ],
)
def test_the_vocabularys_own_tags_may_come_inside_thinking_and_text(text, ok):
    """Qwen3's `<tool_call>`, `</tool_call>` and `<think>` are tokens, no text to llguidance:
    the thinking and the text name them, or a model mentioning one would be refused."""
    import copy

    from raydock.serve_apps import chat_render

    tok = copy.deepcopy(decoder()[0])
    tok.add_tokens(["<tool_call>", "</tool_call>", "<think>", "</think>"])
    tok.chat_template = "{{ messages }} think, then answer with <tool_call>{...}</tool_call>"
    dec = GuidedDecoder(tok, {tok.eos_token_id}, len(tok))
    auto = tools_grammar([WEATHER], auto=True)
    wrapper, tags = chat_render.tool_call_wrapper(tok), chat_render.tag_tokens(tok)
    native = grammars.with_native_calls(auto, wrapper, 8, tags)
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) < len(tok.encode(text.replace("<", "< "), add_special_tokens=False))
    m = dec.compile_sync(grammar_of("grammar", native)).deep_copy()
    assert (m.consume_tokens(ids) and m.is_accepting()) == ok


@pytest.mark.parametrize(
    ("text", "plain", "native"),
    [
        # the prompt opened the block: the output is thinking up to its first `</think>`
        (f"The weather in Oslo.\n</think>\n\n{WRAPPED}", False, True),
        (f"hm</think>{CALL}", True, True),
        ("</think>\n\nIt is sunny.", True, True),  # an empty block
        (f"<tool_call> {{ mentioned\n</think>\n{WRAPPED}", False, True),
        (f"<think>hm</think>\n\n{CALL}", True, True),  # `<think>` is thinking text here
        # the block must end, before a call or text
        (WRAPPED, False, False),
        (CALL, False, False),
        ("It is sunny.", False, False),
        ("hm</think>", False, False),  # a reply follows
        # after it, calls are as constrained as ever
        ('hm</think>\n<tool_call>{"name":"other","arguments":{}}</tool_call>', False, False),
        ("hm</think>\n\n{", False, False),
        (f"hm</think>\n<think>x</think>{CALL}", False, False),  # one block only
        (f"hm</think>\n{WRAPPED}\n</think>", False, False),
    ],
)
def test_a_grammar_starting_in_thinking_the_prompt_opened(text, plain, native):
    auto = tools_grammar([WEATHER], auto=True)
    assert _accepts(grammars.starting_in_thinking(auto), text) == plain
    assert _accepts(grammars.starting_in_thinking(_native()), text) == native


def test_a_grammar_starting_in_thinking_takes_the_vocabularys_end_tag():
    """DeepSeek-R1's and Qwen3's `</think>` is an added token, which llguidance counts as
    special: the grammar names its id, or the model could not end its thinking."""
    import copy

    tok = copy.deepcopy(decoder()[0])
    tok.add_tokens(["<think>", "</think>"])
    unthink = tok.convert_tokens_to_ids("</think>")
    dec = GuidedDecoder(tok, {tok.eos_token_id}, len(tok))
    auto = tools_grammar([WEATHER], auto=True)

    def accepts(grammar: str, text: str) -> bool:
        m = dec.compile_sync(grammar_of("grammar", grammar)).deep_copy()
        return m.consume_tokens(tok.encode(text, add_special_tokens=False)) and m.is_accepting()

    reply = f"The weather in Oslo.\n</think>\n\n{CALL}"
    assert unthink in tok.encode(reply, add_special_tokens=False)
    fitted = grammars.with_native_calls(auto, None, 0, grammars.TagTokens(think_close=unthink))
    assert accepts(grammars.starting_in_thinking(fitted), reply)
    assert accepts(grammars.starting_in_thinking(fitted), "</think>Sunny.")
    assert not accepts(grammars.starting_in_thinking(auto), reply)
    # required and named choices too: the call comes after the thinking, never inside it
    tags = grammars.TagTokens(think_close=unthink)
    required = tools_grammar([WEATHER], auto=False)
    with pytest.raises(ValueError, match="thinking"):  # the API replica's: the call at once
        grammars.starting_in_thinking(required)
    required = grammars.with_native_calls(required, None, 0, tags, thinks=True)
    assert accepts(grammars.starting_in_thinking(required), reply)
    assert not accepts(grammars.starting_in_thinking(required), CALL)
    assert not accepts(grammars.starting_in_thinking(required), "</think>Sunny.")


def test_not_starting_with_is_exact():
    """The text rule's regex (Rust dialect: `\\x{..}` escapes) against its definition."""
    import regex

    prefixes = ["{", "<tool_call>", "[TC]"]
    rust = grammars.not_starting_with(prefixes, not_first=" \n")
    assert "\\<" not in rust and "/" not in rust  # a word boundary in Rust; ends a Lark regex
    pattern = re.sub(r"\\x\{([0-9A-F]+)\}", lambda m: f"\\U{int(m[1], 16):08x}", rust)
    rng = random.Random(0)
    alphabet = "{}<>/tool_call[]TCx \n"
    texts = ["", "<", "<tool_call", "<tool_call>", "[T", "[TC]x", "x<tool_call>"]
    texts += ["".join(rng.choices(alphabet, k=rng.randint(1, 14))) for _ in range(3000)]
    texts += [p[:k] + c for p in prefixes for k in range(len(p)) for c in alphabet]
    for text in texts:
        want = bool(text) and not any(text.startswith(p) for p in [*prefixes, " ", "\n"])
        assert bool(regex.fullmatch(pattern, text)) == want, text


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


def _deep_all_of(branches: int) -> dict:
    """50 values: $defs d0..d9 each allOf `branches` references to the next."""
    defs = {f"d{i}": {"allOf": [{"$ref": f"#/$defs/d{i + 1}"}] * branches} for i in range(10)}
    defs["d10"] = {"type": "object", "properties": {"a": {"type": "string"}}}
    return {"$ref": "#/$defs/d0", "$defs": defs}


@pytest.mark.parametrize(
    ("schema", "says"),
    [
        # Python's re backtracks: "^(a|aa)+$" on this name would take years, GIL held
        (
            {"propertyNames": {"pattern": "^(a|aa)+$"}, "properties": {"a" * 60 + "!": {}}},
            "too slow to match the declared property names",
        ),
        ({"propertyNames": {"pattern": "("}}, "outside the regex dialect"),  # was re.error
        ({"propertyNames": {"minLength": 5, "maxLength": 2}}, "minLength 5 is above"),
        ({"propertyNames": {"maxLength": 2**40}}, "from 0 to 10000"),  # was OverflowError
        (_deep_all_of(3), "merge into more than 1000"),  # took minutes
    ],
    ids=["backtracking", "unreadable", "lengths-crossed", "length-huge", "allOf-fan-out"],
)
def test_a_costly_or_broken_schema_is_a_quick_400(schema, says):
    """Compiled in the gateway (every /v1 request's one replica) before any rate limit: a
    short hostile schema froze it, or came back as a 500."""
    import time

    from raydock.serve_apps import structured

    response_format = {"type": "json_schema", "json_schema": {"schema": schema}}
    start = time.monotonic()
    with pytest.raises(structured.StructuredError, match=re.escape(says)) as refused:
        structured.constraint_for(response_format, None, None)
    assert time.monotonic() - start < 2
    assert refused.value.param == "response_format.json_schema.schema"


def test_property_names_read_the_rust_dialects_classes():
    """A pattern in the dialect the grammar enforces (\\p{Lu}) keeps the declared names it
    matches and closes those it does not (Python's re could not read it: a 500)."""
    from raydock.serve_apps import structured

    schema = {
        "type": "object",
        "propertyNames": {"pattern": "^\\p{Lu}+$"},
        "properties": {"AB": {"type": "integer"}, "ab": {"type": "integer"}},
    }
    response_format = {"type": "json_schema", "json_schema": {"schema": schema}}
    grammar = structured.constraint_for(response_format, None, None).grammar
    enforced = json.loads(grammar.split("%json ", 1)[1])
    assert enforced["properties"]["AB"]["type"] == "integer"
    assert enforced["properties"]["ab"] is False


def test_a_wrapper_whose_tags_are_special_tokens_is_spelled_out():
    """Some vocabularies mark the tags special: the engines decode with special tokens
    skipped, so a tag written as its token would vanish from the reply (and the call come back
    as text). Such tags get no id: the model spells them."""
    import copy

    from raydock.serve_apps import chat_render

    tok = copy.deepcopy(decoder()[0])
    tok.add_special_tokens({"additional_special_tokens": ["<tool_call>", "</tool_call>"]})
    tok.chat_template = "{{ messages }} answer with <tool_call>{...}</tool_call>"
    wrapper = chat_render.tool_call_wrapper(tok)
    assert wrapper is not None and wrapper.open == "<tool_call>"
    assert (wrapper.open_token, wrapper.close_token) == (None, None)
