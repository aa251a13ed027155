"""A NUL character (\\x00) in any input of the management API: PostgreSQL's text columns
cannot hold one (SQLite's can), so it is refused up front, naming the field, on both
databases alike (it was a 500 on PostgreSQL). JSON bodies (schemas._Body), the URL
(errors.RequestGuard) and the multipart import's form fields (api_uploads)."""

from __future__ import annotations

import pytest
from fastapi import FastAPI, Request, params
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from raydock import errors
from raydock.config import hardware_profiles, load_settings
from raydock.platform import api_deps, schemas
from raydock.platform.api import app
from raydock.platform.api_session import SessionCreate
from raydock.platform.registry import Registry
from tests.unit.registry_handle import RegistryHandle

NUL = "\x00"


@pytest.fixture
def http(db_url, tmp_path, monkeypatch):
    """The API app on a registry of `db_url` (SQLite, then PostgreSQL), as the admin."""
    reg = Registry(db_url)
    admin_key = reg.ensure_admin()
    monkeypatch.setattr(api_deps.ctx, "settings", load_settings(home=str(tmp_path)), raising=False)
    monkeypatch.setattr(api_deps.ctx, "registry", RegistryHandle(reg), raising=False)
    with TestClient(app, base_url="http://raydock.test", headers={"X-api-key": admin_key}) as c:
        c.reg = reg
        yield c
    reg.close()


def refused(r, status: int, param: str) -> str:
    assert (r.status_code, r.json()["error"]["param"]) == (status, param), r.text
    return r.json()["error"]["message"]


def test_a_nul_in_a_path_is_not_found(http):
    """No id or name holds a NUL: whatever the route, nothing is there (404, as SQLite said)."""
    for method, path in [
        ("GET", "/public/models/a%00b"),
        ("PATCH", "/public/models/a%00b"),
        ("DELETE", "/public/models/a%00b"),
        ("GET", "/public/deployments/a%00b"),
        ("GET", "/public/connections/a%00b"),
        ("GET", "/public/files/session/a%00b"),
        ("GET", "/public/mod%00els"),
    ]:
        r = http.request(method, path, json={"description": "x"} if method == "PATCH" else None)
        assert "NUL" in refused(r, 404, "path"), path


def test_a_nul_in_a_query_parameter_is_refused_naming_it(http):
    assert "name" in refused(http.get("/public/catalog", params={"name": "a\0"}), 422, "name")
    r = http.get("/public/usage", params={"deploymentId": "dep\0", "groupBy": "day"})
    assert "NUL" in refused(r, 422, "deploymentId")
    assert r.json()["detail"][0]["field"] == "deploymentId"


def test_a_nul_in_a_json_body_is_refused_naming_the_field(http):
    uid = http.reg.authenticate_management(http.headers["X-api-key"])["userId"]
    model = http.reg.create_model("m", "file", uid)
    url = f"/public/models/{model['modelId']}"
    message = refused(http.patch(url, json={"description": f"x{NUL}y"}), 422, "description")
    assert message == "description: must not contain a NUL character (\\u0000)"
    message = refused(http.patch(url, json={"tags": ["ok", f"b{NUL}"]}), 422, "tags")
    assert message == "tags: item 1 must not contain a NUL character (\\u0000)"
    assert http.reg.get_model(model["modelId"])["description"] == ""  # nothing half-written

    refused(http.post("/public/users", json={"name": f"bob{NUL}"}), 422, "name")
    refused(http.post("/public/users", json={"name": "b", "email": f"b{NUL}@x.io"}), 422, "email")
    body = {"name": f"hf{NUL}", "token": "hf_abc", "verify": False}
    refused(http.post("/public/connections", json=body), 422, "name")
    assert http.reg.list_connections() == []
    # nested: the field's whole path
    device = next(iter(hardware_profiles()))
    deploy = {"name": "d", "deviceType": device, "hyperParameters": {"stopSequence": [f"a{NUL}"]}}
    r = http.post(f"{url}/deploy?modelType=openSource", json=deploy)
    assert "item 0 must not" in refused(r, 422, "hyperParameters.stopSequence")
    # a dict's keys too (an apply document's line numbers)
    doc = {"spec": {"name": "d", "deviceType": device, "model": {"id": "cm-1"}}}
    r = http.post("/public/apply", json={"documents": [doc | {"lines": {f"a{NUL}": 1}}]})
    assert "key 'a\\x00'" in refused(r, 422, "documents.0.lines")
    # a key with a NUL is only not a key (it is hashed, never stored)
    r = http.post("/public/session", json={"apiKey": f"k{NUL}"})
    assert r.status_code == 401, r.text


def test_every_json_body_is_held_to_the_rule():
    """Each route's JSON body is a schemas._Body (whose validator refuses a NUL); the one
    that is not, the sign-in's, carries only a key, which is hashed and never stored. The
    multipart import's form fields are checked by the route."""
    bodies = {
        route.name: p.field_info.annotation
        for route in app.routes
        if isinstance(route, APIRoute)
        for p in route.dependant.body_params
        if type(p.field_info) is params.Body
    }
    assert bodies.pop("sign_in") is SessionCreate
    assert list(SessionCreate.model_fields) == ["apiKey"]
    assert bodies and all(issubclass(m, schemas._Body) for m in bodies.values()), bodies


def multipart(file_name: str, **fields: str) -> tuple[bytes, str]:
    """A multipart body written by hand: clients percent-encode a NUL in a file name."""
    boundary = "b0undary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
        for k, v in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{file_name}"'
        "\r\nContent-Type: application/zip\r\n\r\nPK\r\n"
    )
    body = ("".join(parts) + f"--{boundary}--\r\n").encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_a_nul_in_the_multipart_imports_fields_is_refused_and_nothing_kept(http):
    uploads = api_deps.ctx.settings.uploads_path
    for field, fields, name in [
        ("description", {"description": f"x{NUL}"}, "m.zip"),
        ("tags", {"tags": f"a,b{NUL}"}, "m.zip"),
        ("baseModelId", {"kind": "adapter", "baseModelId": f"cm{NUL}"}, "m.zip"),
        ("file", {}, f"m{NUL}.zip"),
    ]:
        body, content_type = multipart(name, **fields)
        r = http.post("/public/models/import", content=body, headers={"content-type": content_type})
        assert "NUL" in refused(r, 422, field), field
    assert http.reg.list_models() == []
    assert not uploads.exists() or list(uploads.iterdir()) == []


def test_the_inference_apps_take_a_nul_in_a_body_they_parse_themselves():
    """errors.install serves the gateway too: a NUL in chat content is text there."""
    gateway = FastAPI()
    errors.install(gateway, lambda: 2**20)

    @gateway.post("/v1/chat/completions")
    async def chat(request: Request):
        return {"content": (await request.json())["messages"][0]["content"]}

    client = TestClient(gateway)
    body = {"messages": [{"role": "user", "content": f"a{NUL}b"}]}
    r = client.post("/v1/chat/completions", json=body)
    assert (r.status_code, r.json()) == (200, {"content": f"a{NUL}b"})
    r = client.post("/v1/chat/completions?x=%00", json=body)
    assert (r.status_code, r.json()["error"]["param"]) == (422, "x")
