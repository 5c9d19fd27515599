"""Report batches applied in bulk: `Store.apply_reports` applies every RUNNING
report of a batch in one statement, every COMPLETED report whose result fits
in another, and the rest one by one. Run on SQLite and PostgreSQL alike
against a real, fresh database. One behaviour per test."""

from __future__ import annotations

import uuid
from typing import Any

import anyio
import pytest
import sqlalchemy as sa

from fastapi_bgtasks.store import DeliveryRow, RunRow, Store, runs
from fastapi_bgtasks.wire import ErrorInfo
from tests.storekit import apply, connect, fetch, report, submit_run

pytestmark = pytest.mark.anyio

TASK = "send_email"
LEASE = 60.0
BIG = 1 << 20

# Results of every JSON shape, as a task may return them.
SHAPES: list[Any] = [
    {"to": ["ä@example.com"], "sent": True, "nested": {"n": [1, 2.5, None]}},
    [1, "two", [3.0, {"four": 4}], None, False],
    "héllo wörld ✓ 🎉 日本語",
    42,
    -7,
    2.5,
    True,
    False,
    "a\x00b",
    "",
    {},
    [],
]


# -- fixtures and helpers (as in tests/store/test_store.py) -------------------


async def submit(store: Store, task: str = TASK, **options: Any) -> RunRow:
    return await submit_run(store, task, **options)


async def claim(store: Store, slots: int = 10, worker: str = "w1") -> list[DeliveryRow]:
    return await store.claim(worker_id=worker, tasks=(TASK,), slots=slots, lease_seconds=LEASE)


async def claim_one(store: Store) -> DeliveryRow:
    claimed = await claim(store, slots=1)
    assert len(claimed) == 1
    return claimed[0]


async def leased_runs(store: Store, count: int, **options: Any) -> list[DeliveryRow]:
    """`count` runs submitted with `options` and claimed: PENDING under w1."""
    for _ in range(count):
        await submit(store, **options)
    claimed = await claim(store, slots=count)
    assert len(claimed) == count
    return claimed


async def steps(store: Store, run_id: uuid.UUID) -> list[tuple[str | None, str]]:
    return [(e["from_state"], e["to_state"]) for e in await store.run_history(run_id)]


async def scalar(store: Store, query: Any) -> Any:
    """One value read straight from the runs table, bypassing the JSON type."""
    async with connect(store) as conn:
        return await conn.scalar(query)


def error(kind: str = "ValueError", message: str = "boom") -> ErrorInfo:
    return ErrorInfo(type=kind, message=message, traceback="Traceback ...")


# -- one run, several reports ---------------------------------------------------


async def test_a_completed_listed_before_its_running_still_goes_through_running(
    store: Store,
) -> None:
    """Kinds are applied in lifecycle order, not batch order: the start lands
    before the result, so the history shows the run running."""
    [delivery] = await leased_runs(store, 1)
    outcomes = await apply(
        store, report(delivery, "COMPLETED", result="done"), report(delivery, "RUNNING")
    )
    assert outcomes == ["accepted", "accepted"]
    row = await fetch(store, delivery["id"])
    assert row["state"] == "COMPLETED"
    assert row["result"] == "done"
    assert row["started_at"] is not None
    assert row["finished_at"] is not None and row["started_at"] <= row["finished_at"]
    assert await steps(store, delivery["id"]) == [
        (None, "SCHEDULED"),
        ("SCHEDULED", "PENDING"),
        ("PENDING", "RUNNING"),
        ("RUNNING", "COMPLETED"),
    ]


async def test_a_completed_report_for_a_pending_run_is_accepted_and_sets_started_at(
    store: Store,
) -> None:
    """A worker sends only COMPLETED for a run that finished before its
    RUNNING report left; the history still shows the run RUNNING."""
    [delivery] = await leased_runs(store, 1)
    assert await apply(store, report(delivery, "COMPLETED", result=[1, 2])) == ["accepted"]
    row = await fetch(store, delivery["id"])
    assert row["state"] == "COMPLETED"
    assert row["result"] == [1, 2]
    assert row["started_at"] is not None and row["started_at"] == row["finished_at"]
    assert row["lease_expires_at"] is None and row["error"] is None
    assert (await steps(store, delivery["id"]))[-2:] == [
        ("PENDING", "RUNNING"),
        ("RUNNING", "COMPLETED"),
    ]


async def test_a_completed_report_keeps_the_start_time_its_running_report_set(
    store: Store,
) -> None:
    [delivery] = await leased_runs(store, 1)
    await apply(store, report(delivery, "RUNNING"))
    started_at = (await fetch(store, delivery["id"]))["started_at"]
    assert await apply(store, report(delivery, "COMPLETED", result=1)) == ["accepted"]
    row = await fetch(store, delivery["id"])
    assert row["started_at"] == started_at
    assert row["finished_at"] > started_at


async def test_a_running_report_for_a_run_already_running_under_that_lease_is_a_duplicate(
    store: Store,
) -> None:
    """In a bulk statement with another run's first start: only that one lands."""
    started, other = await leased_runs(store, 2)
    assert await apply(store, report(started, "RUNNING")) == ["accepted"]
    before = await fetch(store, started["id"])
    outcomes = await apply(store, report(started, "RUNNING"), report(other, "RUNNING"))
    assert outcomes == ["duplicate", "accepted"]
    assert await fetch(store, started["id"]) == before
    assert (await fetch(store, other["id"]))["state"] == "RUNNING"
    assert await steps(store, started["id"]) == [
        (None, "SCHEDULED"),
        ("SCHEDULED", "PENDING"),
        ("PENDING", "RUNNING"),
    ]


async def test_a_completed_repeated_in_one_batch_is_a_duplicate_and_the_result_stays(
    store: Store,
) -> None:
    [delivery] = await leased_runs(store, 1)
    done = report(delivery, "COMPLETED", result={"n": 1})
    assert await apply(store, done, done) == ["accepted", "duplicate"]
    row = await fetch(store, delivery["id"])
    assert row["state"] == "COMPLETED" and row["result"] == {"n": 1}
    assert (await steps(store, delivery["id"])).count(("RUNNING", "COMPLETED")) == 1


async def test_a_second_completed_with_another_result_in_one_batch_is_stale(
    store: Store,
) -> None:
    """The first in the batch goes in the bulk statement; the repeat cannot
    overwrite the result it stored."""
    [delivery] = await leased_runs(store, 1)
    outcomes = await apply(
        store,
        report(delivery, "COMPLETED", result="first"),
        report(delivery, "COMPLETED", result="second"),
    )
    assert outcomes == ["accepted", "stale"]
    assert (await fetch(store, delivery["id"]))["result"] == "first"


async def test_a_running_and_a_failure_of_one_run_in_one_batch_retry_it_after_running(
    store: Store,
) -> None:
    """The failure goes one by one, after the bulk start, even listed first."""
    [delivery] = await leased_runs(store, 1, max_attempts=2)
    outcomes = await apply(
        store, report(delivery, "FAILED", error=error()), report(delivery, "RUNNING")
    )
    assert outcomes == ["accepted", "accepted"]
    row = await fetch(store, delivery["id"])
    assert row["state"] == "SCHEDULED"
    assert row["error"]["type"] == "ValueError"
    assert (await steps(store, delivery["id"]))[-2:] == [
        ("PENDING", "RUNNING"),
        ("RUNNING", "SCHEDULED"),
    ]


async def test_a_batch_repeating_reports_already_applied_changes_nothing(store: Store) -> None:
    """A worker that re-sends a batch whose answer it lost gets a duplicate
    for the final report; the start report of a run already settled is
    `stale` (never leave to start it again), which a worker that has
    finished the run ignores."""
    [delivery] = await leased_runs(store, 1)
    batch = [report(delivery, "RUNNING"), report(delivery, "COMPLETED", result="ok")]
    assert await apply(store, *batch) == ["accepted", "accepted"]
    row = await fetch(store, delivery["id"])
    assert await apply(store, *batch) == ["stale", "duplicate"]
    assert await fetch(store, delivery["id"]) == row
    assert len(await steps(store, delivery["id"])) == 4


# -- many runs -------------------------------------------------------------------


async def test_a_batch_of_150_runs_starting_and_completing_accepts_every_report(
    store: Store,
) -> None:
    deliveries = await leased_runs(store, 150)
    shapes = [*SHAPES, None]
    results = {d["id"]: shapes[i % len(shapes)] for i, d in enumerate(deliveries)}
    batch = [report(d, "RUNNING") for d in deliveries]
    batch += [report(d, "COMPLETED", result=results[d["id"]]) for d in deliveries]
    assert await apply(store, *batch) == ["accepted"] * 300
    for d in deliveries:
        row = await fetch(store, d["id"])
        assert row["state"] == "COMPLETED"
        assert row["result"] == results[d["id"]]
        assert type(row["result"]) is type(results[d["id"]])
        is_null = sa.select(runs.c.result.is_(None)).where(runs.c.id == d["id"])
        assert bool(await scalar(store, is_null)) is (results[d["id"]] is None)
        assert row["started_at"] is not None and row["finished_at"] is not None
        assert await steps(store, d["id"]) == [
            (None, "SCHEDULED"),
            ("SCHEDULED", "PENDING"),
            ("PENDING", "RUNNING"),
            ("RUNNING", "COMPLETED"),
        ]


@pytest.mark.parametrize("result", SHAPES, ids=[repr(s)[:24] for s in SHAPES])
async def test_a_result_of_each_json_shape_completed_in_bulk_round_trips_exactly(
    store: Store, result: Any
) -> None:
    deliveries = await leased_runs(store, 3)
    batch = [report(d, "COMPLETED", result=result) for d in deliveries]
    assert await apply(store, *batch) == ["accepted"] * 3
    for d in deliveries:
        stored = (await fetch(store, d["id"]))["result"]
        assert stored == result
        assert type(stored) is type(result)


async def test_a_none_result_completed_in_bulk_is_stored_as_sql_null(store: Store) -> None:
    """Not the JSON text 'null': a NULL column, as a one-by-one report stores it."""
    nothing, something = await leased_runs(store, 2)
    outcomes = await apply(
        store,
        report(nothing, "COMPLETED", result=None),
        report(something, "COMPLETED", result=0),
    )
    assert outcomes == ["accepted", "accepted"]
    assert (await fetch(store, nothing["id"]))["result"] is None
    is_null = sa.select(runs.c.result.is_(None)).where(runs.c.id == nothing["id"])
    assert await scalar(store, is_null)
    is_null = sa.select(runs.c.result.is_(None)).where(runs.c.id == something["id"])
    assert not await scalar(store, is_null)


async def test_a_result_completed_in_bulk_is_stored_with_its_non_ascii_unescaped(
    store: Store,
) -> None:
    """The store serialises the result itself, keeping non-ASCII as is: its
    stored size is what max_result_bytes measured."""
    [delivery] = await leased_runs(store, 1)
    assert await apply(store, report(delivery, "COMPLETED", result="é🎉")) == ["accepted"]
    text = await scalar(
        store, sa.select(sa.cast(runs.c.result, sa.Text)).where(runs.c.id == delivery["id"])
    )
    assert text == '"é🎉"'


async def test_a_result_with_a_nul_character_completed_in_bulk_is_stored_escaped(
    store: Store,
) -> None:
    """PostgreSQL text cannot hold NUL: the stored JSON carries its escape."""
    [delivery] = await leased_runs(store, 1)
    assert await apply(store, report(delivery, "COMPLETED", result="a\x00é")) == ["accepted"]
    text = await scalar(
        store, sa.select(sa.cast(runs.c.result, sa.Text)).where(runs.c.id == delivery["id"])
    )
    assert "\x00" not in text and "\\u0000" in text
    assert (await fetch(store, delivery["id"]))["result"] == "a\x00é"


@pytest.mark.parametrize(
    "db_url",
    [
        pytest.param(
            "sqlite",
            marks=pytest.mark.xfail(
                strict=True,
                reason="SQLite stores results in a column of NUMERIC affinity: a JSON number "
                "beyond 64 bits comes back as a float, 1.0 as the integer 1",
            ),
        ),
        "postgres",
    ],
    indirect=True,
)
async def test_an_integer_beyond_64_bits_completed_in_bulk_round_trips_exactly(
    store: Store,
) -> None:
    [delivery] = await leased_runs(store, 1)
    result = 12345678901234567890123
    assert await apply(store, report(delivery, "COMPLETED", result=result)) == ["accepted"]
    assert (await fetch(store, delivery["id"]))["result"] == result


# -- outcomes ----------------------------------------------------------------------


async def test_a_bulk_batch_gives_each_report_its_own_outcome_in_batch_order(
    store: Store,
) -> None:
    first, second, forged_run, third = await leased_runs(store, 4)
    forged = {**forged_run, "lease_token": uuid.uuid4().hex}
    ghost = {"id": uuid.uuid4(), "lease_token": uuid.uuid4().hex}
    outcomes = await apply(
        store,
        report(first, "RUNNING"),
        report(forged, "COMPLETED", result="not mine"),
        report(second, "COMPLETED", result=2),
        report(ghost, "RUNNING"),
        report(first, "RUNNING"),
        report(forged, "RUNNING"),
        report(ghost, "COMPLETED", result=None),
        report(third, "COMPLETED", result=3),
    )
    assert outcomes == [
        "accepted",
        "stale",
        "accepted",
        "unknown",
        "duplicate",
        "stale",
        "unknown",
        "accepted",
    ]
    assert (await fetch(store, first["id"]))["state"] == "RUNNING"
    assert (await fetch(store, second["id"]))["result"] == 2
    assert (await fetch(store, third["id"]))["result"] == 3


async def test_a_report_with_a_wrong_lease_token_in_a_bulk_batch_changes_nothing(
    store: Store,
) -> None:
    mine, forged_run = await leased_runs(store, 2)
    before = await fetch(store, forged_run["id"])
    forged = {**forged_run, "lease_token": uuid.uuid4().hex}
    outcomes = await apply(
        store,
        report(mine, "RUNNING"),
        report(forged, "RUNNING"),
        report(mine, "COMPLETED", result="ok"),
        report(forged, "COMPLETED", result="stolen"),
    )
    assert outcomes == ["accepted", "stale", "accepted", "stale"]
    assert await fetch(store, forged_run["id"]) == before
    assert len(await steps(store, forged_run["id"])) == 2


async def test_the_outcome_of_an_accepted_bulk_report_names_the_new_state(
    store: Store,
) -> None:
    """The reports route wakes feeds from these states (a COMPLETED frees credit)."""
    started, done = await leased_runs(store, 2)
    applied = await store.apply_reports(
        [report(done, "COMPLETED", result=1), report(started, "RUNNING")],
        max_result_bytes=BIG,
    )
    assert applied == [
        ("accepted", {"id": done["id"], "state": "COMPLETED"}),
        ("accepted", {"id": started["id"], "state": "RUNNING"}),
    ]


# -- results refused -----------------------------------------------------------------


async def test_a_result_over_max_result_bytes_fails_only_its_own_run(store: Store) -> None:
    big, small, other = await leased_runs(store, 3)
    outcomes = await apply(
        store,
        report(big, "RUNNING"),
        report(small, "RUNNING"),
        report(big, "COMPLETED", result="x" * 500),
        report(small, "COMPLETED", result="x" * 10),
        report(other, "COMPLETED", result={"k": "v"}),
        max_result_bytes=100,
    )
    assert outcomes == ["accepted"] * 5
    row = await fetch(store, big["id"])
    assert row["state"] == "FAILED"
    assert row["result"] is None
    assert row["error"]["type"] == "ResultTooLarge"
    assert "100" in row["error"]["message"]
    assert (await fetch(store, small["id"]))["result"] == "x" * 10
    assert (await fetch(store, other["id"]))["result"] == {"k": "v"}


async def test_a_result_over_max_result_bytes_with_retries_left_is_retried(
    store: Store,
) -> None:
    big, other = await leased_runs(store, 2, max_attempts=3)
    outcomes = await apply(
        store,
        report(big, "COMPLETED", result="x" * 500),
        report(other, "COMPLETED", result="fits"),
        max_result_bytes=100,
    )
    assert outcomes == ["accepted", "accepted"]
    row = await fetch(store, big["id"])
    assert row["state"] == "SCHEDULED"
    assert row["error"]["type"] == "ResultTooLarge"
    assert row["reason"] == "retry: ResultTooLarge"
    assert (await fetch(store, other["id"]))["state"] == "COMPLETED"


async def test_a_result_at_max_result_bytes_counted_in_utf8_is_stored_in_bulk(
    store: Store,
) -> None:
    """'é' is two bytes as stored: 49 of them and the quotes make 100."""
    exact, over = await leased_runs(store, 2)
    outcomes = await apply(
        store,
        report(exact, "COMPLETED", result="é" * 49),
        report(over, "COMPLETED", result="é" * 50),
        max_result_bytes=100,
    )
    assert outcomes == ["accepted", "accepted"]
    assert (await fetch(store, exact["id"]))["result"] == "é" * 49
    assert (await fetch(store, over["id"]))["error"]["type"] == "ResultTooLarge"


async def test_a_nan_result_fails_only_its_own_run_as_not_serializable(store: Store) -> None:
    nan, fine = await leased_runs(store, 2)
    outcomes = await apply(
        store,
        report(nan, "RUNNING"),
        report(fine, "RUNNING"),
        report(nan, "COMPLETED", result={"score": float("nan")}),
        report(fine, "COMPLETED", result={"score": 0.5}),
    )
    assert outcomes == ["accepted"] * 4
    row = await fetch(store, nan["id"])
    assert row["state"] == "FAILED"
    assert row["result"] is None
    assert row["error"]["type"] == "NotSerializable"
    assert (await fetch(store, fine["id"]))["result"] == {"score": 0.5}


# -- every kind at once ------------------------------------------------------------------


async def test_a_batch_mixing_every_report_kind_for_different_runs_applies_each(
    store: Store,
) -> None:
    started, done, failed, cancelled, released = await leased_runs(store, 5, max_attempts=2)
    await store.cancel_run(cancelled["id"])
    outcomes = await apply(
        store,
        report(released, "RELEASED"),
        report(cancelled, "CANCELLED"),
        report(failed, "RUNNING"),
        report(failed, "FAILED", error=error("KeyError", "'id'")),
        report(done, "COMPLETED", result={"ok": True}),
        report(started, "RUNNING"),
    )
    assert outcomes == ["accepted"] * 6

    assert (await fetch(store, started["id"]))["state"] == "RUNNING"

    row = await fetch(store, done["id"])
    assert (row["state"], row["result"]) == ("COMPLETED", {"ok": True})

    row = await fetch(store, failed["id"])
    assert row["state"] == "SCHEDULED"
    assert row["error"]["type"] == "KeyError"
    assert (row["attempt"], row["worker_id"]) == (1, None)
    assert (await steps(store, failed["id"]))[-2:] == [
        ("PENDING", "RUNNING"),
        ("RUNNING", "SCHEDULED"),
    ]

    row = await fetch(store, cancelled["id"])
    assert row["state"] == "CANCELLED" and row["finished_at"] is not None

    row = await fetch(store, released["id"])
    assert row["state"] == "SCHEDULED"
    assert (row["attempt"], row["rescues"]) == (0, 0)
    assert row["reason"] == "handed_back"


# -- locking -------------------------------------------------------------------------


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
async def test_a_report_batch_and_a_heartbeat_of_one_worker_never_deadlock(store: Store) -> None:
    """Heartbeats lock the worker's rows in id order; a batch must too. Made
    deterministic by a third transaction holding the lower row: the
    heartbeat queues for it first, then the batch, and both are let go."""
    low, high = sorted(await leased_runs(store, 2), key=lambda d: d["id"])
    answers: dict[str, Any] = {}

    async def batch() -> None:
        try:
            answers["batch"] = await apply(
                store, report(high, "RUNNING"), report(low, "COMPLETED", result=1)
            )
        except Exception as exc:
            answers["batch"] = exc

    async def heartbeat() -> None:
        held = [(low["id"], low["lease_token"]), (high["id"], high["lease_token"])]
        try:
            answers["heartbeat"] = await store.heartbeat(
                worker_id="w1", held=held, lease_seconds=LEASE
            )
        except Exception as exc:
            answers["heartbeat"] = exc

    async def until_waiting_on_locks(count: int) -> None:
        query = sa.text(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        while True:
            async with connect(store) as conn:
                if await conn.scalar(query) >= count:
                    return
            await anyio.sleep(0.01)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg, connect(store, begin=True) as blocker:
            await blocker.execute(
                sa.select(runs.c.id).where(runs.c.id == low["id"]).with_for_update()
            )
            tg.start_soon(heartbeat)
            await until_waiting_on_locks(1)
            tg.start_soon(batch)
            await until_waiting_on_locks(2)
            # Leaving the block commits the blocker and lets both go.

    assert answers["batch"] == ["accepted", "accepted"]
    renewed, stop, cancel = answers["heartbeat"]
    assert set(renewed) == {low["id"], high["id"]} and stop == [] and cancel == []
