"""A worker's report POSTs on one keep-alive HTTP/1.1 connection of its own:
the request (headers and body) goes out in one write, and the response is
read with no more parsing than a JSON answer needs. Reports are the one
request a worker makes per batch of runs, so this is its hot path; the API
client uses it for a plain `http://` app reached without a proxy, and its
general HTTP client for everything else.
"""

from __future__ import annotations

import urllib.request
from urllib.parse import urlsplit

import anyio
import anyio.abc

__all__ = ["KeepAlive", "ProtocolFault", "Reply", "direct_http"]

# A response head larger than this is not the app's.
MAX_HEAD = 64 * 1024
MAX_BODY = 64 * 1024 * 1024


def direct_http(url: str) -> bool:
    """Whether `url` is plain HTTP reached without a proxy (the environment's
    proxy settings, as the general client reads them)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        return False
    proxies = urllib.request.getproxies()
    if not (proxies.get("http") or proxies.get("all")):
        return True
    return bool(urllib.request.proxy_bypass(parts.hostname))


class Reply:
    """A response: its status and body."""

    __slots__ = ("body", "status")

    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.body = body


class ProtocolFault(Exception):
    """The connection broke or the peer did not speak HTTP/1.1 as expected."""


class KeepAlive:
    """POSTs to the origin of `url` on one connection, opened on first use
    and again after a failure; one request at a time. `headers` go with
    every request (authorization, the worker id)."""

    def __init__(self, url: str, headers: dict[str, str], *, timeout: float) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or ""
        self.port = parts.port or 80
        self.base = parts.path.rstrip("/")
        host = self.host if ":" not in self.host else f"[{self.host}]"
        authority = host if parts.port is None else f"{host}:{parts.port}"
        lines = [f"Host: {authority}", *(f"{k}: {v}" for k, v in headers.items())]
        self._fixed = ("\r\n".join(lines) + "\r\n").encode("latin-1")
        self.timeout = timeout
        self._stream: anyio.abc.SocketStream | None = None
        self._buffer = b""

    async def aclose(self) -> None:
        stream, self._stream = self._stream, None
        self._buffer = b""
        if stream is not None:
            await stream.aclose()

    async def post(self, path: str, body: bytes, content_type: str = "application/json") -> Reply:
        """POST `body` to `path` (under the URL's path); raises OSError (or
        ProtocolFault, TimeoutError) when no answer came. A request on a
        kept connection that the peer had closed meanwhile is sent once more
        on a new one (the reports it carries are idempotent)."""
        head = (
            f"POST {self.base}{path} HTTP/1.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
        ).encode("latin-1")
        request = head + self._fixed + b"\r\n" + body
        for attempt in (1, 2):
            reused = self._stream is not None
            try:
                with anyio.fail_after(self.timeout):
                    return await self._exchange(request)
            except BaseException as exc:
                await self._discard()
                stale = isinstance(exc, _STALE) and not isinstance(exc, TimeoutError)
                if attempt == 1 and reused and stale:
                    continue
                raise
        raise AssertionError("unreachable")

    async def _discard(self) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await self.aclose()
            except OSError:
                pass

    async def _exchange(self, request: bytes) -> Reply:
        if self._stream is None:
            self._stream = await anyio.connect_tcp(self.host, self.port)
            self._buffer = b""
        try:
            await self._stream.send(request)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise ProtocolFault("the connection closed") from exc
        status, length, chunked, close = await self._head()
        if status in (204, 304):  # never a body
            body = b""
        elif chunked:
            body = await self._chunked()
        elif length is not None:
            body = await self._exactly(length)
        else:  # no length: the body runs to the end of the connection
            body = await self._to_end()
            close = True
        if close:
            await self.aclose()
        return Reply(status, body)

    async def _fill(self) -> None:
        assert self._stream is not None
        try:
            data = await self._stream.receive(65536)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise ProtocolFault("the connection closed") from exc
        self._buffer += data

    async def _head(self) -> tuple[int, int | None, bool, bool]:
        """The status, Content-Length, whether chunked, whether the peer
        closes after this response; 1xx responses are skipped."""
        while True:
            while (end := self._buffer.find(b"\r\n\r\n")) < 0:
                if len(self._buffer) > MAX_HEAD:
                    raise ProtocolFault("response head too large")
                await self._fill()
            head = self._buffer[:end].decode("latin-1")
            self._buffer = self._buffer[end + 4 :]
            status_line, *lines = head.split("\r\n")
            version, _, rest = status_line.partition(" ")
            if not version.startswith("HTTP/1.") or not rest[:3].isdigit():
                raise ProtocolFault(f"not an HTTP/1.1 response: {status_line[:100]!r}")
            status = int(rest[:3])
            if 100 <= status < 200:
                continue
            length: int | None = None
            chunked = False
            close = version == "HTTP/1.0"
            for line in lines:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                value = value.strip()
                if name == "content-length":
                    if not value.isdigit() or int(value) > MAX_BODY:
                        raise ProtocolFault(f"bad Content-Length {value[:40]!r}")
                    length = int(value)
                elif name == "transfer-encoding":
                    chunked = value.lower().endswith("chunked")
                elif name == "connection":
                    tokens = {t.strip().lower() for t in value.split(",")}
                    close = "close" in tokens or (close and "keep-alive" not in tokens)
            return status, length, chunked, close

    async def _exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            await self._fill()
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    async def _line(self) -> bytes:
        while (end := self._buffer.find(b"\r\n")) < 0:
            if len(self._buffer) > MAX_HEAD:
                raise ProtocolFault("chunk line too long")
            await self._fill()
        line, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
        return line

    async def _chunked(self) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            size_text = (await self._line()).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise ProtocolFault(f"bad chunk size {size_text[:40]!r}") from None
            if size == 0:
                while await self._line():  # trailers, up to the empty line
                    pass
                return b"".join(parts)
            total += size
            if total > MAX_BODY:
                raise ProtocolFault("response body too large")
            parts.append(await self._exactly(size))
            if await self._exactly(2) != b"\r\n":
                raise ProtocolFault("chunk not followed by CRLF")

    async def _to_end(self) -> bytes:
        while True:
            if len(self._buffer) > MAX_BODY:
                raise ProtocolFault("response body too large")
            try:
                await self._fill()
            except ProtocolFault:
                data, self._buffer = self._buffer, b""
                return data


# A kept connection the peer had closed fails like this before any answer.
_STALE = (ProtocolFault, OSError)
