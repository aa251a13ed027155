"""Management routes for notifications (platform/notify.py): a user's own webhook, and every
delivery with its attempts."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query

from raydock.errors import ApiError, NotFound
from raydock.platform import notify, pages, schemas
from raydock.platform.api_deps import User, ctx

router = APIRouter(prefix="/public")

Kind = Literal[notify.KINDS]  # type: ignore[valid-type]
Status = Literal[notify.STATUSES]  # type: ignore[valid-type]


@router.put("/users/me/webhook", tags=["notifications"])
async def set_my_webhook(body: schemas.WebhookSet, user: User) -> dict[str, Any]:
    """Set (or replace) the webhook your events go to. The answer carries a new signing
    secret, shown this once: verify each delivery's `X-Raydock-Signature` with it. The URL's
    host must resolve to public addresses (or networks the platform allows). The URL is
    stored encrypted and never shown again, in this answer neither: `url` is masked, its
    scheme, host and port, the last 4 characters of the rest and a short hash of it (e.g.
    `https://hooks.slack.com/…/XyZ9 (5d41402a)`, as deliveries show it)."""
    try:
        allowed = ctx.settings.webhook_allowed_networks
        await asyncio.to_thread(notify.webhook_address, body.url, allowed)
    except notify.WebhookAddressRefused as exc:
        raise ApiError(400, f"url: {exc}", "url", "webhook_address_refused") from None
    return await ctx.registry.set_user_webhook.remote(user["userId"], body.url)


@router.get("/users/me/webhook", tags=["notifications"])
async def get_my_webhook(user: User) -> dict[str, Any]:
    """Your webhook: `url` masked as the answer to PUT shows it (never the URL itself, nor
    its secret) and `createdAt`, when it was set; 404 when none is set."""
    return await ctx.registry.get_user_webhook.remote(user["userId"])


@router.delete("/users/me/webhook", tags=["notifications"])
async def delete_my_webhook(user: User) -> dict[str, Any]:
    await ctx.registry.delete_user_webhook.remote(user["userId"])
    return {"deleted": True}


@router.get("/notifications/deliveries", tags=["notifications"])
async def list_deliveries(
    user: User,
    kind: Annotated[Kind | None, Query(description="Only this event kind.")] = None,
    status: Annotated[Status | None, Query(description="Only deliveries in this state.")] = None,
    limit: pages.Limit = pages.PAGE_DEFAULT,
    offset: pages.Offset = 0,
) -> dict[str, Any]:
    """A page of the email and webhook deliveries, newest first: its event, target (a URL masked, as
    GET /users/me/webhook shows it), status (pending while it is retried, then delivered or failed),
    attempts and last error. An admin sees every delivery; any other user the deliveries of
    their own events to their own email and webhook, however old."""
    own = None if user["isAdmin"] else (user["userId"], sorted(await _own_targets(user)))
    found = await ctx.registry.deliveries_page.remote(kind, status, limit, offset, own)
    return pages.page(found, "deliveries", limit, offset)


async def _own_targets(user: dict[str, Any]) -> set[str]:
    """The user's own targets, as deliveries show them: their email and their webhook (the
    registry shows its URL masked as deliveries record it)."""
    own = {user["email"]} if user.get("email") else set()
    try:
        hook = await ctx.registry.get_user_webhook.remote(user["userId"])
        own.add(hook["url"])
    except NotFound:
        pass
    return own
