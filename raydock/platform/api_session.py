"""The web dashboard's sign-in: a management key exchanged for a session cookie.

`POST /api/public/session` checks the key once and sets two cookies: the signed session
(HttpOnly, SameSite=Strict: the page's scripts cannot read it) and its CSRF token (readable,
SameSite=Strict), which the page repeats in `X-CSRF-Token` on every state-changing request
(api_deps.current_user checks it). The key is kept nowhere: not in a cookie, not in the
browser's storage. API clients keep sending their key in X-api-key and need none of this.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from raydock.errors import ApiError
from raydock.platform import sessions
from raydock.platform.api_deps import ctx, session_key

router = APIRouter(prefix="/public", tags=["session"])


class SessionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    apiKey: str = Field(
        ..., min_length=1, max_length=500, description="A management key (X-api-key's value)"
    )


def _secure(request: Request) -> bool:
    proto = request.headers.get("x-forwarded-proto") or request.url.scheme
    return proto == "https"


def _set_cookies(response: Response, request: Request, token: str, csrf: str) -> None:
    common = {
        "max_age": sessions.TTL_S,
        "path": "/",
        "samesite": "strict",
        "secure": _secure(request),
    }
    response.set_cookie(sessions.COOKIE, token, httponly=True, **common)
    response.set_cookie(sessions.CSRF_COOKIE, csrf, httponly=False, **common)


def _clear_cookies(response: Response, request: Request) -> None:
    for name in (sessions.COOKIE, sessions.CSRF_COOKIE):
        response.delete_cookie(
            name,
            path="/",
            samesite="strict",
            secure=_secure(request),
            httponly=name == sessions.COOKIE,
        )


def _view(user: dict[str, Any] | None, session: sessions.Session | None) -> dict[str, Any]:
    if user is None or session is None:
        return {
            "signedIn": False,
            "user": None,
            "csrfToken": None,
            "expiresAt": None,
            "maxChunkBytes": None,
        }
    expires = datetime.fromtimestamp(session.expires, UTC).isoformat().replace("+00:00", "Z")
    return {
        "signedIn": True,
        "user": user,
        "csrfToken": session.csrf,
        "expiresAt": expires,
        "maxChunkBytes": ctx.settings.upload_chunk_max_bytes,  # the dashboard's uploads
    }


@router.post("/session")
async def sign_in(body: SessionCreate, request: Request, response: Response) -> dict[str, Any]:
    """Sign in to the web dashboard with a management key: sets the session cookie (HttpOnly,
    SameSite=Strict, 12 h) and the CSRF cookie; returns the user and the CSRF token."""
    session = sessions.new_session("")  # whose it is, the key tells
    user = await ctx.registry.start_web_session.remote(
        body.apiKey.strip(), session.session_id, session.expires
    )
    if user is None:
        raise ApiError(
            401, "this is not a valid management key", param="apiKey", code="invalid_api_key"
        )
    session = dataclasses.replace(session, user_id=user["userId"])
    _set_cookies(response, request, sessions.sign(session_key(), session), session.csrf)
    return _view(user, session)


async def _current(request: Request) -> tuple[dict[str, Any] | None, sessions.Session | None]:
    session = sessions.verify(session_key(), request.cookies.get(sessions.COOKIE))
    if session is None:
        return None, None
    user = await ctx.registry.session_user.remote(session.session_id, session.user_id)
    return user, session if user else None


@router.get("/session")
async def get_session(request: Request, response: Response) -> dict[str, Any]:
    """The signed-in user and the session's CSRF token, or `signedIn: false`."""
    user, session = await _current(request)
    if session is None and sessions.COOKIE in request.cookies:
        _clear_cookies(response, request)  # expired, forged, or its key was deleted
    return _view(user, session)


@router.delete("/session")
async def sign_out(request: Request, response: Response) -> dict[str, Any]:
    """Sign out: clears both cookies (a live session needs its CSRF token, as every change)."""
    _, session = await _current(request)
    if session is not None and not sessions.csrf_ok(
        session, request.method, request.headers.get(sessions.CSRF_HEADER)
    ):
        raise ApiError(
            403, f"missing or wrong CSRF token in {sessions.CSRF_HEADER}", code="csrf_failed"
        )
    if session is not None:
        await ctx.registry.end_web_session.remote(session.session_id)
    _clear_cookies(response, request)
    return _view(None, None)
