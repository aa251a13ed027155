"""Guided decoding: request formats → Lark grammars (`grammars`, after `schema.normalize`)
→ llguidance matchers per sequence (`matcher.GuidedDecoder`). Engines call only
`GuidedDecoder.matcher / apply / only_end` and `Matcher.allows / advance / forced`."""

from raydock.serve_apps.guided.grammars import (
    choice_grammar,
    json_grammar,
    json_object_grammar,
    tool_call_schema,
    tools_grammar,
)
from raydock.serve_apps.guided.matcher import GuidedDecoder, Limits, Matcher, grammar_of
from raydock.serve_apps.guided.schema import BoundExceeded, Bounds, UnsupportedSchema, normalize

__all__ = [
    "BoundExceeded",
    "Bounds",
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
