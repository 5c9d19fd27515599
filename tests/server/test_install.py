"""`bg.install(app)`: the library's errors raised in the host app's own
routes answer with the same status and JSON body as under the mount point."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fastapi_bgtasks import BgTasks
from fastapi_bgtasks.errors import ERRORS, BgTasksError, RemoteError, TaskRunFailed
from tests.harness.procs import start_app
from tests.server.apikit import assert_error, client, make_hub, serving

pytestmark = pytest.mark.anyio

URL = "sqlite+aiosqlite:///./never-opened.db"


def raised(cls: type[BgTasksError]) -> BgTasksError:
    if cls is TaskRunFailed:
        return TaskRunFailed(uuid.uuid4(), "FAILED", "ValueError", "boom")
    if cls is RemoteError:
        return RemoteError(502, {"error": "x", "message": "y"}, "http://upstream")
    return cls("A sentence a person can act on.")


def raising_app(bg: BgTasks, *, install: bool) -> FastAPI:
    app = FastAPI()
    app.mount("/tasks", bg.app)
    if install:
        bg.install(app)

    @app.get("/raise/{code}")
    async def raise_error(code: str) -> None:
        raise raised(ERRORS[code])

    return app


@pytest.mark.parametrize("code", sorted(ERRORS))
async def test_an_installed_host_app_answers_each_library_error_as_the_api_does(
    code: str,
) -> None:
    error = raised(ERRORS[code])
    async with client(raising_app(BgTasks(URL), install=True)) as http:
        response = await http.get(f"/raise/{code}")
    assert response.status_code == error.status_code
    assert response.headers["content-type"] == "application/json"
    assert response.json() == error.to_body()


async def test_without_install_a_library_error_in_a_host_route_is_a_plain_500() -> None:
    async with client(raising_app(BgTasks(URL), install=False)) as http:
        response = await http.get("/raise/run_not_found")
    assert response.status_code == 500
    assert not response.headers["content-type"].startswith("application/json")


async def test_install_leaves_the_hosts_own_errors_alone() -> None:
    app = raising_app(BgTasks(URL), install=True)
    async with client(app) as http:
        missing = await http.get("/no/such/route")
        mounted = await http.get("/tasks/no/such/route")
    assert missing.json() == {"detail": "Not Found"}  # FastAPI's, not ours
    assert assert_error(mounted, 404)["error"] == "not_found"  # the mounted API's, as before


async def test_install_works_on_a_starlette_app() -> None:
    async def boom(request: Request) -> Response:
        raise ERRORS["store_unavailable"]()

    app = Starlette(routes=[Route("/boom", boom)])
    BgTasks(URL).install(app)
    async with client(app) as http:
        response = await http.get("/boom")
    assert_error(response, 503)


async def test_read_run_of_an_unknown_id_in_a_host_route_is_a_404(db_url: str) -> None:
    hub = make_hub(db_url)
    async with serving(hub) as app, client(app) as http:
        hub.install(app)

        @app.get("/status/{run_id}")
        async def status(run_id: uuid.UUID) -> dict[str, str]:
            return {"state": (await hub.read_run(run_id)).state.value}

        host = await http.get(f"/status/{uuid.uuid4()}")
        api = await http.get(f"/tasks/runs/{uuid.uuid4()}")
    assert assert_error(host, 404)["error"] == "run_not_found"
    assert assert_error(api, 404)["error"] == "run_not_found"


@pytest.mark.slow
def test_the_example_apps_status_route_answers_an_unknown_id_with_404(
    db_url: str, tmp_path: Path
) -> None:
    proc, base = start_app(db_url, tmp_path, module="example_app.main:app", name="example")
    try:
        unknown = uuid.uuid4()
        host = httpx.get(f"{base}/users/signup-status/{unknown}", timeout=10)
        api = httpx.get(f"{base}/tasks/runs/{unknown}", timeout=10)
        run_id = httpx.post(f"{base}/task", params={"name": "Ann"}, timeout=10).json()[
            "task_run_id"
        ]
        known = httpx.get(f"{base}/users/signup-status/{run_id}", timeout=10)
    finally:
        proc.stop()
    assert host.status_code == 404, host.text
    assert host.json() == api.json() | {"message": host.json()["message"]}
    assert host.json()["error"] == "run_not_found"
    assert known.status_code == 200 and known.json()["state"] == "SCHEDULED"
