"""The sub-app (server/app.py): health, the lifespan guard, the OpenAPI
schema and docs, and the route inventory. One behaviour per test."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest
from fastapi import FastAPI
from sqlalchemy import make_url

from fastapi_bgtasks import BgTasks
from tests.harness.procs import ROOT
from tests.server.apikit import (
    ERROR_KEYS,
    api,
    assert_error,
    client,
    connection_threads,
    host_app,
    join_connection_threads,
    make_hub,
    serving,
    settle,
)

pytestmark = pytest.mark.anyio

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


@asynccontextmanager
async def write_locked(db_url: str) -> AsyncIterator[None]:
    """Another connection holds the database's write lock: BEGIN IMMEDIATE
    on SQLite, LOCK TABLE on PostgreSQL (reads still go through)."""
    if db_url.startswith("sqlite"):
        locker = sqlite3.connect(make_url(db_url).database or "", isolation_level=None)
        try:
            locker.execute("BEGIN IMMEDIATE")
            yield
            locker.execute("ROLLBACK")
        finally:
            locker.close()
        return
    url = make_url(db_url).set(drivername="postgresql")
    conn = await asyncpg.connect(url.render_as_string(hide_password=False))
    try:
        async with conn.transaction():
            await conn.execute("LOCK TABLE bgtasks_runs IN EXCLUSIVE MODE")
            yield
    finally:
        await conn.close()


async def test_health_is_503_while_another_connection_holds_the_write_lock(db_url: str) -> None:
    async with api(db_url) as (_, http):
        async with write_locked(db_url):
            started = time.monotonic()
            locked = await http.get("/tasks/health")
            waited = time.monotonic() - started
            # Reads still work: only a write shows the store cannot write.
            assert (await http.get("/tasks/runs")).status_code == 200
        after = await http.get("/tasks/health")
    body = assert_error(locked, 503, "store_unavailable")
    assert "cannot take writes" in body["message"] or "within" in body["message"], body
    assert waited < 3, waited
    assert after.status_code == 200, after.text


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


SNAPSHOT = Path(__file__).with_name("openapi.json")
REGENERATE = (
    'python -c "import json; from fastapi_bgtasks import BgTasks; '
    "print(json.dumps(BgTasks('sqlite+aiosqlite:///:memory:').app.app.openapi(), "
    'indent=1, sort_keys=True))" > tests/server/openapi.json'
)


def test_the_openapi_schema_equals_its_committed_snapshot() -> None:
    live = BgTasks("sqlite+aiosqlite:///:memory:").app.app.openapi()
    expected = json.loads(SNAPSHOT.read_text(encoding="utf-8"))
    assert json.loads(json.dumps(live)) == expected, (
        f"The OpenAPI schema changed. If on purpose, regenerate the snapshot: {REGENERATE}"
    )


# The schema as it stood before the package was re-laid into store/, server/
# and worker/: the re-layout changed nothing in it but the declared 400s
# and the error descriptions, now generated from errors.py. Since then,
# GET /runs' cursor has a pattern and the list takes `include`.
BEFORE_RELAYOUT = Path(__file__).with_name("openapi_0_1_0_layout.json")
BODY_ROUTES = {
    ("/runs", "post"),
    ("/runs/batch", "post"),
    ("/worker/reports", "post"),
    ("/worker/heartbeat", "post"),
}


def _without_error_text(spec: dict[str, Any]) -> dict[str, Any]:
    spec = json.loads(json.dumps(spec))
    listing = spec["paths"]["/runs"]["get"]
    listing["parameters"] = [
        p for p in listing["parameters"] if p["name"] not in ("cursor", "include")
    ]
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            responses = operation["responses"]
            if (path, method) in BODY_ROUTES:
                responses.pop("400", None)
            for status, response in responses.items():
                if int(status) >= 400:
                    response.pop("description", None)
    return spec


def _without_later_additions(spec: dict[str, Any]) -> dict[str, Any]:
    """The schema without what was added since the re-layout, on purpose:
    the REJECTED report and its `signature`, the run document's `reason` and
    `waiting_for`, and the feed's `signature` parameter."""
    spec = json.loads(json.dumps(spec))
    schemas = spec["components"]["schemas"]
    report = schemas["Report"]
    report.pop("description", None)
    report["properties"]["state"]["enum"].remove("REJECTED")
    report["properties"].pop("signature")
    for name in ("reason", "waiting_for"):
        schemas["RunDocument"]["properties"].pop(name)
    feed = spec["paths"]["/feed"]["get"]
    feed["parameters"] = [p for p in feed["parameters"] if p["name"] != "signature"]
    return spec


def test_the_relayout_changed_the_schema_only_by_the_400s_and_the_error_texts() -> None:
    live = _without_later_additions(BgTasks("sqlite+aiosqlite:///:memory:").app.app.openapi())
    before = json.loads(BEFORE_RELAYOUT.read_text(encoding="utf-8"))
    before["components"]["schemas"]["Report"].pop("description", None)
    assert _without_error_text(live) == _without_error_text(before)
    for path, method in BODY_ROUTES:
        assert "400" in live["paths"][path][method]["responses"]


async def test_the_list_limit_bound_in_openapi_is_the_hubs_max_list_limit(db_url: str) -> None:
    hub = make_hub(db_url, max_list_limit=20)
    schema = await openapi(hub)
    (limit,) = [p for p in schema["paths"]["/runs"]["get"]["parameters"] if p["name"] == "limit"]
    assert limit["schema"]["maximum"] == 20
    async with serving(hub) as app, client(app) as http:
        response = await http.get("/tasks/runs", params={"limit": 21})
    assert_error(response, 422, "invalid_request")


@pytest.mark.parametrize("path", ["/tasks/ru%0Ans", "/tasks/%0Aruns", "/tasks%0A/health"])
async def test_a_path_with_a_newline_inside_is_answered_by_the_host_app(path: str) -> None:
    async with client(host_app(make_hub("sqlite+aiosqlite:///./never-opened.db"))) as http:
        response = await http.get(path)
    assert response.status_code == 404
    assert response.json() == {"detail": "Not Found"}  # FastAPI's own body, not ours


async def test_a_path_ending_in_a_newline_is_answered_by_the_sub_app_as_not_found() -> None:
    async with client(host_app(make_hub("sqlite+aiosqlite:///./never-opened.db"))) as http:
        response = await http.get("/tasks/health%0A")
    assert_error(response, 404, "not_found")


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


def test_every_route_handler_and_access_check_is_a_module_level_function() -> None:
    hub = make_hub("sqlite+aiosqlite:///./never-opened.db")
    nested = []
    for route in leaf_routes(hub.app.app.routes):
        dependant = getattr(route, "dependant", None)
        if dependant is None or not route.endpoint.__module__.startswith("fastapi_bgtasks"):
            continue
        calls = [route.endpoint, *(d.call for d in dependant.dependencies)]
        nested += [f"{route.path}: {c.__qualname__}" for c in calls if "<locals>" in c.__qualname__]
    assert nested == []


# -- the request path ------------------------------------------------------------


def test_every_dependency_of_the_task_api_is_async() -> None:
    """FastAPI runs a plain `def` dependency in a worker thread: a thread hop
    on every report, heartbeat and status read. None of ours is one."""
    import inspect

    from fastapi.routing import APIRoute

    from fastapi_bgtasks.server import feed, health, intake, reports, status

    routers = [intake.router, status.router(100), feed.router, reports.router, health.router]
    sync: list[str] = []

    def visit(dependant: Any, path: str) -> None:
        for dependency in dependant.dependencies:
            call = dependency.call
            if call is not None and not (
                inspect.iscoroutinefunction(call)
                or inspect.iscoroutinefunction(getattr(call, "__call__", None))  # noqa: B004
            ):
                sync.append(f"{path}: {getattr(call, '__qualname__', call)}")
            visit(dependency, path)

    routes = [r for router in routers for r in router.routes if isinstance(r, APIRoute)]
    assert len(routes) > 10
    for route in routes:
        visit(route.dependant, route.path)
    assert sync == []
    # And the one a host's routes use: `Depends(bg.submitter)`.
    assert inspect.iscoroutinefunction(BgTasks("sqlite+aiosqlite:///x.db").submitter)
