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
from collections.abc import Callable, Mapping
from typing import Any, get_args
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from pydantic.fields import FieldInfo
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

    def __init__(self, message: str, param: str | None = None, code: str = "conflict"):
        super().__init__(409, message, param, code)


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
        # FastAPI's 400 for any error reading a body: limited_receive's 413 is its own, and
        # a server's file that failed (an upload spooled to its disk) is a 500 in its log
        if isinstance(exc.__cause__, ApiError | OSError):
            return respond(request, exc.__cause__)
        msg = _HTTP_MESSAGES.get(exc.status_code) or str(exc.detail)
        if exc.status_code == 404:
            msg = f"{msg}: {request.method} {request.url.path}"
        response = error_response(exc.status_code, msg, None, None, request_id(request))
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:
            response.headers["Allow"] = ", ".join(sorted(allowed_methods(request)))
        return response

    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_middleware(RequestGuard, max_body_bytes=max_body_bytes)


# ---------------------------------------------------------------- validation errors in words
# Every refusal of a request's fields (FastAPI's validation, a body validated by hand, an
# apply document) is put in words here: the field named, what it allows said in words, and
# none of pydantic's own phrasing ("Value error, ...", "String should match pattern '^...'").


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """The 422 of FastAPI's validation: each error in words, ranges, lengths and fields read
    from the route's body model."""
    route = request.scope.get("route")
    field = getattr(route, "body_field", None)
    model = getattr(getattr(field, "field_info", None), "annotation", None)
    body_model = model if isinstance(model, type) and issubclass(model, BaseModel) else None
    query = _query_fields(route)
    described = [describe_validation_error(e, body_model, query) for e in exc.errors()]
    return validation_response(request, described)


def _query_fields(route: Any) -> dict[str, FieldInfo]:
    """A route's query parameters by name: their bounds give a refusal's whole range."""
    from fastapi.dependencies.utils import get_flat_dependant

    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return {}
    return {p.alias: p.field_info for p in get_flat_dependant(dependant).query_params}


def validation_response(request: Request, described: list[tuple[str, str]]) -> JSONResponse:
    """The 422 for (field, message) pairs: the messages joined, each field in `detail` (the
    document's ValidationErrorResponse)."""
    message = "; ".join(m for _, m in described)
    detail = [{"field": f, "message": m} for f, m in described]
    return error_response(
        422, message, described[0][0], "validation_error", request_id(request), detail=detail
    )


#: What a `pattern` allows, in words: the rest of "<field> <words>" ("must be a file name
#: ending in .zip"). The module that declares a pattern gives its words (`explained`); one
#: character class (`^[A-Za-z0-9_.-]+$`) is put in words without them.
PATTERN_WORDS: dict[str, str] = {}


def explained(pattern: str, words: str) -> str:
    """`pattern`, with the words that say what it allows recorded for its refusals."""
    PATTERN_WORDS[pattern] = words
    return pattern


_ONE_CLASS = re.compile(r"\^\[((?:\\.|[^\]\\])+)\](\+|\*|\{(\d+)(?:,(\d*))?\})\$")
_CLASS_RANGES = {"A-Z": "capital letters", "a-z": "lowercase letters", "0-9": "digits"}


def _class_words(chars: str) -> str | None:
    """A regex character class's content in words ("letters, digits, '_', '.', '-'"), or
    None for one that words cannot say simply (negated, or another range)."""
    if chars.startswith("^"):
        return None
    parts = []
    if "A-Z" in chars and "a-z" in chars:
        parts.append("letters")
        chars = chars.replace("A-Z", "").replace("a-z", "")
    for span, words in _CLASS_RANGES.items():
        if span in chars:
            parts.append(words)
            chars = chars.replace(span, "")
    tokens = re.findall(r"\\.|.", chars)
    for i, token in enumerate(tokens):
        if token == "-" and 0 < i < len(tokens) - 1:  # a range: no words for it
            return None
        parts.append(repr(token[-1]))
    return ", ".join(parts)


def _length_words(lo: int | None, hi: int | None) -> str:
    if lo and lo == hi:
        return f" ({lo} character{'s' if lo > 1 else ''})"
    if lo and hi:
        return f" ({lo}–{hi} characters)"
    if hi:
        return f" (at most {hi} characters)"
    if lo:
        return f" (at least {lo} character{'s' if lo > 1 else ''})"
    return ""


def pattern_words(pattern: str, info: FieldInfo | None = None) -> str:
    """What `pattern` allows, as the rest of "<field> ..."; the field's lengths from `info`."""
    if pattern in PATTERN_WORDS:
        return PATTERN_WORDS[pattern]
    one = _ONE_CLASS.fullmatch(pattern)
    chars = _class_words(one.group(1)) if one else None
    if one is None or chars is None:
        return f"must match the regular expression {pattern}"
    lo, hi = _metadata(info, "min_length"), _metadata(info, "max_length")
    if one.group(3) is not None:  # {m}, {m,} or {m,n} in the pattern itself
        lo, most = int(one.group(3)), one.group(4)
        hi = lo if most is None else int(most) if most else None
    elif one.group(2) == "+":
        lo = max(lo or 0, 1)
    return f"may hold {chars}{_length_words(lo, hi)}"


def _metadata(info: FieldInfo | None, name: str) -> Any:
    """A constraint of a field (min_length, ge, ...), None when it has none."""
    for m in info.metadata if info is not None else ():
        if getattr(m, name, None) is not None:
            return getattr(m, name)
    return None


def _bound(info: FieldInfo | None, *kinds: str) -> tuple[str, Any] | None:
    """(kind, value) of a field's first bound of these kinds ("ge", "gt"), or None."""
    return next(((k, v) for k in kinds if (v := _metadata(info, k)) is not None), None)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model a field's annotation holds: itself, within `X | None` or a list."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        if (model := _model_in(arg)) is not None:
            return model
    return None


def _field_at(
    model: type[BaseModel] | None, loc: tuple[Any, ...]
) -> tuple[FieldInfo | None, type[BaseModel] | None]:
    """(the field at `loc`, the model it is or would be a field of), walking nested models;
    None for what `loc` does not lead to (a list's item is not its list's field)."""
    info, owner = None, model
    for part in loc:
        if isinstance(part, int):  # an item: `model` is already the items' model, if any
            info = None
            continue
        if model is None:
            return None, None
        owner, info = model, model.model_fields.get(part)
        model = _model_in(info.annotation) if info is not None else None
    return info, owner


def _as_field_says(field: str, loc: tuple[Any, ...], text: str) -> str:
    """A validator's message about `field`: as it stands when it starts with the field's
    name ("name must not be blank"), else after it ("scalingParameters: minReplicas ...")."""
    name = next((str(p) for p in reversed(loc) if isinstance(p, str)), None)
    if name and text.startswith(name + " "):
        return field.removesuffix(name) + text
    return f"{field}: {text}"


#: type errors in JSON's words, where pydantic's name Python's ("a valid dictionary or
#: instance of HyperParameters")
_TYPE_WORDS = {
    "model_type": "an object",
    "model_attributes_type": "an object",
    "dict_type": "an object",
    "list_type": "a list",
    "string_type": "a string",
    "bool_type": "true or false",
    "int_type": "an integer",
    "int_from_float": "a whole number",
    "float_type": "a number",
}
#: the first part of a FastAPI error's loc
_SOURCES = ("body", "query", "path", "header", "cookie")
#: a one-sided range's words, by pydantic's name of its bound
_BOUND_WORDS = {"ge": "at least", "gt": "greater than", "le": "at most", "lt": "less than"}


def describe_validation_error(
    err: Mapping[str, Any],
    body_model: type[BaseModel] | None = None,
    query: Mapping[str, FieldInfo] | None = None,
) -> tuple[str, str]:
    """(field path, message) for one pydantic error, in raydock's words. `body_model`, the
    model that was validated, gives ranges, lengths and the fields a body may have; `query`,
    the route's query parameters, their ranges."""
    kind, ctx = err.get("type", ""), err.get("ctx") or {}
    msg = str(err.get("msg", "invalid value"))
    if kind == "json_invalid":  # loc is ("body", <character offset>)
        at, reason = err.get("loc", (None, None))[-1], ctx.get("error", "invalid JSON")
        return "body", f"the body is not valid JSON: {reason} at character {at}"
    loc = tuple(err.get("loc", ()))
    if loc and loc[0] in _SOURCES:  # where FastAPI read it from, not part of the field
        loc = loc[1:]
    field = ".".join(str(p) for p in loc) or "body"
    info, owner = _field_at(body_model, loc)
    if tuple(err.get("loc", ()))[:1] == ("query",):
        info = (query or {}).get(field)
    got = err.get("input")
    if kind.startswith(("greater_than", "less_than")):
        lo, hi = _bound(info, "ge", "gt"), _bound(info, "le", "lt")
        if lo and hi and lo[0] == "ge" and hi[0] == "le":
            return field, f"{field} must be between {lo[1]} and {hi[1]} (got {got})"
        if lo and hi:  # an exclusive side in its own words: "greater than 0", not "between"
            words = f"{_BOUND_WORDS[lo[0]]} {lo[1]} and {_BOUND_WORDS[hi[0]]} {hi[1]}"
            return field, f"{field} must be {words} (got {got})"
        bound = next((f"{w} {ctx[k]}" for k, w in _BOUND_WORDS.items() if k in ctx), None)
        if bound:
            return field, f"{field} must be {bound} (got {got})"
    if kind == "string_too_short":
        n = ctx.get("min_length")
        return field, f"{field}: at least {n} character{'s' if n != 1 else ''}"
    if kind == "string_too_long":
        size = f" (got {len(got)})" if isinstance(got, str) else ""
        return field, f"{field}: at most {ctx.get('max_length')} characters{size}"
    if kind in ("too_short", "too_long"):  # a list's items
        n = ctx.get("min_length" if kind == "too_short" else "max_length")
        size = f" (got {ctx['actual_length']})" if ctx.get("actual_length") is not None else ""
        least = "at least" if kind == "too_short" else "at most"
        return field, f"{field}: {least} {n} item{'s' if n != 1 else ''}{size}"
    if kind == "string_pattern_mismatch":  # the value is not repeated: it may be a secret
        return field, f"{field} {pattern_words(str(ctx.get('pattern')), info)}"
    if kind == "missing":
        return field, f"{field} is required"
    if kind == "extra_forbidden":
        allowed = f" (allowed: {', '.join(owner.model_fields)})" if owner else ""
        return field, f"{field}: unknown field{allowed}"
    if kind in ("value_error", "assertion_error"):  # a validator's own message
        text = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
        return field, _as_field_says(field, loc, text)
    if kind == "literal_error" and " or " in str(ctx.get("expected", "")):
        return field, f"{field} must be one of {ctx['expected']}"
    if kind in _TYPE_WORDS:
        return field, f"{field} must be {_TYPE_WORDS[kind]}"
    if msg.startswith("Input should be "):  # pydantic's other "Input should be ..."
        return field, f"{field} must be {msg.removeprefix('Input should be ')}"
    return field, f"{field}: {msg}"


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
