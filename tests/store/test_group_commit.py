"""Group commit of concurrent submits (`Store._insert_batched`): submits with
no idempotency key that arrive while an insert is in flight are stored
together by the next one, a single multi-row INSERT. Every caller must still
get its own run, or its own refusal. On SQLite and PostgreSQL, against a
real, fresh database. One behaviour per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import asyncpg
import pytest
import sqlalchemy as sa

from fastapi_bgtasks import BgTasks, InvalidValue, Task, TaskRun
from fastapi_bgtasks.store import NOTIFY_CHANNEL, RunRow, Store
from tests import timing
from tests.storekit import eventually, run_values, stored_rows

pytestmark = pytest.mark.anyio

TASK = "record"


def record(n: int) -> int:
    return n


def other(n: int) -> int:
    return n


def script_hub(url: str) -> tuple[BgTasks, Task[Any, Any], Task[Any, Any]]:
    """A hub with no lifespan: it submits as a script does, through a store
    it opens lazily (and whose inserts NOTIFY on PostgreSQL)."""
    hub = BgTasks(url)
    return hub, hub.task(record), hub.task(other)


# -- fixtures and helpers -------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_bgtasks_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BGTASKS_DATABASE_URL", "BGTASKS_URL", "BGTASKS_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def require_postgres(url: str) -> None:
    if not url.startswith("postgresql"):
        pytest.skip("LISTEN/NOTIFY and server-side locks are PostgreSQL's")


def plain_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


@asynccontextmanager
async def runs_table_locked(
    url: str,
) -> AsyncIterator[tuple[asyncpg.Connection, Callable[[], Awaitable[None]]]]:
    """The runs table locked from another connection (inserts wait on it),
    a connection to watch who waits, and the call that releases the lock."""
    blocker = await asyncpg.connect(plain_dsn(url), timeout=10)
    watcher = await asyncpg.connect(plain_dsn(url), timeout=10)
    lock = blocker.transaction()
    await lock.start()
    held = True

    async def release() -> None:
        nonlocal held
        if held:
            held = False
            await lock.rollback()

    try:
        await blocker.execute("LOCK TABLE bgtasks_runs IN SHARE ROW EXCLUSIVE MODE")
        yield watcher, release
    finally:
        await release()
        await blocker.close()
        await watcher.close()


async def insert(store: Store, n: int, task: str = TASK, **options: Any) -> RunRow:
    row, _ = await store.insert_run(**run_values(task, **{"args": [n], **options}))
    return row


@asynccontextmanager
async def listening(url: str) -> AsyncIterator[list[str]]:
    """Every payload NOTIFYed on the runs channel while inside."""
    payloads: list[str] = []
    conn = await asyncpg.connect(plain_dsn(url), timeout=10)
    try:
        await conn.add_listener(
            NOTIFY_CHANNEL, lambda _c, _pid, _ch, payload: payloads.append(payload)
        )
        yield payloads
    finally:
        await conn.close()


async def concurrent_inserts(
    store: Store, count: int, bad_at: int | None = None, bad_task: str = ""
) -> dict[int, RunRow | BaseException]:
    """`count` concurrent store.insert_run calls; each caller's row or error."""
    outcomes: dict[int, RunRow | BaseException] = {}

    async def caller(n: int) -> None:
        try:
            outcomes[n] = await insert(store, n, bad_task if n == bad_at else TASK)
        except Exception as exc:
            outcomes[n] = exc

    with anyio.fail_after(timing.DEADLINE):
        async with anyio.create_task_group() as tg:
            for n in range(count):
                tg.start_soon(caller, n)
    return outcomes


def refused_task_name(store: Store) -> str:
    """A value only the database (or its driver) refuses. The task's own
    checks pass NUL characters in arguments (JSON escapes them, and both
    backends store them), so the bad value goes in the task name, below the
    hub: PostgreSQL text cannot hold NUL; SQLite's driver cannot encode a
    lone surrogate."""
    return "bad\x00name" if store.is_pg else "bad\ud800name"


# -- the group commit -------------------------------------------------------------


async def test_concurrent_submits_from_one_hub_are_all_stored_each_with_its_callers_arguments(
    store: Store, migrated: str
) -> None:
    _, task, _ = script_hub(migrated)
    answers: dict[int, TaskRun[Any]] = {}

    async def caller(n: int) -> None:
        answers[n] = await task.delay(n)

    with anyio.fail_after(timing.DEADLINE):
        async with anyio.create_task_group() as tg:
            for n in range(200):
                tg.start_soon(caller, n)
    rows = await stored_rows(store)
    assert len(rows) == 200
    assert len({run.id for run in answers.values()}) == 200
    assert all(answers[n].document.args == [n] for n in range(200))
    assert all(rows[answers[n].id]["args"] == [n] for n in range(200))


async def test_concurrent_submits_share_insert_statements(store: Store) -> None:
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        if "INSERT INTO bgtasks_runs" in statement:
            statements.append(statement)

    # Every engine's statements (the store's own included), by its public events.
    sa.event.listen(sa.Engine, "before_cursor_execute", seen)
    try:
        outcomes = await concurrent_inserts(store, 200)
    finally:
        sa.event.remove(sa.Engine, "before_cursor_execute", seen)
    assert all(isinstance(row, dict) for row in outcomes.values())
    assert len(statements) < 200 // 4


async def test_a_value_the_database_refuses_in_one_concurrent_submit_refuses_only_that_one(
    store: Store,
) -> None:
    bad = 60
    outcomes = await concurrent_inserts(store, 120, bad_at=bad, bad_task=refused_task_name(store))
    assert isinstance(outcomes.pop(bad), InvalidValue)
    assert all(isinstance(row, dict) for row in outcomes.values()), outcomes
    rows = await stored_rows(store)
    assert sorted(row["args"][0] for row in rows.values()) == sorted(outcomes)
    for n, row in outcomes.items():
        assert isinstance(row, dict)
        assert rows[row["id"]]["args"] == [n]


async def test_a_refused_value_in_a_group_over_one_thousand_submits_refuses_only_that_one(
    store: Store,
) -> None:
    count = 1200
    bad = count - 1
    outcomes = await concurrent_inserts(store, count, bad_at=bad, bad_task=refused_task_name(store))
    assert isinstance(outcomes.pop(bad), InvalidValue)
    refused = sorted(n for n, row in outcomes.items() if not isinstance(row, dict))
    assert refused == []


async def test_cancelling_some_callers_right_after_they_start_keeps_every_other_callers_run(
    store: Store, migrated: str
) -> None:
    _, task, _ = script_hub(migrated)
    await task.delay(-1)  # the store is open: the callers below meet in groups at once
    count = 100
    cancelled = set(range(0, count, 4))
    scopes = {n: anyio.CancelScope() for n in range(count)}
    answers: dict[int, TaskRun[Any]] = {}

    async def caller(n: int) -> None:
        with scopes[n]:
            answers[n] = await task.delay(n)

    with anyio.fail_after(timing.DEADLINE):
        async with anyio.create_task_group() as tg:
            for n in range(count):
                tg.start_soon(caller, n)
            # Each caller has queued its submit; one is in flight.
            await anyio.lowlevel.checkpoint()
            for n in cancelled:
                scopes[n].cancel()
    kept = set(range(count)) - cancelled
    assert kept <= set(answers)
    rows = await stored_rows(store)
    assert all(rows[answers[n].id]["args"] == [n] for n in kept)
    stored_args = [row["args"][0] for row in rows.values()]
    assert len(stored_args) == len(set(stored_args))  # no submit stored twice


async def test_cancelling_the_caller_whose_insert_carries_a_group_still_stores_the_group(
    store: Store, migrated: str
) -> None:
    """The group's INSERT is held on a table lock while its caller and many
    others are cancelled: the statement is shielded, the group is stored and
    the callers left get their runs."""
    require_postgres(migrated)
    _, task, _ = script_hub(migrated)
    await task.delay(-1)
    count = 40
    scopes = {n: anyio.CancelScope() for n in range(count)}
    answers: dict[int, TaskRun[Any]] = {}
    errors: dict[int, Exception] = {}

    async def caller(n: int) -> None:
        with scopes[n]:
            try:
                answers[n] = await task.delay(n)
            except Exception as exc:
                errors[n] = exc

    async def waiting_insert(watcher: asyncpg.Connection, prefix: str) -> int:
        """The pid of a submit's INSERT waiting for the table lock."""

        async def pid() -> int | None:
            found: int | None = await watcher.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND query LIKE $1",
                prefix + "%",
            )
            return found

        found: int = await eventually(pid)
        return found

    async with runs_table_locked(migrated) as (watcher, release):
        with anyio.fail_after(timing.DEADLINE):
            async with anyio.create_task_group() as tg:
                tg.start_soon(caller, 0)
                # Caller 0's lone insert (it carries its own NOTIFY) waits on the lock...
                lone = await waiting_insert(watcher, "WITH inserted AS")
                for n in range(1, count):
                    tg.start_soon(caller, n)
                await anyio.lowlevel.checkpoint()  # ...and every other caller queues.
                await watcher.execute("SELECT pg_cancel_backend($1)", lone)
                # The next flush carries all of them in one INSERT, also held.
                await waiting_insert(watcher, "INSERT INTO bgtasks_runs")
                # Cancel the first half: the caller running that INSERT is among them.
                for n in range(1, count // 2):
                    scopes[n].cancel()
                await release()
    assert set(errors) <= {0}
    kept = set(range(count // 2, count))
    assert kept <= set(answers)
    rows = await stored_rows(store)
    stored_args = {row["args"][0] for row in rows.values()}
    assert set(range(1, count)) <= stored_args  # the cancelled callers' runs too
    assert all(rows[answers[n].id]["args"] == [n] for n in kept)


async def test_sequential_single_submits_are_each_stored(store: Store, migrated: str) -> None:
    _, task, _ = script_hub(migrated)
    answers = [await task.delay(n) for n in range(5)]
    rows = await stored_rows(store)
    assert len(rows) == 5
    assert [rows[run.id]["args"] for run in answers] == [[n] for n in range(5)]


async def test_concurrent_idempotent_and_plain_submits_store_one_run_per_key(
    store: Store, migrated: str
) -> None:
    _, task, _ = script_hub(migrated)
    keyed: dict[str, list[TaskRun[Any]]] = {f"key-{k}": [] for k in range(10)}
    plain: dict[int, TaskRun[Any]] = {}

    async def with_key(k: int) -> None:
        keyed[f"key-{k}"].append(await task.apply_async([k], idempotency_key=f"key-{k}"))

    async def without_key(n: int) -> None:
        plain[n] = await task.delay(100 + n)

    with anyio.fail_after(timing.DEADLINE):
        async with anyio.create_task_group() as tg:
            for n in range(50):
                tg.start_soon(with_key, n % 10)
                tg.start_soon(without_key, n)
    rows = await stored_rows(store)
    stored_keys = [row["idempotency_key"] for row in rows.values() if row["idempotency_key"]]
    assert sorted(stored_keys) == sorted(keyed)
    for key, answered in keyed.items():
        assert len({run.id for run in answered}) == 1
        assert rows[answered[0].id]["idempotency_key"] == key
    assert len(rows) == 10 + 50
    assert all(rows[plain[n].id]["args"] == [100 + n] for n in range(50))


# -- wake-ups from a script (PostgreSQL) ---------------------------------------------


async def test_a_script_submit_on_postgresql_notifies_the_task_name(migrated: str) -> None:
    require_postgres(migrated)
    _, task, _ = script_hub(migrated)
    async with listening(migrated) as payloads:
        await task.delay(1)

        async def notified() -> bool:
            return bool(payloads)

        await eventually(notified)
    assert payloads == [TASK]


async def test_a_group_of_script_submits_on_postgresql_notifies_their_task_name(
    migrated: str,
) -> None:
    """The submit that goes first, alone, names its task; the group that
    follows it must send its own notification naming the group's task."""
    require_postgres(migrated)
    _, task, lone = script_hub(migrated)
    await lone.delay(0)  # the store is open: the submits below meet in groups at once
    async with listening(migrated) as payloads:
        with anyio.fail_after(timing.DEADLINE):
            async with anyio.create_task_group() as tg:
                tg.start_soon(lone.delay, 1)
                for n in range(30):
                    tg.start_soon(task.delay, n)

        async def grouped_named() -> bool:
            return any(TASK in payload.split(",") for payload in payloads)

        await eventually(grouped_named)


async def test_a_caller_cancelled_while_its_submit_waits_for_the_next_group_stores_nothing(
    store: Store, migrated: str
) -> None:
    """A submit queued behind an insert in flight, whose caller gives up
    (a client that disconnected), must not be stored later by another
    group: the caller saw an error and may well submit again."""
    require_postgres(migrated)
    _, task, _ = script_hub(migrated)
    await task.delay(-1)  # the lazy store is open
    scope = anyio.CancelScope()
    outcome: dict[str, Any] = {}

    async def leader() -> None:
        outcome["leader"] = await task.delay(1)

    async def follower() -> None:
        with scope:
            outcome["follower"] = await task.delay(2)

    async with runs_table_locked(migrated) as (watcher, release):
        with anyio.fail_after(timing.DEADLINE):
            async with anyio.create_task_group() as tg:
                tg.start_soon(leader)

                async def held() -> bool:
                    count = await watcher.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                        "current_database() AND wait_event_type = 'Lock' "
                        "AND query LIKE 'WITH inserted AS%'"
                    )
                    return bool(count)

                await eventually(held)  # the leader's insert waits on the lock
                tg.start_soon(follower)
                await anyio.sleep(0.05)  # the follower queues behind it
                scope.cancel()
                await anyio.sleep(0.05)
                await release()
        # A later submit leads a group of its own: the follower is not in it.
        await task.delay(3)
    assert "follower" not in outcome and "leader" in outcome
    stored_args = sorted(row["args"][0] for row in (await stored_rows(store)).values())
    assert stored_args == [-1, 1, 3]
