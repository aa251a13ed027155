"""The combined OpenAPI document tells the truth about errors, bodies and limits, and /docs
loads Swagger UI from raydock itself (no CDN)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from fastapi.testclient import TestClient

from raydock.config import hardware_profiles
from raydock.platform import openapi_doc
from raydock.serve_apps import docs_page, gateway, protocol

ERROR_REF = "#/components/schemas/ErrorResponse"
MGMT = openapi_doc.MANAGEMENT


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return openapi_doc.combined()


def operations(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        f"{method.upper()} {path}": op
        for path, item in doc["paths"].items()
        for method, op in item.items()
    }


def errors_of(op: dict[str, Any]) -> set[int]:
    return {int(code) for code in op["responses"] if code[0] in "45"}


def resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema or "$ref" in schema.get("allOf", [{}])[0]:
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
        (f"GET {MGMT}/models", {401, 413, 422, 500, 503}),  # 422: limit or offset out of range
        (f"POST {MGMT}/users", {400, 401, 403, 413, 422, 500, 503}),
        (f"GET {MGMT}/models/{{modelId}}", {401, 404, 405, 413, 500, 503}),  # 405: "import"
        (f"POST {MGMT}/models/{{modelId}}/deploy", {400, 401, 404, 409, 413, 422, 500, 503}),
        (f"POST {MGMT}/deployments/{{deploymentId}}/undeploy", {401, 404, 409, 413, 500, 503}),
        (f"DELETE {MGMT}/models/{{modelId}}", {401, 404, 405, 409, 413, 500, 503}),
        # 422: its query parameter (deploymentId) holds a NUL
        (f"POST {MGMT}/models/{{modelId}}/export", {401, 404, 409, 413, 422, 500, 503}),
        # no body limit; 413: the disk is full
        (f"POST {MGMT}/models/import", {400, 401, 409, 413, 422, 500, 503}),
        (
            f"DELETE {MGMT}/files/session/{{sessionId}}",
            {401, 404, 405, 409, 413, 500, 503},
        ),  # 405: "start"; 409: being completed
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
        field = "input" if path.endswith("/responses") else field  # the Responses API
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
    most = hp["stopSequence"]["maxItems"]  # a request's, as a deployment's default's
    assert {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": most} in stop
    with pytest.raises(protocol.BadParam, match="stop"):
        protocol.parse(protocol.CompletionRequest, {"prompt": "x", "stop": ["s"] * (most + 1)})
    protocol.parse(protocol.CompletionRequest, {"prompt": "x", "stop": ["s"] * most})
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
    assert urls and all(u.startswith(docs_page.ASSETS_URL + "/") for u in urls), urls
    assert "http://" not in html and "https://" not in html
    for url in urls:
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert asset.content


def test_security_schemes_say_how_each_route_authenticates(doc):
    schemes = doc["components"]["securitySchemes"]
    assert schemes["ManagementKey"] == schemes["ManagementKey"] | {
        "type": "apiKey",
        "in": "header",
        "name": "X-api-key",
    }
    assert schemes["DeploymentKey"]["type"] == "http"
    assert schemes["DeploymentKey"]["scheme"] == "bearer"
    for name, op in operations(doc).items():
        path = name.split()[1]
        headers = {p["name"].lower() for p in op.get("parameters", []) if p["in"] == "header"}
        assert not headers & {"x-api-key", "authorization"}, name  # the scheme says it
        if path == f"{MGMT}/health":
            assert "security" not in op and "401" not in op["responses"]
        elif path == f"{MGMT}/session":  # the dashboard's sign-in: a key in the body
            assert "security" not in op, name
        elif path.startswith(MGMT):
            assert op["security"] == [{"ManagementKey": []}], name
        else:
            assert op["security"] == [{"DeploymentKey": []}], name


def test_inference_documents_its_event_stream(doc):
    for name, op in operations(doc).items():
        if name.startswith("POST /") and not name.split()[1].startswith(MGMT):
            assert set(op["responses"]["200"]["content"]) == {
                "application/json",
                "text/event-stream",
            }, name


def test_cross_field_rules_are_in_the_document(doc):
    """What the validators refuse beyond single fields, the document refuses too: minReplicas
    above maxReplicas (its default when absent), and an adapter upload with no base model."""
    from pydantic import ValidationError

    from raydock.platform.schemas import ScalingParameters, UploadSessionStart

    def agree(name: str, model, body: dict) -> None:
        _document_agrees(doc, name, body, model.model_validate, ValidationError)

    for low in range(1, 11):
        for high in [None, *range(1, 51)]:
            body = {"minReplicas": low} | ({} if high is None else {"maxReplicas": high})
            agree("ScalingParameters", ScalingParameters, body)
    upload = {"fileName": "a.zip", "totalSize": 1, "totalChunks": 1}
    for extra in [
        {},
        {"kind": "adapter"},
        {"kind": "adapter", "baseModelId": ""},
        {"kind": "adapter", "baseModelId": None},
        {"kind": "adapter", "baseModelId": "cm-1"},
        {"kind": "base", "baseModelId": None},
    ]:
        agree("UploadSessionStart", UploadSessionStart, upload | extra)


def test_a_path_parameter_cannot_be_a_literal_segment_beside_it(doc):
    ops = operations(doc)
    for name, value in [("models/{modelId}", "import"), ("files/session/{sessionId}", "start")]:
        param = ops[f"GET {MGMT}/{name}"]["parameters"][0]
        assert param["schema"]["not"] == {"enum": [value]}
        assert "405" in ops[f"GET {MGMT}/{name}"]["responses"]
    assert "405" not in ops[f"GET {MGMT}/models/{{modelId}}/deploy-form"]["responses"]


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto"},
        {"tools": [{"type": "function", "function": {}}]},
        {"tools": [{"type": "tool", "function": {"name": "f"}}]},
        {"tool_choice": "required"},
        {"tool_choice": "none"},
        {"tools": [], "tool_choice": {"function": {"name": "f"}}},
        {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "maybe"},
        # tools take precedence over response_format, yet its shape still holds
        {
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "response_format": {"type": "bogus"},
        },
        {"response_format": {}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        {"response_format": {"type": "json_schema", "json_schema": {"schema": True}}},
        {"structured_outputs": {"json": False, "whitespace_pattern": None}},
        {"structured_outputs": {"whitespace_pattern": " "}},
        {"structured_outputs": {"choice": []}},
        {"structured_outputs": {"json_object": "yes"}},
        {"guided_regex": " "},
        {"guided_regex": "a+"},
        {"guided_choice": []},
    ],
)
def test_chat_shapes_agree_with_parsing(doc, extra):
    """The document's shapes of free-form fields are what protocol.parse holds requests to."""
    _chat_agrees(doc, {"messages": [{"role": "user", "content": "x"}], **extra})


def _chat_agrees(doc: dict, body: dict) -> None:
    """The document's ChatRequest accepts `body` exactly when protocol.parse does."""
    from raydock.serve_apps import protocol

    def parse(body: dict) -> None:
        protocol.parse(protocol.ChatRequest, body)

    _document_agrees(doc, "ChatRequest", body, parse, protocol.BadParam)


def _document_agrees(doc: dict, name: str, body: dict, parse, refusal: type) -> None:
    """The document's schema `name` accepts `body` exactly when `parse` does (it raises
    `refusal` for a body it refuses)."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
    documented = jsonschema.Draft202012Validator(schema).is_valid(body)
    try:
        parse(body)
        parsed = True
    except refusal:
        parsed = False
    assert documented == parsed, (name, body)


_CALL = {"id": "c1", "function": {"name": "f", "arguments": "{}"}}


@pytest.mark.parametrize(
    "message",
    [
        {"role": "user"},
        {"role": "user", "content": None},
        {"role": "user", "content": ""},
        {"role": "developer", "content": [{"type": "text", "text": "x"}]},
        {"role": "assistant"},
        {"role": "assistant", "content": None, "tool_calls": [_CALL]},
        {"role": "assistant", "content": "x", "tool_calls": None},
        {"role": "assistant", "tool_calls": None},
        {"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}},  # deprecated
        {"role": "tool", "content": "21"},
        {"role": "tool", "content": "21", "tool_call_id": "c1"},
        {"role": "tool", "tool_call_id": "c1"},
    ],
)
def test_message_needs_agree_with_parsing(doc, message):
    """What a message of each role must carry, the document says as protocol.parse holds."""
    _chat_agrees(doc, {"messages": [message]})


@pytest.mark.parametrize(
    "extra",
    [
        {"top_logprobs": 2},
        {"top_logprobs": 2, "logprobs": False},
        {"top_logprobs": 2, "logprobs": True},
        {"top_logprobs": None},
        {"logprobs": True},
    ],
)
def test_top_logprobs_needs_logprobs_in_document_and_parsing(doc, extra):
    _chat_agrees(doc, {"messages": [{"role": "user", "content": "x"}]} | extra)


def test_links_name_operations_and_their_path_parameters(doc):
    by_id = {op["operationId"]: op for op in operations(doc).values()}
    links = [
        link
        for op in operations(doc).values()
        for response in op["responses"].values()
        for link in response.get("links", {}).values()
    ]
    assert len(links) == sum(len(targets) for targets in openapi_doc.LINKS.values())
    for link in links:
        target = by_id[link["operationId"]]
        names = {p["name"] for p in target.get("parameters", []) if p["in"] == "path"}
        assert set(link["parameters"]) == names, link


def test_management_strings_say_they_hold_no_nul(doc):
    """A NUL is refused (PostgreSQL cannot store one): the document says so, on body fields
    and query parameters of the management API, not on inference text."""
    schemas = doc["components"]["schemas"]
    assert schemas["ModelUpdate"]["properties"]["description"]["anyOf"][0]["pattern"] == (
        openapi_doc.NO_NUL
    )
    name = schemas["DeployRequest"]["properties"]["name"]  # NOT_BLANK's pattern, and this
    assert {"pattern": openapi_doc.NO_NUL} in name["allOf"]
    export = operations(doc)[f"POST {MGMT}/models/{{modelId}}/export"]
    (param,) = [p for p in export["parameters"] if p["name"] == "deploymentId"]
    assert param["schema"]["anyOf"][0]["pattern"] == openapi_doc.NO_NUL
    assert "u0000" not in str(schemas["ChatMessage"])


@pytest.mark.parametrize(
    "extra",
    [
        {"logit_bias": {"42": 5}},
        {"logit_bias": {"x": 5}},  # schemathesis found the document let this through
        {"logit_bias": {"": []}},
        {"logit_bias": {"42": 101}},
        {"seed": 7},
        {"include_reasoning": False},
        {"input": [{"type": "reasoning", "summary": []}]},  # thinking alone asks nothing
        {"input": [{"type": "reasoning", "summary": []}, {"role": "user", "content": "x"}]},
    ],
)
def test_responses_shapes_agree_with_parsing(doc, extra):
    """The document's ResponsesRequest accepts a body exactly when responses_api.parse does."""
    from raydock.errors import ApiError
    from raydock.serve_apps import responses_api

    body = {"model": "m", "input": "x"} | extra
    _document_agrees(doc, "ResponsesRequest", body, responses_api.parse, ApiError)
