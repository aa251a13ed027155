"""Dashboard sessions (platform/sessions.py): signed, expiring, bound to a CSRF token."""

from __future__ import annotations

import base64
import json
import time

from sqlalchemy import delete

from raydock.platform import db, security, sessions
from raydock.platform.registry import Registry

KEY = sessions.signing_key(b"platform-key")


def test_a_token_carries_its_session_and_no_key():
    token, session = sessions.issue(KEY, "u-1", now=1000)
    assert sessions.verify(KEY, token, now=1001) == session
    assert (session.user_id, session.expires) == ("u-1", 1000 + sessions.TTL_S)
    assert session.session_id.startswith("ws-")
    assert len(session.csrf) >= 32
    payload = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert set(payload) == {"s", "u", "c", "e"}  # ids, CSRF token, expiry: no key
    # every session has its own id and CSRF token
    again = sessions.issue(KEY, "u-1", now=1000)[1]
    assert again.csrf != session.csrf and again.session_id != session.session_id


def test_expired_tokens_are_refused():
    token, _ = sessions.issue(KEY, "u-1", ttl_s=60, now=1000)
    assert sessions.verify(KEY, token, now=1059) is not None
    assert sessions.verify(KEY, token, now=1060) is None


def test_forged_or_damaged_tokens_are_refused():
    token, _ = sessions.issue(KEY, "u-1", now=1000)
    payload, signature = token.split(".")
    other = sessions.signing_key(b"another platform key")
    assert sessions.verify(other, token, now=1001) is None  # signed under another key
    # a payload edited to another user, with the old signature
    forged = json.loads(base64.urlsafe_b64decode(payload + "=="))
    forged["u"] = "u-admin"
    forged_payload = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode()
    assert sessions.verify(KEY, f"{forged_payload}.{signature}", now=1001) is None
    for bad in ("", None, "x", "a.b.c", f"{payload}.", f".{signature}", payload, token + "x"):
        assert sessions.verify(KEY, bad, now=1001) is None


def test_a_token_with_non_ascii_characters_is_refused_not_an_error():
    token, _ = sessions.issue(KEY, "u-1", now=1000)
    payload, signature = token.split(".")
    assert sessions.verify(KEY, f"{payload}.\u00e9{signature[1:]}", now=1001) is None
    assert sessions.verify(KEY, f"\u00e9{payload}.{signature}", now=1001) is None


def test_the_signing_key_is_derived_not_the_platform_key():
    assert KEY != b"platform-key" and len(KEY) == 32
    assert sessions.signing_key(b"platform-key") == KEY  # stable across restarts


def test_csrf_is_needed_for_state_changes_only():
    _, session = sessions.issue(KEY, "u-1", now=1000)
    for method in ("GET", "HEAD", "OPTIONS"):
        assert sessions.csrf_ok(session, method, None)
    for method in ("POST", "PUT", "PATCH", "DELETE", "delete"):
        assert not sessions.csrf_ok(session, method, None)
        assert not sessions.csrf_ok(session, method, "")
        assert not sessions.csrf_ok(session, method, session.csrf + "x")
        assert sessions.csrf_ok(session, method, session.csrf)


def test_the_registry_records_sessions_and_ends_them(tmp_path):
    """A session lives in the database: signing out, expiry, and deleting the management key
    it began with each end it, whatever its signed cookie says."""
    reg = Registry(f"sqlite:///{tmp_path / 'raydock.db'}")
    key = reg.ensure_admin()
    soon = time.time() + 60
    assert reg.start_web_session(key + "x", "ws-bad", soon) is None
    admin = reg.start_web_session(key, "ws-1", soon)
    assert admin["name"] == "admin" and "keyId" not in admin
    assert reg.session_user("ws-1", admin["userId"]) == admin
    assert reg.session_user("ws-1", "u-someone-else") is None
    assert reg.session_user("ws-bad", admin["userId"]) is None  # a refused sign-in left nothing
    reg.end_web_session("ws-1")
    assert reg.session_user("ws-1", admin["userId"]) is None  # signed out

    reg.start_web_session(key, "ws-old", time.time() - 1)
    assert reg.session_user("ws-old", admin["userId"]) is None  # expired

    reg.start_web_session(key, "ws-2", soon)
    with reg._tx() as s:
        s.execute(delete(db.ApiKey).where(db.ApiKey.key_hash == security.hash_key(key)))
    assert reg.session_user("ws-2", admin["userId"]) is None  # its key was deleted
