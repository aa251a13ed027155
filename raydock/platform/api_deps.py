"""What every management route shares: the platform's actors and settings, the caller's
management key, the seed's job reference."""

from __future__ import annotations

import os
from typing import Annotated, Any

from fastapi import Depends, Header, Request

from raydock.config import Settings
from raydock.errors import ApiError
from raydock.platform import sessions
from raydock.platform.secrets import platform_key
from raydock.serve_apps.access import bearer_token


class _Ctx:
    settings: Settings
    registry: Any
    lifecycle: Any
    session_key: bytes | None = None


ctx = _Ctx()


def session_key() -> bytes:
    """The key that signs dashboard sessions (derived from the platform key, as bootstrap
    reads it: RAYDOCK_SECRET_KEY, else the data dir's key file)."""
    if ctx.session_key is None:
        configured = os.environ.get("RAYDOCK_SECRET_KEY", "")
        ctx.session_key = sessions.signing_key(platform_key(ctx.settings.home_path, configured))
    return ctx.session_key


async def current_user(
    request: Request,
    x_api_key: Annotated[str | None, Header(alias="X-api-key")] = None,
    authorization: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    """The caller: by a management key (X-api-key or Bearer), else by the dashboard's session
    cookie, which needs the CSRF header on state-changing methods."""
    key = x_api_key or bearer_token(authorization)
    if not key and sessions.COOKIE in request.cookies:
        return await session_user(request)
    if not key:
        raise ApiError(401, "missing management API key: send it in the X-api-key header")
    user = await ctx.registry.authenticate_management.remote(key)
    if user is None:
        raise ApiError(401, "invalid management API key", code="invalid_api_key")
    return user


async def session_user(request: Request) -> dict[str, Any]:
    session = sessions.verify(session_key(), request.cookies.get(sessions.COOKIE))
    if session is None:
        raise ApiError(
            401, "your session has expired or is invalid: sign in again", code="invalid_session"
        )
    if not sessions.csrf_ok(session, request.method, request.headers.get(sessions.CSRF_HEADER)):
        raise ApiError(
            403,
            f"missing or wrong CSRF token: send the session's token in {sessions.CSRF_HEADER}",
            code="csrf_failed",
        )
    user = await ctx.registry.session_user.remote(session.session_id, session.user_id)
    if user is None:  # signed out, or the management key it began with was deleted
        raise ApiError(401, "your session has ended: sign in again", code="invalid_session")
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


def limits_need_metering(limits: dict[str, Any] | None) -> None:
    """Replicas enforce a key's limits from what they meter: without metering they would be
    shown and never applied (409; the API's key routes and apply alike)."""
    if not ctx.settings.metering and any(v is not None for v in (limits or {}).values()):
        raise ApiError(
            409,
            "limits: key limits need metering, which is off on this platform (metering: false)",
            "limits",
        )
