"""Many runs of one task at once: `Task.map`, `Submitter.map`, the store's
`insert_runs` behind them, and `POST /runs/batch` (also the route a hub given
the app's URL maps through). On SQLite and PostgreSQL; the HTTP tests share
one real app and worker per backend. One behaviour per test."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import sqlalchemy as sa
from pydantic import ValidationError

from fastapi_bgtasks import (
    BgTasks,
    InvalidValue,
    NotSerializable,
    PayloadTooLarge,
    RunState,
    StoreUnavailable,
    Task,
    TaskNotFound,
)
from fastapi_bgtasks.store import MAP_CHUNK, NOTIFY_CHANNEL, Store, runs
from fastapi_bgtasks.wire import MAX_MAP_CALLS
from tests import timing
from tests.storekit import connect, eventually, stored_rows

pytestmark = pytest.mark.anyio


# -- the tasks -------------------------------------------------------------------


async def add(a: int, b: int) -> int:
    return a + b


def scale(n: int, factor: float = 1.0, *, label: str = "", **extra: Any) -> float:
    return n * factor


def echo(value: Any = None) -> Any:
    return value


def ratio(x: float) -> float:
    return x


def stamp(n: int, when: datetime, factor: float = 1.0, *, label: str = "") -> str:
    return f"{n}@{when.isoformat()}"


def make_hub(database_url: str, **options: Any) -> BgTasks:
    """A hub with no lifespan: it submits as a script does (the lazy store),
    or over HTTP when given the app's `url=`."""
    hub = BgTasks(database_url, **options)
    for fn in (add, scale, echo, ratio):
        hub.task(fn)
    hub.task(retries=2, retry_delay_seconds=[0.5, 1.5], timeout_seconds=7)(stamp)
    return hub


def task_of(hub: BgTasks, name: str) -> Task[Any, Any]:
    return hub.tasks[name]


# -- fixtures and helpers -------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_bgtasks_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BGTASKS_DATABASE_URL", "BGTASKS_URL", "BGTASKS_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def served(shared_server: str, shared_db: tuple[str, Path]) -> tuple[str, str]:
    """(base URL, database URL) of the app and worker this module shares."""
    return shared_server, shared_db[0]


async def count_runs(store: Store) -> int:
    async with connect(store) as conn:
        return int(await conn.scalar(sa.select(sa.func.count()).select_from(runs)) or 0)


async def count_runs_at(url: str) -> int:
    opened = Store(url)
    await opened.open()
    try:
        return await count_runs(opened)
    finally:
        await opened.close()


def calls(*items: tuple[list[Any], dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"args": args, "kwargs": kwargs} for args, kwargs in items]


# -- Task.map and Submitter.map, straight to the store ------------------------------


async def test_map_over_two_iterables_gives_each_run_one_pair_of_positional_arguments(
    store: Store, migrated: str
) -> None:
    hub = make_hub(migrated)
    mapped = await task_of(hub, "add").map([1, 2, 3], (n * 10 for n in (1, 2, 3)))
    rows = await stored_rows(store)
    assert [rows[run.id]["args"] for run in mapped] == [[1, 10], [2, 20], [3, 30]]
    assert [rows[run.id]["kwargs"] for run in mapped] == [{}, {}, {}]


async def test_static_keyword_arguments_reach_every_run(store: Store, migrated: str) -> None:
    hub = make_hub(migrated)
    mapped = await task_of(hub, "scale").map([1, 2, 3], label="x", colour="red")
    rows = await stored_rows(store)
    assert [rows[run.id]["args"] for run in mapped] == [[1], [2], [3]]
    assert [rows[run.id]["kwargs"] for run in mapped] == [{"label": "x", "colour": "red"}] * 3


async def test_a_mapped_run_is_stored_exactly_as_delay_stores_the_same_call(
    store: Store, migrated: str
) -> None:
    """Validated and normalised the same way (coerced values, keyword
    arguments that can go by position moved there, the task's options)."""
    hub = make_hub(migrated)
    task = task_of(hub, "stamp")
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    (mapped,) = await task.map(["7"], [when], factor=2, label="x")
    delayed = await task.delay("7", when, factor=2, label="x")
    rows = await stored_rows(store)
    per_run = ("id", "created_at", "scheduled_at", "updated_at")
    as_mapped = {k: v for k, v in rows[mapped.id].items() if k not in per_run}
    as_delayed = {k: v for k, v in rows[delayed.id].items() if k not in per_run}
    assert as_mapped == as_delayed
    assert as_mapped["args"] == [7, "2026-01-02T03:04:05Z", 2.0]
    assert as_mapped["kwargs"] == {"label": "x"}
    assert as_mapped["max_attempts"] == 3


async def test_iterables_of_different_lengths_raise_value_error_and_store_nothing(
    store: Store, migrated: str
) -> None:
    hub = make_hub(migrated)
    with pytest.raises(ValueError):
        await task_of(hub, "add").map([1, 2, 3], [10, 20])
    assert await count_runs(store) == 0


@pytest.mark.parametrize("entry", ["task", "submitter"])
async def test_map_with_no_iterables_raises_type_error(tmp_path: Path, entry: str) -> None:
    hub = make_hub(f"sqlite+aiosqlite:///{tmp_path}/never-opened.db")
    task = task_of(hub, "echo")
    with pytest.raises(TypeError):
        if entry == "task":
            await task.map()
        else:
            await (await hub.submitter()).map(task)


async def test_an_empty_iterable_returns_no_runs_and_stores_nothing(
    store: Store, migrated: str
) -> None:
    hub = make_hub(migrated)
    assert await task_of(hub, "add").map([], []) == []
    assert await count_runs(store) == 0


@pytest.mark.parametrize(
    ("task_name", "bad", "error"),
    [
        pytest.param("add", "not a number", ValidationError, id="wrong-type"),
        pytest.param("ratio", math.nan, ValidationError, id="nan-as-float"),
        pytest.param("echo", math.nan, NotSerializable, id="nan-under-any"),
        pytest.param("echo", "x" * 2048, PayloadTooLarge, id="too-large"),
    ],
)
async def test_one_invalid_call_anywhere_raises_before_anything_is_stored(
    store: Store, migrated: str, task_name: str, bad: Any, error: type[Exception]
) -> None:
    hub = make_hub(migrated, max_args_bytes=1024)
    task = task_of(hub, task_name)
    firsts: list[Any] = list(range(300))
    firsts[150] = bad
    columns = [firsts] if task.name != "add" else [firsts, range(300)]
    with pytest.raises(error):
        await task.map(*columns)
    assert await count_runs(store) == 0


async def test_runs_over_several_insert_chunks_are_all_stored_in_input_order(
    store: Store, migrated: str
) -> None:
    """MAP_CHUNK runs per INSERT: two full chunks and one more run."""
    total = 2 * MAP_CHUNK + 1
    hub = make_hub(migrated)
    mapped = await task_of(hub, "add").map(range(total), range(total, 2 * total))
    assert len(mapped) == total
    assert len({run.id for run in mapped}) == total
    rows = await stored_rows(store)
    assert len(rows) == total
    mismatched = [i for i, run in enumerate(mapped) if rows[run.id]["args"] != [i, total + i]]
    assert mismatched == []


async def test_mapped_runs_come_back_scheduled_and_read_back_as_stored(migrated: str) -> None:
    hub = make_hub(migrated)
    mapped = await task_of(hub, "add").map([1, 2], [3, 4])
    for run in mapped:
        assert run.state is RunState.SCHEDULED
        returned = run.document
        assert await run.refresh() is RunState.SCHEDULED
        assert run.document == returned


async def test_submitter_map_stores_one_run_per_item(store: Store, migrated: str) -> None:
    hub = make_hub(migrated)
    mapped = await (await hub.submitter()).map(task_of(hub, "add"), [1, 2], [3, 4])
    rows = await stored_rows(store)
    assert [rows[run.id]["args"] for run in mapped] == [[1, 3], [2, 4]]
    assert all(run.task_name == "add" for run in mapped)


async def test_a_map_from_a_script_notifies_postgresql_listeners_with_the_task_name(
    migrated: str,
) -> None:
    """No lifespan to coalesce wake-ups: the map's transaction NOTIFYs itself,
    so app processes claim the runs at once instead of at their next poll."""
    if not migrated.startswith("postgresql"):
        pytest.skip("LISTEN/NOTIFY wake-ups exist only on PostgreSQL")
    payloads: list[str] = []
    listener = await asyncpg.connect(migrated.replace("+asyncpg", "", 1), timeout=10)
    try:
        await listener.add_listener(
            NOTIFY_CHANNEL, lambda _c, _pid, _ch, payload: payloads.append(payload)
        )
        hub = make_hub(migrated)
        await task_of(hub, "add").map([1, 2], [3, 4])

        async def notified() -> bool:
            return bool(payloads)

        await eventually(notified)
    finally:
        await listener.close()
    assert payloads == ["add"]


async def test_a_map_whose_later_chunk_the_database_refuses_stores_none_of_its_runs(
    store: Store,
) -> None:
    """All or none: the first chunk's rows go with the failed second one.
    (NaN bypasses the task's checks here; only the database refuses it.)"""
    batch: list[tuple[list[Any], dict[str, Any]]] = [([i], {}) for i in range(MAP_CHUNK + 10)]
    batch[MAP_CHUNK + 5] = ([math.nan], {})
    with pytest.raises((InvalidValue, StoreUnavailable)):
        await store.insert_runs(
            task="echo",
            calls=batch,
            max_attempts=1,
            max_rescues=3,
            retry_delays=[0.0],
            timeout_seconds=None,
        )
    assert await count_runs(store) == 0


# -- POST /runs/batch on a real app ---------------------------------------------------


async def test_post_runs_batch_answers_202_with_the_documents_in_call_order(
    served: tuple[str, str],
) -> None:
    base, _ = served
    body = {"task": "add", "calls": calls(*[([str(i), i], {}) for i in range(5)])}
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        response = await http.post("/tasks/runs/batch", json=body)
        assert response.status_code == 202, response.text
        documents = response.json()["runs"]
        assert [d["args"] for d in documents] == [[i, i] for i in range(5)]
        assert [d["task"] for d in documents] == ["add"] * 5
        assert len({d["id"] for d in documents}) == 5
        for document in documents:
            stored = (await http.get(f"/tasks/runs/{document['id']}")).json()
            assert stored["args"] == document["args"]


async def test_post_runs_batch_of_an_unknown_task_is_a_404(served: tuple[str, str]) -> None:
    base, _ = served
    body = {"task": "no_such_task", "calls": calls(([1], {}))}
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        response = await http.post("/tasks/runs/batch", json=body)
    assert response.status_code == 404, response.text
    assert response.json()["error"] == "task_not_found"


@pytest.mark.parametrize("how_many", [0, MAX_MAP_CALLS + 1])
async def test_post_runs_batch_with_no_calls_or_more_than_the_limit_is_a_422(
    served: tuple[str, str], how_many: int
) -> None:
    base, db_url = served
    before = await count_runs_at(db_url)
    body = {"task": "add", "calls": calls(*[([1, 2], {})] * how_many)}
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        response = await http.post("/tasks/runs/batch", json=body)
    assert response.status_code == 422, response.text
    assert await count_runs_at(db_url) == before


async def test_post_runs_batch_with_one_invalid_call_is_a_422_and_stores_nothing(
    served: tuple[str, str],
) -> None:
    base, db_url = served
    items: list[tuple[list[Any], dict[str, Any]]] = [([i, i], {}) for i in range(50)]
    items[40] = (["forty", 40], {})
    before = await count_runs_at(db_url)
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        response = await http.post(
            "/tasks/runs/batch", json={"task": "add", "calls": calls(*items)}
        )
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "invalid_arguments"
    assert await count_runs_at(db_url) == before


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(
            {"task": "add", "calls": [{"args": [1, 2], "kwargs": {}}], "priority": 5},
            id="in-the-body",
        ),
        pytest.param(
            {"task": "add", "calls": [{"args": [1, 2], "kwargs": {}, "countdown": 60}]},
            id="in-a-call",
        ),
    ],
)
async def test_post_runs_batch_with_unknown_fields_is_a_422_and_stores_nothing(
    served: tuple[str, str], body: dict[str, Any]
) -> None:
    base, db_url = served
    before = await count_runs_at(db_url)
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        response = await http.post("/tasks/runs/batch", json=body)
    assert response.status_code == 422, response.text
    assert await count_runs_at(db_url) == before


async def test_a_hub_given_the_apps_url_maps_through_the_api(
    served: tuple[str, str], tmp_path: Path
) -> None:
    """Its own database URL leads nowhere: only the API can store these runs."""
    base, _ = served
    hub = make_hub(f"sqlite+aiosqlite:///{tmp_path}/absent.db", url=f"{base}/tasks")
    mapped = await task_of(hub, "add").map([5, 6, 7], [50, 60, 70])
    assert [run.document.args for run in mapped] == [[5, 50], [6, 60], [7, 70]]
    assert all(run.state is RunState.SCHEDULED for run in mapped)
    assert not (tmp_path / "absent.db").exists()
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        for run in mapped:
            response = await http.get(f"/tasks/runs/{run.id}")
            assert response.status_code == 200, response.text
            assert response.json()["args"] == run.document.args


async def test_a_map_over_http_of_more_calls_than_one_request_takes_is_refused_before_sending(
    served: tuple[str, str], tmp_path: Path
) -> None:
    """POST /runs/batch takes at most MAX_MAP_CALLS: the caller gets a named
    error saying to split, not a bare 422, and nothing is stored."""
    base, _ = served
    hub = make_hub(f"sqlite+aiosqlite:///{tmp_path}/absent.db", url=f"{base}/tasks")
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        before = (await http.get("/tasks/runs", params={"limit": 1})).json()
        with pytest.raises(PayloadTooLarge, match="split"):
            await task_of(hub, "add").map(range(MAX_MAP_CALLS + 1), range(MAX_MAP_CALLS + 1))
        after = (await http.get("/tasks/runs", params={"limit": 1})).json()
    assert after == before


async def test_a_map_over_http_of_a_task_the_app_does_not_know_raises_task_not_found(
    served: tuple[str, str], tmp_path: Path
) -> None:
    base, _ = served
    hub = BgTasks(f"sqlite+aiosqlite:///{tmp_path}/absent.db", url=f"{base}/tasks")

    @hub.task
    def only_here(n: int) -> int:
        return n

    with pytest.raises(TaskNotFound):
        await only_here.map([1, 2])


async def test_runs_mapped_through_the_api_are_run_by_a_worker(
    served: tuple[str, str], tmp_path: Path
) -> None:
    """Stored by the app process (which wakes its feeds), claimed and run by
    the shared worker, read back over HTTP."""
    base, _ = served
    hub = make_hub(f"sqlite+aiosqlite:///{tmp_path}/absent.db", url=f"{base}/tasks")
    mapped = await task_of(hub, "add").map(range(20), range(100, 120))
    results = [await run.result(timeout=timing.DEADLINE) for run in mapped]
    assert results == [i + 100 + i for i in range(20)]
    assert all(run.state is RunState.COMPLETED for run in mapped)


async def test_runs_mapped_straight_into_the_store_by_a_script_are_run_by_a_worker(
    served: tuple[str, str],
) -> None:
    _, db_url = served
    hub = make_hub(db_url)
    mapped = await task_of(hub, "add").map(range(20), range(200, 220))
    results = [await run.result(timeout=timing.DEADLINE) for run in mapped]
    assert results == [i + 200 + i for i in range(20)]
