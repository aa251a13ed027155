"""Management routes for notifications (platform/notify.py): a user's own webhook, and every
delivery with its attempts."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query

from raydock.platform import notify, schemas
from raydock.platform.api_deps import User, ctx

router = APIRouter(prefix="/public")

Kind = Literal[notify.KINDS]  # type: ignore[valid-type]
Status = Literal[notify.STATUSES]  # type: ignore[valid-type]


@router.put("/users/me/webhook", tags=["notifications"])
async def set_my_webhook(body: schemas.WebhookSet, user: User) -> dict[str, Any]:
    """Set (or replace) the webhook your events go to. The answer carries a new signing
    secret, shown this once: verify each delivery's `X-Raydock-Signature` with it."""
    return await ctx.registry.set_user_webhook.remote(user["userId"], body.url)


@router.get("/users/me/webhook", tags=["notifications"])
async def get_my_webhook(user: User) -> dict[str, Any]:
    """Your webhook's URL (never its secret); 404 when none is set."""
    return await ctx.registry.get_user_webhook.remote(user["userId"])


@router.delete("/users/me/webhook", tags=["notifications"])
async def delete_my_webhook(user: User) -> dict[str, Any]:
    await ctx.registry.delete_user_webhook.remote(user["userId"])
    return {"deleted": True}


@router.get("/notifications/deliveries", tags=["notifications"])
async def list_deliveries(
    _: User,
    kind: Annotated[Kind | None, Query(description="Only this event kind.")] = None,
    status: Annotated[Status | None, Query(description="Only deliveries in this state.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="At most this many, 1–1000.")] = 100,
) -> dict[str, Any]:
    """Each email and webhook delivery, newest first: its event, target, status
    (pending while it is retried, then delivered or failed), attempts and last error."""
    found = await ctx.registry.list_deliveries.remote(kind, status, limit)
    return {"deliveries": found, "total": len(found)}
