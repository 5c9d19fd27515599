"""How errors leave the mounted API: every exception becomes the one JSON
error body of its class in errors.py, and each route's OpenAPI `responses=`
is derived from the classes it can raise.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from ..errors import (
    AccessDenied,
    BadRequest,
    BgTasksError,
    Forbidden,
    InvalidArguments,
    InvalidRequest,
    MethodNotAllowed,
    NotAcceptable,
    PayloadTooLarge,
    RateLimited,
    RouteNotFound,
    UnsupportedMediaType,
)
from ..wire import ErrorBody, clean_text

__all__ = ["EXCEPTION_HANDLERS", "declare", "install_handlers", "method_not_allowed"]

# The class that answers each status FastAPI and Starlette raise on their own
# (or the host's `auth=` dependency raises as an HTTPException).
_BY_STATUS: dict[int, type[BgTasksError]] = {
    cls.status_code: cls
    for cls in (
        BadRequest,
        AccessDenied,
        Forbidden,
        RouteNotFound,
        MethodNotAllowed,
        NotAcceptable,
        PayloadTooLarge,
        UnsupportedMediaType,
        RateLimited,
    )
}

_UNREADABLE: dict[type[BaseException], str] = {
    UnicodeDecodeError: "The request body is not valid UTF-8.",
    RecursionError: "The request body nests too deeply.",
}


def declare(*errors: type[BgTasksError]) -> dict[int | str, dict[str, Any]]:
    """A route's `responses=`: each status its error classes answer with, the
    error body's schema, and a description made of each class's code and
    docstring (its default message)."""
    by_status: dict[int, list[type[BgTasksError]]] = {}
    for cls in errors:
        by_status.setdefault(cls.status_code, []).append(cls)
    responses: dict[int | str, dict[str, Any]] = {}
    for status, classes in sorted(by_status.items()):
        lines = [f"`{cls.code}`: {_summary(cls)}" for cls in classes]
        description = lines[0] if len(lines) == 1 else "\n".join(f"- {line}" for line in lines)
        responses[status] = {"model": ErrorBody, "description": description}
    return responses


def _summary(cls: type[BgTasksError]) -> str:
    return (cls.__doc__ or cls.code).strip().splitlines()[0]


def _answer(error: BgTasksError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.to_body(), status_code=error.status_code, headers=headers)


async def _on_bgtasks_error(_request: Request, exc: BgTasksError) -> JSONResponse:
    return _answer(exc)


async def _on_validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    return _answer(InvalidRequest(detail=_safe_errors(exc.errors())))


async def _on_bad_arguments(_request: Request, exc: ValidationError) -> JSONResponse:
    return _answer(InvalidArguments(detail=_safe_errors(exc.errors(include_url=False))))


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _allowed(request: Request) -> str:
    """Every method some route serves on this path (Starlette names only the
    methods of the first route matching the path, so `OPTIONS /runs` would
    say POST without GET)."""
    allowed = []
    for method in _METHODS:
        scope = {**request.scope, "method": method}
        for route in request.app.router.routes:
            if route.matches(scope)[0] is Match.FULL:
                allowed.append(method)
                break
    return ", ".join(allowed)


def method_not_allowed(allow: str) -> JSONResponse:
    """The 405 of a route that answers other methods itself."""
    return _answer(MethodNotAllowed(), {"Allow": allow})


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 405:
        return _answer(MethodNotAllowed(), {"Allow": _allowed(request)})
    if isinstance(exc.detail, dict) and "error" in exc.detail:
        # The host's auth= dependency may answer with a body of its own.
        return JSONResponse(exc.detail, status_code=exc.status_code, headers=exc.headers)
    cls = _BY_STATUS.get(exc.status_code)
    if cls is None:
        body = {"error": f"http_{exc.status_code}", "message": str(exc.detail), "detail": None}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)
    if cls is BadRequest:
        # FastAPI's words ("There was an error parsing the body") hide the cause.
        for cause, message in _UNREADABLE.items():
            if isinstance(exc.__cause__, cause):
                return _answer(BadRequest(message), exc.headers)
    return _answer(cls(str(exc.detail)), exc.headers)


def _safe_errors(errors: Any) -> list[dict[str, Any]]:
    """pydantic's error list without the offending input, which may be NaN,
    raw bytes or a lone surrogate that no JSON response can carry (and which
    the caller already has)."""
    safe = []
    for error in errors:
        item: dict[str, Any] = {
            "type": str(error.get("type", "")),
            "loc": [p if isinstance(p, int) else str(p) for p in error.get("loc", ())],
            "msg": clean_text(error.get("msg", "")),
        }
        if error.get("ctx"):
            item["ctx"] = {str(k): clean_text(v) for k, v in error["ctx"].items()}
        safe.append(item)
    return safe


EXCEPTION_HANDLERS: dict[
    int | type[Exception], Callable[[Request, Any], Coroutine[Any, Any, Response]]
] = {
    BgTasksError: _on_bgtasks_error,
    RequestValidationError: _on_validation_error,
    StarletteHTTPException: _on_http_error,
    ValidationError: _on_bad_arguments,
}
"""The sub-app's `exception_handlers=`: one JSON error body for every error."""


def install_handlers(app: Any) -> None:
    """Make a host app (FastAPI or Starlette) answer a `BgTasksError` raised
    in its own routes with that class's status and JSON error body, as the
    mounted API does. Nothing else of the host's error handling changes."""
    add = getattr(app, "add_exception_handler", None)
    if not callable(add):
        raise TypeError("bg.install(app) needs a FastAPI or Starlette app")
    add(BgTasksError, _on_bgtasks_error)
