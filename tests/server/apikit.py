"""What the server's tests share: a hub with `add` and `echo`, a FastAPI host
app that mounts `bg.app` at /tasks, httpx over the ASGI transport while the
hub's lifespan runs, and the error-body assertions. Non-streaming routes only
(endless SSE streams hang the ASGI transport; they are tested over uvicorn)."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
from fastapi import FastAPI

from fastapi_bgtasks import BgTasks

LOOPBACK = ("127.0.0.1", 50000)
REMOTE = ("203.0.113.9", 1234)
TOKEN = "s3cret"
ERROR_KEYS = {"error", "message", "detail"}


async def add(a: int, b: int) -> int:
    return a + b


def echo(value: Any = None) -> Any:
    return value


def make_hub(db_url: str, **options: Any) -> BgTasks:
    # One reaper pass, at start-up (see `settle`): no test here needs another.
    options.setdefault("reaper_seconds", 3600)
    hub = BgTasks(db_url, **options)
    hub.task(add)
    hub.task(echo)
    return hub


def host_app(hub: BgTasks) -> FastAPI:
    app = FastAPI(lifespan=hub.lifespan)
    app.mount("/tasks", hub.app)
    return app


def client(
    app: Any, *, remote: bool = False, headers: dict[str, str] | None = None
) -> httpx.AsyncClient:
    # raise_app_exceptions=False: a server error is a 500 response to assert
    # on, as a real server would answer, not an exception in the test.
    transport = httpx.ASGITransport(
        app=app, client=REMOTE if remote else LOOPBACK, raise_app_exceptions=False
    )
    return httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", headers=headers)


async def settle(hub: BgTasks) -> None:
    """Return once the reaper's start-up pass has finished.

    Leaving a SQLite lifespan while that pass is mid-statement hangs the event
    loop (see test_leaving_the_lifespan_early_lets_the_event_loop_close), so
    every other test waits for it: the SQLite writer is one pooled connection,
    and the second of two writes through it cannot start before the reaper's
    write has ended, whichever of them took the connection first.
    """
    assert hub.running is not None
    if hub.running.store.is_pg:
        return
    for _ in range(2):
        await hub.running.store.reap_expired_runs()


def connection_threads() -> list[threading.Thread]:
    """aiosqlite's connection threads still alive."""
    return [
        thread
        for thread in threading.enumerate()
        if thread.name.endswith("(_connection_worker_thread)") and thread.is_alive()
    ]


async def join_connection_threads() -> None:
    """A safety net: let any connection thread a lifespan left behind finish
    while this event loop still runs, so it cannot call into a closed loop
    (test_leaving_the_lifespan_leaves_no_connection_thread checks there is none)."""
    for thread in connection_threads():
        await anyio.to_thread.run_sync(thread.join, 10)


@asynccontextmanager
async def serving(hub: BgTasks) -> AsyncIterator[FastAPI]:
    """The host app with the hub's lifespan running (ASGITransport runs none)."""
    app = host_app(hub)
    try:
        async with hub.lifespan(app):
            await settle(hub)
            yield app
    finally:
        await join_connection_threads()


@asynccontextmanager
async def api(db_url: str, **options: Any) -> AsyncIterator[tuple[BgTasks, httpx.AsyncClient]]:
    """A hub with `add` and `echo`, served, and a loopback client."""
    hub = make_hub(db_url, **options)
    async with serving(hub) as app, client(app) as http:
        yield hub, http


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert set(body) == ERROR_KEYS, body
    assert isinstance(body["message"], str) and body["message"]
    if code is not None:
        assert body["error"] == code, body
    return body


def assert_client_error(response: httpx.Response) -> dict[str, Any]:
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    return assert_error(response, response.status_code)


async def submit(
    http: httpx.AsyncClient,
    task: str = "add",
    *args: Any,
    headers: dict[str, str] | None = None,
    **fields: Any,
) -> str:
    body: dict[str, Any] = {"task": task, "args": list(args or (1, 2)), **fields}
    response = await http.post("/tasks/runs", json=body, headers=headers)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def stored_runs(http: httpx.AsyncClient) -> list[dict[str, Any]]:
    response = await http.get("/tasks/runs", params={"limit": 100, "include": "args,result"})
    assert response.status_code == 200, response.text
    runs: list[dict[str, Any]] = response.json()["runs"]
    return runs


async def claim(hub: BgTasks, task: str = "add", worker_id: str = "w1") -> str:
    """Lease the due runs of `task` to `worker_id`, as the feed does; the lease token."""
    assert hub.running is not None
    rows = await hub.running.store.claim(
        worker_id=worker_id, tasks=[task], slots=1, lease_seconds=30
    )
    assert len(rows) == 1
    return str(rows[0]["lease_token"])
