"""The first thing a request meets in the mounted API: bodies over the limit
are refused with 413 before they are read, so no route parses more than
`max_body_bytes` (or the worker routes' larger limit).
"""

from __future__ import annotations

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import PayloadTooLarge

__all__ = ["BodyLimit"]


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
