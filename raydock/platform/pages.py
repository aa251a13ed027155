"""The one rule of the management API's lists: a list route answers a page, `limit` rows
(PAGE_DEFAULT when not given, at most PAGE_MAX) from `offset`, in a stable order, with
`total` (rows in the whole list) and `nextOffset` (the next page's offset; null: no more)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Query

PAGE_DEFAULT = 100
PAGE_MAX = 1000
OFFSET_MAX = 2**31 - 1  # a 32-bit integer: any database's OFFSET takes it

Limit = Annotated[
    int,
    Query(
        ge=1,
        le=PAGE_MAX,
        description=f"At most this many rows, 1–{PAGE_MAX} (default {PAGE_DEFAULT}).",
    ),
]
Offset = Annotated[
    int,
    Query(
        ge=0,
        le=OFFSET_MAX,
        description="Skip this many rows first: 0 for the first page, then the previous "
        "answer's `nextOffset`.",
    ),
]


def page(found: dict[str, Any], rows: str, limit: int, offset: int) -> dict[str, Any]:
    """The answer of a list route from the registry's `{rows: [...], "total": n}`: with
    `limit`, `offset` and `nextOffset` (null when this page reaches the end)."""
    end = offset + len(found[rows])
    more = len(found[rows]) > 0 and end < found["total"]
    return found | {"limit": limit, "offset": offset, "nextOffset": end if more else None}
