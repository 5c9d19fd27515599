"""The mounted API in process, on SQLite and PostgreSQL: a FastAPI host app
mounts `bg.app` at /tasks and httpx drives it over its ASGI transport while
the hub's lifespan runs. Non-streaming routes only (endless SSE streams hang
the ASGI transport; they are tested over uvicorn). One behaviour per test."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from fastapi import Depends, FastAPI, Header, HTTPException

from fastapi_bgtasks import BgTasks
from tests.harness.procs import ROOT

pytestmark = pytest.mark.anyio

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
    body = response.json()
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
    response = await http.get("/tasks/runs", params={"limit": 100})
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


@pytest.fixture(autouse=True)
def _no_bgtasks_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BGTASKS_DATABASE_URL", "BGTASKS_URL", "BGTASKS_TOKEN"):
        monkeypatch.delenv(name, raising=False)


# -- POST /runs ----------------------------------------------------------------


async def test_submitting_answers_202_with_the_scheduled_run_document(db_url: str) -> None:
    async with api(db_url) as (_, http):
        response = await http.post("/tasks/runs", json={"task": "add", "args": [1, 2]})
    assert response.status_code == 202, response.text
    doc = response.json()
    assert uuid.UUID(doc["id"]).version == 4
    assert doc["task"] == "add"
    assert doc["state"] == "SCHEDULED"
    assert doc["args"] == [1, 2]
    assert doc["kwargs"] == {}
    assert doc["max_attempts"] == 1
    for field in ("created_at", "scheduled_at"):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", doc[field]), doc[field]
    assert doc["started_at"] is None and doc["finished_at"] is None
    assert doc["result"] is None and doc["error"] is None
    assert "Idempotent-Replayed" not in response.headers


async def test_submitted_arguments_are_stored_validated(db_url: str) -> None:
    async with api(db_url) as (_, http):
        response = await http.post("/tasks/runs", json={"task": "add", "args": ["1", 2]})
    assert response.status_code == 202, response.text
    assert response.json()["args"] == [1, 2]


async def test_a_countdown_schedules_the_run_in_the_future(db_url: str) -> None:
    async with api(db_url) as (_, http):
        response = await http.post(
            "/tasks/runs", json={"task": "add", "args": [1, 2], "countdown": 3600}
        )
    assert response.status_code == 202, response.text
    doc = response.json()
    created = datetime.fromisoformat(doc["created_at"])
    scheduled = datetime.fromisoformat(doc["scheduled_at"])
    assert timedelta(minutes=59) < scheduled - created < timedelta(minutes=61)


async def test_an_unknown_task_is_a_404_with_the_json_error_body(db_url: str) -> None:
    async with api(db_url) as (_, http):
        response = await http.post("/tasks/runs", json={"task": "nope", "args": []})
        assert_error(response, 404, "task_not_found")
        assert await stored_runs(http) == []


async def test_wrong_arguments_are_a_422_with_pydantics_errors_and_nothing_stored(
    db_url: str,
) -> None:
    async with api(db_url) as (_, http):
        response = await http.post("/tasks/runs", json={"task": "add", "args": ["x", 2]})
        body = assert_error(response, 422)
        assert isinstance(body["detail"], list) and body["detail"]
        assert {"type", "loc", "msg"} <= set(body["detail"][0])
        assert await stored_runs(http) == []


async def test_missing_arguments_are_a_422_and_nothing_stored(db_url: str) -> None:
    async with api(db_url) as (_, http):
        response = await http.post("/tasks/runs", json={"task": "add", "args": [1]})
        assert_error(response, 422)
        assert await stored_runs(http) == []


@pytest.mark.parametrize(
    "field", [{"state": "COMPLETED"}, {"attempt": 5}, {"worker_id": "w"}, {"result": 3}]
)
async def test_unknown_body_fields_are_a_422_and_nothing_stored(
    db_url: str, field: dict[str, Any]
) -> None:
    async with api(db_url) as (_, http):
        response = await http.post("/tasks/runs", json={"task": "add", "args": [1, 2], **field})
        assert_error(response, 422)
        assert await stored_runs(http) == []


async def test_malformed_json_is_a_4xx_json_error(db_url: str) -> None:
    async with api(db_url) as (_, http):
        response = await http.post(
            "/tasks/runs",
            content=b'{"task": "add", "args": [1, 2]',
            headers={"Content-Type": "application/json"},
        )
        assert_client_error(response)
        assert await stored_runs(http) == []


async def test_a_json_body_that_is_not_an_object_is_a_4xx_json_error(db_url: str) -> None:
    async with api(db_url) as (_, http):
        response = await http.post("/tasks/runs", json=["add", 1, 2])
        assert_client_error(response)


async def test_a_non_json_content_type_is_a_4xx_json_error(db_url: str) -> None:
    async with api(db_url) as (_, http):
        response = await http.post(
            "/tasks/runs",
            content=b'{"task": "add", "args": [1, 2]}',
            headers={"Content-Type": "text/plain"},
        )
        assert_client_error(response)
        assert await stored_runs(http) == []


async def test_deeply_nested_json_is_a_4xx_json_error(db_url: str) -> None:
    async with api(db_url) as (_, http):
        depth = 100_000
        response = await http.post(
            "/tasks/runs",
            content=b'{"task": "echo", "args": [' + b"[" * depth + b"]" * depth + b"]}",
            headers={"Content-Type": "application/json"},
        )
        assert_client_error(response)
        assert await stored_runs(http) == []


async def test_a_nan_literal_in_the_body_is_refused_not_stored_as_null(db_url: str) -> None:
    async with api(db_url) as (_, http):
        response = await http.post(
            "/tasks/runs",
            content=b'{"task": "echo", "args": [NaN]}',
            headers={"Content-Type": "application/json"},
        )
        assert_client_error(response)
        assert await stored_runs(http) == []


async def test_countdown_with_eta_is_a_422_and_nothing_stored(db_url: str) -> None:
    eta = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    async with api(db_url) as (_, http):
        response = await http.post(
            "/tasks/runs", json={"task": "add", "args": [1, 2], "countdown": 5, "eta": eta}
        )
        assert_error(response, 422, "invalid_schedule")
        assert await stored_runs(http) == []


async def test_a_naive_eta_is_a_422(db_url: str) -> None:
    async with api(db_url) as (_, http):
        response = await http.post(
            "/tasks/runs", json={"task": "add", "args": [1, 2], "eta": "2030-01-01T00:00:00"}
        )
        assert_error(response, 422)


async def test_a_task_name_shaped_like_sql_is_just_an_unknown_task(db_url: str) -> None:
    async with api(db_url) as (_, http):
        response = await http.post("/tasks/runs", json={"task": "' OR 1=1--", "args": []})
        assert_error(response, 404, "task_not_found")


async def test_an_idempotency_key_with_a_nul_character_is_not_a_server_error(
    db_url: str, request: pytest.FixtureRequest
) -> None:
    async with api(db_url) as (_, http):
        response = await http.post(
            "/tasks/runs", json={"task": "add", "args": [1, 2], "idempotency_key": "k\x00"}
        )
    assert response.status_code < 500, response.text


# -- body limit ----------------------------------------------------------------


async def test_a_body_over_max_body_bytes_with_content_length_is_a_413(db_url: str) -> None:
    async with api(db_url, max_body_bytes=1000) as (_, http):
        response = await http.post("/tasks/runs", json={"task": "echo", "args": ["x" * 2000]})
        assert "content-length" in response.request.headers
        assert_error(response, 413, "payload_too_large")
        assert await stored_runs(http) == []


def chunked(body: bytes, size: int = 100) -> Callable[[], AsyncIterator[bytes]]:
    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), size):
            yield body[start : start + size]

    return chunks


async def test_a_streamed_body_under_max_body_bytes_is_accepted(db_url: str) -> None:
    body = b'{"task": "echo", "args": ["' + b"x" * 500 + b'"]}'
    async with api(db_url, max_body_bytes=1000) as (_, http):
        response = await http.post(
            "/tasks/runs",
            content=chunked(body)(),
            headers={"Content-Type": "application/json"},
        )
    assert "content-length" not in response.request.headers
    assert response.status_code == 202, response.text


async def test_a_streamed_body_over_max_body_bytes_is_a_413(db_url: str) -> None:
    body = b'{"task": "echo", "args": ["' + b"x" * 2000 + b'"]}'
    async with api(db_url, max_body_bytes=1000) as (_, http):
        response = await http.post(
            "/tasks/runs",
            content=chunked(body)(),
            headers={"Content-Type": "application/json"},
        )
        assert "content-length" not in response.request.headers
        assert_error(response, 413, "payload_too_large")
        assert await stored_runs(http) == []


async def test_a_streamed_body_over_max_body_bytes_is_refused_and_stores_nothing(
    db_url: str,
) -> None:
    body = b'{"task": "echo", "args": ["' + b"x" * 2000 + b'"]}'
    async with api(db_url, max_body_bytes=1000) as (_, http):
        response = await http.post(
            "/tasks/runs",
            content=chunked(body)(),
            headers={"Content-Type": "application/json"},
        )
        assert_client_error(response)
        assert await stored_runs(http) == []


# -- idempotency ---------------------------------------------------------------


async def test_a_repeated_idempotency_key_in_the_body_replays_the_stored_run(
    db_url: str,
) -> None:
    body = {"task": "add", "args": [1, 2], "idempotency_key": "order-1"}
    async with api(db_url) as (_, http):
        first = await http.post("/tasks/runs", json=body)
        again = await http.post("/tasks/runs", json=body)
        assert len(await stored_runs(http)) == 1
    assert first.status_code == 202 and "Idempotent-Replayed" not in first.headers
    assert again.status_code == 202, again.text
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]


async def test_a_repeated_idempotency_key_header_replays_the_stored_run(db_url: str) -> None:
    body = {"task": "add", "args": [1, 2]}
    headers = {"Idempotency-Key": "order-2"}
    async with api(db_url) as (_, http):
        first = await http.post("/tasks/runs", json=body, headers=headers)
        again = await http.post("/tasks/runs", json=body, headers=headers)
        assert len(await stored_runs(http)) == 1
    assert first.status_code == 202 and "Idempotent-Replayed" not in first.headers
    assert again.status_code == 202, again.text
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]


async def test_a_repeated_idempotency_key_with_other_arguments_is_a_409(db_url: str) -> None:
    async with api(db_url) as (_, http):
        first = await http.post(
            "/tasks/runs", json={"task": "add", "args": [1, 2], "idempotency_key": "k"}
        )
        assert first.status_code == 202
        response = await http.post(
            "/tasks/runs", json={"task": "add", "args": [1, 3], "idempotency_key": "k"}
        )
        assert_error(response, 409, "idempotency_conflict")
        runs = await stored_runs(http)
    assert [r["args"] for r in runs] == [[1, 2]]


async def test_an_idempotency_key_is_unique_per_task_only(db_url: str) -> None:
    async with api(db_url) as (_, http):
        first = await http.post(
            "/tasks/runs", json={"task": "add", "args": [1, 2], "idempotency_key": "k"}
        )
        other = await http.post(
            "/tasks/runs", json={"task": "echo", "args": [1], "idempotency_key": "k"}
        )
    assert first.status_code == other.status_code == 202
    assert "Idempotent-Replayed" not in other.headers
    assert other.json()["id"] != first.json()["id"]


# -- GET /runs/{id} ------------------------------------------------------------


async def test_reading_a_run_returns_its_document(db_url: str) -> None:
    async with api(db_url) as (_, http):
        run_id = await submit(http)
        response = await http.get(f"/tasks/runs/{run_id}")
    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["id"] == run_id
    assert doc["state"] == "SCHEDULED"
    assert doc["args"] == [1, 2]


async def test_a_malformed_run_id_is_a_422(db_url: str) -> None:
    async with api(db_url) as (_, http):
        response = await http.get("/tasks/runs/not-a-uuid")
    assert_error(response, 422)


async def test_an_unknown_run_id_is_a_404(db_url: str) -> None:
    async with api(db_url) as (_, http):
        response = await http.get(f"/tasks/runs/{uuid.uuid4()}")
    assert_error(response, 404, "run_not_found")


# -- GET /runs -----------------------------------------------------------------


async def test_listing_runs_pages_through_all_of_them_newest_first(db_url: str) -> None:
    async with api(db_url) as (_, http):
        submitted = [await submit(http, "add", i, i) for i in range(5)]
        seen: list[dict[str, Any]] = []
        pages = 0
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 2}
            if cursor:
                params["cursor"] = cursor
            response = await http.get("/tasks/runs", params=params)
            assert response.status_code == 200, response.text
            page = response.json()
            assert len(page["runs"]) <= 2
            seen += page["runs"]
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
    assert pages == 3
    ids = [r["id"] for r in seen]
    assert sorted(ids) == sorted(submitted) and len(set(ids)) == 5
    created = [r["created_at"] for r in seen]
    assert created == sorted(created, reverse=True)


async def test_listing_runs_filters_by_task(db_url: str) -> None:
    async with api(db_url) as (_, http):
        await submit(http, "add", 1, 2)
        echo_id = await submit(http, "echo", "hi")
        response = await http.get("/tasks/runs", params={"task": "echo"})
    assert response.status_code == 200, response.text
    assert [r["id"] for r in response.json()["runs"]] == [echo_id]


async def test_listing_runs_filters_by_state(db_url: str) -> None:
    async with api(db_url) as (_, http):
        await submit(http)
        cancelled = await submit(http)
        assert (await http.post(f"/tasks/runs/{cancelled}/cancel")).status_code == 200
        response = await http.get("/tasks/runs", params={"state": "CANCELLED"})
    assert response.status_code == 200, response.text
    assert [r["id"] for r in response.json()["runs"]] == [cancelled]


async def test_listing_runs_with_a_filter_shaped_like_sql_finds_nothing(db_url: str) -> None:
    async with api(db_url) as (_, http):
        await submit(http)
        response = await http.get("/tasks/runs", params={"task": "' OR 1=1--"})
    assert response.status_code == 200, response.text
    assert response.json()["runs"] == []


async def test_listing_runs_with_a_nul_in_the_task_filter_is_not_a_server_error(
    db_url: str, request: pytest.FixtureRequest
) -> None:
    async with api(db_url) as (_, http):
        response = await http.get("/tasks/runs", params={"task": "a\x00b"})
    assert response.status_code < 500, response.text


async def test_a_limit_over_max_list_limit_is_a_422(db_url: str) -> None:
    async with api(db_url, max_list_limit=10) as (_, http):
        response = await http.get("/tasks/runs", params={"limit": 11})
    assert_error(response, 422)


async def test_an_unknown_state_filter_is_a_422(db_url: str) -> None:
    async with api(db_url) as (_, http):
        response = await http.get("/tasks/runs", params={"state": "DONE"})
    assert_error(response, 422)


async def test_a_cursor_this_api_did_not_return_is_a_422(db_url: str) -> None:
    async with api(db_url) as (_, http):
        response = await http.get("/tasks/runs", params={"cursor": "bm90LWEtY3Vyc29y"})
    assert_error(response, 422)


# -- cancel --------------------------------------------------------------------


async def test_cancelling_a_scheduled_run_answers_200_cancelled(db_url: str) -> None:
    async with api(db_url) as (_, http):
        run_id = await submit(http)
        response = await http.post(f"/tasks/runs/{run_id}/cancel")
        stored = (await http.get(f"/tasks/runs/{run_id}")).json()
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "CANCELLED"
    assert response.json()["finished_at"].endswith("Z")
    assert stored["state"] == "CANCELLED"


async def test_cancelling_a_finished_run_again_is_a_409(db_url: str) -> None:
    async with api(db_url) as (_, http):
        run_id = await submit(http)
        assert (await http.post(f"/tasks/runs/{run_id}/cancel")).status_code == 200
        response = await http.post(f"/tasks/runs/{run_id}/cancel")
    assert_error(response, 409, "run_finished")


async def test_cancelling_an_unknown_run_is_a_404(db_url: str) -> None:
    async with api(db_url) as (_, http):
        response = await http.post(f"/tasks/runs/{uuid.uuid4()}/cancel")
    assert_error(response, 404)


# -- health --------------------------------------------------------------------


async def test_health_is_200_while_the_lifespan_runs(db_url: str) -> None:
    async with api(db_url) as (_, http):
        response = await http.get("/tasks/health")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "ok"


async def test_health_is_503_when_the_lifespan_does_not_run(db_url: str) -> None:
    hub = make_hub(db_url)
    async with client(hub.app) as http:
        response = await http.get("/health")
    assert_error(response, 503)


async def test_health_is_503_after_the_lifespan_ended(db_url: str) -> None:
    hub = make_hub(db_url)
    async with serving(hub) as app:
        pass
    async with client(app) as http:
        response = await http.get("/tasks/health")
    assert_error(response, 503)


LIFESPAN_CYCLES = """
import asyncio, faulthandler, sys
from fastapi_bgtasks import BgTasks

async def cycle(url, yields, delay):
    async with BgTasks(url).lifespan():
        for _ in range(yields):
            await asyncio.sleep(0)
        await asyncio.sleep(delay)

# Leave the lifespan at many moments of the services' start-up pass.
timings = [(y, 0.0) for y in range(4)] + [(0, d / 10000) for d in range(1, 60, 2)]
for i, (yields, delay) in enumerate(timings):
    # A cycle that hangs ends the process (exit code 1) with its traceback.
    faulthandler.dump_traceback_later(5, exit=True)
    asyncio.run(cycle(f"sqlite+aiosqlite:///{sys.argv[1]}/x{i}.db", yields, delay))
    faulthandler.cancel_dump_traceback_later()
print("closed", len(timings))
"""


def test_leaving_the_lifespan_early_lets_the_event_loop_close(tmp_path: Path) -> None:
    try:
        done = subprocess.run(
            [sys.executable, "-c", LIFESPAN_CYCLES, str(tmp_path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the lifespan cycles did not end within 120 s")
    assert done.returncode == 0, f"a cycle hung after leaving the lifespan:\n{done.stderr}"
    assert "closed 34" in done.stdout


async def test_leaving_the_lifespan_leaves_no_connection_thread(tmp_path: Path) -> None:
    # A connection closed without waiting would finish in its thread after
    # the lifespan (then call into a loop that may be closed). Repeat: a race
    # shows only in some rounds.
    left: list[int] = []
    for round_ in range(30):
        hub = BgTasks(f"sqlite+aiosqlite:///{tmp_path}/x{round_}.db", reaper_seconds=3600)
        async with hub.lifespan():
            await settle(hub)
        # aiosqlite stops a closed connection's thread without joining it:
        # it may take a moment to exit, but must not outlive that moment.
        for thread in connection_threads():
            await anyio.to_thread.run_sync(thread.join, 2.0)
        if connection_threads():
            left.append(round_)
        await join_connection_threads()
    assert left == []


async def test_submitting_without_the_lifespan_is_a_503(db_url: str) -> None:
    hub = make_hub(db_url)
    async with client(host_app(hub)) as http:
        response = await http.post("/tasks/runs", json={"task": "add", "args": [1, 2]})
    assert_error(response, 503)


# -- worker access -------------------------------------------------------------

BAD_WORKER_HEADERS = {
    "no header": {},
    "wrong token": {"Authorization": "Bearer wrong"},
    "empty bearer": {"Authorization": "Bearer "},
    "other scheme": {"Authorization": f"Basic {TOKEN}"},
    "token without scheme": {"Authorization": TOKEN},
}


@pytest.mark.parametrize("headers", BAD_WORKER_HEADERS.values(), ids=BAD_WORKER_HEADERS.keys())
async def test_a_report_without_the_worker_token_is_a_401_and_changes_nothing(
    db_url: str, headers: dict[str, str]
) -> None:
    async with api(db_url, token=TOKEN) as (hub, http):
        run_id = await submit(http)
        lease_token = await claim(hub)
        response = await http.post(
            "/tasks/worker/reports",
            json={
                "worker_id": "w1",
                "reports": [
                    {
                        "run_id": run_id,
                        "lease_token": lease_token,
                        "state": "COMPLETED",
                        "result": 3,
                    }
                ],
            },
            headers=headers,
        )
        stored = (await http.get(f"/tasks/runs/{run_id}")).json()
    assert_error(response, 401)
    assert stored["state"] == "PENDING"
    assert stored["result"] is None


@pytest.mark.parametrize("headers", BAD_WORKER_HEADERS.values(), ids=BAD_WORKER_HEADERS.keys())
async def test_a_heartbeat_without_the_worker_token_is_a_401(
    db_url: str, headers: dict[str, str]
) -> None:
    async with api(db_url, token=TOKEN) as (_, http):
        response = await http.post(
            "/tasks/worker/heartbeat", json={"worker_id": "w1", "runs": []}, headers=headers
        )
    assert_error(response, 401)


async def test_a_heartbeat_with_the_worker_token_is_a_200(db_url: str) -> None:
    async with api(db_url, token=TOKEN) as (_, http):
        response = await http.post(
            "/tasks/worker/heartbeat",
            json={"worker_id": "w1", "runs": []},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
    assert response.status_code == 200, response.text
    assert response.json() == {"renewed": [], "stop": [], "cancel": []}


async def test_the_worker_token_is_refused_in_the_query_string(db_url: str) -> None:
    async with api(db_url, token=TOKEN) as (_, http):
        response = await http.post(
            "/tasks/worker/heartbeat",
            params={"token": TOKEN, "access_token": TOKEN},
            json={"worker_id": "w1", "runs": []},
        )
    assert_error(response, 401)


async def test_a_report_with_the_worker_token_is_accepted(db_url: str) -> None:
    async with api(db_url, token=TOKEN) as (hub, http):
        run_id = await submit(http)
        lease_token = await claim(hub)
        response = await http.post(
            "/tasks/worker/reports",
            json={
                "worker_id": "w1",
                "reports": [
                    {
                        "run_id": run_id,
                        "lease_token": lease_token,
                        "state": "COMPLETED",
                        "result": 3,
                    }
                ],
            },
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        stored = (await http.get(f"/tasks/runs/{run_id}")).json()
    assert response.status_code == 200, response.text
    assert response.json() == {"outcomes": ["accepted"]}
    assert stored["state"] == "COMPLETED" and stored["result"] == 3


# -- loopback-only defaults ----------------------------------------------------


async def test_without_a_token_a_loopback_client_may_call_worker_routes(db_url: str) -> None:
    async with api(db_url) as (_, http):
        response = await http.post("/tasks/worker/heartbeat", json={"worker_id": "w1", "runs": []})
    assert response.status_code == 200, response.text


async def test_without_a_token_a_remote_client_gets_401_on_worker_routes(db_url: str) -> None:
    hub = make_hub(db_url)
    async with serving(hub) as app, client(app, remote=True) as remote:
        response = await remote.post(
            "/tasks/worker/heartbeat", json={"worker_id": "w1", "runs": []}
        )
    assert_error(response, 401)


async def test_without_auth_a_remote_client_cannot_submit(db_url: str) -> None:
    hub = make_hub(db_url)
    async with serving(hub) as app, client(app, remote=True) as remote, client(app) as local:
        response = await remote.post("/tasks/runs", json={"task": "add", "args": [1, 2]})
        assert_error(response, 401)
        assert await stored_runs(local) == []


async def test_without_auth_a_remote_client_cannot_list_runs(db_url: str) -> None:
    hub = make_hub(db_url)
    async with serving(hub) as app, client(app, remote=True) as remote:
        response = await remote.get("/tasks/runs")
    assert_error(response, 401)


async def test_without_auth_a_remote_client_cannot_cancel_a_run(db_url: str) -> None:
    hub = make_hub(db_url)
    async with serving(hub) as app, client(app, remote=True) as remote, client(app) as local:
        run_id = await submit(local)
        response = await remote.post(f"/tasks/runs/{run_id}/cancel")
        stored = (await local.get(f"/tasks/runs/{run_id}")).json()
    assert_error(response, 401)
    assert stored["state"] == "SCHEDULED"


@pytest.mark.parametrize(
    "proxy_header",
    [
        {"X-Forwarded-For": "198.51.100.7"},
        {"Forwarded": "for=198.51.100.7"},
        {"X-Real-IP": "198.51.100.7"},
    ],
    ids=["x-forwarded-for", "forwarded", "x-real-ip"],
)
async def test_a_loopback_client_behind_a_proxy_header_is_treated_as_remote(
    db_url: str, proxy_header: dict[str, str]
) -> None:
    async with api(db_url) as (_, http):
        worker = await http.post(
            "/tasks/worker/heartbeat",
            json={"worker_id": "w1", "runs": []},
            headers=proxy_header,
        )
        operator = await http.post(
            "/tasks/runs", json={"task": "add", "args": [1, 2]}, headers=proxy_header
        )
        assert await stored_runs(http) == []
    assert_error(worker, 401)
    assert_error(operator, 401)


# -- operator access through the host's auth dependency ------------------------


def check_admin(x_admin: str | None = Header(default=None)) -> None:
    if x_admin != "yes":
        raise HTTPException(status_code=401, detail="Operators only.")


def require_admin_header(x_admin: str = Header()) -> None:
    if x_admin != "yes":
        raise HTTPException(status_code=401, detail="Operators only.")


ADMIN = {"X-Admin": "yes"}


async def test_the_auth_dependency_refuses_a_submit_with_its_401_as_a_json_error(
    db_url: str,
) -> None:
    hub = make_hub(db_url, auth=Depends(check_admin))
    async with serving(hub) as app, client(app, remote=True) as http:
        response = await http.post("/tasks/runs", json={"task": "add", "args": [1, 2]})
        listed = await http.get("/tasks/runs", headers=ADMIN)
    body = assert_error(response, 401)
    assert body["message"] == "Operators only."
    assert listed.json()["runs"] == []


async def test_the_auth_dependency_refuses_a_submit_even_from_loopback(db_url: str) -> None:
    hub = make_hub(db_url, auth=Depends(check_admin))
    async with serving(hub) as app, client(app) as http:
        response = await http.post("/tasks/runs", json={"task": "add", "args": [1, 2]})
        listed = await http.get("/tasks/runs", headers=ADMIN)
    assert_error(response, 401)
    assert listed.json()["runs"] == []


async def test_the_auth_dependency_accepts_a_submit_it_allows(db_url: str) -> None:
    hub = make_hub(db_url, auth=Depends(check_admin))
    async with serving(hub) as app, client(app, remote=True, headers=ADMIN) as http:
        response = await http.post("/tasks/runs", json={"task": "add", "args": [1, 2]})
    assert response.status_code == 202, response.text


async def test_the_auth_dependency_guards_listing_and_cancelling(db_url: str) -> None:
    hub = make_hub(db_url, auth=Depends(check_admin))
    async with serving(hub) as app, client(app, remote=True) as http:
        run_id = await submit(http, headers=ADMIN)
        listing = await http.get("/tasks/runs")
        cancel = await http.post(f"/tasks/runs/{run_id}/cancel")
        stored = (await http.get(f"/tasks/runs/{run_id}")).json()
    assert_error(listing, 401)
    assert_error(cancel, 401)
    assert stored["state"] == "SCHEDULED"


async def test_the_worker_token_also_passes_operator_routes(db_url: str) -> None:
    hub = make_hub(db_url, token=TOKEN, auth=Depends(check_admin))
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    async with serving(hub) as app, client(app, remote=True, headers=bearer) as http:
        submitted = await http.post("/tasks/runs", json={"task": "add", "args": [1, 2]})
        listing = await http.get("/tasks/runs")
        cancel = await http.post(f"/tasks/runs/{submitted.json()['id']}/cancel")
    assert submitted.status_code == 202, submitted.text
    assert listing.status_code == 200, listing.text
    assert cancel.status_code == 200, cancel.text


async def test_a_wrong_worker_token_does_not_pass_operator_routes(db_url: str) -> None:
    hub = make_hub(db_url, token=TOKEN, auth=Depends(check_admin))
    async with (
        serving(hub) as app,
        client(app, remote=True, headers={"Authorization": "Bearer wrong"}) as http,
    ):
        response = await http.post("/tasks/runs", json={"task": "add", "args": [1, 2]})
    assert_error(response, 401)


# -- capability reads ----------------------------------------------------------


async def failed_run(hub: BgTasks, http: httpx.AsyncClient) -> str:
    """A run of `add` that FAILED with a traceback, reported over the worker route."""
    run_id = await submit(http)
    lease_token = await claim(hub)
    response = await http.post(
        "/tasks/worker/reports",
        json={
            "worker_id": "w1",
            "reports": [
                {
                    "run_id": run_id,
                    "lease_token": lease_token,
                    "state": "FAILED",
                    "error": {
                        "type": "ValueError",
                        "message": "boom",
                        "traceback": "Traceback (most recent call last): secret frames",
                    },
                }
            ],
        },
    )
    assert response.json() == {"outcomes": ["accepted"]}, response.text
    return run_id


async def test_a_capability_read_omits_arguments_and_traceback(db_url: str) -> None:
    hub = make_hub(db_url)
    async with serving(hub) as app, client(app) as local, client(app, remote=True) as remote:
        run_id = await failed_run(hub, local)
        response = await remote.get(f"/tasks/runs/{run_id}")
    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["state"] == "FAILED"
    assert doc["args"] is None and doc["kwargs"] is None
    assert doc["error"]["type"] == "ValueError"
    assert doc["error"]["message"] == "boom"
    assert doc["error"]["traceback"] is None
    assert "secret frames" not in response.text


async def test_an_operator_read_includes_arguments_and_traceback(db_url: str) -> None:
    hub = make_hub(db_url)
    async with serving(hub) as app, client(app) as local:
        run_id = await failed_run(hub, local)
        response = await local.get(f"/tasks/runs/{run_id}")
    doc = response.json()
    assert doc["args"] == [1, 2] and doc["kwargs"] == {}
    assert doc["error"]["traceback"] == "Traceback (most recent call last): secret frames"


async def test_a_capability_read_under_host_auth_omits_arguments(db_url: str) -> None:
    hub = make_hub(db_url, auth=Depends(check_admin))
    async with serving(hub) as app, client(app, headers=ADMIN) as admin, client(app) as anyone:
        run_id = await submit(admin)
        full = (await admin.get(f"/tasks/runs/{run_id}")).json()
        response = await anyone.get(f"/tasks/runs/{run_id}")
    assert full["args"] == [1, 2]
    assert response.status_code == 200, response.text
    assert response.json()["args"] is None and response.json()["kwargs"] is None


async def test_a_capability_read_needs_nothing_the_host_auth_requires(db_url: str) -> None:
    hub = make_hub(db_url, auth=Depends(require_admin_header))
    async with serving(hub) as app, client(app, headers=ADMIN) as admin, client(app) as anyone:
        run_id = await submit(admin)
        response = await anyone.get(f"/tasks/runs/{run_id}")
    assert response.status_code == 200, response.text
    assert response.json()["args"] is None


# -- OpenAPI, docs and the route inventory -------------------------------------

DECLARED_ERRORS: dict[tuple[str, str], set[int]] = {
    ("post", "/runs"): {401, 404, 409, 413, 422, 503},
    ("get", "/runs"): {401, 422, 503},
    ("get", "/runs/{run_id}"): {404, 422, 503},
    ("post", "/runs/{run_id}/cancel"): {401, 404, 409, 422, 503},
    ("get", "/runs/{run_id}/events"): {404, 422, 503},
    ("get", "/feed"): {401, 422, 503},
    ("post", "/worker/reports"): {401, 413, 422, 503},
    ("post", "/worker/heartbeat"): {401, 413, 422, 503},
    ("get", "/health"): {503},
}


async def openapi(hub: BgTasks) -> dict[str, Any]:
    async with client(host_app(hub)) as http:
        response = await http.get("/tasks/openapi.json")
    assert response.status_code == 200, response.text
    spec: dict[str, Any] = response.json()
    return spec


async def test_every_route_declares_its_error_statuses() -> None:
    spec = await openapi(make_hub("sqlite+aiosqlite:///./never-opened.db"))
    missing = {}
    for (method, path), statuses in DECLARED_ERRORS.items():
        operation = spec["paths"].get(path, {}).get(method)
        assert operation is not None, f"{method.upper()} {path} is not in the OpenAPI"
        declared = {int(s) for s in operation["responses"] if s.isdigit()}
        if not statuses <= declared:
            missing[f"{method.upper()} {path}"] = sorted(statuses - declared)
    assert missing == {}


async def test_every_declared_error_status_has_the_error_body_schema() -> None:
    spec = await openapi(make_hub("sqlite+aiosqlite:///./never-opened.db"))
    wrong = []
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if status.isdigit() and int(status) < 400:
                    continue
                schema = response.get("content", {}).get("application/json", {}).get("schema")
                if schema != {"$ref": "#/components/schemas/ErrorBody"}:
                    wrong.append(f"{method.upper()} {path} {status}: {schema}")
    assert wrong == []
    assert set(spec["components"]["schemas"]["ErrorBody"]["properties"]) == ERROR_KEYS


async def test_the_docs_page_is_html_that_points_at_the_mounted_openapi() -> None:
    hub = make_hub("sqlite+aiosqlite:///./never-opened.db")
    async with client(host_app(hub)) as http:
        response = await http.get("/tasks/docs")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "/tasks/openapi.json" in response.text


UNGUARDED = {
    "/health",
    "/runs/{run_id}",
    "/runs/{run_id}/events",
    "/openapi.json",
    "/docs",
    "/docs/oauth2-redirect",
    "/redoc",
}
ACCESS_CHECKS = {"check_worker", "require_operator"}


def dependency_names(dependant: Any) -> set[str]:
    names: set[str] = set()
    for dependency in dependant.dependencies:
        names.add(getattr(dependency.call, "__name__", ""))
        names |= dependency_names(dependency)
    return names


def leaf_routes(routes: list[Any]) -> Iterator[Any]:
    """Routes with their included routers expanded (FastAPI may keep an
    included router as one route whose candidates carry its dependencies)."""
    for route in routes:
        candidates = getattr(route, "effective_candidates", None)
        if callable(candidates):
            yield from leaf_routes(candidates())
        else:
            yield route


def test_every_route_but_health_capabilities_and_docs_has_an_access_dependency() -> None:
    hub = make_hub("sqlite+aiosqlite:///./never-opened.db")
    api_app = hub.app.app  # bg.app is the BodyLimit wrapper around the FastAPI app
    assert isinstance(api_app, FastAPI)
    unguarded = []
    guarded = []
    for route in leaf_routes(api_app.routes):
        name = f"{sorted(getattr(route, 'methods', None) or [])} {route.path}"
        if route.path in UNGUARDED:
            continue
        dependant = getattr(route, "dependant", None)
        if dependant is None or not dependency_names(dependant) & ACCESS_CHECKS:
            unguarded.append(name)
        else:
            guarded.append(name)
    assert unguarded == []
    assert {"['POST'] /runs", "['GET'] /feed", "['POST'] /worker/reports"} <= set(guarded)
