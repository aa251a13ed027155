"""raydock's exceptions and the one error body every HTTP endpoint returns (OpenAI's shape).

Every error a user sees is built here: from raydock's own exceptions (ApiError and its
subclasses, also when a Ray actor call wraps them), from FastAPI's and Starlette's own
refusals, and, for anything else, a generic message carrying the request id — the details go
to the log under that id, never into the body.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from raydock.jsontypes import NUL

log = logging.getLogger("raydock.errors")

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}

REQUEST_ID_HEADER = "x-request-id"
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class ApiError(Exception):
    """An error meant for the user: an HTTP status, a message, the offending field."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,  # e.g. Retry-After on a 429
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def __reduce__(self):  # Ray pickles exceptions raised in actors; keep every field
        return (_rebuild, (type(self), self.__dict__.copy()))


def meter_unavailable(what: str) -> ApiError:
    """The 503 of a route that asks the meter actor while it is busy or being started again
    (Ray forgets its name for a few seconds)."""
    return ApiError(
        503,
        f"{what} unavailable (the meter is busy or restarting); retry shortly",
        headers={"Retry-After": "5"},
    )


def _rebuild(cls: type[ApiError], fields: dict[str, Any]) -> ApiError:
    exc = Exception.__new__(cls)
    Exception.__init__(exc, fields["message"])
    exc.__dict__.update(fields)
    return exc


class NotFound(ApiError):
    """The named object does not exist (404)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(404, message, param, "not_found")


class Conflict(ApiError):
    """The request clashes with the object's current state (409)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(409, message, param, "conflict")


def error_body(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    request_id: str | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "message": message,
        "type": TYPES.get(status, "invalid_request_error"),
        "param": param,
        "code": code,
    }
    if request_id:
        body["request_id"] = request_id
    return {"error": body}


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    request_id: str | None = None,
    **extra: Any,
) -> JSONResponse:
    body = error_body(status, message, param, code, request_id) | extra
    return JSONResponse(body, status_code=status)


def request_id(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


def as_api_error(exc: BaseException) -> ApiError | None:
    """The ApiError `exc` is or wraps (a Ray actor call re-raises it inside a RayTaskError,
    whose str() is a traceback), or an ApiError for a platform actor that is restarting."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, ApiError):
        return cause
    if isinstance(exc, ApiError):
        return exc
    from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError

    if isinstance(exc, ActorDiedError | ActorUnavailableError | GetTimeoutError):
        return ApiError(
            503, "a platform component is restarting; retry shortly", None, "service_unavailable"
        )
    return None


def respond(request: Request, exc: BaseException) -> JSONResponse:
    """The response for any exception: its own message when it is meant for the user, else a
    generic one naming the request id (the traceback goes to the log)."""
    rid = request_id(request)
    err = as_api_error(exc)
    if err is None:
        log.error("request %s failed", rid, exc_info=exc)
        err = ApiError(500, f"internal error (request id {rid})", None, "internal_error")
    elif err.status >= 500:
        log.warning("request %s: %s (%r)", rid, err.message, exc)
    extra = {}
    if err.status == 422:  # as FastAPI's own validation errors: each field at fault in detail
        extra["detail"] = [{"field": err.param or "body", "message": err.message}]
    response = error_response(err.status, err.message, err.param, err.code, rid, **extra)
    response.headers.update(getattr(err, "headers", None) or {})
    return response


_HTTP_MESSAGES = {404: "no such route", 405: "method not allowed on this route"}


def install(app: FastAPI, max_body_bytes: Callable[[], int | None] = lambda: None) -> None:
    """Give `app` request ids, a body size limit (read per request: the app is configured
    after import), URLs with a NUL character refused, and raydock's error bodies for every
    error."""

    @app.exception_handler(Exception)
    async def _any(request: Request, exc: Exception):
        return respond(request, exc)

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError):
        return respond(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if isinstance(exc.__cause__, ApiError):  # FastAPI's 400 for any error reading a body
            return respond(request, exc.__cause__)  # (limited_receive's 413)
        msg = _HTTP_MESSAGES.get(exc.status_code) or str(exc.detail)
        if exc.status_code == 404:
            msg = f"{msg}: {request.method} {request.url.path}"
        response = error_response(exc.status_code, msg, None, None, request_id(request))
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:
            response.headers["Allow"] = ", ".join(sorted(allowed_methods(request)))
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        from raydock.platform.schemas import describe_error

        described = [describe_error(e, None) for e in exc.errors()]
        message = "; ".join(m for _, m in described)
        return error_response(
            422, message, described[0][0], "validation_error", request_id(request)
        )

    app.add_middleware(RequestGuard, max_body_bytes=max_body_bytes)


def allowed_methods(request: Request) -> set[str]:
    """Every method some route serves at this request's path. Starlette's own Allow header
    names only the first route whose path matches, while FastAPI adds one route per method."""
    from starlette.routing import Match, Route

    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.methods:
            match, _ = route.matches(request.scope)
            if match != Match.NONE:
                methods |= route.methods
    return methods


class BodyTooLarge(ApiError):
    def __init__(self, limit: int):
        super().__init__(
            413, f"the request body exceeds the {limit} byte limit", "body", "body_too_large"
        )


def limited_receive(scope, receive, limit: int, too_large: Callable[[], ApiError]):
    """`receive` for a body of at most `limit` bytes: `too_large()` is raised at once when
    the Content-Length says more, else as soon as more has arrived (a chunked body)."""
    declared = dict(scope.get("headers") or []).get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large()
    seen = 0

    async def bounded_receive():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise too_large()
        return message

    return bounded_receive


def nul_in_url(scope) -> ApiError | None:
    """A NUL character (%00) in the URL: PostgreSQL's text cannot hold one, so no id or name
    has one. In the path, nothing is there whatever the route (404); in a query parameter,
    a 422 naming it."""
    if NUL in scope.get("path", ""):
        return ApiError(
            404, "not found: no id or name contains a NUL character (%00)", "path", "not_found"
        )
    # parsed as Starlette parses it for the routes
    query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    for name, value in query:
        if NUL in name or NUL in value:
            message = f"{name}: query parameters must not contain a NUL character (%00)"
            return ApiError(422, message, name, "validation_error")
    return None


class RequestGuard:
    """ASGI middleware: a request id for every request, a URL with a NUL character refused
    (nul_in_url), and bodies over `max_body_bytes` refused with a 413 before they are read
    whole (routes that stream uploads set their own limits and are exempt). The id is the
    `X-Request-Id` Serve's proxy sets (and returns in the response's header, so logs, header
    and error body agree), else a new one."""

    def __init__(self, app, max_body_bytes: Callable[[], int | None]):
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        given = headers.get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        rid = given if _CLIENT_ID.fullmatch(given) else f"req_{uuid.uuid4().hex[:20]}"
        scope.setdefault("state", {})["request_id"] = rid

        limit = self.max_body_bytes()
        path = scope.get("path", "")
        try:
            if refusal := nul_in_url(scope):
                raise refusal
            if limit and not (path.endswith("/models/import") or "/chunks/" in path):
                receive = limited_receive(scope, receive, limit, lambda: BodyTooLarge(limit))
        except ApiError as refused:  # answered here: the app's handlers are inside
            return await respond(Request(scope), refused)(scope, receive, send)
        await self.app(scope, receive, send)
