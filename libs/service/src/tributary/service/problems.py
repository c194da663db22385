"""One error shape for every service: RFC 9457 ``application/problem+json``.

Every 4xx and 5xx answer has the body::

    {
      "type": "https://tributary.dev/problems/validation-error",
      "title": "Validation Failed",
      "status": 422,
      "detail": "The request is not valid: see errors for each field.",
      "errors": [{"field": "body.email", "message": "is not a valid email address",
                  "type": "value_error"}]
    }

``type`` is always ``https://tributary.dev/problems/<slug>`` (never ``about:blank``), so a
client can switch on it. A plain HTTP status problem has the slug of its status phrase
(``not-found``, ``unauthorized``, ``too-many-requests``...); the one problem with a slug of its
own is ``validation-error`` (422 with ``errors``). ``errors`` is present when a problem is
about named fields: ``field`` is the location (``body``, ``query``, ``path``, ``header``,
``cookie``) and the path in it, joined with dots; list positions are numbers
(``body.items.0.name``). ``type`` of an error is pydantic's error type (``missing``,
``string_too_long``...) or the service's own (``conflict``, ``not_found``...).

``detail`` never carries the input: no email address, name, token or secret. Validation
errors keep pydantic's message but never its ``input``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("tributary.service.problems")

MEDIA_TYPE = "application/problem+json"
TYPE_BASE = "https://tributary.dev/problems/"
VALIDATION = "validation-error"

# RFC 9110's names where Python's http.HTTPStatus still has the RFC 7231 ones
_TITLES = {
    413: "Content Too Large",
    414: "URI Too Long",
    416: "Range Not Satisfiable",
    422: "Unprocessable Content",
}
_SLUG_TITLES = {VALIDATION: "Validation Failed"}


def status_title(status: int) -> str:
    if status in _TITLES:
        return _TITLES[status]
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def status_slug(status: int) -> str:
    """``not-found`` for 404: the status phrase in lower case, words joined with hyphens."""
    title = status_title(status)
    if title == "Error":
        return f"http-{status}"
    return "-".join(title.lower().replace("'", "").split())


class ProblemFieldError(BaseModel):
    """One field a problem is about."""

    field: str = Field(
        description="Location and path, joined with dots: body.email, query.limit, "
        "path.user_id, header.Idempotency-Key; list positions are numbers (body.items.0.name)",
        examples=["body.email"],
    )
    message: str = Field(examples=["is not a valid email address"])
    type: str = Field(
        description="What is wrong, for programs: pydantic's error type (missing, "
        "string_too_long...) or the service's own (conflict, not_found...)",
        examples=["value_error"],
    )


class ProblemDetail(BaseModel):
    """RFC 9457 problem details: the body of every 4xx and 5xx answer."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "type": TYPE_BASE + VALIDATION,
                    "title": "Validation Failed",
                    "status": 422,
                    "detail": "The request is not valid: see errors for each field.",
                    "errors": [
                        {
                            "field": "body.email",
                            "message": "is not a valid email address",
                            "type": "value_error",
                        }
                    ],
                }
            ]
        }
    )

    type: str = Field(
        description=f"A URI naming the kind of problem: {TYPE_BASE}<slug>",
        examples=[TYPE_BASE + "not-found"],
    )
    title: str = Field(description="Short summary of the kind of problem (same for a type)")
    status: int = Field(ge=400, le=599, description="The HTTP status code")
    detail: str = Field(description="This occurrence, for people; never carries personal data")
    errors: list[ProblemFieldError] | None = Field(
        default=None, description="The fields the problem is about (validation errors)"
    )


class Problem(HTTPException):
    """Raise anywhere in a request to answer with a problem; ``headers`` are kept.

    A subclass of FastAPI's ``HTTPException``, so code that handles those handles it too
    (FastAPI re-raises it when it comes from reading the body).
    """

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        slug: str | None = None,
        title: str | None = None,
        errors: Sequence[ProblemFieldError] = (),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(status, detail=detail, headers=dict(headers) if headers else None)
        self.slug = slug or status_slug(status)
        self.title = title or _SLUG_TITLES.get(self.slug) or status_title(status)
        self.errors = list(errors)

    @property
    def type(self) -> str:
        return TYPE_BASE + self.slug

    def body(self) -> ProblemDetail:
        return ProblemDetail(
            type=self.type,
            title=self.title,
            status=self.status_code,
            detail=str(self.detail),
            errors=self.errors or None,
        )

    def response(self) -> JSONResponse:
        return JSONResponse(
            self.body().model_dump(mode="json", exclude_none=True),
            status_code=self.status_code,
            headers=self.headers,
            media_type=MEDIA_TYPE,
        )


# -- helpers -----------------------------------------------------------------------------------


def field_error(field: str, message: str, kind: str) -> ProblemFieldError:
    return ProblemFieldError(field=field, message=message, type=kind)


def invalid(field: str, message: str, kind: str = "value_error", *, status: int = 422) -> Problem:
    """A validation problem about one field, e.g. ``invalid("query.cursor", "is not...")``."""
    return Problem(
        status,
        "The request is not valid: see errors for each field.",
        slug=VALIDATION,
        errors=[field_error(field, message, kind)],
    )


def not_found(detail: str, *, field: str | None = None, message: str = "was not found") -> Problem:
    """404; with ``field`` (``path.user_id``) the problem names the parameter too."""
    errors = [field_error(field, message, "not_found")] if field else []
    return Problem(404, detail, errors=errors)


def conflict(detail: str, *, field: str | None = None, message: str = "conflicts") -> Problem:
    errors = [field_error(field, message, "conflict")] if field else []
    return Problem(409, detail, errors=errors)


def unavailable(detail: str, *, retry_after: int = 5) -> Problem:
    return Problem(503, detail, headers={"Retry-After": str(retry_after)})


def internal_error() -> Problem:
    return Problem(500, "The service failed to answer this request; the failure is logged.")


def problem_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries documenting ``codes`` as problem details."""
    return {code: {"model": ProblemDetail, "description": status_title(code)} for code in codes}


# -- from what FastAPI and Starlette raise -----------------------------------------------------


def _message(error: Mapping[str, Any]) -> str:
    message = str(error.get("msg", "is not valid"))
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    return message


def field_errors(errors: Sequence[Any]) -> list[ProblemFieldError]:
    """Pydantic's (or FastAPI's) error list as ``errors[]``: location, message, type; no input."""
    found: list[ProblemFieldError] = []
    for error in errors:
        if not isinstance(error, Mapping):
            continue
        kind = str(error.get("type", "value_error"))
        loc = [str(part) for part in error.get("loc", ()) if str(part)]
        if kind == "json_invalid":
            # FastAPI puts the character position where the field would be
            ctx = error.get("ctx") or {}
            reason = ctx.get("error") if isinstance(ctx, Mapping) else None
            message = f"is not valid JSON ({reason})" if reason else "is not valid JSON"
            found.append(field_error("body", message, kind))
            continue
        found.append(field_error(".".join(loc) or "request", _message(error), kind))
    return found


def from_http_exception(exc: StarletteHTTPException) -> Problem:
    if isinstance(exc, Problem):
        return exc
    detail = exc.detail
    if isinstance(detail, str) and detail:
        return Problem(exc.status_code, detail, headers=exc.headers)
    if isinstance(detail, list) and (errors := field_errors(detail)):
        # the FastAPI-style list some code raises: [{"loc": [...], "msg": ..., "type": ...}]
        problem = Problem(
            exc.status_code,
            "The request is not valid: see errors for each field.",
            slug=VALIDATION if exc.status_code == 422 else None,
            errors=errors,
            headers=exc.headers,
        )
        return problem
    return Problem(exc.status_code, status_title(exc.status_code), headers=exc.headers)


def from_validation_error(exc: RequestValidationError) -> Problem:
    errors = field_errors(exc.errors())
    return Problem(
        422,
        "The request is not valid: see errors for each field.",
        slug=VALIDATION,
        errors=errors or [field_error("request", "is not valid", "value_error")],
    )


async def http_exception_handler(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, StarletteHTTPException):
        return internal_error().response()
    if exc.status_code in (204, 304) or exc.status_code < 400:
        # no body allowed (204, 304) or not an error: as Starlette answers them
        return Response(status_code=exc.status_code, headers=exc.headers)
    return from_http_exception(exc).response()


async def validation_exception_handler(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, RequestValidationError):
        return internal_error().response()
    return from_validation_error(exc).response()


async def server_error_handler(request: Request, exc: Exception) -> Response:
    """Starlette's last resort (an error outside the routes): a 500 problem.

    Starlette re-raises the exception afterwards, so the server logs it with its traceback.
    """
    return internal_error().response()


class TrackedSend:
    """ASGI ``send`` that remembers whether the response has started (too late to answer)."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)


class UnhandledErrors:
    """Pure ASGI: an exception no handler answered becomes a 500 problem, logged here.

    Inside the correlation middleware, so the log line and the answer carry the request's
    correlation id. The exception text stays out of the answer and out of the span (it may
    hold personal data from the database); the log formatter masks it in the traceback.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        watch = TrackedSend(send)
        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            trace.get_current_span().set_status(Status(StatusCode.ERROR, type(exc).__name__))
            if watch.started:  # too late to answer: let the server drop the connection
                raise
            await internal_error().response()(scope, receive, send)


# -- OpenAPI -----------------------------------------------------------------------------------

_REF = "#/components/schemas/"


def _problem_content() -> dict[str, Any]:
    return {MEDIA_TYPE: {"schema": {"$ref": _REF + "ProblemDetail"}}}


def _is_problem(content: Mapping[str, Any]) -> bool:
    schema = content.get("application/json", {}).get("schema", {})
    ref = schema.get("$ref", "") if isinstance(schema, Mapping) else ""
    return ref in (_REF + "ProblemDetail", _REF + "HTTPValidationError")


def rewrite_openapi(schema: dict[str, Any]) -> dict[str, Any]:
    """Problem answers as ``application/problem+json``; FastAPI's 422 replaced by the problem.

    An error answer documented without a body (``{429: {"description": ...}}``) gets the
    problem body too; one with a body of its own (OAuth's errors) keeps it.

    Every operation also documents a ``default`` problem answer (401, 403, 413, 429, 500,
    503...), so any error status is described.
    """
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    detail_schema = ProblemDetail.model_json_schema(ref_template=_REF + "{model}")
    for name, definition in detail_schema.pop("$defs", {}).items():
        components.setdefault(name, definition)
    components.setdefault("ProblemDetail", detail_schema)
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            responses: dict[str, Any] = operation["responses"]
            for code, response in responses.items():
                content = response.get("content")
                if (content is None and code.startswith(("4", "5"))) or _is_problem(content or {}):
                    response["content"] = _problem_content()
            responses.setdefault(
                "default",
                {
                    "description": "Any other error, as problem details",
                    "content": _problem_content(),
                },
            )
    for unused in ("HTTPValidationError", "ValidationError"):  # FastAPI's, if nothing uses them
        definition = components.pop(unused, None)
        if definition is not None and f'"{_REF}{unused}"' in json.dumps(schema):
            components[unused] = definition
    return schema


def document(app: FastAPI) -> None:
    """Wrap ``app.openapi`` (whatever it is now) so its schema is rewritten once, when built."""
    build: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = rewrite_openapi(build())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def install(app: FastAPI) -> None:
    """Register the handlers and the catch-all; call before the correlation middleware."""
    app.add_exception_handler(StarletteHTTPException, http_exception_handler)
    app.add_exception_handler(RequestValidationError, validation_exception_handler)
    app.add_exception_handler(Exception, server_error_handler)
    app.add_middleware(UnhandledErrors)
    document(app)
