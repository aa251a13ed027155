"""The combined OpenAPI document (management and inference), made accurate.

FastAPI documents what it can see: a 422 `HTTPValidationError` (a body raydock never sends)
on every route with parameters, no other error, no body for routes that read the raw request,
and fields as typed rather than as validated. `finish` rewrites the generated document to
what the server does: raydock/errors.py builds every error body; the statuses are read off
the routes in platform/api.py (and the registry they call), serve_apps/gateway.py,
openai_service.py and engine_app.py.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from raydock.config import hardware_profiles
from raydock.errors import TYPES, error_body
from raydock.params import MAX_STOP_SEQUENCES
from raydock.platform.schemas import NOT_BLANK, ScalingParameters
from raydock.serve_apps.protocol import (
    MESSAGE_NEEDS,
    NEUTRAL,
    NOT_HONOURED,
    SHAPES,
    TOOL_CHOICE_NEEDS_TOOLS,
    ChatRequest,
    CompletionRequest,
)
from raydock.serve_apps.responses_api import ResponsesRequest

Doc = dict[str, Any]

SCHEMAS = "#/components/schemas/"
MANAGEMENT = "/api/public"
METHODS = ("get", "put", "post", "delete", "patch")

DESCRIPTIONS = {
    400: "The body cannot be parsed, a value is invalid, or the cluster cannot do what it asks",
    401: "The API key is missing or invalid (for inference: not this deployment's key)",
    403: "Only an admin management key may do this, or a dashboard session (cookie) sent "
    "no CSRF token (X-CSRF-Token) with a change",
    404: "The object the path names does not exist (inference: the deployment or `model`)",
    405: "The path is another route's, which does not take this method (a path parameter "
    "never takes the value of a literal segment beside it, such as `import` in "
    "/models/{modelId})",
    409: "The object's current state does not allow this",
    413: "The request body is over the size limit",
    422: "The body or a parameter fails validation; `detail` names each field",
    429: "The deployment's request queue is full; retry later",
    500: "Internal error; the message names the request id (the details are in the log)",
    503: "A platform component is restarting, or the deployment is not serving; retry shortly",
    504: "The request did not complete within the deployment's timeout",
}

# Management errors particular to one route ("METHOD path under /api/public"); those common
# to all, or that follow from the route's parameters, are derived in `_management_errors`.
ROUTE_ERRORS: dict[str, tuple[int, ...]] = {
    "POST /users": (403,),
    "GET /users": (403,),
    "DELETE /users/{userId}": (403, 409),  # yourself, or your own admin was deleted meanwhile
    "POST /users/{userId}/rotate-key": (403,),  # another user's, without admin
    "POST /models/import": (409, 413),  # baseModelId is not a ready base model; disk full
    "POST /files/session/{sessionId}/chunks/{chunkNumber}": (400,),  # chunkNumber out of range
    "PUT /files/session/{sessionId}/chunks/{chunkNumber}": (400,),
    # an adapter's base is not a ready base model (409), checked at start and at complete
    "POST /files/session/start": (409,),
    "POST /files/session/{sessionId}/complete": (400, 409),  # chunks missing; as import
    "DELETE /files/session/{sessionId}": (409,),  # while it is being completed
    # model not READY, deployment already deploying, the name is another deployment's
    "POST /models/{modelId}/deploy": (409,),
    "POST /deployments/{deploymentId}/api-keys": (409,),  # the name is another key's; metering
    "POST /deployments/{deploymentId}/redeploy": (409,),
    "POST /deployments/{deploymentId}/retrigger": (400, 409),  # the cluster cannot run it
    "POST /deployments/{deploymentId}/undeploy": (409,),
    "DELETE /models/{modelId}": (409,),
    "DELETE /deployments/{deploymentId}": (409,),
    "POST /models/{modelId}/export": (409,),
    "GET /deployments/{deploymentId}/stats": (409,),  # not DEPLOYED
    "GET /catalog/{entryId}": (400,),  # an optimizationType its architecture does not run
    "GET /usage": (400,),  # a period: start before end; by minute or hour, 2 or 92 days
    "GET /exports/{dockStatusId}/download": (409,),
    "POST /connections": (400, 409),  # the Hub refuses the token; the name exists
    "POST /models/import/huggingface": (404, 409),  # connectionId; baseModelId not READY
    "POST /deployments/huggingface": (400, 404, 409),  # as deploy, and connectionId
    "POST /models/{modelId}/retry-import": (409,),  # not a failed download
    "POST /catalog/{entryId}/deploy": (400, 404, 409),  # too small; connectionId; importing
    # as deploy; a model, catalog entry or connection named; names twice, zips to upload
    "POST /apply": (400, 404, 409),
    "POST /deployments/{deploymentId}/rollback": (400, 409),  # as redeploy
    "POST /backup": (403, 409),  # not an admin; the database is not at this raydock's head
    "GET /users/me/webhook": (404,),  # none set
    "DELETE /users/me/webhook": (404,),
    "POST /session": (401,),  # not a management key
    "DELETE /session": (403,),  # a live session without its CSRF token
}
# OpenAPI links: which ids a management response names, and the operations that take them
# (Swagger shows them; API testers such as schemathesis follow them). Destructive operations
# are linked only from the response that created their object.
BODY = "$response.body#/"
FIRST_DEPLOYMENT = BODY + "deployments/0/deploymentId"
LINKS: dict[tuple[str, str], list[tuple[str, dict[str, Any]]]] = {
    ("POST /files/session/start", "201"): [
        ("GET /files/session/{sessionId}", {"sessionId": BODY + "sessionId"}),
        (
            "PUT /files/session/{sessionId}/chunks/{chunkNumber}",
            {"sessionId": BODY + "sessionId", "chunkNumber": "1"},
        ),
        ("POST /files/session/{sessionId}/complete", {"sessionId": BODY + "sessionId"}),
        ("DELETE /files/session/{sessionId}", {"sessionId": BODY + "sessionId"}),
    ],
    ("POST /models/import", "202"): [
        ("GET /models/{modelId}", {"modelId": BODY + "modelId"}),
        ("GET /dock-status/{dockStatusId}", {"dockStatusId": BODY + "dockStatusId"}),
        ("DELETE /models/{modelId}", {"modelId": BODY + "modelId"}),
    ],
    ("POST /models/{modelId}/export", "202"): [
        ("GET /dock-status/{dockStatusId}", {"dockStatusId": BODY + "dockStatusId"}),
        ("GET /exports/{dockStatusId}/download", {"dockStatusId": BODY + "dockStatusId"}),
    ],
    ("POST /deployments/{deploymentId}/api-keys", "201"): [
        ("GET /deployments/{deploymentId}/api-keys", {"deploymentId": BODY + "deploymentId"}),
        (
            "DELETE /deployments/{deploymentId}/api-keys/{keyId}",
            {"deploymentId": BODY + "deploymentId", "keyId": BODY + "keyId"},
        ),
    ],
    ("GET /models", "200"): [
        ("GET /models/{modelId}", {"modelId": BODY + "models/0/modelId"}),
        ("GET /models/{modelId}/deployments", {"modelId": BODY + "models/0/modelId"}),
        ("GET /models/{modelId}/deploy-form", {"modelId": BODY + "models/0/modelId"}),
    ],
    ("GET /models/{modelId}/deployments", "200"): [
        (f"GET /deployments/{{deploymentId}}{tail}", {"deploymentId": FIRST_DEPLOYMENT})
        for tail in ("", "/history", "/stats", "/api-keys")
    ],
}

# list routes that answer a page (platform/pages.py: `limit`, `offset`): the rows' field in
# the answer
PAGED: dict[str, str] = {
    "GET /models": "models",
    "GET /deployments/{deploymentId}/history": "versions",
    "GET /notifications/deliveries": "deliveries",
}

# streams its upload to disk with no size limit (errors.RequestGuard exempts it)
NO_BODY_LIMIT = {"POST /models/import"}

# How each family of routes authenticates (Swagger's Authorize button and API clients read
# these): management routes take a management key, inference routes a deployment's key.
SECURITY_SCHEMES: dict[str, Any] = {
    "ManagementKey": {
        "type": "apiKey",
        "in": "header",
        "name": "X-api-key",
        "description": "A management key: the admin key `raydock up` prints on first start, or "
        "one POST /api/public/users returned. `Authorization: Bearer <key>` is accepted too.",
    },
    "DeploymentKey": {
        "type": "http",
        "scheme": "bearer",
        "description": "A key created for the deployment (POST "
        "/api/public/deployments/{deploymentId}/api-keys). An `X-api-key` header is accepted too.",
    },
}
# the headers FastAPI documents as parameters of management.current_user: the scheme says it
AUTH_HEADERS = {"x-api-key", "authorization"}

STRING = {"type": "string"}
# an inference 400 says in `code` whether the request is at fault or the deployment cannot
# do what it asks (a refusal tests/e2e/test_schemathesis.py allows for schema-valid requests)
INFERENCE_400 = (
    "A parameter is invalid (code `invalid_parameter` or `invalid_json`), or valid but not one "
    "this deployment can honour: `unsupported_schema` (an output format, schema keyword, regex "
    "or grammar it cannot enforce, two formats at once, a tool_choice naming no declared tool), "
    "`unsupported_parameter` (a parameter its engine or vocabulary cannot take), "
    "`context_length_exceeded`, `invalid_messages` (its chat template refuses the conversation)"
)

# what an inference route answers with `"stream": true`: Server-Sent Events, `schema` one
# event (OpenAPI 3.1 has no item schema for streams; 3.2 reads `schema` so too)
STREAM = {
    "schema": {
        "type": "object",
        "description": "One server-sent event. `data` is a chunk object's JSON (an error that "
        "occurs after the stream started comes as an ErrorResponse's JSON); the last event's "
        "is `[DONE]`.",
        "required": ["data"],
        "properties": {"data": {"type": "string"}},
    }
}
# ...and a Responses API route (serve_apps/responses_api.py): typed events, no [DONE]
RESPONSES_STREAM = {
    "schema": {
        "type": "object",
        "description": "One server-sent event: `event` is the Responses event's type, `data` its "
        "JSON (`response.created` first; `response.completed`, `response.incomplete`, or an "
        "`error` event then `response.failed`, last).",
        "required": ["data"],
        "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
    }
}

ERROR_SCHEMAS: dict[str, Any] = {
    "ErrorResponse": {
        "type": "object",
        "description": "Every error raydock returns (OpenAI's shape); the request id is also "
        "in the X-Request-Id header.",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code", "request_id"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string", "enum": sorted(set(TYPES.values()))},
                    "param": {"type": ["string", "null"], "description": "The offending field"},
                    "code": {"type": ["string", "null"]},
                    "request_id": {"type": "string"},
                },
            }
        },
    },
    "ValidationErrorResponse": {
        "description": "A management request that fails validation: every field at fault.",
        "allOf": [
            {"$ref": SCHEMAS + "ErrorResponse"},
            {
                "type": "object",
                "required": ["detail"],
                "properties": {
                    "detail": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["field", "message"],
                            "properties": {
                                "field": {"type": "string"},
                                "message": {"type": "string"},
                            },
                        },
                    }
                },
            },
        ],
    },
}


def combined() -> Doc:
    """The management API (under /api) and the inference endpoints in one document. Built
    here, in the control plane, which may read both planes' routes; the gateway serves it."""
    from raydock.platform.api import app as api_app
    from raydock.serve_apps.gateway import app as gateway_app

    doc = get_openapi(
        title="raydock",
        version="0.1.0",
        routes=list(gateway_app.routes),
        description="Management API (/api/public/*) and OpenAI-compatible "
        "inference (/v1/*, /deployments/{id}/*).",
    )
    mgmt = get_openapi(title="raydock", version="0.1.0", routes=api_app.routes)
    for path, item in mgmt["paths"].items():
        doc["paths"]["/api" + path] = item
    doc.setdefault("components", {}).setdefault("schemas", {}).update(
        mgmt.get("components", {}).get("schemas", {})
    )
    return finish(doc)


def finish(doc: Doc) -> Doc:
    """Rewrite FastAPI's document (in place, and returned) to what the server does."""
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for path, method, op in _operations(doc):
        _secure(path, op)
        statuses = _errors(path, method, op)  # before bodies are added: 422 depends on them
        if not path.startswith(MANAGEMENT) and method == "post":
            op["requestBody"] = _inference_body(path, schemas)
            stream = RESPONSES_STREAM if path.endswith("/responses") else STREAM
            op["responses"]["200"]["content"]["text/event-stream"] = stream
        elif "/chunks/" in path:  # the chunk is the raw request body
            op["requestBody"] = {
                "required": True,
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
            }
        route = f"{method.upper()} {path.removeprefix(MANAGEMENT)}"
        if path.startswith(MANAGEMENT) and route in PAGED:
            op["responses"]["200"]["content"]["application/json"]["schema"] = _page(PAGED[route])
        kept = {code: r for code, r in op.get("responses", {}).items() if code != "422"}
        op["responses"] = kept | {str(s): _error_response(s) for s in sorted(statuses)}
        if not path.startswith(MANAGEMENT) and "400" in op["responses"]:
            op["responses"]["400"]["description"] = INFERENCE_400
    for path, name, values in _shadowed_parameters(list(doc["paths"])):
        for op in doc["paths"][path].values():
            param = next(p for p in op["parameters"] if p["in"] == "path" and p["name"] == name)
            param["schema"]["not"] = {"enum": values}
            op["responses"] = dict(
                sorted((op["responses"] | {"405": _error_response(405)}).items())
            )
    _link(doc)
    _as_validated(schemas)
    _refuse_nul(doc)
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    schemas.update(copy.deepcopy(ERROR_SCHEMAS))  # callers may edit the document
    doc["components"]["securitySchemes"] = copy.deepcopy(SECURITY_SCHEMES)
    return doc


#: what no management string may hold (jsontypes.NUL: PostgreSQL's text cannot): a body's
#: field or a query parameter with one is a 422 (schemas._Body, errors.nul_in_url)
NO_NUL = "^[^\\u0000]*$"


def _refuse_nul(doc: Doc) -> None:
    """Say on every management string, in bodies and query parameters, that it holds no NUL
    (inference text may: a chat message is not stored)."""
    inference = {ChatRequest.__name__, CompletionRequest.__name__, ResponsesRequest.__name__}
    for model in (ChatRequest, CompletionRequest, ResponsesRequest):
        inference |= set(model.model_json_schema().get("$defs", {}))
    for name, schema in doc["components"]["schemas"].items():
        if name not in inference and name not in ERROR_SCHEMAS:
            _no_nul_strings(schema)
    for path, _, op in _operations(doc):
        if path.startswith(MANAGEMENT):
            for param in op.get("parameters", []):
                if param["in"] == "query":
                    _no_nul_strings(param["schema"])


def _no_nul_strings(schema: Any) -> None:
    if isinstance(schema, list):
        for item in schema:
            _no_nul_strings(item)
        return
    if not isinstance(schema, dict):
        return
    types = schema.get("type")
    is_string = types == "string" or (isinstance(types, list) and "string" in types)
    free = is_string and schema.get("format") != "binary" and not {"enum", "const"} & set(schema)
    if free:
        if "pattern" in schema:  # one pattern per schema: the other joins through allOf
            schema.setdefault("allOf", []).append({"pattern": NO_NUL})
        else:
            schema["pattern"] = NO_NUL
    for key, value in schema.items():
        if key not in ("enum", "const", "default", "example", "examples", "pattern"):
            _no_nul_strings(value)


def _secure(path: str, op: dict[str, Any]) -> None:
    """Name the operation's security scheme in place of FastAPI's key header parameters."""
    if not path.startswith(MANAGEMENT):
        op["security"] = [{"DeploymentKey": []}]  # every inference route authorizes a key
        return
    params = op.get("parameters", [])
    kept = [p for p in params if not (p["in"] == "header" and p["name"].lower() in AUTH_HEADERS)]
    if len(kept) < len(params):  # the route depends on current_user
        op["security"] = [{"ManagementKey": []}]
        op["parameters"] = kept
    if not kept:
        op.pop("parameters", None)


def _link(doc: Doc) -> None:
    ops = {f"{m.upper()} {p.removeprefix(MANAGEMENT)}": op for p, m, op in _operations(doc)}
    for (source, status), targets in LINKS.items():
        response = ops[source]["responses"][status]
        for target, parameters in targets:
            method, path = target.split()
            name = method.lower() + "".join(w[:1].upper() + w[1:] for w in re.split(r"\W+", path))
            response.setdefault("links", {})[name] = {
                "operationId": ops[target]["operationId"],
                "parameters": dict(parameters),
            }


def _shadowed_parameters(paths: list[str]) -> list[tuple[str, str, list[str]]]:
    """(path, parameter, values it cannot take): the literal segments of other paths at its
    place (api._literal_segments_win routes /models/import to the import route only)."""
    literal = [p for p in paths if "{" not in p]
    out = []
    for path in paths:
        pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(path))
        if pattern == re.escape(path):
            continue
        taken: dict[str, list[str]] = {}
        for match in filter(None, (re.fullmatch(pattern, p) for p in literal)):
            for name, value in match.groupdict().items():
                taken.setdefault(name, []).append(value)
        out += [(path, name, values) for name, values in taken.items()]
    return out


def _operations(doc: Doc) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, op)
        for path, item in doc["paths"].items()
        for method, op in item.items()
        if method in METHODS
    ]


def _errors(path: str, method: str, op: dict[str, Any]) -> set[int]:
    if path.startswith(MANAGEMENT):
        return _management_errors(path.removeprefix(MANAGEMENT), method, op)
    # every inference route authorizes a deployment key (401, 404, 503); generating adds
    # parameter checks (400), the replica queue (429) and the deployment's timeout (504)
    common = {401, 404, 413, 500, 503}
    return (common | {400, 429, 504}) if method == "post" else common


def _management_errors(path: str, method: str, op: dict[str, Any]) -> set[int]:
    route = f"{method.upper()} {path}"
    # 503: the registry or lifecycle actor is restarting; every route asks one
    out = {500, 503, *ROUTE_ERRORS.get(route, ())}
    if route not in NO_BODY_LIMIT:
        out.add(413)
    params = op.get("parameters", [])
    if op.get("security"):
        out.add(401)
    if "{" in path:  # the registry looks up every id in the path
        out.add(404)
    if "requestBody" in op:
        # 400: FastAPI cannot parse it (not UTF-8, broken multipart); each route's own checks
        out |= {400, 422}
    if any(_can_fail(p) for p in params):
        out.add(422)
    return out


def _can_fail(param: dict[str, Any]) -> bool:
    """Whether this parameter can be refused (422): any query parameter (required, or with
    a NUL), or a path parameter typed other than a free string (an int, an enum)."""
    if param["in"] not in ("path", "query"):
        return False
    if param["in"] == "query":  # required, or a NUL in it (errors.nul_in_url)
        return True
    schema = param.get("schema", {})
    options = schema.get("anyOf", [schema])
    return not all(
        o.get("type") in ("string", "null") and o.keys() <= {"type", "title"} for o in options
    )


def _page(rows: str) -> dict[str, Any]:
    """The answer of a list route that pages (api._page)."""
    count = {"type": "integer", "minimum": 0}
    return {
        "type": "object",
        "description": f"A page of the list: `{rows}` from `offset`, at most `limit` of them.",
        "required": [rows, "total", "limit", "offset", "nextOffset"],
        "properties": {
            rows: {"type": "array", "items": {"type": "object"}},
            "total": count | {"description": "How many rows the whole list has."},
            "limit": {"type": "integer", "minimum": 1},
            "offset": count,
            "nextOffset": {
                "type": ["integer", "null"],
                "minimum": 1,
                "description": "The next page's `offset`; null: this page is the last.",
            },
        },
    }


def _error_response(status: int) -> dict[str, Any]:
    # the example shows the `type` that goes with this status
    rid = "req_8f14e45fceea167a5a36"
    if status == 422:
        name, msg = "ValidationErrorResponse", "timeout must be between 30 and 180 (got 5)"
        example = error_body(422, msg, "timeout", "validation_error", rid)
        example["detail"] = [{"field": "timeout", "message": msg}]
    else:
        name, example = "ErrorResponse", error_body(status, DESCRIPTIONS[status], request_id=rid)
    return {
        "description": DESCRIPTIONS[status],
        "content": {"application/json": {"schema": {"$ref": SCHEMAS + name}, "example": example}},
    }


def _inference_body(path: str, schemas: dict[str, Any]) -> dict[str, Any]:
    """The routes read the raw request (openai_service.complete parses it with these models,
    answering 400 rather than 422), so FastAPI cannot see the body."""
    model = ChatRequest if path.endswith("/chat/completions") else CompletionRequest
    if path.endswith("/responses"):
        model = ResponsesRequest  # its free-form fields' shapes are in its own schema
    schema: dict[str, Any] = {"$ref": _add_model(model, schemas)}
    if not path.startswith("/deployments/"):  # /v1/*: `model` names the deployment (else 404)
        schema = {"allOf": [schema], "required": ["model"], "properties": {"model": STRING}}
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _add_model(model: type[BaseModel], schemas: dict[str, Any]) -> str:
    schema = model.model_json_schema(ref_template=SCHEMAS + "{model}")
    for name, sub in {**schema.pop("$defs", {}), model.__name__: schema}.items():
        if schemas.setdefault(name, sub) != sub:
            raise ValueError(f"two different schemas are named {name}")
    return SCHEMAS + model.__name__


def _as_validated(schemas: dict[str, Any]) -> None:
    """Show the limits that validators, not the fields' types, enforce."""

    def props(model: str) -> dict[str, Any]:
        return schemas[model]["properties"]

    # checked against configs/hardware.yaml by DeployRequest._known_device; blank names refused
    for deploy in ("DeployRequest", "HuggingFaceDeploy", "CatalogDeploy", "DeploymentSpec"):
        props(deploy)["deviceType"]["enum"] = list(hardware_profiles())
        props(deploy)["name"]["pattern"] = NOT_BLANK
    props("HyperParameters")["stopSequence"]["items"]["minLength"] = 1
    schemas["ScalingParameters"]["description"] = "minReplicas must not exceed maxReplicas."
    schemas["ScalingParameters"]["allOf"] = _min_not_above_max(ScalingParameters)
    # schemas.import_kind_problem, for JSON bodies and the multipart import alike
    adapter = {
        "if": {"properties": {"kind": {"const": "adapter"}}, "required": ["kind"]},
        "then": {
            "properties": {"baseModelId": {"type": "string", "minLength": 1}},
            "required": ["baseModelId"],
        },
        "else": {"properties": {"baseModelId": {"enum": [None, ""]}}},
    }
    schemas["UploadSessionStart"].update(copy.deepcopy(adapter))
    schemas["HuggingFaceImport"].update(copy.deepcopy(adapter))
    schemas[_import_form(schemas)].update(copy.deepcopy(adapter))
    props("ModelUpdate")["name"] = {
        "type": "null",
        "description": "The model name is not editable: any value but null is refused.",
    }
    stop = {"type": "string", "minLength": 1}
    for request in ("ChatRequest", "CompletionRequest"):
        props(request)["stop"]["anyOf"] = [
            stop,
            {"type": "array", "items": stop, "maxItems": MAX_STOP_SEQUENCES},
            {"type": "null"},
        ]
    for request in ("ChatRequest", "CompletionRequest", "ResponsesRequest"):
        bias = next(o for o in props(request)["logit_bias"]["anyOf"] if o.get("type") == "object")
        bias["propertyNames"] = {"pattern": "^[0-9]+$"}  # token ids
    for request in ("ChatRequest", "CompletionRequest"):
        for name, shape in SHAPES.items():  # protocol.parse holds requests to them
            if name in props(request):
                props(request)[name]["anyOf"] = [copy.deepcopy(shape), {"type": "null"}]
    # protocol._check_shapes: tool_choice needs tools, top_logprobs needs logprobs
    schemas["ChatRequest"]["allOf"] = [
        copy.deepcopy(TOOL_CHOICE_NEEDS_TOOLS),
        {
            "if": {
                "required": ["top_logprobs"],
                "properties": {"top_logprobs": {"not": {"type": "null"}}},
            },
            "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}},
        },
    ]
    for request in ("ChatRequest", "CompletionRequest"):
        schemas[request].setdefault("allOf", []).append(
            {  # stream_options needs stream: true
                "if": {
                    "required": ["stream_options"],
                    "properties": {"stream_options": {"not": {"type": "null"}}},
                },
                "then": {"required": ["stream"], "properties": {"stream": {"const": True}}},
            }
        )
        for name, why in NOT_HONOURED.items():  # refused unless null, neutral (best_of: n)
            allowed = [None, *NEUTRAL.get(name, ())]
            props(request)[name] = {"enum": allowed, "description": f"Not supported: {why}."}
    schemas["ChatMessage"]["allOf"] = _message_needs()
    props("CompletionRequest")["prompt"]["anyOf"] = [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1},
    ]


def _message_needs() -> list[dict[str, Any]]:
    """protocol.MESSAGE_NEEDS: per role, the fields a message must carry (not null); an
    assistant's message needs content or tool_calls."""
    present = {"not": {"type": "null"}}

    def needs(*fields: str) -> dict[str, Any]:
        return {"required": list(fields), "properties": {f: present for f in fields}}

    rules = [
        {"if": {"properties": {"role": {"const": role}}}, "then": needs(*fields)}
        for role, fields in MESSAGE_NEEDS.items()
        if fields
    ]
    rules.append(
        {
            "if": {"properties": {"role": {"const": "assistant"}}},
            "then": {"anyOf": [needs("content"), needs("tool_calls"), needs("function_call")]},
        }
    )
    return rules


def _min_not_above_max(model: type[BaseModel]) -> list[dict[str, Any]]:
    """ScalingParameters._min_le_max in JSON Schema, which cannot compare two fields: for
    each minReplicas value k above the lowest, maxReplicas (its default when absent) >= k."""
    fields = model.model_fields
    low, high = (_bound(fields["minReplicas"], b) for b in ("ge", "le"))
    default_max = fields["maxReplicas"].default
    rules = []
    for k in range(low + 1, high + 1):
        then: dict[str, Any] = {"properties": {"maxReplicas": {"minimum": k}}}
        if k > default_max:
            then["required"] = ["maxReplicas"]
        cond = {"properties": {"minReplicas": {"minimum": k}}, "required": ["minReplicas"]}
        rules.append({"if": cond, "then": then})
    return rules


def _bound(field: Any, name: str) -> int:
    return next(getattr(m, name) for m in field.metadata if hasattr(m, name))


def _import_form(schemas: dict[str, Any]) -> str:
    """The name FastAPI gives the multipart form of POST /models/import."""
    (name,) = (n for n in schemas if n.startswith("Body_import_model"))
    return name
