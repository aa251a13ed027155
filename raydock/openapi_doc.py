"""The combined OpenAPI document made accurate, and the offline Swagger UI that shows it.

FastAPI documents what it can see: a 422 `HTTPValidationError` (a body raydock never sends)
on every route with parameters, no other error, no body for routes that read the raw request,
and fields as typed rather than as validated. `finish` rewrites the generated document to
what the server does: raydock/errors.py builds every error body; the statuses are read off
the routes in platform/api.py (and the registry they call), serve_apps/gateway.py,
openai_service.py and engine_app.py.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from pydantic import BaseModel

from raydock.config import hardware_profiles
from raydock.errors import TYPES, error_body
from raydock.serve_apps.protocol import ChatRequest, CompletionRequest

Doc = dict[str, Any]

SCHEMAS = "#/components/schemas/"
MANAGEMENT = "/api/public"
METHODS = ("get", "put", "post", "delete", "patch")

DESCRIPTIONS = {
    400: "The body cannot be parsed, a value is invalid, or the cluster cannot do what it asks",
    401: "The API key is missing or invalid (for inference: not this deployment's key)",
    403: "Only an admin management key may do this",
    404: "The object the path names does not exist (inference: the deployment or `model`)",
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
    "POST /models/import": (409,),  # baseModelId is not a ready base model
    "POST /files/session/{sessionId}/chunks/{chunkNumber}": (400,),  # chunkNumber out of range
    "PUT /files/session/{sessionId}/chunks/{chunkNumber}": (400,),
    "POST /files/session/{sessionId}/complete": (400, 409),  # chunks missing; as import
    "POST /models/{modelId}/deploy": (409,),  # model not READY, deployment already deploying
    "POST /deployments/{deploymentId}/redeploy": (409,),
    "POST /deployments/{deploymentId}/retrigger": (400, 409),  # the cluster cannot run it
    "POST /deployments/{deploymentId}/undeploy": (409,),
    "DELETE /models/{modelId}": (409,),
    "DELETE /deployments/{deploymentId}": (409,),
    "POST /models/{modelId}/export": (409,),
    "GET /deployments/{deploymentId}/stats": (409,),
    "GET /exports/{dockStatusId}/download": (409,),
}
# streams its upload to disk with no size limit (errors.RequestGuard exempts it)
NO_BODY_LIMIT = {"POST /models/import"}

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


def finish(doc: Doc) -> Doc:
    """Rewrite FastAPI's document (in place, and returned) to what the server does."""
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for path, method, op in _operations(doc):
        statuses = _errors(path, method, op)  # before bodies are added: 422 depends on them
        if not path.startswith(MANAGEMENT) and method == "post":
            op["requestBody"] = _inference_body(path, schemas)
        elif "/chunks/" in path:  # the chunk is the raw request body
            op["requestBody"] = {
                "required": True,
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
            }
        kept = {code: r for code, r in op.get("responses", {}).items() if code != "422"}
        op["responses"] = kept | {str(s): _error_response(s) for s in sorted(statuses)}
    _as_validated(schemas)
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    schemas.update(copy.deepcopy(ERROR_SCHEMAS))  # callers may edit the document
    return doc


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
    if any(p["in"] == "header" and p["name"].lower() == "x-api-key" for p in params):
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
    """Whether FastAPI can refuse this parameter: a required query parameter, or a path or
    query parameter typed other than a free string (an int, an enum)."""
    if param["in"] not in ("path", "query"):
        return False
    if param["in"] == "query" and param.get("required"):
        return True
    schema = param.get("schema", {})
    options = schema.get("anyOf", [schema])
    return not all(
        o.get("type") in ("string", "null") and o.keys() <= {"type", "title"} for o in options
    )


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
    schema: dict[str, Any] = {"$ref": _add_model(model, schemas)}
    if not path.startswith("/deployments/"):  # /v1/*: `model` names the deployment (else 404)
        schema = {"allOf": [schema], "required": ["model"]}
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

    # checked against configs/hardware.yaml by DeployRequest._known_device
    props("DeployRequest")["deviceType"]["enum"] = list(hardware_profiles())
    props("DeployRequest")["name"]["pattern"] = r"\S"  # a blank name is refused
    props("HyperParameters")["stopSequence"]["items"]["minLength"] = 1
    schemas["ScalingParameters"]["description"] = "minReplicas must not exceed maxReplicas."
    props("ModelUpdate")["name"] = {
        "type": "null",
        "description": "The model name is not editable: any value but null is refused.",
    }
    stop = {"type": "string", "minLength": 1}
    for request in ("ChatRequest", "CompletionRequest"):
        props(request)["stop"]["anyOf"] = [
            stop,
            {"type": "array", "items": stop, "maxItems": 4},
            {"type": "null"},
        ]
        bias = next(o for o in props(request)["logit_bias"]["anyOf"] if o.get("type") == "object")
        bias["propertyNames"] = {"pattern": "^[0-9]+$"}  # token ids
    props("CompletionRequest")["prompt"]["anyOf"] = [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1},
    ]


# ------------------------------------------------------------------ Swagger UI, offline

ASSETS_DIR = Path(__file__).parent / "web" / "swagger-ui"  # swagger-ui-dist; see its README
ASSETS_URL = "/docs/assets"


def swagger_ui(openapi_url: str, title: str) -> HTMLResponse:
    """Swagger UI loaded from raydock's own copy of its assets: /docs works offline."""
    return get_swagger_ui_html(
        openapi_url=openapi_url,
        title=title,
        swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
        swagger_favicon_url=f"{ASSETS_URL}/favicon-32x32.png",
        swagger_ui_parameters={"validatorUrl": None},  # no validator badge from swagger.io
    )
