"""The one HTTP client of the mounted API against a real app: every error
response comes back as the package's own exception, for a script's calls and
a worker's alike. The app (tests/worker/workerapp.py) wants a token."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastapi_bgtasks.client import ApiClient, HttpRoute
from fastapi_bgtasks.errors import AccessDenied, RunNotFound, StoreUnavailable, TaskNotFound
from tests.harness.procs import Proc, free_port, start_app

TOKEN = "a-token-long-enough-for-the-app-0123456789"

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def tasks_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp: Path = tmp_path_factory.mktemp("client")
    db_url = f"sqlite+aiosqlite:///{tmp}/client.db"
    app: Proc | None = None
    try:
        app, base = start_app(db_url, tmp, module="tests.worker.workerapp:app", BGTASKS_TOKEN=TOKEN)
        yield f"{base}/tasks"
    finally:
        if app is not None:
            app.stop()


async def test_a_submitted_run_reads_back_through_the_route(tasks_url: str) -> None:
    route = HttpRoute(tasks_url, TOKEN)
    try:
        submitted = await route.client.submit("cjk", [3], {})
        read = await route.read_run(submitted.id)
        assert (read.id, read.task, read.args) == (submitted.id, "cjk", [3])
    finally:
        await route.aclose()


async def test_error_responses_come_back_as_the_package_exceptions(tasks_url: str) -> None:
    client = ApiClient(tasks_url, TOKEN, worker_id="w-test")
    try:
        with pytest.raises(TaskNotFound):
            await client.submit("no_such_task", [], {})
        with pytest.raises(RunNotFound):
            await client.read_run(uuid.uuid4())
    finally:
        await client.aclose()


async def test_a_wrong_token_is_access_denied_on_every_worker_route(tasks_url: str) -> None:
    client = ApiClient(tasks_url, "wrong-" + TOKEN, worker_id="w-test")
    try:
        with pytest.raises(AccessDenied, match="BGTASKS_TOKEN"):
            await client.heartbeat([])
        with pytest.raises(AccessDenied, match="BGTASKS_TOKEN"):
            await client.reports([])
        with pytest.raises(AccessDenied, match="BGTASKS_TOKEN"):
            async for _event in client.feed(["cjk"], 1):
                pass
    finally:
        await client.aclose()


async def test_an_unreachable_app_is_store_unavailable() -> None:
    client = ApiClient(f"http://127.0.0.1:{free_port()}/tasks", None, worker_id="w-test")
    try:
        with pytest.raises(StoreUnavailable):
            await client.read_run(uuid.uuid4())
        with pytest.raises(StoreUnavailable):
            async for _event in client.feed(["cjk"], 1):
                pass
    finally:
        await client.aclose()
