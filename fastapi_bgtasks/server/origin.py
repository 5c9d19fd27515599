"""The guard in front of every state-changing request of the mounted API: a
browser page of another site must not be able to submit, cancel or report
through a visitor's network position (loopback trust) or cookies.

Writes (POST, PUT, PATCH, DELETE) carry JSON or no body at all: an HTML form
or a "simple" `fetch` cannot send `application/json` without a CORS
preflight, which this API never grants. A write that a browser marks as
coming from another site (`Sec-Fetch-Site`, else an `Origin` that is not the
request's own) is refused unless it carries a bearer token, which a browser
never attaches by itself.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import BgTasksError, Forbidden, UnsupportedMediaType

__all__ = ["WriteGuard", "cross_site"]

_WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_DEFAULT_PORTS = {"http": "80", "https": "443"}


def _authority(host: str, scheme: str) -> str:
    """`host[:port]` lower-cased, with the scheme's default port made explicit."""
    host = host.strip().lower()
    bracket = host.rfind("]")
    if host.rfind(":") > bracket:
        return host
    return f"{host}:{_DEFAULT_PORTS.get(scheme, '')}"


def cross_site(headers: Headers) -> bool:
    """Whether a browser says this request comes from a page of another
    origin: `Sec-Fetch-Site` other than `same-origin` or `none` (a typed URL),
    or, from a browser that sends no `Sec-Fetch-Site`, an `Origin` whose
    host and port differ from the request's `Host`. Clients that are not
    browsers send neither and are never cross-site."""
    site = headers.get("sec-fetch-site")
    if site is not None:
        return site.strip().lower() not in ("same-origin", "none")
    origin = headers.get("origin")
    if origin is None:
        return False
    parts = urlsplit(origin.strip())
    if not parts.scheme or not parts.netloc:
        return True  # "null": a sandboxed frame, a file, a redirect across origins
    host = headers.get("host", "")
    return _authority(parts.netloc, parts.scheme) != _authority(host, parts.scheme)


def _bearer(headers: Headers) -> bool:
    scheme, _, value = headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and bool(value.strip())


def _has_body(headers: Headers) -> bool:
    if "transfer-encoding" in headers:
        return True
    try:
        return int(headers.get("content-length", "0")) > 0
    except ValueError:
        return True


def _refusal(headers: Headers) -> BgTasksError | None:
    content_type = headers.get("content-type")
    if content_type is not None:
        media = content_type.split(";", 1)[0].strip().lower()
        if media != "application/json":
            return UnsupportedMediaType(
                f"Requests that change state take application/json, not {media or 'nothing'}."
            )
    elif _has_body(headers):
        return UnsupportedMediaType("A request body needs `Content-Type: application/json`.")
    if cross_site(headers) and not _bearer(headers):
        return Forbidden(
            "A page of another site may not change state here; send the request "
            "from your own backend or with a bearer token."
        )
    return None


class WriteGuard:
    """Refuse writes in another media type than JSON (415) and writes a
    browser sends from another site without a bearer token (403), before the
    body is read or any credential is checked."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") in _WRITES:
            error = _refusal(Headers(scope=scope))
            if error is not None:
                response = JSONResponse(
                    error.to_body(), status_code=error.status_code, headers={"Connection": "close"}
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
