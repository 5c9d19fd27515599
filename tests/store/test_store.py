"""The storage contract: every statement of `Store`, run on SQLite and
PostgreSQL alike against a real, fresh database. One behaviour per test."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import anyio
import pytest
import sqlalchemy as sa

from fastapi_bgtasks import BgTasks
from fastapi_bgtasks.errors import IdempotencyConflict, RunFinished, RunNotFound, SchemaError
from fastapi_bgtasks.schedule import Schedule
from fastapi_bgtasks.states import RunState
from fastapi_bgtasks.store import (
    SCHEMA_VERSION,
    DeliveryRow,
    RunRow,
    Store,
    runs,
    schema_table,
)
from fastapi_bgtasks.submit import StoreRoute
from fastapi_bgtasks.wire import ErrorInfo, decode_cursor, encode_cursor
from tests.storekit import (
    apply,
    clock,
    eventually,
    fetch,
    read,
    reap_expired,
    report,
    submit_run,
    write,
)

pytestmark = pytest.mark.anyio

TASK = "send_email"
LEASE = 60.0
BIG = 1 << 20


# -- fixtures and helpers ----------------------------------------------------


@pytest.fixture
async def second_store(store: Store, db_url: str) -> AsyncIterator[Store]:
    """Another store on the same database: another app process."""
    other = Store(db_url)
    await other.open()
    try:
        yield other
    finally:
        await other.close()


async def submit(store: Store, task: str = TASK, **options: Any) -> RunRow:
    return await submit_run(store, task, **options)


async def claim(
    store: Store, worker: str = "w1", slots: int = 10, tasks: tuple[str, ...] = (TASK,)
) -> list[DeliveryRow]:
    return await store.claim(worker_id=worker, tasks=tasks, slots=slots, lease_seconds=LEASE)


async def claim_one(store: Store, worker: str = "w1") -> DeliveryRow:
    claimed = await claim(store, worker, slots=1)
    assert len(claimed) == 1
    return claimed[0]


async def update_rows(store: Store, where: Any, **values: Any) -> None:
    """Write straight to the runs table, as a fixture (a backdated lease...)."""
    await write(store, runs.update().where(where).values(**values))


async def expire_leases(store: Store, *run_ids: uuid.UUID) -> None:
    await update_rows(
        store,
        runs.c.id.in_(list(run_ids)),
        lease_expires_at=datetime.now(UTC) - timedelta(minutes=5),
    )


async def make_due(store: Store, run_id: uuid.UUID) -> None:
    await update_rows(
        store, runs.c.id == run_id, scheduled_at=datetime.now(UTC) - timedelta(seconds=1)
    )


def error(kind: str = "ValueError", message: str = "boom") -> ErrorInfo:
    return ErrorInfo(type=kind, message=message, traceback="Traceback ...")


# -- the schema --------------------------------------------------------------


async def test_migrate_is_idempotent_and_keeps_the_runs(store: Store) -> None:
    row = await submit(store)
    assert await store.migrate() == SCHEMA_VERSION
    assert await store.migrate() == SCHEMA_VERSION
    await store.check_schema()
    assert (await fetch(store, row["id"]))["state"] == "SCHEDULED"


async def test_two_concurrent_migrations_of_a_fresh_database_both_succeed(db_url: str) -> None:
    first, second = Store(db_url), Store(db_url)
    await first.open()
    await second.open()
    try:
        versions = await asyncio.gather(first.migrate(), second.migrate())
        assert list(versions) == [SCHEMA_VERSION, SCHEMA_VERSION]
        await first.check_schema()
        recorded = [r.version for r in await read(first, sa.select(schema_table.c.version))]
        assert recorded == [SCHEMA_VERSION]
        await submit(first)
    finally:
        await first.close()
        await second.close()


async def test_check_schema_names_the_database_when_there_is_no_schema(db_url: str) -> None:
    bare = Store(db_url)
    await bare.open()
    try:
        with pytest.raises(SchemaError) as caught:
            await bare.check_schema()
        database = bare.url.database or ""
        assert database and database in str(caught.value)
        assert "No fastapi_bgtasks schema" in str(caught.value)
    finally:
        await bare.close()


async def test_a_schema_newer_than_this_package_knows_is_refused(store: Store) -> None:
    await write(store, schema_table.update().values(version=SCHEMA_VERSION + 1))
    with pytest.raises(SchemaError, match="newer"):
        await store.migrate()
    with pytest.raises(SchemaError, match=str(SCHEMA_VERSION + 1)):
        await store.check_schema()


# -- ① submit ----------------------------------------------------------------


async def test_insert_run_stores_a_scheduled_run_and_says_it_was_created(store: Store) -> None:
    row, created = await store.insert_run(
        task=TASK,
        args=[1],
        kwargs={"a": 2},
        max_attempts=4,
        max_rescues=2,
        retry_delays=[1.0, 5.0],
        timeout_seconds=9.5,
        priority=3,
        countdown=None,
        eta=None,
        idempotency_key=None,
    )
    assert created is True
    assert isinstance(row["id"], uuid.UUID) and row["id"].version == 4
    assert row["state"] == "SCHEDULED"
    assert row["attempt"] == 0
    assert row["rescues"] == 0
    assert (row["max_attempts"], row["max_rescues"], row["priority"]) == (4, 2, 3)
    assert row["retry_delays"] == [1.0, 5.0]
    assert row["timeout_seconds"] == 9.5
    assert row["worker_id"] is None and row["lease_token"] is None
    assert row["result"] is None and row["error"] is None
    assert row["cancel_requested"] is False
    assert row["created_at"].tzinfo is not None
    assert row["scheduled_at"] == row["created_at"]
    assert await store.get_run(row["id"]) == row


async def test_get_run_round_trips_arguments_exactly(store: Store) -> None:
    args = [
        "héllo wörld ✓ 日本語 🚀",
        'line one\nline two\r\n\ttabbed "quoted" \\ backslash',
        {"nested": {"list": [1, 2.5, None, True, False, [], {}], "deep": [[["x"]]]}},
        -(2**53),
        0.1,
        "",
        None,
        "\u0000-free but \u2028 separators and \U0001f600",
    ]
    kwargs = {"ключ": "значение", "emoji 😀": [{"a": "b\nc"}], "empty": {}}
    row = await submit(store, args=args, kwargs=kwargs)
    stored = await fetch(store, row["id"])
    assert stored["args"] == args
    assert stored["kwargs"] == kwargs
    assert list(stored["kwargs"]) == list(kwargs)


async def test_get_run_of_an_unknown_id_is_none(store: Store) -> None:
    assert await store.get_run(uuid.uuid4()) is None


async def test_a_repeated_idempotency_key_returns_the_stored_run(store: Store) -> None:
    first = await submit(store, args=[1], idempotency_key="signup-42")
    again, created = await store.insert_run(
        task=TASK,
        args=[1],
        kwargs={},
        max_attempts=1,
        max_rescues=3,
        retry_delays=[0.0],
        timeout_seconds=None,
        priority=0,
        countdown=None,
        eta=None,
        idempotency_key="signup-42",
    )
    assert created is False
    assert again == first
    assert len(await store.list_runs(state=None, task=None, limit=10, cursor=None)) == 1


async def test_two_submissions_racing_with_one_idempotency_key_store_one_run(
    store: Store, second_store: Store
) -> None:
    options: dict[str, Any] = {
        "task": TASK,
        "args": ["x"],
        "kwargs": {},
        "max_attempts": 1,
        "max_rescues": 3,
        "retry_delays": [0.0],
        "timeout_seconds": None,
        "priority": 0,
        "countdown": None,
        "eta": None,
        "idempotency_key": "race",
    }
    (one, created_one), (two, created_two) = await asyncio.gather(
        store.insert_run(**options), second_store.insert_run(**options)
    )
    assert sorted([created_one, created_two]) == [False, True]
    assert one["id"] == two["id"]
    assert len(await store.list_runs(state=None, task=None, limit=10, cursor=None)) == 1


async def test_an_eta_is_stored_as_the_same_instant_in_utc(store: Store) -> None:
    eta = datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=timezone(timedelta(hours=2)))
    row = await submit(store, eta=eta)
    assert row["scheduled_at"] == eta
    assert (await fetch(store, row["id"]))["scheduled_at"].utcoffset() == timedelta(0)


async def test_an_idempotency_key_is_unique_per_task_not_across_tasks(store: Store) -> None:
    one = await submit(store, task="a", idempotency_key="k")
    two = await submit(store, task="b", idempotency_key="k")
    assert one["id"] != two["id"]


async def test_an_idempotency_key_reused_with_other_arguments_is_a_conflict(
    store: Store, db_url: str
) -> None:
    hub = BgTasks(db_url)

    @hub.task
    def add(a: int, b: int) -> int:
        return a + b

    route = StoreRoute(store, None)
    keyed = Schedule(idempotency_key="k")
    first, created = await route.submit_row(add, [1, 2], {}, keyed)
    assert created
    replay, created = await route.submit_row(add, [1, 2], {}, keyed)
    assert not created and replay.id == first.id
    with pytest.raises(IdempotencyConflict, match=str(first.id)):
        await route.submit_row(add, [1, 3], {}, keyed)
    listed = await store.list_runs(state=None, task="add", limit=10, cursor=None)
    assert [r["args"] for r in listed] == [[1, 2]]


# -- ③ claims ----------------------------------------------------------------


async def test_a_claim_never_takes_more_than_the_free_credit(store: Store) -> None:
    for _ in range(5):
        await submit(store)
    first = await claim(store, slots=3)
    assert len(first) == 3
    assert await claim(store, slots=3) == []
    await apply(store, report(first[0], "COMPLETED"))
    assert len(await claim(store, slots=3)) == 1
    assert await claim(store, slots=3) == []


async def test_a_claim_counts_only_that_workers_own_runs_against_its_credit(
    store: Store,
) -> None:
    for _ in range(5):
        await submit(store)
    assert len(await claim(store, "w1", slots=3)) == 3
    assert len(await claim(store, "w2", slots=3)) == 2


async def test_a_claim_with_no_free_credit_changes_nothing(store: Store) -> None:
    runs_ = [await submit(store) for _ in range(3)]
    assert await claim(store, slots=0) == []
    for row in runs_:
        assert await fetch(store, row["id"]) == row


async def test_a_claim_changes_no_more_rows_than_it_returns(store: Store) -> None:
    for _ in range(6):
        await submit(store)
    claimed = {r["id"] for r in await claim(store, slots=2)}
    listed = await store.list_runs(state=None, task=None, limit=100, cursor=None)
    pending = {r["id"] for r in listed if r["state"] == "PENDING"}
    assert len(claimed) == 2 and pending == claimed
    for row in listed:
        if row["id"] not in claimed:
            assert row["state"] == "SCHEDULED"
            assert row["attempt"] == 0
            assert row["worker_id"] is None and row["lease_token"] is None


async def test_a_claim_takes_higher_priority_first_then_the_earliest_scheduled(
    store: Store,
) -> None:
    now = datetime.now(UTC)
    low_late = await submit(store, priority=0, eta=now - timedelta(seconds=10))
    high_late = await submit(store, priority=5, eta=now - timedelta(seconds=10))
    high_early = await submit(store, priority=5, eta=now - timedelta(seconds=20))
    low_early = await submit(store, priority=0, eta=now - timedelta(seconds=40))
    negative = await submit(store, priority=-1, eta=now - timedelta(seconds=50))
    order = [(await claim_one(store, f"w{i}"))["id"] for i in range(5)]
    expected = [high_early, high_late, low_early, low_late, negative]
    assert order == [r["id"] for r in expected]


async def test_a_claim_returns_its_batch_in_priority_order(store: Store) -> None:
    now = datetime.now(UTC)
    low = await submit(store, priority=0, eta=now - timedelta(seconds=30))
    high = await submit(store, priority=9, eta=now - timedelta(seconds=1))
    mid = await submit(store, priority=4, eta=now - timedelta(seconds=2))
    claimed = await claim(store, slots=10)
    assert [r["id"] for r in claimed] == [high["id"], mid["id"], low["id"]]


async def test_a_claim_skips_runs_not_yet_due(store: Store) -> None:
    await submit(store, countdown=3600)
    await submit(store, eta=datetime.now(UTC) + timedelta(hours=1))
    due = await submit(store, eta=datetime.now(UTC) - timedelta(seconds=1))
    assert [r["id"] for r in await claim(store)] == [due["id"]]
    assert await claim(store, "w2") == []


async def test_a_countdown_run_becomes_claimable_once_due(store: Store) -> None:
    row = await submit(store, countdown=0.2)
    assert await claim(store) == []
    claimed = await eventually(lambda: claim(store))
    assert [r["id"] for r in claimed] == [row["id"]]


async def test_next_due_is_the_earliest_waiting_run_of_those_tasks(store: Store) -> None:
    assert await store.next_due([TASK]) is None
    later = datetime(2031, 1, 1, 12, 0, 0, 250000, tzinfo=UTC)
    await submit(store, eta=later + timedelta(hours=1))
    await submit(store, eta=later)
    await submit(store, task="other", eta=later - timedelta(hours=1))
    assert await store.next_due([TASK]) == later
    assert await store.next_due([TASK, "other"]) == later - timedelta(hours=1)
    assert await store.next_due(["nobody"]) is None


async def test_waiting_says_whether_a_run_is_due_and_when_the_next_falls_due(
    store: Store,
) -> None:
    assert await store.waiting([TASK]) == (False, None)
    later = datetime(2031, 1, 1, 12, 0, 0, 250000, tzinfo=UTC)
    await submit(store, eta=later)
    assert await store.waiting([TASK]) == (False, later)
    due = await submit(store, task="other")
    assert await store.waiting([TASK]) == (False, later)
    assert await store.waiting(["other", TASK]) == (True, later)
    await claim(store, tasks=("other",))
    assert await store.waiting(["other"]) == (False, None)
    assert (await store.get_run(due["id"]) or {}).get("state") == "PENDING"


async def test_get_runs_reads_many_runs_in_one_call_and_skips_unknown_ids(store: Store) -> None:
    first, second = await submit(store), await submit(store)
    rows = await store.get_runs([first["id"], uuid.uuid4(), second["id"]])
    assert sorted(r["id"] for r in rows) == sorted([first["id"], second["id"]])
    assert await store.get_runs([]) == []


async def test_a_claim_takes_only_the_named_tasks(store: Store) -> None:
    mine = await submit(store, task="a")
    also_mine = await submit(store, task="b")
    other = await submit(store, task="c")
    claimed = await claim(store, tasks=("a", "b"))
    assert {r["id"] for r in claimed} == {mine["id"], also_mine["id"]}
    assert (await fetch(store, other["id"]))["state"] == "SCHEDULED"


async def test_a_claim_leases_the_run_to_the_worker(store: Store) -> None:
    row = await submit(store, args=[1, "x"], kwargs={"k": [1]}, timeout_seconds=7.0)
    delivery = await claim_one(store, "host:1:abc")
    assert delivery["id"] == row["id"]
    assert delivery["task"] == TASK
    assert delivery["attempt"] == 1
    assert delivery["args"] == [1, "x"] and delivery["kwargs"] == {"k": [1]}
    assert delivery["timeout_seconds"] == 7.0
    assert isinstance(delivery["lease_token"], str) and len(delivery["lease_token"]) >= 16
    stored = await fetch(store, row["id"])
    assert stored["state"] == "PENDING"
    assert stored["worker_id"] == "host:1:abc"
    assert stored["attempt"] == 1
    assert stored["lease_token"] == delivery["lease_token"]
    assert stored["lease_expires_at"] > stored["created_at"] + timedelta(seconds=LEASE / 2)


async def test_every_claim_of_a_run_issues_a_new_lease_token(store: Store) -> None:
    await submit(store)
    first = await claim_one(store)
    assert await store.release_unsent([(first["id"], first["lease_token"])]) == 1
    second = await claim_one(store)
    assert second["id"] == first["id"]
    assert second["lease_token"] != first["lease_token"]


async def test_two_workers_claiming_at_once_never_get_the_same_run_and_together_get_all(
    store: Store, second_store: Store
) -> None:
    for round_ in range(3):
        ids = {(await submit(store))["id"] for _ in range(20)}
        one, two = await asyncio.gather(
            store.claim(worker_id=f"a{round_}", tasks=[TASK], slots=12, lease_seconds=LEASE),
            second_store.claim(worker_id=f"b{round_}", tasks=[TASK], slots=12, lease_seconds=LEASE),
        )
        got_one, got_two = {r["id"] for r in one}, {r["id"] for r in two}
        assert len(got_one) == len(one) and len(got_two) == len(two)
        assert not got_one & got_two
        assert got_one | got_two == ids
        for run_id in got_one:
            assert (await fetch(store, run_id))["worker_id"] == f"a{round_}"
        for run_id in got_two:
            assert (await fetch(store, run_id))["worker_id"] == f"b{round_}"


async def test_a_claim_shared_among_feeds_takes_its_share_of_a_small_batch(
    store: Store,
) -> None:
    for _ in range(3):
        await submit(store)
    first = await store.claim(worker_id="w1", tasks=[TASK], slots=50, lease_seconds=LEASE, feeds=2)
    second = await store.claim(worker_id="w2", tasks=[TASK], slots=50, lease_seconds=LEASE, feeds=2)
    assert (len(first), len(second)) == (2, 1)


async def test_a_claim_shared_among_feeds_still_takes_a_lone_run(store: Store) -> None:
    await submit(store)
    taken = await store.claim(worker_id="w1", tasks=[TASK], slots=5, lease_seconds=LEASE, feeds=3)
    assert len(taken) == 1


async def test_a_claim_shared_among_feeds_takes_its_whole_credit_from_a_backlog(
    store: Store,
) -> None:
    for _ in range(30):
        await submit(store)
    await submit(store, task="other")
    taken = await store.claim(
        worker_id="w1", tasks=[TASK, "other"], slots=8, lease_seconds=LEASE, feeds=3
    )
    assert len(taken) == 8


async def test_a_claim_says_whether_it_left_nothing_due_for_its_worker(store: Store) -> None:
    for _ in range(5):
        await submit(store)
    limited = await claim(store, "w1", slots=3)
    assert len(limited) == 3 and not limited.exhausted  # its credit ran out first
    rest = await claim(store, "w2", slots=10)
    assert len(rest) == 2 and rest.exhausted  # it took every due run
    for _ in range(4):
        await submit(store)
    shared = await store.claim(worker_id="w3", tasks=[TASK], slots=10, lease_seconds=LEASE, feeds=2)
    assert len(shared) == 2 and not shared.exhausted  # its share: the rest is the other feed's
    assert len(await claim(store, "w4")) == 2
    assert not (await claim(store, "w5")).exhausted  # none taken: the feed reads what waits


async def test_a_claim_for_one_feed_takes_every_due_run_its_credit_allows(store: Store) -> None:
    for _ in range(3):
        await submit(store)
    assert len(await claim(store, slots=50)) == 3


# -- re-sending and releasing -------------------------------------------------


async def test_leased_to_resends_the_pending_runs_of_that_worker(store: Store) -> None:
    for _ in range(3):
        await submit(store)
    await submit(store, task="other")
    started, waiting, also_waiting = await claim(store, "w1")
    await claim(store, "w2", tasks=("other",))
    assert await apply(store, report(started, "RUNNING")) == ["accepted"]
    resent = await store.leased_to("w1", [TASK])
    assert {r["id"] for r in resent} == {waiting["id"], also_waiting["id"]}
    assert {r["lease_token"] for r in resent} == {waiting["lease_token"]}
    assert all(r["attempt"] == 1 for r in resent)
    assert await store.leased_to("w2", [TASK]) == []
    assert await store.leased_to("w1", ["other"]) == []


async def test_release_unsent_returns_runs_to_scheduled_without_spending_an_attempt(
    store: Store,
) -> None:
    for _ in range(2):
        await submit(store)
    claimed = await claim(store)
    leases = [(r["id"], r["lease_token"]) for r in claimed]
    assert await store.release_unsent(leases) == 2
    for delivery in claimed:
        row = await fetch(store, delivery["id"])
        assert row["state"] == "SCHEDULED"
        assert row["attempt"] == 0
        assert row["worker_id"] is None and row["lease_expires_at"] is None
    assert [r["attempt"] for r in await claim(store)] == [1, 1]


async def test_release_unsent_leaves_started_runs_and_other_leases_alone(store: Store) -> None:
    for _ in range(2):
        await submit(store)
    started, waiting = await claim(store)
    await apply(store, report(started, "RUNNING"))
    leases = [(started["id"], started["lease_token"]), (waiting["id"], "not-the-token")]
    assert await store.release_unsent(leases) == 0
    assert (await fetch(store, started["id"]))["state"] == "RUNNING"
    assert (await fetch(store, waiting["id"]))["state"] == "PENDING"
    assert await store.release_unsent([]) == 0


# -- ⑤ reports ---------------------------------------------------------------


async def test_a_running_report_is_accepted_then_its_repeat_is_a_duplicate(
    store: Store,
) -> None:
    await submit(store)
    delivery = await claim_one(store)
    assert await apply(store, report(delivery, "RUNNING")) == ["accepted"]
    row = await fetch(store, delivery["id"])
    assert row["state"] == "RUNNING" and row["started_at"] is not None
    assert await apply(store, report(delivery, "RUNNING")) == ["duplicate"]
    assert await fetch(store, delivery["id"]) == row


async def test_a_completed_report_stores_the_result_and_ends_the_lease(store: Store) -> None:
    await submit(store)
    delivery = await claim_one(store)
    await apply(store, report(delivery, "RUNNING"))
    result = {"sent": True, "to": ["ä@example.com"], "note": "a\nb"}
    assert await apply(store, report(delivery, "COMPLETED", result=result)) == ["accepted"]
    row = await fetch(store, delivery["id"])
    assert row["state"] == "COMPLETED"
    assert row["result"] == result
    assert row["error"] is None
    assert row["finished_at"] is not None and row["finished_at"] >= row["started_at"]
    assert row["lease_expires_at"] is None


async def test_a_repeated_identical_completed_report_is_a_duplicate(store: Store) -> None:
    await submit(store)
    delivery = await claim_one(store)
    done = report(delivery, "COMPLETED", result=[1, "two"])
    assert await apply(store, done) == ["accepted"]
    row = await fetch(store, delivery["id"])
    assert await apply(store, done) == ["duplicate"]
    assert await fetch(store, delivery["id"]) == row


async def test_a_repeated_completed_report_with_another_result_is_stale(store: Store) -> None:
    await submit(store)
    delivery = await claim_one(store)
    await apply(store, report(delivery, "COMPLETED", result="first"))
    row = await fetch(store, delivery["id"])
    assert await apply(store, report(delivery, "COMPLETED", result="second")) == ["stale"]
    assert await fetch(store, delivery["id"]) == row


@pytest.mark.parametrize("final", ["COMPLETED", "FAILED"])
async def test_a_start_report_for_a_run_its_lease_already_settled_is_stale(
    store: Store, final: str
) -> None:
    """A worker starts a confirmed run on `accepted` or `duplicate`: a re-sent
    delivery of a run just settled must be told `stale` (do not run it)."""
    await submit(store)
    delivery = await claim_one(store)
    settle = report(delivery, final, result=1 if final == "COMPLETED" else None, error=None)
    assert await apply(store, settle) == ["accepted"]
    row = await fetch(store, delivery["id"])
    assert row["state"] == final
    assert await apply(store, report(delivery, "RUNNING")) == ["stale"]
    assert await fetch(store, delivery["id"]) == row


async def test_a_report_with_the_wrong_lease_token_is_stale_and_changes_nothing(
    store: Store,
) -> None:
    await submit(store)
    delivery = await claim_one(store)
    row = await fetch(store, delivery["id"])
    forged = {**delivery, "lease_token": uuid.uuid4().hex}
    for state in ("RUNNING", "COMPLETED", "FAILED", "CANCELLED", "RELEASED"):
        assert await apply(store, report(forged, state, error=error())) == ["stale"]
        assert await fetch(store, delivery["id"]) == row
    assert len(await store.run_history(delivery["id"])) == 2


async def test_a_report_for_an_unknown_run_is_unknown(store: Store) -> None:
    ghost = {"id": uuid.uuid4(), "lease_token": uuid.uuid4().hex}
    for state in ("RUNNING", "COMPLETED", "FAILED", "CANCELLED", "RELEASED"):
        assert await apply(store, report(ghost, state, error=error())) == ["unknown"]


async def test_a_batch_gets_one_outcome_per_report_in_order(store: Store) -> None:
    for _ in range(2):
        await submit(store)
    first, second = await claim(store)
    ghost = {"id": uuid.uuid4(), "lease_token": "x"}
    outcomes = await apply(
        store,
        report(first, "RUNNING"),
        report(ghost, "RUNNING"),
        report(first, "RUNNING"),
        report({**second, "lease_token": "old"}, "RUNNING"),
        report(second, "COMPLETED", result=2),
    )
    assert outcomes == ["accepted", "unknown", "duplicate", "stale", "accepted"]


async def test_a_failure_with_retries_left_is_rescheduled_after_its_back_off(
    store: Store,
) -> None:
    await submit(store, max_attempts=3, retry_delays=[60.0])
    delivery = await claim_one(store)
    await apply(store, report(delivery, "RUNNING"))
    before = await clock(store)
    outcome = await apply(store, report(delivery, "FAILED", error=error("KeyError", "'id'")))
    after = await clock(store)
    assert outcome == ["accepted"]
    row = await fetch(store, delivery["id"])
    assert row["state"] == "SCHEDULED"
    assert row["attempt"] == 1
    assert row["error"] == {"type": "KeyError", "message": "'id'", "traceback": "Traceback ..."}
    assert row["worker_id"] is None and row["lease_expires_at"] is None
    assert row["finished_at"] is None
    margin = timedelta(milliseconds=5)  # SQLite's clock is the app's, read twice
    assert before + timedelta(seconds=60) - margin <= row["scheduled_at"]
    assert row["scheduled_at"] <= after + timedelta(seconds=60) + margin
    assert await claim(store) == []


async def test_each_retry_waits_its_own_back_off_and_the_last_one_repeats(
    store: Store,
) -> None:
    await submit(store, max_attempts=4, retry_delays=[10.0, 100.0])
    waits = []
    for _ in range(3):
        delivery = await claim_one(store)
        before = await clock(store)
        await apply(store, report(delivery, "FAILED", error=error()))
        row = await fetch(store, delivery["id"])
        assert row["state"] == "SCHEDULED"
        waits.append(round((row["scheduled_at"] - before).total_seconds()))
        await make_due(store, delivery["id"])
    assert waits == [10, 100, 100]
    last = await claim_one(store)
    assert last["attempt"] == 4
    await apply(store, report(last, "FAILED", error=error()))
    assert (await fetch(store, last["id"]))["state"] == "FAILED"


async def test_a_failure_with_no_retries_left_ends_failed(store: Store) -> None:
    await submit(store, max_attempts=2, retry_delays=[0.0])
    for attempt in (1, 2):
        delivery = await claim_one(store)
        assert delivery["attempt"] == attempt
        await apply(store, report(delivery, "RUNNING"))
        outcome = await apply(store, report(delivery, "FAILED", error=error(message=str(attempt))))
        assert outcome == ["accepted"]
    row = await fetch(store, delivery["id"])
    assert row["state"] == "FAILED"
    assert row["error"]["message"] == "2"
    assert row["finished_at"] is not None
    assert row["lease_expires_at"] is None
    assert await apply(store, report(delivery, "FAILED", error=error())) == ["duplicate"]


async def test_a_failure_of_a_run_with_a_cancel_request_is_not_retried(store: Store) -> None:
    await submit(store, max_attempts=5)
    delivery = await claim_one(store)
    await store.cancel_run(delivery["id"])
    await apply(store, report(delivery, "FAILED", error=error()))
    assert (await fetch(store, delivery["id"]))["state"] == "FAILED"


async def test_a_cancelled_report_ends_the_run_cancelled(store: Store) -> None:
    await submit(store)
    delivery = await claim_one(store)
    await store.cancel_run(delivery["id"])
    await apply(store, report(delivery, "RUNNING"))
    assert await apply(store, report(delivery, "CANCELLED")) == ["accepted"]
    row = await fetch(store, delivery["id"])
    assert row["state"] == "CANCELLED"
    assert row["finished_at"] is not None and row["lease_expires_at"] is None
    assert await apply(store, report(delivery, "CANCELLED")) == ["duplicate"]


async def test_releasing_a_pending_run_reschedules_it_without_spending_an_attempt(
    store: Store,
) -> None:
    await submit(store)
    delivery = await claim_one(store)
    assert await apply(store, report(delivery, "RELEASED")) == ["accepted"]
    row = await fetch(store, delivery["id"])
    assert row["state"] == "SCHEDULED"
    assert (row["attempt"], row["rescues"]) == (0, 0)
    assert row["worker_id"] is None and row["lease_expires_at"] is None
    assert (await claim_one(store, "w2"))["attempt"] == 1


async def test_releasing_a_running_run_reschedules_it_as_a_rescue(store: Store) -> None:
    await submit(store)
    delivery = await claim_one(store)
    await apply(store, report(delivery, "RUNNING"))
    assert await apply(store, report(delivery, "RELEASED")) == ["accepted"]
    row = await fetch(store, delivery["id"])
    assert row["state"] == "SCHEDULED"
    assert (row["attempt"], row["rescues"]) == (1, 1)
    assert row["worker_id"] is None and row["lease_expires_at"] is None
    assert (await claim_one(store, "w2"))["attempt"] == 2


async def test_a_completed_result_over_max_result_bytes_is_stored_as_failed(
    store: Store,
) -> None:
    await submit(store)
    delivery = await claim_one(store)
    outcome = await apply(
        store, report(delivery, "COMPLETED", result="x" * 500), max_result_bytes=100
    )
    assert outcome == ["accepted"]
    row = await fetch(store, delivery["id"])
    assert row["state"] == "FAILED"
    assert row["result"] is None
    assert row["error"]["type"] == "ResultTooLarge"
    assert "100" in row["error"]["message"]


async def test_a_result_at_max_result_bytes_is_stored(store: Store) -> None:
    await submit(store)
    delivery = await claim_one(store)
    result = "x" * 98  # 100 bytes as JSON, with its quotes
    outcome = await apply(store, report(delivery, "COMPLETED", result=result), max_result_bytes=100)
    assert outcome == ["accepted"]
    assert (await fetch(store, delivery["id"]))["result"] == result


# -- heartbeats --------------------------------------------------------------


async def test_a_heartbeat_renews_only_the_leases_the_worker_holds(store: Store) -> None:
    for _ in range(3):
        await submit(store)
    mine = await claim_one(store, "w1")
    [other_token] = await claim(store, "w1", slots=2)  # another claim: another token
    theirs = await claim_one(store, "w2")
    before = {r: (await fetch(store, r))["lease_expires_at"] for r in (mine["id"], theirs["id"])}
    other_before = (await fetch(store, other_token["id"]))["lease_expires_at"]
    renewed, stop, cancel = await store.heartbeat(
        worker_id="w1",
        held=[
            (mine["id"], mine["lease_token"]),
            (other_token["id"], "an-old-token"),
            (theirs["id"], theirs["lease_token"]),
        ],
        lease_seconds=3600,
    )
    assert renewed == [mine["id"]]
    assert set(stop) == {other_token["id"], theirs["id"]}
    assert cancel == []
    assert (await fetch(store, mine["id"]))["lease_expires_at"] > before[mine["id"]]
    assert (await fetch(store, theirs["id"]))["lease_expires_at"] == before[theirs["id"]]
    assert (await fetch(store, other_token["id"]))["lease_expires_at"] == other_before


async def test_a_heartbeat_with_a_stale_token_does_not_renew_that_lease(store: Store) -> None:
    for _ in range(2):
        await submit(store)
    held, stale = await claim(store, "w1", slots=2)  # one claim: one token for both
    before = (await fetch(store, stale["id"]))["lease_expires_at"]
    renewed, stop, _ = await store.heartbeat(
        worker_id="w1",
        held=[(held["id"], held["lease_token"]), (stale["id"], "an-old-token")],
        lease_seconds=3600,
    )
    assert (renewed, stop) == ([held["id"]], [stale["id"]])
    assert (await fetch(store, stale["id"]))["lease_expires_at"] == before


async def test_a_heartbeat_renews_running_runs_too(store: Store) -> None:
    await submit(store)
    delivery = await claim_one(store)
    await apply(store, report(delivery, "RUNNING"))
    await expire_leases(store, delivery["id"])
    renewed, stop, _ = await store.heartbeat(
        worker_id="w1", held=[(delivery["id"], delivery["lease_token"])], lease_seconds=LEASE
    )
    assert (renewed, stop) == ([delivery["id"]], [])
    assert await reap_expired(store) == []


async def test_a_heartbeat_tells_the_worker_to_stop_runs_it_no_longer_holds(
    store: Store,
) -> None:
    for _ in range(3):
        await submit(store)
    done, lost, unmentioned = await claim(store, "w1")
    await apply(store, report(done, "COMPLETED"))
    await expire_leases(store, lost["id"])
    await reap_expired(store)
    held = [(r["id"], r["lease_token"]) for r in (done, lost)] + [(uuid.uuid4(), "t")]
    renewed, stop, cancel = await store.heartbeat(worker_id="w1", held=held, lease_seconds=LEASE)
    assert renewed == [] and cancel == []
    assert set(stop) == {done["id"], lost["id"], held[2][0]}
    assert unmentioned["id"] not in stop


async def test_a_heartbeat_tells_the_worker_to_cancel_runs_with_a_cancel_request(
    store: Store,
) -> None:
    for _ in range(2):
        await submit(store)
    wanted, kept = await claim(store, "w1")
    await apply(store, report(wanted, "RUNNING"))
    await store.cancel_run(wanted["id"])
    held = [(r["id"], r["lease_token"]) for r in (wanted, kept)]
    renewed, stop, cancel = await store.heartbeat(worker_id="w1", held=held, lease_seconds=LEASE)
    assert set(renewed) == {wanted["id"], kept["id"]}
    assert stop == []
    assert cancel == [wanted["id"]]


async def test_a_heartbeat_with_nothing_held_answers_nothing(store: Store) -> None:
    assert await store.heartbeat(worker_id="w1", held=[], lease_seconds=LEASE) == ([], [], [])


# -- the reaper --------------------------------------------------------------


async def test_an_expired_lease_sends_the_run_back_to_scheduled_as_a_rescue(
    store: Store,
) -> None:
    for _ in range(2):
        await submit(store)
    waiting, started = await claim(store)
    await apply(store, report(started, "RUNNING"))
    await expire_leases(store, waiting["id"], started["id"])
    reaped = await reap_expired(store)
    assert sorted(reaped) == sorted([(waiting["id"], "SCHEDULED"), (started["id"], "SCHEDULED")])
    for delivery in (waiting, started):
        row = await fetch(store, delivery["id"])
        assert row["state"] == "SCHEDULED"
        assert (row["attempt"], row["rescues"]) == (1, 1)
        assert row["worker_id"] is None and row["lease_expires_at"] is None
        assert row["finished_at"] is None and row["error"] is None
    assert await reap_expired(store) == []
    assert [r["attempt"] for r in await claim(store, "w2")] == [2, 2]


async def test_a_lease_expires_on_the_stores_clock_without_a_heartbeat(store: Store) -> None:
    row = await submit(store)
    await store.claim(worker_id="w1", tasks=[TASK], slots=1, lease_seconds=0.05)
    assert await eventually(lambda: reap_expired(store)) == [(row["id"], "SCHEDULED")]


async def test_a_run_whose_rescues_are_spent_ends_crashed_worker_lost(store: Store) -> None:
    row = await submit(store, max_rescues=2, max_attempts=5)
    for rescues in (1, 2):
        delivery = await claim_one(store)
        await expire_leases(store, row["id"])
        assert await reap_expired(store) == [(row["id"], "SCHEDULED")]
        assert (await fetch(store, row["id"]))["rescues"] == rescues
    delivery = await claim_one(store)
    await apply(store, report(delivery, "RUNNING"))
    await expire_leases(store, row["id"])
    assert await reap_expired(store) == [(row["id"], "CRASHED")]
    crashed = await fetch(store, row["id"])
    assert crashed["state"] == "CRASHED"
    assert crashed["attempt"] == 3 and crashed["rescues"] == 2
    assert crashed["error"]["type"] == "WorkerLost"
    assert crashed["finished_at"] is not None and crashed["lease_expires_at"] is None
    assert (await store.run_history(row["id"]))[-1]["reason"] == "worker_lost"


async def test_max_rescues_zero_crashes_the_run_at_the_first_loss(store: Store) -> None:
    row = await submit(store, max_rescues=0, max_attempts=3)
    await claim_one(store)
    await expire_leases(store, row["id"])
    assert await reap_expired(store) == [(row["id"], "CRASHED")]
    crashed = await fetch(store, row["id"])
    assert crashed["error"]["type"] == "WorkerLost"
    assert crashed["rescues"] == 0


async def test_an_expired_run_with_a_cancel_request_ends_cancelled(store: Store) -> None:
    row = await submit(store, max_rescues=3)
    delivery = await claim_one(store)
    await apply(store, report(delivery, "RUNNING"))
    await store.cancel_run(row["id"])
    await expire_leases(store, row["id"])
    assert await reap_expired(store) == [(row["id"], "CANCELLED")]
    cancelled = await fetch(store, row["id"])
    assert cancelled["state"] == "CANCELLED"
    assert cancelled["error"] is None
    assert cancelled["finished_at"] is not None


async def test_runs_whose_lease_has_not_expired_are_not_reaped(store: Store) -> None:
    for _ in range(3):
        await submit(store)
    expired, fresh, started = await claim(store)
    await apply(store, report(started, "RUNNING"))
    await expire_leases(store, expired["id"])
    untouched = {r["id"]: await fetch(store, r["id"]) for r in (fresh, started)}
    assert await reap_expired(store) == [(expired["id"], "SCHEDULED")]
    for run_id, row in untouched.items():
        assert await fetch(store, run_id) == row


async def test_finished_and_waiting_runs_are_never_reaped(store: Store) -> None:
    await submit(store)
    done = await claim_one(store)
    waiting = await submit(store)
    await apply(store, report(done, "COMPLETED"))
    await update_rows(
        store,
        runs.c.id.in_([waiting["id"], done["id"]]),
        lease_expires_at=datetime.now(UTC) - timedelta(minutes=5),
    )
    assert await reap_expired(store) == []
    assert (await fetch(store, done["id"]))["state"] == "COMPLETED"
    assert (await fetch(store, waiting["id"]))["state"] == "SCHEDULED"


# -- ⑥ cancel ----------------------------------------------------------------


async def test_cancelling_a_scheduled_run_cancels_it_at_once(store: Store) -> None:
    row = await submit(store)
    cancelled = await store.cancel_run(row["id"])
    assert cancelled["state"] == "CANCELLED"
    assert cancelled["finished_at"] is not None
    assert await fetch(store, row["id"]) == cancelled
    assert await claim(store) == []


async def test_cancelling_a_leased_run_flags_it_and_keeps_its_state(store: Store) -> None:
    for _ in range(2):
        await submit(store)
    pending, running = await claim(store)
    await apply(store, report(running, "RUNNING"))
    for delivery, state in ((pending, "PENDING"), (running, "RUNNING")):
        flagged = await store.cancel_run(delivery["id"])
        assert flagged["state"] == state
        assert flagged["cancel_requested"] is True
        assert flagged["finished_at"] is None
        stored = await fetch(store, delivery["id"])
        assert stored["state"] == state and stored["cancel_requested"] is True
        assert stored["lease_token"] == delivery["lease_token"]


async def test_cancelling_a_finished_run_raises_run_finished(store: Store) -> None:
    row = await submit(store)
    delivery = await claim_one(store)
    await apply(store, report(delivery, "COMPLETED", result=1))
    with pytest.raises(RunFinished, match="COMPLETED"):
        await store.cancel_run(row["id"])
    assert (await fetch(store, row["id"]))["cancel_requested"] is False


async def test_cancelling_an_unknown_run_raises_run_not_found(store: Store) -> None:
    with pytest.raises(RunNotFound):
        await store.cancel_run(uuid.uuid4())


# -- history -----------------------------------------------------------------


async def test_the_history_records_every_transition_in_order_with_its_time(
    store: Store,
) -> None:
    row = await submit(store, max_attempts=2)
    delivery = await claim_one(store)
    await apply(store, report(delivery, "RUNNING"))
    await store.heartbeat(
        worker_id="w1", held=[(row["id"], delivery["lease_token"])], lease_seconds=LEASE
    )
    await apply(store, report(delivery, "FAILED", error=error()))
    delivery = await claim_one(store)
    await store.cancel_run(row["id"])  # flags the leased run: no transition
    await apply(store, report(delivery, "RUNNING"))
    await apply(store, report(delivery, "COMPLETED", result="ok"))
    entries = await store.run_history(row["id"])
    steps = [(e["from_state"], e["to_state"], e["attempt"]) for e in entries]
    assert steps == [
        (None, "SCHEDULED", 0),
        ("SCHEDULED", "PENDING", 1),
        ("PENDING", "RUNNING", 1),
        ("RUNNING", "SCHEDULED", 1),
        ("SCHEDULED", "PENDING", 2),
        ("PENDING", "RUNNING", 2),
        ("RUNNING", "COMPLETED", 2),
    ]
    times = [e["at"] for e in entries]
    assert all(t.tzinfo is not None for t in times)
    assert times == sorted(times)
    assert times[0] == row["created_at"]
    final = await fetch(store, row["id"])
    assert times[-1] == final["finished_at"]
    assert entries[3]["reason"] == "retry: ValueError"


async def test_the_history_records_losses_and_releases_with_their_reasons(
    store: Store,
) -> None:
    row = await submit(store, max_rescues=1)
    delivery = await claim_one(store)
    await store.release_unsent([(row["id"], delivery["lease_token"])])
    delivery = await claim_one(store)
    await apply(store, report(delivery, "RELEASED"))
    await claim_one(store)
    await expire_leases(store, row["id"])
    await reap_expired(store)
    await claim_one(store)
    await expire_leases(store, row["id"])
    await reap_expired(store)
    entries = await store.run_history(row["id"])
    steps = [(e["from_state"], e["to_state"], e["reason"]) for e in entries]
    assert steps == [
        (None, "SCHEDULED", None),
        ("SCHEDULED", "PENDING", None),
        ("PENDING", "SCHEDULED", "released_unsent"),
        ("SCHEDULED", "PENDING", None),
        ("PENDING", "SCHEDULED", "handed_back"),
        ("SCHEDULED", "PENDING", None),
        ("PENDING", "SCHEDULED", "worker_lost"),
        ("SCHEDULED", "PENDING", None),
        ("PENDING", "CRASHED", "worker_lost"),
    ]


async def test_the_history_of_an_unknown_run_is_empty(store: Store) -> None:
    assert await store.run_history(uuid.uuid4()) == []


# -- ⑥ listing ---------------------------------------------------------------


async def test_list_runs_returns_the_newest_first(store: Store) -> None:
    ids = [(await submit(store))["id"] for _ in range(5)]
    listed = await store.list_runs(state=None, task=None, limit=100, cursor=None)
    assert [r["id"] for r in listed] == ids[::-1]
    limited = await store.list_runs(state=None, task=None, limit=2, cursor=None)
    assert [r["id"] for r in limited] == ids[:-3:-1]


async def test_list_runs_filters_by_state_and_task(store: Store) -> None:
    a_waiting = await submit(store, task="a")
    a_leased = await submit(store, task="a")
    b_waiting = await submit(store, task="b")
    await store.cancel_run(a_waiting["id"])
    await claim(store, tasks=("a",))

    async def ids(**filters: Any) -> set[uuid.UUID]:
        options: dict[str, Any] = {"state": None, "task": None, **filters}
        return {r["id"] for r in await store.list_runs(limit=100, cursor=None, **options)}

    assert await ids(task="a") == {a_waiting["id"], a_leased["id"]}
    assert await ids(state=RunState.SCHEDULED) == {b_waiting["id"]}
    assert await ids(state=RunState.PENDING, task="a") == {a_leased["id"]}
    assert await ids(state=RunState.PENDING, task="b") == set()
    assert await ids(state=RunState.CANCELLED) == {a_waiting["id"]}


async def test_paging_with_a_cursor_visits_every_run_exactly_once(store: Store) -> None:
    ids = [(await submit(store))["id"] for _ in range(23)]
    # Several runs created in the same microsecond: the id breaks the tie.
    same_time = datetime.now(UTC).replace(microsecond=123456) - timedelta(hours=1)
    await update_rows(store, runs.c.id.in_(ids[5:12]), created_at=same_time)
    seen: list[uuid.UUID] = []
    cursor = None
    for _ in range(20):
        page = await store.list_runs(state=None, task=None, limit=5, cursor=cursor)
        seen.extend(r["id"] for r in page)
        if len(page) < 5:
            break
        token = encode_cursor(page[-1]["created_at"], page[-1]["id"])
        cursor = decode_cursor(token)
    assert sorted(seen) == sorted(ids)
    assert len(seen) == len(set(seen))


async def test_a_cursor_round_trips_and_a_forged_one_is_refused() -> None:
    at, run_id = datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=UTC), uuid.uuid4()
    token = encode_cursor(at, run_id)
    assert "=" not in token
    assert decode_cursor(token) == (at, run_id)
    with pytest.raises(ValueError):
        decode_cursor("not a cursor")


# -- fencing end to end -------------------------------------------------------


async def test_a_report_under_a_lost_lease_is_stale_and_the_successors_is_accepted(
    store: Store, second_store: Store
) -> None:
    row = await submit(store, max_attempts=3)
    lost = await claim_one(store, "w-a")
    assert await apply(store, report(lost, "RUNNING")) == ["accepted"]
    await expire_leases(store, row["id"])
    assert await reap_expired(store) == [(row["id"], "SCHEDULED")]
    successor = await claim_one(second_store, "w-b")
    assert successor["id"] == row["id"]
    assert successor["lease_token"] != lost["lease_token"]
    before = await fetch(store, row["id"])

    for state in ("RUNNING", "COMPLETED", "FAILED", "CANCELLED", "RELEASED"):
        stale = report(lost, state, result="from a", error=error())
        assert await apply(second_store, stale) == ["stale"], state
        assert await fetch(store, row["id"]) == before
    renewed, stop, _ = await store.heartbeat(
        worker_id="w-a", held=[(row["id"], lost["lease_token"])], lease_seconds=3600
    )
    assert (renewed, stop) == ([], [row["id"]])
    assert await fetch(store, row["id"]) == before

    assert await apply(store, report(successor, "RUNNING")) == ["accepted"]
    assert await apply(store, report(successor, "COMPLETED", result="from b")) == ["accepted"]
    done = await fetch(store, row["id"])
    assert (done["state"], done["result"], done["worker_id"]) == ("COMPLETED", "from b", "w-b")
    assert (done["attempt"], done["rescues"]) == (2, 1)


async def test_a_failure_reported_after_the_reaper_took_the_lease_back_is_stale(
    store: Store,
) -> None:
    row = await submit(store, max_attempts=3)
    lost = await claim_one(store)
    await apply(store, report(lost, "RUNNING"))
    await expire_leases(store, row["id"])
    await reap_expired(store)
    before = await fetch(store, row["id"])
    outcome = await apply(store, report(lost, "FAILED", error=error("LateError")))
    assert await fetch(store, row["id"]) == before  # the failure was not recorded...
    assert outcome == ["stale"]  # ...so the worker must not be told it was


# -- wake-ups between app processes --------------------------------------------


async def test_a_store_hears_other_processes_notifications_but_not_its_own(
    store: Store, second_store: Store
) -> None:
    if not store.is_pg:
        pytest.skip("NOTIFY is PostgreSQL's; SQLite's watcher reads data_version")
    heard: list[str | None] = []

    async def listening() -> bool:
        return heard == [None]  # the first pass after connecting

    async def theirs_heard() -> bool:
        return "theirs" in heard

    async with anyio.create_task_group() as tg:
        tg.start_soon(store.watch, heard.append)
        await eventually(listening)
        await store.notify(["ours"])  # sent on the listening connection: no echo
        await second_store.notify(["theirs"])
        await eventually(theirs_heard)
        tg.cancel_scope.cancel()
    assert heard == [None, "theirs"]


async def test_a_sqlite_store_hears_other_connections_commits_but_not_its_own(
    store: Store, second_store: Store
) -> None:
    if store.is_pg:
        pytest.skip("SQLite's watcher reads data_version; PostgreSQL's listens")
    heard: list[str | None] = []

    async def woken() -> bool:
        return bool(heard)

    async with anyio.create_task_group() as tg:
        tg.start_soon(store.watch, heard.append)
        await anyio.sleep(0.1)
        await submit(store)  # this process's own write: announced in-process
        await anyio.sleep(0.3)
        assert heard == []
        await submit(second_store)  # another process's
        await eventually(woken)
        tg.cancel_scope.cancel()
    assert heard == [None]
