"""JSON value types shared by the management API and the OpenAI protocol: integers as JSON
has them, what "not blank" means, and the one character no stored text may hold (NUL).
Neither plane's internals: both import it."""

from __future__ import annotations

from typing import Annotated, Any, get_args

from pydantic import BaseModel, Strict, ValidationInfo
from pydantic_core import PydanticCustomError


def _whitespace_class() -> str:
    """A regex class of the characters str.strip() removes, as \\uXXXX ranges."""
    codes = [c for c in range(0x10000) if chr(c).isspace()]
    spans: list[list[int]] = []
    for c in codes:
        if spans and spans[-1][1] == c - 1:
            spans[-1][1] = c
        else:
            spans.append([c, c])
    return "".join(f"\\u{a:04x}" + (f"-\\u{b:04x}" if b > a else "") for a, b in spans)


# Regex dialects disagree on `\s`: Python's takes \x1c-\x1f, ECMA's (the document's, JSON
# Schema) U+FEFF, Rust's (pydantic's `pattern`) \x85. Patterns name Python's whitespace (what
# str.strip() removes) instead, and use no inline flags: every dialect reads them alike.
_WHITESPACE = _whitespace_class()
#: What a string must match not to be blank (str.strip() leaves something)
NOT_BLANK = f"[^{_WHITESPACE}]"
_WORD = f"[^@{_WHITESPACE}]+"
EMAIL_PATTERN = f"^{_WORD}@{_WORD}\\.{_WORD}$"
ZIP_NAME_PATTERN = r"^[^/\\]+\.[zZ][iI][pP]$"

#: An integer as JSON has it: an int, or a number without a fractional part (JSON has one
#: number type; to JSON Schema 5.0 is the integer 5), never a string or a boolean. Request
#: models are strict (no "yes" read as a boolean, no "5" as a number), which would refuse 5.0
#: too: their JsonInt fields read lax, and `refuse_non_json_integers` refuses strings and
#: booleans before. (A validator inside JsonInt would do both, but pydantic then documents an
#: optional field's range as `ge`/`le`, which JSON Schema does not know.)
JsonInt = Annotated[int, Strict(False)]
_LAX = Strict(False)


def refuse_non_json_integers(model: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    """A request model's "before" validator for every field: no string or boolean where
    a JsonInt is expected."""
    field = model.model_fields[info.field_name]
    if isinstance(value, bool | str) and (
        _LAX in field.metadata
        or any(_LAX in getattr(arg, "__metadata__", ()) for arg in get_args(field.annotation))
    ):
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    return value


#: PostgreSQL's text columns cannot hold a NUL character (SQLite's can): no text the
#: management API stores or looks up may carry one
NUL = "\x00"


def nul_at(value: Any, path: str = "") -> str | None:
    """Where in `value` (text, or lists and dicts of it) a NUL character is, as a message's
    start: "" for the text itself, "item 1 " or "item a.0 " inside, "key 'k' " in a dict's
    key; None where there is none. Models are left to their own validators."""
    if isinstance(value, str):
        if NUL not in value:
            return None
        return f"item {path} " if path else ""
    if isinstance(value, dict):
        for key in value:
            if isinstance(key, str) and NUL in key:
                return f"key {key!r} "
        items = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        if (at := nul_at(item, f"{path}.{key}" if path else str(key))) is not None:
            return at
    return None
