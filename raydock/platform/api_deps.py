"""What every management route shares: the platform's actors and settings, the caller's
management key, the seed's job reference."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Header

from raydock.config import Settings
from raydock.errors import ApiError


class _Ctx:
    settings: Settings
    registry: Any
    lifecycle: Any


ctx = _Ctx()


async def current_user(
    x_api_key: Annotated[str | None, Header(alias="X-api-key")] = None,
    authorization: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    key = x_api_key or (authorization or "").removeprefix("Bearer ").strip() or None
    if not key:
        raise ApiError(401, "missing management API key: send it in the X-api-key header")
    user = await ctx.registry.authenticate_management.remote(key)
    if user is None:
        raise ApiError(401, "invalid management API key", code="invalid_api_key")
    return user


User = Annotated[dict[str, Any], Depends(current_user)]


async def admin_user(user: User) -> dict[str, Any]:
    if not user["isAdmin"]:
        raise ApiError(403, "this action needs an admin management key")
    return user


def job_ref(job: dict[str, Any]) -> dict[str, Any]:
    """The seed's job response; `dock-statusId` repeats the id as the seed's sample spells it."""
    return {
        "dockStatusId": job["dockStatusId"],
        "dock-statusId": job["dockStatusId"],
        "modelId": job["modelId"],
        "deploymentId": job.get("deploymentId"),
        "jobType": job["jobType"],
        "action": job["action"],
        "status": job["status"],
    }
