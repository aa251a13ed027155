"""Guided decoding: request formats → Lark grammars (`grammars`, after `schema.normalize`)
→ llguidance matchers per sequence (`matcher.GuidedDecoder`). Engines call only
`GuidedDecoder.matcher / apply / only_end` and `Matcher.allows / advance / forced`.

The matcher half needs torch and transformers; it is imported on first use, so the API
replicas, which only build grammars, do not load them."""

from typing import Any

from raydock.serve_apps.guided.grammars import (
    choice_grammar,
    json_grammar,
    json_object_grammar,
    tool_call_schema,
    tools_grammar,
)
from raydock.serve_apps.guided.schema import BoundExceeded, Bounds, UnsupportedSchema, normalize

_MATCHER = ("GuidedChecks", "GuidedDecoder", "Limits", "Matcher", "grammar_of")


def __getattr__(name: str) -> Any:
    if name in _MATCHER:
        from raydock.serve_apps.guided import matcher

        return getattr(matcher, name)
    raise AttributeError(name)


__all__ = [
    "BoundExceeded",
    "Bounds",
    "GuidedChecks",
    "GuidedDecoder",
    "Limits",
    "Matcher",
    "UnsupportedSchema",
    "choice_grammar",
    "grammar_of",
    "json_grammar",
    "json_object_grammar",
    "normalize",
    "tool_call_schema",
    "tools_grammar",
]
