"""Usage per key, deployment and adapter, by day, hour or minute, as JSON or CSV."""

from __future__ import annotations

import asyncio
import csv
import io
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import ray
from fastapi import APIRouter, Query
from fastapi.responses import Response
from pydantic import BeforeValidator

from raydock import names
from raydock.errors import ApiError
from raydock.platform.api_deps import User, ctx

router = APIRouter(prefix="/public")

#: how long a usage read waits for the meter to write what it holds
FLUSH_WAIT_S = 2.0
COLUMNS = (
    "period",
    "deploymentId",
    "deploymentName",
    "adapterId",
    "adapterName",
    "keyId",
    "keyName",
    "requests",
    "promptTokens",
    "completionTokens",
    "totalTokens",
)


def _iso_only(value: object) -> object:
    """Refuse what pydantic would read as a Unix time (`start=0.5`): dates are ISO 8601."""
    if isinstance(value, str) and not re.match(r"\d{4}-\d{2}-\d{2}", value):
        raise ValueError("must be an ISO 8601 date-time or date, e.g. 2026-12-01T08:00:00Z")
    return value


IsoTime = Annotated[datetime, BeforeValidator(_iso_only)]


def as_utc(value: datetime | None) -> datetime | None:
    """A query's date-time as naive UTC (the database's); one without a zone is UTC."""
    if value is not None and value.tzinfo is not None:
        try:
            value = value.astimezone(UTC).replace(tzinfo=None)
        except OverflowError:  # a zone offset past year 1 or 9999: before or after all usage
            value = datetime.min if value.year < 5000 else datetime.max
    return value


async def _flush_meter() -> None:
    """Have the meter write what it holds first (otherwise: up to its flush interval old)."""
    if not ray.is_initialized():  # no cluster, no meter (get_actor would start a cluster)
        return
    try:
        meter = ray.get_actor(names.METER, namespace=names.NAMESPACE)
        await asyncio.wait_for(meter.flush_usage.remote(), FLUSH_WAIT_S)
    except Exception:  # a meter restarting: what is stored
        pass


#: the longest period one answer covers by minute or by hour (about 3,000 rows per key and
#: deployment): the registry builds an answer alone, and every API request waits meanwhile
MAX_SPAN = {"minute": timedelta(days=2), "hour": timedelta(days=92)}
INVALID_PERIOD = "invalid_period"


def period(
    since: datetime | None, until: datetime | None, group_by: str, now: datetime
) -> tuple[datetime | None, datetime | None]:
    """The period a usage answer covers: as asked, or, by minute or hour without a start, the
    last MAX_SPAN before its end; a 400 naming `start` when it is empty or longer (a rule
    across two parameters, which a JSON Schema of each cannot state)."""
    if since is not None and until is not None and since >= until:
        raise ApiError(
            400, f"start must be before end (got {since} and {until})", "start", INVALID_PERIOD
        )
    span = MAX_SPAN.get(group_by)
    if span is None:
        return since, until
    if since is None:
        return max(until or now, datetime.min + span) - span, until
    if (until or now) - since > span:
        raise ApiError(
            400,
            f"groupBy={group_by} covers at most {span.days} days: start must be at most "
            f"{span.days} days before end (or now); got {since}",
            "start",
            INVALID_PERIOD,
        )
    return since, until


#: what a spreadsheet reads as the start of a formula (OWASP's CSV injection list)
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: Any) -> Any:
    """A text cell a spreadsheet would run as a formula (a key named `=HYPERLINK(...)`),
    quoted with a leading apostrophe so that it shows as text."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


@router.get(
    "/usage",
    tags=["usage"],
    responses={200: {"content": {"text/csv": {"schema": {"type": "string"}}}}},  # format=csv
)
async def usage(
    _: User,
    deploymentId: str | None = None,
    keyId: str | None = None,
    start: Annotated[
        IsoTime | None,
        Query(
            description="ISO 8601 date-time or date (UTC unless it names a zone), inclusive; "
            "by minute or hour at most 2 or 92 days before end (default: that far back)"
        ),
    ] = None,
    end: Annotated[
        IsoTime | None, Query(description="ISO 8601 date-time or date, exclusive")
    ] = None,
    groupBy: Literal["day", "hour", "minute", "total"] = "day",
    format: Literal["json", "csv"] = "json",
):
    """Requests and tokens per period, deployment, adapter and key (what the responses'
    `usage` reported), with totals; `format=csv` downloads the rows. By minute or hour an
    answer covers at most 2 or 92 days (without `start`: the last ones)."""
    now = datetime.now(UTC).replace(tzinfo=None)
    since, until = period(as_utc(start), as_utc(end), groupBy, now)
    await _flush_meter()
    rows = await ctx.registry.usage_rows.remote(since, until, deploymentId, keyId, groupBy)
    if format == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, COLUMNS)
        writer.writeheader()
        writer.writerows({k: spreadsheet_safe(v) for k, v in r.items()} for r in rows)
        return Response(
            buf.getvalue(),
            media_type="text/csv",
            headers={"Content-Disposition": 'attachment; filename="raydock-usage.csv"'},
        )
    totals = {
        field: sum(r[field] for r in rows)
        for field in ("requests", "promptTokens", "completionTokens", "totalTokens")
    }
    covered = {"start": since and since.isoformat(), "end": until and until.isoformat()}
    return {"groupBy": groupBy, **covered, "rows": rows, "totals": totals}
