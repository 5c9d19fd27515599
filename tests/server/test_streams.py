"""Run event streams and worker feeds over a real uvicorn: streams are capped
per app, per client address and per run; a change to one run wakes and
re-reads only that run, once however many streams watch it; idle feeds and
streams send no statements to the store.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest

from tests import timing
from tests.harness.procs import Proc, start_app

pytestmark = pytest.mark.anyio

APP = "tests.server.streamapp:app"


class RawStream:
    """One HTTP request over a socket of its own (from any loopback address),
    read as Server-Sent Events: light enough to hold a hundred open."""

    def __init__(self, sock: anyio.abc.SocketStream) -> None:
        self.sock = sock
        self.status = 0
        self.content_type = ""
        self._buffer = b""

    @classmethod
    async def open(
        cls, port: int, target: str, *, source: str = "127.0.0.1", **headers: str
    ) -> RawStream:
        sock = await anyio.connect_tcp("127.0.0.1", port, local_host=source)
        lines = [f"GET {target} HTTP/1.1", "Host: 127.0.0.1", "Accept: text/event-stream"]
        lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
        await sock.send(("\r\n".join(lines) + "\r\n\r\n").encode())
        stream = cls(sock)
        head = await stream._until(b"\r\n\r\n")
        status_line, *fields = head.decode().split("\r\n")
        stream.status = int(status_line.split()[1])
        for field in fields:
            name, _, value = field.partition(":")
            if name.lower() == "content-type":
                stream.content_type = value.strip()
        return stream

    async def _until(self, marker: bytes) -> bytes:
        while marker not in self._buffer:
            chunk = await self.sock.receive()
            self._buffer += chunk
        head, self._buffer = self._buffer.split(marker, 1)
        return head

    async def body(self) -> bytes:
        """The rest of a short answer (an error's JSON body, chunked or not)."""
        with anyio.move_on_after(timing.DEADLINE):
            while b"}" not in self._buffer:
                self._buffer += await self.sock.receive()
        start = self._buffer.index(b"{")
        return self._buffer[start : self._buffer.rindex(b"}") + 1]

    async def event(self) -> tuple[str, Any]:
        """The next event other than a ping comment: (name, decoded data)."""
        with anyio.fail_after(timing.DEADLINE):
            while True:
                # Chunked framing: an event's lines arrive inside one chunk.
                raw = (await self._until(b"\r\n\r\n")).decode()
                name, data = "", ""
                for line in raw.split("\r\n"):
                    if line.startswith("event: "):
                        name = line[len("event: ") :]
                    elif line.startswith("data: "):
                        data = line[len("data: ") :]
                if name:
                    return name, json.loads(data)

    async def aclose(self) -> None:
        await self.sock.aclose()


@pytest.fixture
def server(db_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    env = getattr(request, "param", {})
    proc, base = start_app(db_url, tmp_path, module=APP, **env)
    try:
        yield base
    finally:
        proc.stop()


def _port(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


async def _state(http: httpx.AsyncClient) -> dict[str, int]:
    response = await http.get("/__test__/streams")
    response.raise_for_status()
    return dict(response.json())


async def _wait_state(http: httpx.AsyncClient, name: str, value: int) -> None:
    with anyio.fail_after(timing.DEADLINE):
        while (await _state(http))[name] != value:
            await anyio.sleep(0.02)


async def _submit(http: httpx.AsyncClient) -> str:
    response = await http.post("/tasks/runs", json={"task": "watched", "args": []})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


@asynccontextmanager
async def _http(base: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base, timeout=timing.DEADLINE) as http:
        yield http


async def _streams(
    stack: AsyncExitStack, port: int, run_id: str, count: int, source: str = "127.0.0.1"
) -> list[RawStream]:
    opened = []
    for _ in range(count):
        stream = await RawStream.open(port, f"/tasks/runs/{run_id}/events", source=source)
        stack.push_async_callback(stream.aclose)
        assert stream.status == 200
        name, document = await stream.event()
        assert (name, document["state"]) == ("state", "SCHEDULED")
        opened.append(stream)
    return opened


async def _refused(port: int, run_id: str, source: str) -> dict[str, Any]:
    stream = await RawStream.open(port, f"/tasks/runs/{run_id}/events", source=source)
    try:
        assert stream.status == 429
        assert stream.content_type == "application/json"
        body: dict[str, Any] = json.loads(await stream.body())
        return body
    finally:
        await stream.aclose()


CAPS = {
    "BGTASKS_TEST_MAX_STREAMS": "20",
    "BGTASKS_TEST_MAX_STREAMS_PER_CLIENT": "4",
    "BGTASKS_TEST_MAX_STREAMS_PER_RUN": "6",
}


@pytest.mark.parametrize("server", [CAPS], indirect=True)
async def test_one_client_cannot_take_every_stream_another_client_is_still_served(
    server: str,
) -> None:
    port = _port(server)
    async with _http(server) as http, AsyncExitStack() as stack:
        run_a, run_b = await _submit(http), await _submit(http)
        await _streams(stack, port, run_a, 4)
        refused = await _refused(port, run_a, "127.0.0.1")
        assert refused["error"] == "too_many_requests"
        assert "this address" in refused["message"]
        # Another address: served, until the run itself has its cap.
        await _streams(stack, port, run_a, 2, source="127.0.0.2")
        refused = await _refused(port, run_a, "127.0.0.2")
        assert "this run" in refused["message"]
        await _streams(stack, port, run_b, 1, source="127.0.0.2")
        assert (await _state(http))["open"] == 7
        # Clients that hang up at once leave no place taken.
        for _ in range(10):
            gone = await RawStream.open(port, f"/tasks/runs/{run_b}/events", source="127.0.0.3")
            assert gone.status == 200
            await gone.aclose()
        await _wait_state(http, "open", 7)
        await _streams(stack, port, run_b, 4, source="127.0.0.3")
        await _wait_state(http, "open", 11)
        await stack.aclose()
        await _wait_state(http, "open", 0)


@pytest.mark.parametrize("server", [{"BGTASKS_TEST_POLL": "30"}], indirect=True)
async def test_a_change_to_one_run_reads_that_run_once_and_no_other(server: str) -> None:
    port = _port(server)
    async with _http(server) as http, AsyncExitStack() as stack:
        run_a, run_b = await _submit(http), await _submit(http)
        on_a = await _streams(stack, port, run_a, 8)
        await _streams(stack, port, run_b, 8)
        # PostgreSQL's reader re-reads every watched run once when the first
        # is watched (then every poll_seconds): let that pass.
        await anyio.sleep(0.5)
        before = await _state(http)
        response = await http.post(f"/tasks/runs/{run_a}/cancel")
        assert response.status_code == 200, response.text
        for stream in on_a:
            name, document = await stream.event()
            assert (name, document["state"]) == ("state", "CANCELLED")
            assert (await stream.event())[0] == "end"
        after = await _state(http)
    # The cancel's own statements and one read; none per stream.
    assert after["statements"] - before["statements"] <= 4, (before, after)
    assert after["reads"] - before["reads"] == 1  # run A, once, for its 8 streams
    assert after["reader_statements"] - before["reader_statements"] == 1


IDLE = {
    "BGTASKS_TEST_POLL": "0.5",
    "BGTASKS_TEST_MAX_STREAMS_PER_CLIENT": "100",
    "BGTASKS_TEST_MAX_FEEDS": "100",
}


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.slow
async def test_idle_feeds_and_streams_send_no_statements(db_url: str, tmp_path: Path) -> None:
    proc, base = start_app(db_url, tmp_path, module=APP, **IDLE)
    try:
        await _idle(proc, base)
    finally:
        proc.stop()


async def _idle(proc: Proc, base: str) -> None:
    port, seconds = _port(base), 3.0
    async with _http(base) as http, AsyncExitStack() as stack:
        runs = [await _submit(http) for _ in range(8)]
        for i in range(32):
            feed = await RawStream.open(
                port, "/tasks/feed?task=idle&slots=1", X_Worker_Id=f"idle-{i}"
            )
            stack.push_async_callback(feed.aclose)
            assert feed.status == 200
            assert (await feed.event())[0] == "hello"
        for run_id in runs:
            await _streams(stack, port, run_id, 8)
        await anyio.sleep(1.0)  # the feeds' first claims, the first re-read
        before, cpu, started = await _state(http), _cpu_seconds(proc.pid), time.monotonic()
        await anyio.sleep(seconds)
        after, cpu = await _state(http), _cpu_seconds(proc.pid) - cpu
        elapsed = time.monotonic() - started
        # Runs of a task no open feed serves wake none of them.
        for _ in range(5):
            await _submit(http)
        await anyio.sleep(0.5)
        submitted = (await _state(http))["statements"] - after["statements"]
    # The inserts, NOTIFYs, a reaper pass, a re-read: no claims (32 feeds, 64 each).
    assert submitted < 20, submitted
    reader = after["reader_statements"] - before["reader_statements"]
    others = after["statements"] - before["statements"] - reader
    # Before: each feed claimed and read next_due every poll_seconds, each
    # stream re-read its run: over 500 statements here. Now: the reaper's
    # pass, and on PostgreSQL one re-read of all 8 runs per poll_seconds.
    assert others <= 2 * (elapsed / 5 + 1), (before, after)
    assert reader <= elapsed / 0.5 + 1, (before, after)
    # CPU time, not wall time: a busy machine slows the app but does not add
    # to it. A few per cent of a core here, with hundreds of statements a
    # second before.
    assert cpu / elapsed < 0.25, f"{100 * cpu / elapsed:.1f}% of a core"


async def test_a_stream_sees_a_change_made_through_another_app_process(
    db_url: str, tmp_path: Path
) -> None:
    """A cancel through app 2 names no run to app 1 (on PostgreSQL it sends
    no notification at all): app 1's reader still re-reads within
    `poll_seconds`."""
    env = {"BGTASKS_TEST_POLL": "0.2"}
    one, base1 = start_app(db_url, tmp_path, module=APP, name="one", **env)
    try:
        two, base2 = start_app(db_url, tmp_path, module=APP, name="two", **env)
        try:
            async with _http(base1) as http, _http(base2) as other, AsyncExitStack() as stack:
                run_id = await _submit(http)
                (stream,) = await _streams(stack, _port(base1), run_id, 1)
                response = await other.post(f"/tasks/runs/{run_id}/cancel")
                assert response.status_code == 200, response.text
                name, document = await stream.event()
                assert (name, document["state"]) == ("state", "CANCELLED")
                assert (await stream.event())[0] == "end"
        finally:
            two.stop()
    finally:
        one.stop()
