"""The one submit sequence: a `Schedule` checked once, then the call
validated, then stored; `task.delay`, the `Submitter` and `POST /runs` all
go through it, so they refuse and store alike. The HTTP tests drive the
mounted API in process (ASGI transport) on SQLite and PostgreSQL. One
behaviour per test."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from fastapi_bgtasks import BgTasks, ConfigurationError, InvalidSchedule, RunState
from fastapi_bgtasks.schedule import Schedule

pytestmark = pytest.mark.anyio

PLUS_1 = timezone(timedelta(hours=1))
MINUS_1 = timezone(timedelta(hours=-1))
PLUS_5 = timezone(timedelta(hours=5))
MINUS_5 = timezone(timedelta(hours=-5))
LOOPBACK = ("127.0.0.1", 50000)

OUT_OF_RANGE: list[tuple[str, dict[str, Any]]] = [
    ("countdown and eta", {"countdown": 5, "eta": datetime.now(UTC)}),
    ("a negative countdown", {"countdown": -1}),
    ("a countdown over ten years", {"countdown": 11 * 365 * 86400}),
    ("a countdown that is not a number", {"countdown": "5"}),
    ("a naive eta", {"eta": datetime(2030, 1, 1)}),
    ("an eta that is not a datetime", {"eta": "2030-01-01T00:00:00Z"}),
    ("a year-1 eta east of UTC", {"eta": datetime(1, 1, 1, tzinfo=PLUS_5)}),
    ("a year-9999 eta west of UTC", {"eta": datetime(9999, 12, 31, 23, tzinfo=MINUS_5)}),
    ("an eta before 1970", {"eta": datetime(1969, 12, 31, tzinfo=UTC)}),
    ("an eta over ten years ahead", {"eta": datetime.now(UTC) + timedelta(days=3660)}),
    ("an empty idempotency key", {"idempotency_key": ""}),
    ("an idempotency key over 200 characters", {"idempotency_key": "k" * 201}),
    ("a NaN countdown", {"countdown": math.nan}),
    ("an infinite countdown", {"countdown": math.inf}),
    ("a negative infinite countdown", {"countdown": -math.inf}),
    ("a huge countdown", {"countdown": 1e300}),
    ("a year-1 eta an hour east of UTC", {"eta": datetime(1, 1, 1, tzinfo=PLUS_1)}),
    (
        "a year-9999 eta an hour west of UTC",
        {"eta": datetime(9999, 12, 31, 23, 30, tzinfo=MINUS_1)},
    ),
    ("a priority over 32 bits", {"priority": 2**31}),
    ("a priority that is a bool", {"priority": True}),
]


async def add(a: int, b: int) -> int:
    return a + b


def make_hub(database_url: str) -> BgTasks:
    hub = BgTasks(database_url, reaper_seconds=3600)
    hub.task(add)
    return hub


@asynccontextmanager
async def serving(hub: BgTasks) -> AsyncIterator[httpx.AsyncClient]:
    """The hub's lifespan and a loopback client of its mounted API."""
    transport = httpx.ASGITransport(app=hub.app, client=LOOPBACK, raise_app_exceptions=False)
    async with (
        hub.lifespan(),
        httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http,
    ):
        try:
            yield http
        finally:
            # Two writes through the SQLite writer: the second waits for the
            # reaper's start-up pass, which must not be cut off mid-statement.
            for _ in range(2):
                await hub.tasks["add"].delay(0, 0)


async def runs_of_add(http: httpx.AsyncClient) -> list[dict[str, Any]]:
    response = await http.get("/runs", params={"task": "add", "limit": 100})
    assert response.status_code == 200, response.text
    runs: list[dict[str, Any]] = response.json()["runs"]
    return runs


# -- the schedule, checked once ------------------------------------------------


@pytest.mark.parametrize("fields", [f for _, f in OUT_OF_RANGE], ids=[n for n, _ in OUT_OF_RANGE])
def test_a_schedule_out_of_range_raises_invalid_schedule(fields: dict[str, Any]) -> None:
    with pytest.raises(InvalidSchedule):
        Schedule(**fields)


def test_a_past_eta_and_the_limits_of_every_field_make_a_schedule() -> None:
    Schedule(eta=datetime(1970, 1, 1, tzinfo=UTC))
    Schedule(eta=datetime.now(PLUS_5) - timedelta(days=1))
    Schedule(countdown=10 * 365 * 86400, idempotency_key="k" * 200, priority=-(2**31))
    Schedule(countdown=0.0, priority=2**31 - 1)


async def test_apply_async_with_a_year_1_eta_raises_before_opening_the_store(
    tmp_path: Path,
) -> None:
    hub = make_hub(f"sqlite+aiosqlite:///{tmp_path}/x.db")
    with pytest.raises(InvalidSchedule):
        await hub.tasks["add"].apply_async((1, 2), eta=datetime(1, 1, 1, tzinfo=PLUS_5))
    assert not (tmp_path / "x.db").exists()


async def test_submitter_apply_async_checks_the_schedule_too(tmp_path: Path) -> None:
    hub = make_hub(f"sqlite+aiosqlite:///{tmp_path}/x.db")
    with pytest.raises(InvalidSchedule):
        await (await hub.submitter()).apply_async(hub.tasks["add"], (1, 2), priority=2**40)
    assert not (tmp_path / "x.db").exists()


async def test_a_task_of_another_hub_is_refused_before_opening_the_store(tmp_path: Path) -> None:
    hub = make_hub(f"sqlite+aiosqlite:///{tmp_path}/x.db")
    other = make_hub(f"sqlite+aiosqlite:///{tmp_path}/y.db")
    with pytest.raises(ConfigurationError, match="another hub"):
        await (await hub.submitter()).delay(other.tasks["add"], 1, 2)
    assert not (tmp_path / "x.db").exists()


# -- POST /runs goes through the same sequence ---------------------------------


@pytest.mark.parametrize(
    "eta", ["0001-01-01T00:00:00+05:00", "9999-12-31T23:00:00-05:00"], ids=["year-1", "year-9999"]
)
async def test_post_runs_with_an_eta_at_the_calendars_edge_is_a_422_and_stores_nothing(
    db_url: str, eta: str
) -> None:
    async with serving(make_hub(db_url)) as http:
        response = await http.post("/runs", json={"task": "add", "args": [1, 2], "eta": eta})
        assert await runs_of_add(http) == []
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "invalid_schedule"


# Raw bodies: JSON as Python writes it (NaN, Infinity) and as others may.
BAD_SCHEDULE_BODIES = {
    "year-1 eta +01:00": '"eta": "0001-01-01T00:00:00+01:00"',
    "year-9999 eta -01:00": '"eta": "9999-12-31T23:30:00-01:00"',
    "eta before 1970": '"eta": "1969-12-31T23:59:59Z"',
    "eta 11 years ahead": f'"eta": "{datetime.now(UTC).year + 11}-01-01T00:00:00Z"',
    "naive eta": '"eta": "2030-01-01T00:00:00"',
    "negative countdown": '"countdown": -1',
    "huge countdown": '"countdown": 1e300',
    "overflowing countdown": '"countdown": 1e400',
    "NaN countdown": '"countdown": NaN',
    "infinite countdown": '"countdown": Infinity',
    "negative infinite countdown": '"countdown": -Infinity',
}


@pytest.mark.parametrize("field", BAD_SCHEDULE_BODIES.values(), ids=BAD_SCHEDULE_BODIES.keys())
async def test_post_runs_with_a_schedule_out_of_range_is_a_422_and_stores_nothing(
    db_url: str, field: str
) -> None:
    async with serving(make_hub(db_url)) as http:
        response = await http.post(
            "/runs",
            content=f'{{"task": "add", "args": [1, 2], {field}}}',
            headers={"Content-Type": "application/json"},
        )
        assert await runs_of_add(http) == []
    assert response.status_code == 422, response.text
    assert response.json()["error"] in ("invalid_schedule", "invalid_request"), response.text


@pytest.mark.parametrize("fields", [f for _, f in OUT_OF_RANGE], ids=[n for n, _ in OUT_OF_RANGE])
async def test_every_python_entry_point_refuses_a_schedule_out_of_range_and_stores_nothing(
    db_url: str, fields: dict[str, Any]
) -> None:
    """task.apply_async and Submitter.apply_async, with the lifespan's store."""
    hub = make_hub(db_url)
    async with serving(hub) as http:
        with pytest.raises(InvalidSchedule):
            await hub.tasks["add"].apply_async((1, 2), **fields)
        with pytest.raises(InvalidSchedule):
            await (await hub.submitter()).apply_async(hub.tasks["add"], (1, 2), **fields)
        assert await runs_of_add(http) == []


async def test_post_runs_and_delay_store_the_same_run_for_the_same_call(db_url: str) -> None:
    hub = make_hub(db_url)
    async with serving(hub) as http:
        over_http = await http.post(
            "/runs", json={"task": "add", "kwargs": {"b": 2, "a": 1}, "priority": 3}
        )
        assert over_http.status_code == 202, over_http.text
        in_python = await hub.tasks["add"].apply_async(kwargs={"a": 1, "b": 2}, priority=3)
    stored = over_http.json()
    assert stored["state"] == in_python.state.value == RunState.SCHEDULED.value
    assert (stored["args"], stored["kwargs"]) == (in_python.document.args, {})
    assert stored["args"] == [1, 2]
    assert stored["max_attempts"] == in_python.document.max_attempts


async def test_an_idempotent_repeat_over_http_is_marked_replayed_and_in_python_is_the_same_run(
    db_url: str,
) -> None:
    hub = make_hub(db_url)
    body = {"task": "add", "args": [1, 2], "idempotency_key": "order-7"}
    async with serving(hub) as http:
        first = await http.post("/runs", json=body)
        again = await http.post("/runs", json=body)
        in_python = await hub.tasks["add"].apply_async((1, 2), idempotency_key="order-7")
    assert "Idempotent-Replayed" not in first.headers
    assert again.headers["Idempotent-Replayed"] == "true"
    assert first.json()["id"] == again.json()["id"] == str(in_python.id)
