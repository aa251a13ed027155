"""Guided-decoding checks every engine runs in its unit tests: the schema corpus enforced
(outputs validated with jsonschema, format checks on) and hostile constraints bounded."""

from __future__ import annotations

import asyncio
import json
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import regex
from jsonschema import Draft202012Validator, ValidationError, validators

from raydock.serve_apps import structured
from raydock.serve_apps.engines.base import ConstraintError
from raydock.serve_apps.sampling import SamplingParams

SCHEMAS = Path(__file__).parent / "schemas"


def _pattern(validator, pattern, instance, schema):
    # ECMA-262 patterns (\p{L} ...): the `regex` package reads them, Python's `re` does not
    if isinstance(instance, str) and not regex.search(pattern, instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _pattern_properties(validator, patterns, instance, schema):
    if isinstance(instance, dict):
        for pattern, sub in patterns.items():
            for k, v in instance.items():
                if regex.search(pattern, k):
                    yield from validator.descend(v, sub, path=k, schema_path=pattern)


def _additional_properties(validator, extra, instance, schema):
    if not isinstance(instance, dict):
        return
    props, patterns = schema.get("properties", {}), schema.get("patternProperties", {})
    rest = [k for k in instance if k not in props and not any(regex.search(p, k) for p in patterns)]
    if extra is False and rest:
        yield ValidationError(f"additional properties {rest}")
    elif isinstance(extra, dict):
        for k in rest:
            yield from validator.descend(instance[k], extra, path=k)


def _multiple_of(validator, step, instance, schema):
    # exact decimal arithmetic: jsonschema's float check calls 2.53 no multiple of 0.01
    number = isinstance(instance, int | float) and not isinstance(instance, bool)
    if number and Decimal(str(instance)) % Decimal(str(step)) != 0:
        yield ValidationError(f"{instance} is not a multiple of {step}")


Validator = validators.extend(
    Draft202012Validator,
    {
        "pattern": _pattern,
        "patternProperties": _pattern_properties,
        "additionalProperties": _additional_properties,
        "multipleOf": _multiple_of,
    },
)


def validator_for(schema: Any):
    """jsonschema's draft 2020-12 validator with format checks, ECMA-style patterns."""
    return Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def corpus() -> list[tuple[str, Any]]:
    """(name, schema) of every schema raydock enforces (tests/schemas/*.json)."""
    out = []
    for path in sorted(SCHEMAS.glob("*.json")):
        doc = json.loads(path.read_text())
        out.append((doc.get("name", path.stem), doc["schema"]))
    return out


def refused_corpus() -> list[tuple[str, Any, str]]:
    """(name, schema, keyword) of what raydock refuses (tests/schemas/unsupported/)."""
    out = []
    for path in sorted((SCHEMAS / "unsupported").glob("*.json")):
        doc = json.loads(path.read_text())
        out.append((doc.get("name", path.stem), doc["schema"], doc["keyword"]))
    return out


def schema_constraint(schema: Any) -> structured.Constraint:
    """The constraint of `response_format` json_schema with `schema`."""
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    return structured.constraint_for(fmt, None, None)


def rss_mb() -> float:
    """This process's resident memory (MiB), from /proc."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096 / 2**20


async def _generate(engine, grammar=None, regex=None, max_tokens=48, seed=0):
    text, finish = "", None
    params = SamplingParams(max_tokens=max_tokens, seed=seed, temperature=1.0)
    async for steps in engine.generate(engine.text_prompt("json:"), params, regex, grammar=grammar):
        for ev in steps:
            text += ev.text
            finish = ev.finish_reason or finish
    return text, finish


def corpus_check(
    engine, label: str, max_tokens: int = 48, seeds: int = 1, run=asyncio.run
) -> dict[str, Any]:
    """Every corpus schema compiles; every output that ends with "stop" validates. Prints
    coverage (schemas enforced) and how many outputs closed within max_tokens."""
    enforced = closed = 0
    refused: list[str] = []
    items = corpus()

    async def main():
        nonlocal enforced, closed
        for name, schema in items:
            try:
                c = schema_constraint(schema)
                await engine.check_grammar(c.grammar)
            except (structured.StructuredError, ConstraintError) as exc:
                refused.append(f"{name}: {exc}")
                continue
            enforced += 1
            validator = validator_for(schema)
            for seed in range(seeds):
                text, finish = await _generate(engine, c.grammar, max_tokens=max_tokens, seed=seed)
                if finish == "stop":
                    closed += 1
                    errors = list(validator.iter_errors(json.loads(text)))
                    assert not errors, (name, text, errors[0].message)
                else:
                    assert finish == "length", (name, finish)

    run(main())
    total = len(items)
    print(
        f"\n{label}: {enforced}/{total} corpus schemas enforced ({100 * enforced / total:.0f} %), "
        f"{closed}/{enforced * seeds} outputs closed within {max_tokens} tokens"
    )
    assert not refused, refused
    assert total >= 80
    return {"enforced": enforced, "total": total, "closed": closed}


HOSTILE_SCHEMAS = [
    ({"type": "array", "minItems": 1_000_000}, "minItems"),
    ({"type": "string", "maxLength": 10**9}, None),  # lazy: served, memory bounded
    ({"type": "object", "properties": {"s": {"type": "string", "minLength": 10**9}}}, None),
]
HOSTILE_REGEX = r"(a|b)*a(a|b){20}"  # a 2^20-state DFA; llguidance never builds it


def hostile_bounds_check(
    engine, memory_mb: float = 300, seconds: float = 10, run=asyncio.run
) -> None:
    """Hostile sizes are refused (a 400 naming the bound) or served lazily; either way in
    bounded time and memory, and the next ordinary request is served normally."""

    async def main():
        for schema, keyword in HOSTILE_SCHEMAS:
            before, start = rss_mb(), time.monotonic()
            try:
                c = schema_constraint(schema)
                await engine.check_grammar(c.grammar)
                _, finish = await _generate(engine, c.grammar, max_tokens=16)
                assert keyword is None, f"{keyword} was not refused"
                assert finish in ("stop", "length")
            except structured.StructuredError as exc:
                assert keyword is not None and keyword in str(exc) and "max_count" in str(exc)
            assert time.monotonic() - start < seconds
            assert rss_mb() - before < memory_mb, (schema, rss_mb() - before)
        before, start = rss_mb(), time.monotonic()
        await engine.check_regex(HOSTILE_REGEX)
        text, finish = await _generate(engine, regex=HOSTILE_REGEX, max_tokens=30)
        assert set(text) <= {"a", "b"} and finish in ("stop", "length")
        assert time.monotonic() - start < seconds and rss_mb() - before < memory_mb
        # a grammar over a configured bound: a 400 naming it
        from raydock.serve_apps.guided import GuidedDecoder, Limits, grammar_of

        small = GuidedDecoder(engine.tokenizer, {engine.tokenizer.eos_token_id}, 1)
        small.limits = Limits(max_grammar_size=50)
        small._parser_limits = small.limits.parser_limits()
        big = {"type": "object", "properties": {f"k{i}": {"type": "integer"} for i in range(40)}}
        grammar = schema_constraint(big).grammar
        try:
            await small.check(grammar_of("grammar", grammar))
            raise AssertionError("max_grammar_size was not enforced")
        except ConstraintError as exc:
            assert "max_grammar_size" in str(exc), str(exc)
        # the next ordinary request is served
        text, finish = await _generate(engine, regex=r"[a-z]{3}", max_tokens=8)
        assert finish == "stop" and len(text) == 3

    run(main())
