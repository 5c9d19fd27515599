"""The mounted ASGI app: the routes of submit, feed, reports and status under
one FastAPI sub-app, the body limit, and one JSON error shape for all errors.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import BgTasksError, PayloadTooLarge
from ..wire import ErrorBody
from .context import require_running
from .feed import feed_router
from .intake import submit_router
from .reports import reports_router
from .status import status_router

if TYPE_CHECKING:
    from .context import ServerHub

__all__ = ["build_app"]

log = logging.getLogger("fastapi_bgtasks.api")

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
}


class BodyLimit:
    """Refuse bodies over `limit` bytes with 413, without reading past it:
    by Content-Length when given, by counting when streamed."""

    def __init__(self, app: ASGIApp, limit: int, worker_limit: int) -> None:
        self.app = app
        self.limit = limit
        self.worker_limit = worker_limit

    def _limit(self, scope: Scope) -> int:
        path = str(scope.get("path", ""))
        root = str(scope.get("root_path", ""))
        if root and path.startswith(root):
            path = path[len(root) :]  # relative to the mount point
        return self.worker_limit if path.startswith("/worker/") else self.limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > limit
                except ValueError:
                    too_big = False
                if too_big:
                    await self._refuse(scope, receive, send, limit)
                    return
        seen = 0
        exceeded = False
        refused = False

        async def limited_receive() -> Message:
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # Stop reading here. The app fails to parse the body and
                    # answers some 4xx, which tracking_send replaces with a 413.
                    exceeded = True
                    raise PayloadTooLarge(
                        f"The request body is over {limit} bytes (max_body_bytes)."
                    )
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal refused
            if exceeded:
                if message["type"] == "http.response.start" and not refused:
                    refused = True
                    await self._refuse(scope, receive, send, limit)
                return
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except PayloadTooLarge:
            if not refused:
                await self._refuse(scope, receive, send, limit)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        error = PayloadTooLarge(f"The request body is over {limit} bytes (max_body_bytes).")
        response = JSONResponse(error.to_body(), status_code=413, headers={"Connection": "close"})
        await response(scope, receive, send)


def _safe_errors(errors: Any) -> list[dict[str, Any]]:
    """pydantic's error list without the offending input, which may be NaN,
    raw bytes or a lone surrogate that no JSON response can carry (and which
    the caller already has)."""
    safe = []
    for error in errors:
        item: dict[str, Any] = {
            "type": str(error.get("type", "")),
            "loc": [p if isinstance(p, int) else str(p) for p in error.get("loc", ())],
            "msg": _text(error.get("msg", "")),
        }
        if error.get("ctx"):
            item["ctx"] = {str(k): _text(v) for k, v in error["ctx"].items()}
        safe.append(item)
    return safe


def _text(value: Any) -> str:
    return str(value).encode("utf-8", "replace").decode("utf-8")


def build_app(hub: ServerHub) -> ASGIApp:
    api = FastAPI(
        title="fastapi_bgtasks",
        summary="Durable background tasks: submit, feed, reports and status.",
        version="1",
        redirect_slashes=False,
    )

    @api.exception_handler(BgTasksError)
    async def on_bgtasks_error(_request: Request, exc: BgTasksError) -> JSONResponse:
        return JSONResponse(exc.to_body(), status_code=exc.status_code)

    @api.exception_handler(RequestValidationError)
    async def on_validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        body = {
            "error": "invalid_request",
            "message": "The request is not valid; see detail for each problem.",
            "detail": _safe_errors(exc.errors()),
        }
        return JSONResponse(body, status_code=422)

    @api.exception_handler(StarletteHTTPException)
    async def on_http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = exc.detail if isinstance(exc.detail, dict) and "error" in exc.detail else None
        if body is None:
            body = {
                "error": _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}"),
                "message": str(exc.detail),
                "detail": None,
            }
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @api.exception_handler(ValidationError)
    async def on_bad_arguments(_request: Request, exc: ValidationError) -> JSONResponse:
        body = {
            "error": "invalid_arguments",
            "message": "The arguments do not match the task's signature.",
            "detail": _safe_errors(exc.errors(include_url=False)),
        }
        return JSONResponse(body, status_code=422)

    api.include_router(submit_router(hub))
    api.include_router(status_router(hub))
    api.include_router(feed_router(hub))
    api.include_router(reports_router(hub))

    @api.get(
        "/health",
        summary="200 when the lifespan runs and the store answers, else 503",
        responses={503: {"model": ErrorBody, "description": "Not ready"}},
    )
    async def health() -> dict[str, str]:
        from ..errors import StoreUnavailable

        running = require_running(hub)
        import anyio

        try:
            with anyio.fail_after(2):
                await running.store.ping()
        except TimeoutError:
            raise StoreUnavailable("The task store did not answer within 2 s.") from None
        return {"status": "ok", "database": running.store.dialect}

    return BodyLimit(api, hub.settings.max_body_bytes, hub.settings.worker_body_bytes)
