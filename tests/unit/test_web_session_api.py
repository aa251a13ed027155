"""The dashboard's session routes and the management API's cookie rule, over HTTP (FastAPI's
test client on the API app) with a real registry on SQLite, without Ray."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from raydock.config import load_settings
from raydock.platform import api_deps, sessions
from raydock.platform.api import app
from raydock.platform.registry import Registry
from tests.unit.registry_handle import RegistryHandle


@pytest.fixture
def client(tmp_path, monkeypatch):
    monkeypatch.delenv("RAYDOCK_SECRET_KEY", raising=False)
    reg = Registry(f"sqlite:///{tmp_path / 'raydock.db'}")
    admin_key = reg.ensure_admin()
    monkeypatch.setattr(api_deps.ctx, "settings", load_settings(home=str(tmp_path)), raising=False)
    monkeypatch.setattr(api_deps.ctx, "registry", RegistryHandle(reg), raising=False)
    monkeypatch.setattr(api_deps.ctx, "session_key", None)
    with TestClient(app, base_url="http://raydock.test") as c:
        c.admin_key = admin_key
        yield c


def test_sign_in_sets_an_httponly_strict_cookie_and_returns_the_csrf_token(client):
    refused = client.post("/public/session", json={"apiKey": client.admin_key + "x"})
    assert refused.status_code == 401
    assert refused.json()["error"]["message"] == "this is not a valid management key"
    assert "set-cookie" not in refused.headers

    reply = client.post("/public/session", json={"apiKey": client.admin_key})
    assert reply.status_code == 200
    body = reply.json()
    assert body["signedIn"] and body["user"]["name"] == "admin"
    assert body["maxChunkBytes"] == 100 * 2**20  # the dashboard cuts its uploads by it
    set_cookie = reply.headers.get_list("set-cookie")
    session = next(c for c in set_cookie if c.startswith("raydock_session="))
    csrf = next(c for c in set_cookie if c.startswith("raydock_csrf="))
    assert "HttpOnly" in session and "SameSite=strict" in session and "Path=/" in session
    assert "HttpOnly" not in csrf and "SameSite=strict" in csrf
    assert f"raydock_csrf={body['csrfToken']};" in csrf
    assert client.admin_key not in " ".join(set_cookie)
    assert client.get("/public/session").json()["user"]["name"] == "admin"


def test_the_cookie_needs_the_csrf_header_for_changes(client):
    csrf = client.post("/public/session", json={"apiKey": client.admin_key}).json()["csrfToken"]
    assert client.get("/public/models").status_code == 200
    body = {"name": "u2"}
    refused = client.post("/public/users", json=body)
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "csrf_failed"
    assert client.post("/public/users", json=body, headers={"X-CSRF-Token": "x"}).status_code == 403
    made = client.post("/public/users", json=body, headers={sessions.CSRF_HEADER: csrf})
    assert made.status_code == 201
    # a key header still works alone (API clients), and wins over the cookie
    client.cookies.clear()
    headers = {"X-api-key": client.admin_key}
    assert client.post("/public/users", json={"name": "u3"}, headers=headers).status_code == 201
    assert client.get("/public/models").status_code == 401


def test_sign_out_ends_the_session_on_the_server(client):
    csrf = client.post("/public/session", json={"apiKey": client.admin_key}).json()["csrfToken"]
    token = client.cookies.get(sessions.COOKIE)
    assert client.delete("/public/session").status_code == 403  # no CSRF token
    out = client.delete("/public/session", headers={sessions.CSRF_HEADER: csrf})
    assert out.status_code == 200 and not out.json()["signedIn"]
    assert sessions.COOKIE not in client.cookies
    # the same cookie replayed: refused, and GET /session says signed out and clears it
    client.cookies.set(sessions.COOKIE, token)
    assert client.get("/public/models").status_code == 401
    assert client.get("/public/session").json() == {
        "signedIn": False,
        "user": None,
        "csrfToken": None,
        "expiresAt": None,
        "maxChunkBytes": None,
    }


def test_a_forged_cookie_is_refused(client):
    client.post("/public/session", json={"apiKey": client.admin_key})
    token = client.cookies.get(sessions.COOKIE)
    payload, signature = token.split(".")
    client.cookies.clear()
    client.cookies.set(sessions.COOKIE, payload + "." + signature[::-1])
    reply = client.get("/public/models")
    assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_session"


def test_a_cookie_with_non_ascii_bytes_is_an_invalid_session_not_a_500(client):
    cookie = {"cookie": b"raydock_session=abc.\xe9"}
    signed_out = client.get("/public/session", headers=cookie)
    assert signed_out.status_code == 200 and not signed_out.json()["signedIn"]
    reply = client.get("/public/models", headers=cookie)
    assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_session"


def test_a_bearer_key_is_taken_whatever_the_case_of_its_scheme(client):
    for scheme in ("Bearer", "bearer", "BEARER"):
        headers = {"authorization": f"{scheme} {client.admin_key}"}
        assert client.get("/public/models", headers=headers).status_code == 200, scheme
    for wrong in (f"Basic {client.admin_key}", f"Bearer{client.admin_key}", "Bearer "):
        assert client.get("/public/models", headers={"authorization": wrong}).status_code == 401


def test_a_users_keys_can_be_rotated_and_the_user_deleted(client):
    """A leaked key, someone leaving: the old key and the dashboard sessions begun with it
    stop working at once."""
    admin = {"X-api-key": client.admin_key}
    bob = client.post("/public/users", json={"name": "bob"}, headers=admin).json()
    old = {"X-api-key": bob["apiKey"]}
    assert client.get("/public/users", headers=old).status_code == 403  # admins only
    listed = client.get("/public/users", headers=admin).json()["users"]
    assert [(u["name"], u["managementKeys"]) for u in listed] == [("admin", 1), ("bob", 1)]
    assert "apiKey" not in str(listed) and bob["apiKey"] not in str(listed)

    # bob's dashboard session, begun with the key about to be rotated
    client.post("/public/session", json={"apiKey": bob["apiKey"]})
    assert client.get("/public/session").status_code == 200
    other = client.post(f"/public/users/{listed[0]['userId']}/rotate-key", headers=old)
    assert other.status_code == 403  # not someone else's
    new = client.post("/public/users/me/rotate-key", headers=old).json()
    assert new["userId"] == bob["userId"] and new["apiKey"] != bob["apiKey"]
    assert client.get("/public/me", headers=old).status_code == 401
    assert client.get("/public/session").json().get("signedIn") is not True
    client.cookies.clear()
    assert client.get("/public/me", headers={"X-api-key": new["apiKey"]}).status_code == 200

    # an admin rotates anyone's; then removes bob: his key stops working
    again = client.post(f"/public/users/{bob['userId']}/rotate-key", headers=admin).json()
    assert client.get("/public/me", headers={"X-api-key": new["apiKey"]}).status_code == 401
    assert client.delete(f"/public/users/{bob['userId']}", headers=admin).json()["deleted"]
    assert client.get("/public/me", headers={"X-api-key": again["apiKey"]}).status_code == 401
    assert client.delete(f"/public/users/{bob['userId']}", headers=admin).status_code == 404


def test_nobody_deletes_themselves_so_an_admin_remains(client):
    admin = {"X-api-key": client.admin_key}
    me = client.get("/public/me", headers=admin).json()
    r = client.delete(f"/public/users/{me['userId']}", headers=admin)
    assert r.status_code == 409 and "yourself" in r.text
    ops = client.post("/public/users", json={"name": "ops", "isAdmin": True}, headers=admin)
    ops_key = {"X-api-key": ops.json()["apiKey"]}
    assert client.delete(f"/public/users/{me['userId']}", headers=ops_key).json()["deleted"]
    r = client.delete(f"/public/users/{ops.json()['userId']}", headers=ops_key)
    assert r.status_code == 409
