"""A worker's report POSTs on a keep-alive connection of their own: against a
real app (outcomes, an app restarted between two batches), against a small
HTTP/1.1 server of the test's own (chunked bodies, a peer that closes), and
when the general HTTP client is used instead (https, a proxy)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import pytest

from fastapi_bgtasks.client import ApiClient
from fastapi_bgtasks.errors import AccessDenied, StoreUnavailable
from fastapi_bgtasks.keepalive import KeepAlive, direct_http
from fastapi_bgtasks.states import Outcome
from fastapi_bgtasks.wire import Report
from tests.harness.procs import free_port, start_app

TOKEN = "a-token-long-enough-for-the-app-0123456789"

pytestmark = pytest.mark.anyio


def _unknown_reports(n: int) -> list[bytes]:
    return [
        Report(run_id=uuid.uuid4(), lease_token="t", state="COMPLETED").model_dump_json().encode()
        for _ in range(n)
    ]


async def test_reports_land_across_a_restart_of_the_app(tmp_path: Path) -> None:
    """The kept connection dies with the app: the next batch goes on a new one."""
    db_url = f"sqlite+aiosqlite:///{tmp_path}/keepalive.db"
    port = free_port()
    module = "tests.worker.workerapp:app"
    app, base = start_app(db_url, tmp_path, module=module, port=port, BGTASKS_TOKEN=TOKEN)
    client = ApiClient(f"{base}/tasks", TOKEN, worker_id="w-keepalive")
    try:
        assert await client.reports(_unknown_reports(3)) == [Outcome.UNKNOWN] * 3
        app.stop()
        with pytest.raises(StoreUnavailable):
            await client.reports(_unknown_reports(1))
        app, _ = start_app(db_url, tmp_path, module=module, port=port, BGTASKS_TOKEN=TOKEN)
        assert await client.reports(_unknown_reports(2)) == [Outcome.UNKNOWN] * 2
        assert await client.reports([]) == []
    finally:
        await client.aclose()
        app.stop()
    wrong = ApiClient(f"{base}/tasks", "wrong-" + TOKEN, worker_id="w-keepalive")
    app, _ = start_app(db_url, tmp_path, module=module, port=port, BGTASKS_TOKEN=TOKEN)
    try:
        with pytest.raises(AccessDenied, match="BGTASKS_TOKEN"):
            await wrong.reports(_unknown_reports(1))
    finally:
        await wrong.aclose()
        app.stop()


Answer = Callable[[bytes], Awaitable[bytes]]


@asynccontextmanager
async def http_server(answer: Answer, *, close_after: bool = False) -> AsyncIterator[int]:
    """A loopback HTTP/1.1 server: each request (head and body) is handed to
    `answer`, whose bytes are sent back as they are."""

    async def serve(stream: anyio.abc.SocketStream) -> None:
        buffer = b""
        async with stream:
            while True:
                while b"\r\n\r\n" not in buffer:
                    try:
                        buffer += await stream.receive()
                    except anyio.EndOfStream:
                        return
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                while len(buffer) < length:
                    buffer += await stream.receive()
                body, buffer = buffer[:length], buffer[length:]
                await stream.send(await answer(head + b"\r\n\r\n" + body))
                if close_after:
                    return

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        try:
            yield port
        finally:
            tg.cancel_scope.cancel()


async def test_a_chunked_answer_is_read_whole_and_the_connection_kept() -> None:
    requests: list[bytes] = []

    async def answer(request: bytes) -> bytes:
        requests.append(request)
        return (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;x=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n"
        )

    async with http_server(answer) as port:
        link = KeepAlive(f"http://127.0.0.1:{port}/tasks", {"X-Worker-Id": "w"}, timeout=5)
        try:
            for _ in range(2):
                reply = await link.post("/worker/reports", b'{"a":1}')
                assert (reply.status, reply.body) == (200, b"hello world")
        finally:
            await link.aclose()
    head, _, body = requests[0].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /tasks/worker/reports HTTP/1.1\r\n")
    assert b"\r\nX-Worker-Id: w" in head and b"\r\nContent-Length: 7" in head
    assert body == b'{"a":1}'


@pytest.mark.parametrize("says_so", [True, False], ids=["connection-close", "silently"])
async def test_a_peer_that_closes_after_each_answer_gets_a_new_connection_each_time(
    says_so: bool,
) -> None:
    """Said (`Connection: close`) or not (a kept connection the peer let go
    of): each request still gets its answer."""
    close = b"Connection: close\r\n" if says_so else b""

    async def answer(_request: bytes) -> bytes:
        return b"HTTP/1.1 503 Busy\r\n" + close + b"Content-Length: 2\r\n\r\n{}"

    async with http_server(answer, close_after=True) as port:
        link = KeepAlive(f"http://127.0.0.1:{port}", {}, timeout=5)
        try:
            for _ in range(3):
                assert (await link.post("/r", b"{}")).status == 503
        finally:
            await link.aclose()


async def test_an_interim_answer_is_skipped_and_no_content_has_no_body() -> None:
    async def answer(_request: bytes) -> bytes:
        return b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n"

    async with http_server(answer) as port:
        link = KeepAlive(f"http://127.0.0.1:{port}", {}, timeout=5)
        try:
            for _ in range(2):
                reply = await link.post("/r", b"{}")
                assert (reply.status, reply.body) == (204, b"")
        finally:
            await link.aclose()


async def test_an_answer_that_never_comes_times_out() -> None:
    async def answer(_request: bytes) -> bytes:
        await anyio.sleep(30)
        return b""

    async with http_server(answer) as port:
        link = KeepAlive(f"http://127.0.0.1:{port}", {}, timeout=0.2)
        try:
            with pytest.raises(TimeoutError):
                await link.post("/r", b"{}")
        finally:
            await link.aclose()


def test_only_plain_http_reached_without_a_proxy_takes_the_keep_alive_link(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert direct_http("http://127.0.0.1:8000/tasks")
    assert not direct_http("https://app.example/tasks")
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    assert not direct_http("http://app.internal:8000/tasks")
    monkeypatch.setenv("NO_PROXY", "app.internal")
    assert direct_http("http://app.internal:8000/tasks")
