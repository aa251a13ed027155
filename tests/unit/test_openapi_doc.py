"""The combined OpenAPI document tells the truth about errors, bodies and limits, and /docs
loads Swagger UI from raydock itself (no CDN)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from fastapi.testclient import TestClient

from raydock import openapi_doc
from raydock.config import hardware_profiles
from raydock.serve_apps import gateway

ERROR_REF = "#/components/schemas/ErrorResponse"
MGMT = openapi_doc.MANAGEMENT


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return gateway.combined_openapi()


def operations(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        f"{method.upper()} {path}": op
        for path, item in doc["paths"].items()
        for method, op in item.items()
    }


def errors_of(op: dict[str, Any]) -> set[int]:
    return {int(code) for code in op["responses"] if code[0] in "45"}


def resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema or "allOf" in schema:
        if "$ref" in schema:
            schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
        else:
            schema = schema["allOf"][0]
    return schema


def test_is_a_valid_openapi_31_document(doc):
    validator = pytest.importorskip("openapi_spec_validator")
    assert doc["openapi"].startswith("3.1")
    validator.validate(doc)


def test_every_error_response_is_the_error_body(doc):
    for name, op in operations(doc).items():
        assert errors_of(op), name
        for code in op["responses"]:
            if code[0] not in "45":
                continue
            schema = op["responses"][code]["content"]["application/json"]["schema"]
            if code == "422":  # management validation errors add `detail`
                assert schema["$ref"].endswith("/ValidationErrorResponse"), name
                schema = doc["components"]["schemas"]["ValidationErrorResponse"]["allOf"][0]
            assert schema == {"$ref": ERROR_REF}, (name, code)


def test_fastapis_unused_422_shape_is_gone(doc):
    assert "HTTPValidationError" not in json.dumps(doc)
    assert "ValidationError" not in doc["components"]["schemas"]


def test_error_body_matches_what_the_server_sends(doc):
    from raydock.errors import error_body

    schemas = doc["components"]["schemas"]
    error = schemas["ErrorResponse"]["properties"]["error"]
    sent = error_body(409, "clash", None, "conflict", "req_1")
    assert set(error["required"]) == set(sent["error"])
    assert sent["error"]["type"] in error["properties"]["type"]["enum"]
    detail = schemas["ValidationErrorResponse"]["allOf"][1]
    assert detail["required"] == ["detail"]


@pytest.mark.parametrize(
    ("route", "expected"),
    [
        ("GET /v1/models", {401, 404, 413, 500, 503}),
        ("POST /v1/chat/completions", {400, 401, 404, 413, 429, 500, 503, 504}),
        (
            "POST /deployments/{deployment_id}/v1/completions",
            {400, 401, 404, 413, 429, 500, 503, 504},
        ),
        (f"GET {MGMT}/health", {413, 500, 503}),  # no key needed
        (f"GET {MGMT}/models", {401, 413, 500, 503}),
        (f"POST {MGMT}/users", {400, 401, 403, 413, 422, 500, 503}),
        (f"GET {MGMT}/models/{{modelId}}", {401, 404, 413, 500, 503}),
        (f"POST {MGMT}/models/{{modelId}}/deploy", {400, 401, 404, 409, 413, 422, 500, 503}),
        (f"POST {MGMT}/deployments/{{deploymentId}}/undeploy", {401, 404, 409, 413, 500, 503}),
        (f"DELETE {MGMT}/models/{{modelId}}", {401, 404, 409, 413, 500, 503}),
        (f"POST {MGMT}/models/{{modelId}}/export", {401, 404, 409, 413, 500, 503}),
        (f"POST {MGMT}/models/import", {400, 401, 409, 422, 500, 503}),  # no body limit
        (
            f"PUT {MGMT}/files/session/{{sessionId}}/chunks/{{chunkNumber}}",
            {400, 401, 404, 413, 422, 500, 503},  # chunkNumber is an int
        ),
    ],
)
def test_statuses_route_by_route(doc, route, expected):
    assert errors_of(operations(doc)[route]) == expected


def test_only_management_routes_answer_422(doc):
    for name, op in operations(doc).items():
        if "422" in op["responses"]:
            assert name.split()[1].startswith(MGMT), name


def test_route_table_names_real_routes(doc):
    routes = {f"{n.split()[0]} {n.split()[1].removeprefix(MGMT)}" for n in operations(doc)}
    stale = (set(openapi_doc.ROUTE_ERRORS) | openapi_doc.NO_BODY_LIMIT) - routes
    assert not stale


def test_device_type_lists_the_hardware_profiles(doc):
    device = doc["components"]["schemas"]["DeployRequest"]["properties"]["deviceType"]
    assert device["enum"] == list(hardware_profiles())


def test_inference_routes_document_their_bodies(doc):
    ops = operations(doc)
    for path in doc["paths"]:
        if path.startswith("/api/") or "post" not in doc["paths"][path]:
            continue
        schema = ops[f"POST {path}"]["requestBody"]["content"]["application/json"]["schema"]
        field = "messages" if path.endswith("/chat/completions") else "prompt"
        assert field in resolve(doc, schema)["required"], path
        if path.startswith("/v1/"):  # the body's `model` names the deployment
            assert schema["required"] == ["model"]
    chat = doc["components"]["schemas"]["ChatRequest"]["properties"]["messages"]
    assert chat["items"]["$ref"] == "#/components/schemas/ChatMessage"


def test_ranges_match_the_validators(doc):
    schemas = doc["components"]["schemas"]
    hp = schemas["HyperParameters"]["properties"]
    assert (hp["maxTokens"]["minimum"], hp["maxTokens"]["maximum"]) == (0, 512)
    assert hp["stopSequence"]["items"]["minLength"] == 1
    timeout = schemas["DeployRequest"]["properties"]["timeout"]
    assert (timeout["minimum"], timeout["maximum"]) == (30, 180)
    assert schemas["ModelUpdate"]["properties"]["name"]["type"] == "null"
    stop = schemas["ChatRequest"]["properties"]["stop"]["anyOf"]
    assert {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4} in stop
    prompt = schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    assert prompt[1]["maxItems"] == 1


@pytest.fixture
def client(monkeypatch) -> TestClient:
    # the request guard reads the body limit from the gateway's context, set by `configure`
    monkeypatch.setattr(gateway.ctx, "max_request_bytes", 2**20, raising=False)
    return TestClient(gateway.app)


def test_docs_load_swagger_ui_from_raydock(client):
    html = client.get("/docs").text
    urls = re.findall(r"""(?:src|href)="([^"]+)\"""", html)
    assert urls and all(u.startswith(openapi_doc.ASSETS_URL + "/") for u in urls), urls
    assert "http://" not in html and "https://" not in html
    for url in urls:
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert asset.content


def test_openapi_json_is_served(client):
    served = client.get("/openapi.json").json()
    assert f"{MGMT}/models/{{modelId}}/deploy" in served["paths"]
