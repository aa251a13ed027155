"""Usage per key, deployment and adapter, by day, hour or minute, as JSON or CSV."""

from __future__ import annotations

import asyncio
import csv
import io
from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal

import ray
from fastapi import APIRouter, Query
from fastapi.responses import Response

from raydock.errors import ApiError
from raydock.platform import names
from raydock.platform.api_deps import User, ctx

router = APIRouter(prefix="/public")

#: how long a usage read waits for the meter to write what it holds
FLUSH_WAIT_S = 2.0
PERIODS = {"minute": 16, "hour": 13, "day": 10}  # characters of the ISO minute kept
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


def parse_time(value: str | None, param: str) -> datetime | None:
    """An ISO 8601 date or date-time (UTC when it names no zone), as naive UTC."""
    if value is None:
        return None
    try:
        if len(value) == 10:
            parsed = datetime.combine(date.fromisoformat(value), datetime.min.time())
        else:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(
            400,
            f"{param} must be an ISO 8601 date or date-time (e.g. 2026-12-01 or "
            f"2026-12-01T08:00:00Z), not {value!r}",
            param,
            "invalid_parameter",
        ) from None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC).replace(tzinfo=None)
    return parsed


def group(rows: list[dict[str, Any]], by: str) -> list[dict[str, Any]]:
    """Minute rows summed per period (or over everything: "total"), deployment, adapter, key."""
    out: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        period = "" if by == "total" else r["minute"][: PERIODS[by]]
        if by == "hour":
            period += ":00Z"
        elif by == "minute":
            period += "Z"
        key = (period, r["deploymentId"], r["adapterId"], r["keyId"])
        row = out.get(key)
        if row is None:
            row = out[key] = {
                "period": period or None,
                **{c: r[c] for c in COLUMNS[1:7]},
                "requests": 0,
                "promptTokens": 0,
                "completionTokens": 0,
                "totalTokens": 0,
            }
        row["requests"] += r["requests"]
        row["promptTokens"] += r["promptTokens"]
        row["completionTokens"] += r["completionTokens"]
        row["totalTokens"] += r["promptTokens"] + r["completionTokens"]
    return list(out.values())


async def _flush_meter() -> None:
    """Have the meter write what it holds first (otherwise: up to its flush interval old)."""
    try:
        meter = ray.get_actor(names.METER, namespace=names.NAMESPACE)
        await asyncio.wait_for(meter.flush_usage.remote(), FLUSH_WAIT_S)
    except Exception:  # a meter restarting: what is stored
        pass


@router.get("/usage", tags=["usage"])
async def usage(
    _: User,
    deploymentId: str | None = None,
    keyId: str | None = None,
    start: Annotated[
        str | None, Query(description="ISO 8601 date or date-time (UTC), inclusive")
    ] = None,
    end: Annotated[
        str | None, Query(description="ISO 8601 date or date-time (UTC), exclusive")
    ] = None,
    groupBy: Literal["day", "hour", "minute", "total"] = "day",
    format: Literal["json", "csv"] = "json",
):
    """Requests and tokens per period, deployment, adapter and key (what the responses'
    `usage` reported), with totals; `format=csv` downloads the rows."""
    since, until = parse_time(start, "start"), parse_time(end, "end")
    if since and until and since >= until:
        raise ApiError(400, "start must be before end", "start", "invalid_parameter")
    await _flush_meter()
    rows = group(await ctx.registry.usage_rows.remote(since, until, deploymentId, keyId), groupBy)
    if format == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        return Response(
            buf.getvalue(),
            media_type="text/csv",
            headers={"Content-Disposition": 'attachment; filename="raydock-usage.csv"'},
        )
    totals = {
        field: sum(r[field] for r in rows)
        for field in ("requests", "promptTokens", "completionTokens", "totalTokens")
    }
    return {"groupBy": groupBy, "rows": rows, "totals": totals}
