"""raydock's error bodies for the framework's own refusals (no Ray needed)."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel

from raydock import errors


class Echo(BaseModel):
    text: str


def test_a_405_names_every_method_of_the_path():
    app = FastAPI()
    errors.install(app)

    @app.get("/things/{thing}")
    @app.delete("/things/{thing}")
    async def thing(thing: str):
        return {}

    @app.patch("/things/{thing}")
    async def edit(thing: str):
        return {}

    r = TestClient(app).request("TRACE", "/things/1")
    assert r.status_code == 405
    # Starlette's own header named the first route's methods only (GET)
    assert r.headers["allow"] == "DELETE, GET, PATCH"
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert r.json()["error"]["request_id"]


def test_a_literal_path_is_its_own_route(monkeypatch):
    """GET /models/import is the import route refusing GET, not a lookup of model "import"."""
    from types import SimpleNamespace

    from starlette.routing import Match

    from raydock.platform import api

    monkeypatch.setattr(api.ctx, "settings", SimpleNamespace(max_request_bytes=2**20), False)
    client = TestClient(api.app)
    for method, path, allow in [
        ("GET", "/public/models/import", "POST"),
        ("DELETE", "/public/models/import", "POST"),
        ("GET", "/public/files/session/start", "POST"),
    ]:
        r = client.request(method, path)
        assert (r.status_code, r.headers["allow"]) == (405, allow), path
    # any other value is an id
    scope = {"type": "http", "method": "GET", "path": "/public/models/cm-1", "root_path": ""}
    matched = [r.name for r in api.app.routes if r.matches(scope)[0] == Match.FULL]
    assert matched == ["get_model"]


def test_every_422_lists_the_fields_at_fault():
    """The document gives every 422 the ValidationErrorResponse shape: `detail` too when a
    route's own check refuses (schemas.parse_tags), not only FastAPI's validation."""
    from raydock.errors import ApiError

    app = FastAPI()
    errors.install(app)

    @app.post("/tags")
    async def tags():
        raise ApiError(422, "tags.1: at most 100 characters (got 101)", "tags.1")

    body = TestClient(app).post("/tags").json()
    assert body["error"]["param"] == "tags.1"
    assert body["detail"] == [
        {"field": "tags.1", "message": "tags.1: at most 100 characters (got 101)"}
    ]


def test_a_body_over_the_limit_is_a_413_without_a_content_length_too():
    """Sent in chunks, the body outgrows the limit while FastAPI reads it, and FastAPI
    answers any error it meets there with a 400 "error parsing the body": the guard's 413
    is what the client sees."""
    app = FastAPI()
    errors.install(app, lambda: 100)

    @app.post("/echo")
    async def echo(body: Echo):
        return body

    client = TestClient(app)
    big = b'{"text": "' + b"a" * 200 + b'"}'
    for content in (big, (piece for piece in (big[:50], big[50:]))):  # then no Content-Length
        r = client.post("/echo", content=content, headers={"content-type": "application/json"})
        assert (r.status_code, r.json()["error"]["code"]) == (413, "body_too_large"), r.text
    assert client.post("/echo", json={"text": "a"}).status_code == 200
