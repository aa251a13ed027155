"""Browser sessions for the web dashboard: signed, expiring tokens and the CSRF check.

A session token is `<payload>.<signature>` (base64url): the payload names the session (a
database row, which records the management key it began with: signing out deletes the row,
and deleting that key ends the session), the user, a CSRF token and an expiry; the signature
is HMAC-SHA256 under a key derived from the platform key (secrets.platform_key), so a token
cannot be made or altered without it. The management key itself is in neither the cookie nor
the browser's storage.

The token travels in an HttpOnly, SameSite=Strict cookie. State-changing requests made with
it must repeat the CSRF token in a header (double submit: the page reads it from the
non-HttpOnly CSRF cookie or from `GET /api/public/session`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

COOKIE = "raydock_session"
CSRF_COOKIE = "raydock_csrf"
CSRF_HEADER = "X-CSRF-Token"
TTL_S = 12 * 3600
#: methods that change state: a cookie-authenticated request with one needs the CSRF header
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_CONTEXT = b"raydock web session v1"


def signing_key(platform_key: bytes) -> bytes:
    """The sessions' own key, derived from the platform key (which also seals secrets)."""
    return hmac.new(platform_key, _CONTEXT, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Session:
    session_id: str
    user_id: str
    csrf: str
    expires: int  # unix seconds


def new_session(user_id: str, *, ttl_s: int = TTL_S, now: float | None = None) -> Session:
    """A fresh session (its id, CSRF token and expiry), not yet signed."""
    now = time.time() if now is None else now
    return Session(
        "ws-" + secrets.token_urlsafe(18), user_id, secrets.token_urlsafe(24), int(now + ttl_s)
    )


def sign(key: bytes, session: Session) -> str:
    """The cookie's value for a session."""
    payload = _b64(
        json.dumps(
            {
                "s": session.session_id,
                "u": session.user_id,
                "c": session.csrf,
                "e": session.expires,
            },
            separators=(",", ":"),
        ).encode()
    )
    return f"{payload}.{_sign(key, payload)}"


def issue(key: bytes, user_id: str, **kwargs) -> tuple[str, Session]:
    """A new signed session: (token, Session)."""
    session = new_session(user_id, **kwargs)
    return sign(key, session), session


def _sign(key: bytes, payload: str) -> str:
    return _b64(hmac.new(key, payload.encode(), hashlib.sha256).digest())


def verify(key: bytes, token: str | None, *, now: float | None = None) -> Session | None:
    """The session a token carries; None when it is malformed, forged or expired."""
    if not token or token.count(".") != 1:
        return None
    payload, signature = token.split(".")
    # bytes: compare_digest refuses str with non-ASCII characters (a TypeError, so a 500)
    if not hmac.compare_digest(_sign(key, payload).encode(), signature.encode()):
        return None
    try:
        data = json.loads(_unb64(payload))
        session = Session(str(data["s"]), str(data["u"]), str(data["c"]), int(data["e"]))
    except (ValueError, KeyError, TypeError):
        return None
    if session.expires <= (time.time() if now is None else now):
        return None
    return session


def csrf_ok(session: Session, method: str, header: str | None) -> bool:
    """Whether a request made with this session may go on: safe methods always, others only
    with the session's CSRF token in the header."""
    if method.upper() not in UNSAFE_METHODS:
        return True
    return bool(header) and hmac.compare_digest(header.encode(), session.csrf.encode())
