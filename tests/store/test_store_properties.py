"""R8, R9 and R11 of RELIABILITY.md §3.2, on SQLite and PostgreSQL: a claim
is atomic under contention, the run state machine keeps its invariants under
any sequence of store calls (a Hypothesis state machine), and the reaper
takes back exactly the leases that expired, never a heartbeating run.

Each scenario writes its figures to artifacts/faults/<scenario>_<backend>.json.
"""

from __future__ import annotations

import functools
import itertools
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import anyio
import httpx
import pytest
import sqlalchemy as sa
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from fastapi_bgtasks.errors import RunFinished, StoreUnavailable
from fastapi_bgtasks.states import ACTIVE_STATES, TERMINAL_STATES, TRANSITIONS
from fastapi_bgtasks.states import RunState as S
from fastapi_bgtasks.store import RunRow, Store, history, runs
from fastapi_bgtasks.wire import ErrorInfo, Report
from tests import timing
from tests.faults.checker import ARTIFACTS
from tests.harness.procs import Proc, start_app, start_worker
from tests.storekit import read, reap_expired, store_time, write
from tests.storekit import submit_run as submit

# Fault-injection and multi-process scenarios: the slow tier, as in tests/faults/.
pytestmark = pytest.mark.slow

ACTIVE = {s.value for s in ACTIVE_STATES}
TERMINAL = {s.value for s in TERMINAL_STATES}
BIG = 1 << 20


# -- helpers -------------------------------------------------------------------


def backend_of(db_url: str) -> str:
    return "postgres" if db_url.startswith("postgresql") else "sqlite"


def write_figures(scenario: str, figures: dict[str, Any]) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{scenario}.json"
    path.write_text(json.dumps({"scenario": scenario, **figures}, indent=2, default=str))
    return path


async def all_rows(store: Store) -> dict[uuid.UUID, RunRow]:
    listed = await store.list_runs(state=None, task=None, limit=100_000, cursor=None)
    return {row["id"]: row for row in listed}


async def transitions(store: Store) -> dict[uuid.UUID, list[tuple[str | None, str, str | None]]]:
    """Every run's history, oldest first: (from_state, to_state, reason)."""
    rows = await read(
        store,
        sa.select(
            history.c.run_id, history.c.from_state, history.c.to_state, history.c.reason
        ).order_by(history.c.id),
    )
    by_run: dict[uuid.UUID, list[tuple[str | None, str, str | None]]] = {}
    for r in rows:
        by_run.setdefault(r.run_id, []).append((r.from_state, r.to_state, r.reason))
    return by_run


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await anyio.sleep(0.05)


async def retrying(call: Callable[[], Awaitable[Any]], unavailable: Counter[str]) -> Any:
    """StoreUnavailable is the one error a caller may see (a busy SQLite file
    past its busy timeout, a pool timeout): count it and try again."""
    for _ in range(200):
        try:
            return await call()
        except StoreUnavailable:
            unavailable["store_unavailable"] += 1
            await anyio.sleep(0.01)
    raise AssertionError("the store stayed unavailable")


async def open_stores(db_url: str, count: int) -> list[Store]:
    """`count` stores on one database: as many app processes, each with its
    own connections (a small pool: other suites share the PostgreSQL server)."""
    stores = [Store(db_url, pool_size=2) for _ in range(count)]
    for store in stores:
        await store.open()
    await stores[0].migrate()
    return stores


async def close_stores(stores: list[Store]) -> None:
    for store in stores:
        with anyio.CancelScope(shield=True):
            await store.close()


# -- R8: the claim is atomic under contention ------------------------------------

CLAIMERS = 20
RUNS = 100
WAVES = 3  # waves of RUNS runs, each falling due at one instant
CONTENDED = "add"  # a hostapp task: the real workers serve it too
SOLO = "r8_solo"  # served by nobody but the claimers of part 2


@pytest.mark.anyio
@pytest.mark.timeout(300)
async def test_r8_each_run_is_claimed_exactly_once_under_contention(
    db_url: str, tmp_path: Path
) -> None:
    """Waves of 100 runs fall due at one instant; the claimers of 20 app
    processes and two real workers (through a real app's feed) claim them
    all: each run once, attempt 1, and no claim takes more than its credit."""
    backend = backend_of(db_url)
    stores = await open_stores(db_url, CLAIMERS)
    procs: list[Proc] = []
    unavailable: Counter[str] = Counter()
    owner: dict[uuid.UUID, str] = {}
    duplicates: list[uuid.UUID] = []
    over_credit: list[tuple[str, int, int]] = []
    bad_attempts: list[tuple[uuid.UUID, int]] = []
    calls = Counter[str]()
    batch_sizes: Counter[int] = Counter()
    started = time.monotonic()
    try:
        app, base = await anyio.to_thread.run_sync(
            functools.partial(start_app, db_url, tmp_path, name="r8-app")
        )
        procs.append(app)
        for i in range(2):
            procs.append(
                start_worker(
                    f"{base}/tasks",
                    db_url,
                    tmp_path,
                    "--task",
                    CONTENDED,
                    concurrency=2,
                    name=f"r8-worker{i}",
                    wait=False,
                )
            )
        for proc in procs[1:]:
            await anyio.to_thread.run_sync(proc.wait_for, r"Worker \S+ connected to")

        async def scheduled_left() -> int:
            query = sa.select(sa.func.count()).where(
                runs.c.task == CONTENDED, runs.c.state == S.SCHEDULED.value
            )
            return int((await read(stores[0], query))[0][0])

        async def claimer(index: int, store: Store, due_at: datetime) -> None:
            worker = f"claimer-{index}"
            rng = random.Random(f"{index}-{due_at}")
            slots = rng.randint(1, 4)
            held: list[dict[str, Any]] = []
            await anyio.sleep(max(0.0, (due_at - datetime.now(UTC)).total_seconds()))
            while True:
                credit = slots - len(held)
                got = await retrying(
                    lambda: store.claim(
                        worker_id=worker, tasks=[CONTENDED], slots=slots, lease_seconds=600
                    ),
                    unavailable,
                )
                calls["claims"] += 1
                batch_sizes[len(got)] += 1
                if len(got) > credit:
                    over_credit.append((worker, credit, len(got)))
                for row in got:
                    if row["id"] in owner:
                        duplicates.append(row["id"])
                    owner[row["id"]] = worker
                    if row["attempt"] != 1:
                        bad_attempts.append((row["id"], row["attempt"]))
                held.extend(got)
                if not got and not held:
                    if await scheduled_left() == 0:
                        break
                    await anyio.sleep(0.005)  # the rest are locked by others
                    continue
                # Finish some of what it holds, so its credit stays partly in use.
                finish = rng.randint(1, len(held))
                done, held = held[:finish], held[finish:]
                for row in done:
                    outcome = await retrying(
                        lambda row=row: store.apply_reports(
                            [
                                Report(
                                    run_id=row["id"],
                                    lease_token=row["lease_token"],
                                    state="COMPLETED",
                                    result=worker,
                                )
                            ],
                            max_result_bytes=BIG,
                        ),
                        unavailable,
                    )
                    calls[f"report_{outcome[0][0]}"] += 1
                    assert outcome[0][0] in ("accepted", "duplicate"), outcome

            # A claim that raised StoreUnavailable may still have committed.
            leftovers = await store.leased_to(worker, [CONTENDED])
            calls["ambiguous_claims_recovered"] += len(leftovers)
            for row in leftovers:
                owner.setdefault(row["id"], worker)
                report = Report(
                    run_id=row["id"],
                    lease_token=row["lease_token"],
                    state="COMPLETED",
                    result=worker,
                )
                await retrying(
                    lambda report=report: store.apply_reports([report], max_result_bytes=BIG),
                    unavailable,
                )

        async def all_completed() -> dict[uuid.UUID, RunRow] | None:
            rows = await all_rows(stores[0])
            done = all(r["state"] == "COMPLETED" for r in rows.values())
            return rows if done else None

        for wave in range(WAVES):
            # All due at one instant, so every claimer and both feeds race.
            due_at = datetime.now(UTC) + timedelta(seconds=1.5)
            for i in range(RUNS):
                await submit(stores[0], CONTENDED, args=[wave * RUNS + i, 1], eta=due_at)
            async with anyio.create_task_group() as tg:
                for index, store in enumerate(stores):
                    tg.start_soon(claimer, index, store, due_at)
            await eventually(all_completed, timing.DEADLINE * 2, f"wave {wave} completed")
        rows = await all_rows(stores[0])
        history_of = await transitions(stores[0])
    finally:
        await close_stores(stores)
        for proc in reversed(procs):
            await anyio.to_thread.run_sync(proc.stop)

    pending_transitions = {
        run_id: sum(1 for _, to, _ in steps if to == "PENDING")
        for run_id, steps in history_of.items()
    }
    by_workers = {
        r["id"] for r in rows.values() if not (r["worker_id"] or "").startswith("claimer-")
    }
    figures = {
        "backend": backend,
        "runs": RUNS * WAVES,
        "waves": WAVES,
        "claimers": CLAIMERS,
        "real_workers": 2,
        "claims_total": calls["claims"],
        "claims_empty": batch_sizes[0],
        "batch_sizes": dict(sorted(batch_sizes.items())),
        "rows_claimed_in_process": len(owner),
        "rows_claimed_by_workers": len(by_workers),
        "duplicates": len(duplicates),
        "over_credit": len(over_credit),
        "attempt_not_1": sum(1 for r in rows.values() if r["attempt"] != 1),
        "runs_with_pending_transitions_not_1": sum(
            1 for run_id in rows if pending_transitions.get(run_id) != 1
        ),
        "store_unavailable": unavailable["store_unavailable"],
        "reports": {k: v for k, v in calls.items() if k.startswith("report_")},
        "ambiguous_claims_recovered": calls["ambiguous_claims_recovered"],
        "elapsed_s": round(time.monotonic() - started, 2),
    }
    write_figures(f"R8_claim_contention_{backend}", figures)

    assert duplicates == []
    assert over_credit == []
    assert bad_attempts == []
    assert len(rows) == RUNS * WAVES
    assert len(owner) + len(by_workers) == RUNS * WAVES
    assert not set(owner) & by_workers
    for run_id, row in rows.items():
        assert row["attempt"] == 1, row
        assert row["rescues"] == 0, row
        assert pending_transitions.get(run_id) == 1, history_of.get(run_id)
        if run_id in owner:
            assert row["worker_id"] == owner[run_id]
            assert row["result"] == owner[run_id]
        else:
            assert row["result"] == row["args"][0] + 1  # `add` ran in a real worker


@pytest.mark.anyio
@pytest.mark.timeout(120)
async def test_r8_fifty_concurrent_claims_for_one_due_run_give_it_to_exactly_one(
    db_url: str,
) -> None:
    """Only one run is due (others wait an hour): 50 claims from 20 app
    processes at once, each with credit to spare; exactly one gets it."""
    backend = backend_of(db_url)
    rounds = 5
    contenders = 50
    stores = await open_stores(db_url, CLAIMERS)
    unavailable: Counter[str] = Counter()
    winners_per_round: list[int] = []
    try:
        not_due = [(await submit(stores[0], SOLO, countdown=3600))["id"] for _ in range(3)]
        for round_ in range(rounds):
            target = await submit(stores[0], SOLO)
            go = anyio.Event()
            won: list[tuple[str, list[dict[str, Any]]]] = []

            async def contender(
                index: int, won: list[tuple[str, list[dict[str, Any]]]], go: anyio.Event
            ) -> None:
                store = stores[index % len(stores)]
                worker = f"solo-{index}"
                await go.wait()
                got = await retrying(
                    lambda: store.claim(worker_id=worker, tasks=[SOLO], slots=3, lease_seconds=600),
                    unavailable,
                )
                if got:
                    won.append((worker, got))

            async with anyio.create_task_group() as tg:
                for index in range(contenders):
                    tg.start_soon(contender, index, won, go)
                await anyio.sleep(0.05)
                go.set()

            winners_per_round.append(len(won))
            assert len(won) == 1, (round_, won)
            worker, got = won[0]
            assert [r["id"] for r in got] == [target["id"]]
            row = await stores[1].get_run(target["id"])
            assert row is not None and row["lease_token"] is not None
            assert (row["state"], row["attempt"], row["worker_id"]) == ("PENDING", 1, worker)
            steps = (await transitions(stores[0]))[target["id"]]
            assert [to for _, to, _ in steps] == ["SCHEDULED", "PENDING"]
            await stores[0].apply_reports(
                [Report(run_id=row["id"], lease_token=row["lease_token"], state="COMPLETED")],
                max_result_bytes=BIG,
            )
        for run_id in not_due:
            row = await stores[0].get_run(run_id)
            assert row is not None
            assert (row["state"], row["attempt"], row["worker_id"]) == ("SCHEDULED", 0, None)
    finally:
        await close_stores(stores)
    write_figures(
        f"R8_one_due_run_{backend}",
        {
            "backend": backend,
            "rounds": rounds,
            "contenders_per_round": contenders,
            "stores": CLAIMERS,
            "winners_per_round": winners_per_round,
            "duplicates": sum(w - 1 for w in winners_per_round if w > 1),
            "store_unavailable": unavailable["store_unavailable"],
        },
    )


@pytest.mark.anyio
@pytest.mark.timeout(120)
async def test_r8_concurrent_claims_for_one_worker_never_exceed_its_slots(
    db_url: str, request: pytest.FixtureRequest
) -> None:
    """One worker id claiming through several app processes at once (a
    reconnect overlapping its old feed on another replica, or its two
    allowed feeds): together they may lease it no more than `slots` runs,
    since credit is "computed from the store, so it holds across app
    processes" (DESIGN.md §4)."""
    backend = backend_of(db_url)
    rounds, processes, slots = 20, 10, 2
    stores = await open_stores(db_url, processes)
    leased_per_round: list[int] = []
    unavailable: Counter[str] = Counter()
    try:
        for round_ in range(rounds):
            task = f"r8_credit_{round_}"
            for _ in range(processes * slots):
                await submit(stores[0], task)
            go = anyio.Event()
            got: list[dict[str, Any]] = []

            async def claim(
                store: Store, task: str, go: anyio.Event, got: list[dict[str, Any]]
            ) -> None:
                await go.wait()
                got.extend(
                    await retrying(
                        lambda: store.claim(
                            worker_id="one-worker", tasks=[task], slots=slots, lease_seconds=600
                        ),
                        unavailable,
                    )
                )

            async with anyio.create_task_group() as tg:
                for store in stores:
                    tg.start_soon(claim, store, task, go, got)
                await anyio.sleep(0.05)
                go.set()
            leased_per_round.append(len(got))
            # Finish them, so the next round starts with the whole credit free.
            await stores[0].apply_reports(
                [
                    Report(run_id=r["id"], lease_token=r["lease_token"], state="COMPLETED")
                    for r in got
                ],
                max_result_bytes=BIG,
            )
    finally:
        await close_stores(stores)
    write_figures(
        f"R8_one_worker_credit_{backend}",
        {
            "backend": backend,
            "rounds": rounds,
            "concurrent_claims_per_round": processes,
            "slots": slots,
            "leased_per_round": leased_per_round,
            "rounds_over_credit": sum(1 for n in leased_per_round if n > slots),
            "max_leased": max(leased_per_round),
            "store_unavailable": unavailable["store_unavailable"],
        },
    )
    assert max(leased_per_round) <= slots, leased_per_round


# -- R9: the run state machine, property-based -----------------------------------

WORKERS = ("w0", "w1", "w2")
MACHINE_TASK = "machine"
REPORT_KINDS = ("RUNNING", "COMPLETED", "FAILED", "RELEASED", "CANCELLED")


@dataclass
class ModelRun:
    """What the store must hold for one run, computed from the contract."""

    id: uuid.UUID
    max_attempts: int
    max_rescues: int
    priority: int
    state: str = "SCHEDULED"
    attempt: int = 0
    rescues: int = 0
    token: str | None = None  # the row's lease_token
    worker: str | None = None
    cancel_requested: bool = False
    result: Any = None
    error_type: str | None = None
    claims: int = 0
    version: int = 0  # bumped on every change but a lease renewal
    tokens: list[str] = field(default_factory=list)  # every token ever issued to it

    def changed(self) -> None:
        self.version += 1


class StoreMachine(RuleBasedStateMachine):
    """Drives one `Store` through random sequences of the calls the app
    makes (submit, claim, heartbeat, reports, release, reap, cancel, read)
    and checks every row against a model after each step.

    The store's coroutines run on a blocking portal's event loop (one loop
    for the whole test, so its connections stay on the loop that made them);
    Hypothesis runs this machine in the test's own thread.
    """

    portal: ClassVar[BlockingPortal]
    store: ClassVar[Store]
    figures: ClassVar[Counter[str]]

    def __init__(self) -> None:
        super().__init__()
        self.runs: dict[uuid.UUID, ModelRun] = {}
        self.previous: dict[uuid.UUID, dict[str, Any]] = {}
        self.last_report: tuple[Report, str, int] | None = None
        self.call(self._reset)
        self.figures["examples"] += 1

    # -- plumbing

    def call(self, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        return self.portal.call(functools.partial(fn, *args, **kwargs))

    async def _reset(self) -> None:
        await write(self.store, history.delete())
        await write(self.store, runs.delete())

    def rows(self) -> dict[uuid.UUID, dict[str, Any]]:
        return dict(self.call(all_rows, self.store))

    def pick(self, data: st.DataObject, states: set[str] | None = None) -> ModelRun:
        # In creation order: run ids are random, and Hypothesis replays need
        # the same choice to mean the same run.
        ids = [r.id for r in self.runs.values() if states is None or r.state in states]
        return self.runs[data.draw(st.sampled_from(ids), label="run")]

    def has(self, states: set[str]) -> bool:
        return any(r.state in states for r in self.runs.values())

    def token_for(self, run: ModelRun, valid: bool, data: st.DataObject) -> str:
        """`valid`: the token of the run's latest claim. Otherwise a token that
        is not the row's: an older claim's, another run's, a made-up one."""
        if valid and run.tokens:
            return run.tokens[-1]
        others = [t for r in self.runs.values() for t in r.tokens]
        ordered = dict.fromkeys([*run.tokens[:-1], *others, "", uuid.uuid4().hex])
        candidates = [t for t in ordered if t != run.token]
        if valid and not run.tokens:
            candidates = [uuid.uuid4().hex]
        return str(data.draw(st.sampled_from(candidates), label="token"))

    def bump(self, name: str) -> None:
        self.figures[name] += 1
        self.figures["steps"] += 1

    # -- rules

    @initialize(
        specs=st.lists(
            st.tuples(st.integers(1, 3), st.integers(0, 2), st.integers(0, 2)),
            min_size=1,
            max_size=3,
        )
    )
    def start(self, specs: list[tuple[int, int, int]]) -> None:
        for max_attempts, max_rescues, priority in specs:
            self.submit(max_attempts, max_rescues, priority)

    @rule(max_attempts=st.integers(1, 3), max_rescues=st.integers(0, 2), priority=st.integers(0, 2))
    def submit(self, max_attempts: int, max_rescues: int, priority: int) -> None:
        row = self.call(
            submit,
            self.store,
            MACHINE_TASK,
            max_attempts=max_attempts,
            max_rescues=max_rescues,
            priority=priority,
        )
        assert (row["state"], row["attempt"], row["rescues"]) == ("SCHEDULED", 0, 0)
        self.runs[row["id"]] = ModelRun(row["id"], max_attempts, max_rescues, priority)
        self.bump("submit")

    @rule(worker=st.sampled_from(WORKERS), slots=st.integers(1, 3))
    def claim(self, worker: str, slots: int) -> None:
        self.claim_for(worker, slots)

    # The same call again, only when runs wait: more of the paths past a claim.
    @precondition(lambda self: self.has({"SCHEDULED"}))
    @rule(worker=st.sampled_from(WORKERS), slots=st.integers(1, 3))
    def claim_waiting(self, worker: str, slots: int) -> None:
        self.claim_for(worker, slots)

    def claim_for(self, worker: str, slots: int) -> None:
        before = self.rows()
        held = sum(1 for r in self.runs.values() if r.worker == worker and r.state in ACTIVE)
        waiting = [r for r in self.runs.values() if r.state == "SCHEDULED"]
        got = self.call(
            self.store.claim,
            worker_id=worker,
            tasks=[MACHINE_TASK],
            slots=slots,
            lease_seconds=3600,
        )
        # Never more than the credit; never less while runs are due (all are).
        assert len(got) == min(max(0, slots - held), len(waiting)), (slots, held, len(waiting))
        claimed = {g["id"] for g in got}
        assert claimed <= {r.id for r in waiting}

        def key(run_id: uuid.UUID) -> tuple[int, float]:
            row = before[run_id]
            return (-row["priority"], row["scheduled_at"].timestamp())

        for left in {r.id for r in waiting} - claimed:
            assert all(key(c) <= key(left) for c in claimed), "claimed out of priority order"
        for g in got:
            run = self.runs[g["id"]]
            assert g["lease_token"] and g["lease_token"] not in run.tokens, "a reused lease token"
            assert g["attempt"] == run.attempt + 1
            run.state, run.attempt, run.worker = "PENDING", run.attempt + 1, worker
            run.token = g["lease_token"]
            run.tokens.append(g["lease_token"])
            run.claims += 1
            run.changed()
        self.figures["claimed_rows"] += len(got)
        self.bump("claim")

    @rule(data=st.data(), valid=st.booleans())
    def heartbeat(self, data: st.DataObject, valid: bool) -> None:
        run = self.pick(data)
        token = self.token_for(run, valid, data)
        worker = run.worker or data.draw(st.sampled_from(WORKERS), label="worker")
        before = self.rows()
        renewed, stop, cancel = self.call(
            self.store.heartbeat, worker_id=worker, held=[(run.id, token)], lease_seconds=3600
        )
        after = self.rows()
        live = token == run.token and run.state in ACTIVE and worker == run.worker
        if live:
            assert (renewed, stop) == ([run.id], [])
            assert cancel == ([run.id] if run.cancel_requested else [])
            renewal = {"lease_expires_at"}
            assert {k: v for k, v in after[run.id].items() if k not in renewal} == {
                k: v for k, v in before[run.id].items() if k not in renewal
            }
            assert after[run.id]["lease_expires_at"] >= before[run.id]["lease_expires_at"]
            del after[run.id], before[run.id]
        else:
            assert (renewed, stop, cancel) == ([], [run.id], [])
        assert after == before, "a heartbeat changed a row it holds no lease on"
        self.bump("heartbeat_live" if live else "heartbeat_refused")

    @rule(
        data=st.data(),
        kind=st.sampled_from(REPORT_KINDS),
        valid=st.booleans(),
        result=st.one_of(st.none(), st.integers(-3, 3), st.text("ab", max_size=2)),
        error_type=st.sampled_from(["ValueError", "TimeoutError", "UnknownTask"]),
    )
    def report(
        self,
        data: st.DataObject,
        kind: str,
        valid: bool,
        result: Any,
        error_type: str,
    ) -> None:
        run = self.pick(data)
        report = Report(
            run_id=run.id,
            lease_token=self.token_for(run, valid, data),
            state=kind,  # type: ignore[arg-type]
            result=result if kind == "COMPLETED" else None,
            error=ErrorInfo(type=error_type, message="boom") if kind == "FAILED" else None,
        )
        outcome = self.send(report)
        self.last_report = (report, outcome, run.version)

    # Reports under the current lease of a leased run: the accepted paths.
    @precondition(lambda self: self.has(ACTIVE))
    @rule(
        data=st.data(),
        kind=st.sampled_from(REPORT_KINDS),
        result=st.one_of(st.none(), st.integers(-3, 3)),
        error_type=st.sampled_from(["ValueError", "UnknownTask"]),
    )
    def report_on_a_live_lease(
        self, data: st.DataObject, kind: str, result: Any, error_type: str
    ) -> None:
        run = self.pick(data, ACTIVE)
        assert run.token is not None
        report = Report(
            run_id=run.id,
            lease_token=run.token,
            state=kind,  # type: ignore[arg-type]
            result=result if kind == "COMPLETED" else None,
            error=ErrorInfo(type=error_type, message="boom") if kind == "FAILED" else None,
        )
        outcome = self.send(report)
        self.last_report = (report, outcome, run.version)

    @precondition(lambda self: self.last_report is not None)
    @rule()
    def duplicate_last_report(self) -> None:
        assert self.last_report is not None
        report, first, version = self.last_report
        run = self.runs[report.run_id]
        before = self.rows()
        outcome = self.call(self.store.apply_reports, [report], max_result_bytes=BIG)[0][0]
        assert self.rows() == before, "a repeated report changed the store"
        if run.version == version:
            # Nothing happened to the run since: the same answer, or
            # `duplicate` where the first was accepted.
            expected = "duplicate" if first in ("accepted", "duplicate") else first
            assert outcome == expected, (report.state, first, outcome, run.state)
        else:
            assert outcome in ("duplicate", "stale"), outcome
        self.figures[f"repeat_{first}_then_{outcome}"] += 1
        self.bump("duplicate_last_report")

    @rule(data=st.data(), valid=st.booleans())
    def release_unsent(self, data: st.DataObject, valid: bool) -> None:
        run = self.pick(data)
        token = self.token_for(run, valid, data)
        before = self.rows()
        released = self.call(self.store.release_unsent, [(run.id, token)])
        applies = token == run.token and run.state == "PENDING"
        assert released == int(applies)
        if applies:
            run.state, run.attempt, run.token, run.worker = "SCHEDULED", run.attempt - 1, None, None
            run.changed()
        else:
            assert self.rows() == before
        self.bump("release_unsent")

    @rule(data=st.data())
    def reap_expired(self, data: st.DataObject) -> None:
        """Advance the store's clock for some runs: backdate their lease (any
        state, so the reaper must also ignore finished and waiting runs)."""
        offsets = {
            run_id: data.draw(st.sampled_from([None, None, -3600.0, -60.0, 60.0]), label="lease")
            for run_id in self.runs
        }
        for run_id, offset in offsets.items():
            if offset is not None:
                self.call(
                    write,
                    self.store,
                    runs.update()
                    .where(runs.c.id == run_id)
                    .values(lease_expires_at=store_time(self.store, offset)),
                )
        before = self.rows()
        self.previous = before  # the backdating is ours, not the reaper's
        expired = {
            run_id
            for run_id, offset in offsets.items()
            if offset is not None and offset < 0 and self.runs[run_id].state in ACTIVE
        }
        reaped = dict(self.call(reap_expired, self.store))
        assert set(reaped) == expired, "the reaper changed a row whose lease had not expired"
        after = self.rows()
        for run_id in set(after) - expired:
            assert after[run_id] == before[run_id]
        for run_id in expired:
            run = self.runs[run_id]
            if run.cancel_requested:
                run.state = "CANCELLED"
            elif run.rescues >= run.max_rescues:
                run.state, run.error_type = "CRASHED", "WorkerLost"
            else:
                run.state, run.rescues, run.worker = "SCHEDULED", run.rescues + 1, None
            run.token = None
            run.changed()
            assert reaped[run_id] == run.state
        self.figures["reaped_rows"] += len(reaped)
        self.bump("reap")

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        run = self.pick(data)
        if run.state in TERMINAL:
            before = self.rows()
            try:
                self.call(self.store.cancel_run, run.id)
            except RunFinished:
                pass
            else:
                raise AssertionError(f"cancelling a {run.state} run did not raise RunFinished")
            assert self.rows() == before
        else:
            row = self.call(self.store.cancel_run, run.id)
            if run.state == "SCHEDULED":
                run.state = "CANCELLED"
            run.cancel_requested = True
            run.changed()
            assert (row["state"], row["cancel_requested"]) == (run.state, True)
        self.bump("cancel")

    @rule(data=st.data())
    def read_status(self, data: st.DataObject) -> None:
        run = self.pick(data)
        row = self.call(self.store.get_run, run.id)
        assert row is not None and row["state"] == run.state and row["attempt"] == run.attempt
        assert self.call(self.store.get_run, uuid.uuid4()) is None
        self.bump("read")

    # -- the report model

    def send(self, report: Report) -> str:
        run = self.runs[report.run_id]
        before = self.rows()
        [(outcome, _)] = self.call(self.store.apply_reports, [report], max_result_bytes=BIG)
        mine = report.lease_token == run.token
        kind = report.state
        applies = mine and (run.state == "PENDING" if kind == "RUNNING" else run.state in ACTIVE)
        self.figures[f"report_{kind}_{outcome}"] += 1
        self.bump("report")
        if not applies:
            assert outcome != "accepted", (kind, run.state)
            if not mine:
                assert outcome == "stale", (kind, outcome)  # fencing: a stale token
            else:
                assert outcome in ("duplicate", "stale"), outcome
            assert self.rows() == before, "a report that was not accepted changed the store"
            return str(outcome)
        assert outcome == "accepted", (kind, run.state, outcome)
        if kind == "RUNNING":
            run.state = "RUNNING"
        elif kind == "COMPLETED":
            run.state, run.result, run.error_type = "COMPLETED", report.result, None
        elif kind == "CANCELLED":
            run.state = "CANCELLED"
        elif kind == "RELEASED":
            if run.state == "PENDING":
                run.attempt -= 1  # never started: the attempt is not spent
            else:
                run.rescues += 1
            run.state = "CANCELLED" if run.cancel_requested else "SCHEDULED"
            run.worker = None
        else:  # FAILED
            assert report.error is not None
            run.error_type = report.error.type
            failures = run.attempt - run.rescues
            retry = report.error.type != "UnknownTask" and not run.cancel_requested
            if retry and failures < run.max_attempts:
                run.state, run.worker = "SCHEDULED", None
            else:
                run.state = "FAILED"
        run.changed()
        after = self.rows()
        del before[run.id], after[run.id]
        assert after == before, "a report changed another run"
        return str(outcome)

    # -- invariants

    @invariant()
    def store_matches_the_model_and_never_goes_back(self) -> None:
        rows = self.rows()
        assert set(rows) == set(self.runs)
        steps = self.call(transitions, self.store)
        for run_id, row in rows.items():
            run = self.runs[run_id]
            seen = (
                row["state"],
                row["attempt"],
                row["rescues"],
                row["lease_token"],
                row["worker_id"],
                row["cancel_requested"],
            )
            expected = (
                run.state,
                run.attempt,
                run.rescues,
                run.token,
                run.worker,
                run.cancel_requested,
            )
            assert seen == expected, (run_id, seen, expected)
            assert row["result"] == (run.result if run.state == "COMPLETED" else None)
            assert (row["error"] or {}).get("type") == run.error_type
            # attempt - rescues counts the task's own failures: bounded by max_attempts.
            assert 0 <= row["attempt"] - row["rescues"] <= row["max_attempts"]
            if row["state"] in ACTIVE:  # one live lease, and it can expire
                assert row["lease_token"] and row["lease_expires_at"] and row["worker_id"]
            previous = self.previous.get(run_id)
            if previous is not None:
                if previous["state"] in TERMINAL:
                    assert row == previous, "a finished run changed"
                if row["attempt"] < previous["attempt"]:
                    # Only a run handed back before it started gives its attempt
                    # back (and ends CANCELLED instead if a cancel was asked for).
                    assert previous["state"] == "PENDING"
                    assert row["state"] in ("SCHEDULED", "CANCELLED")
                    assert row["attempt"] == previous["attempt"] - 1
            # The history: a chain of allowed edges, one PENDING per claim.
            chain = steps[run_id]
            assert chain[0][:2] == (None, "SCHEDULED")
            for (_, to_a, _), (from_b, to_b, _) in itertools.pairwise(chain):
                assert from_b == to_a and S(to_b) in TRANSITIONS[S(from_b)], chain
            assert chain[-1][1] == row["state"]
            assert sum(1 for _, to, _ in chain if to == "PENDING") == run.claims
        self.previous = rows


@pytest.mark.anyio
async def test_r9_a_repeated_release_that_cancelled_the_run_is_a_duplicate(
    db_url: str,
) -> None:
    """A worker re-sends a batch whose answer it lost: the hand-back of a
    run someone asked to cancel was applied (the run ended CANCELLED), so the
    repeat is identical to what is stored and must be answered `duplicate`,
    not `stale` (which tells the worker its lease had moved on)."""
    [store] = await open_stores(db_url, 1)
    try:
        row = await submit(store, MACHINE_TASK)
        [delivery] = await store.claim(
            worker_id="w0", tasks=[MACHINE_TASK], slots=1, lease_seconds=3600
        )
        running = Report(run_id=row["id"], lease_token=delivery["lease_token"], state="RUNNING")
        assert (await store.apply_reports([running], max_result_bytes=BIG))[0][0] == "accepted"
        await store.cancel_run(row["id"])
        released = Report(run_id=row["id"], lease_token=delivery["lease_token"], state="RELEASED")
        first = await store.apply_reports([released], max_result_bytes=BIG)
        assert first == [("accepted", {"id": row["id"], "state": "CANCELLED"})]
        stored = await store.get_run(row["id"])
        again = await store.apply_reports([released], max_result_bytes=BIG)
        assert await store.get_run(row["id"]) == stored  # holds today: nothing changes
        assert again == [("duplicate", None)]  # fails today: ("stale", None)
    finally:
        await close_stores([store])


# Small enough for < 30 s per backend on a loaded 2-core machine.
MACHINE_SETTINGS = settings(
    max_examples=40,
    stateful_step_count=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.timeout(240)
def test_r9_run_state_machine_properties(db_url: str) -> None:
    """Any sequence of submits, claims, heartbeats, reports (under the live
    lease or a stale one), repeats, releases, reaps and cancels leaves every
    row as the model says, and no run ever goes back from where it got."""
    backend = backend_of(db_url)
    figures: Counter[str] = Counter()
    started = time.monotonic()
    with start_blocking_portal(backend="asyncio") as portal:
        store = Store(db_url, pool_size=2)
        portal.call(store.open)
        try:
            portal.call(store.migrate)
            machine = type(
                "StoreMachineOn" + backend.capitalize(),
                (StoreMachine,),
                {"portal": portal, "store": store, "figures": figures},
            )
            run_state_machine_as_test(machine, settings=MACHINE_SETTINGS)
        finally:
            portal.call(store.close)
    write_figures(
        f"R9_state_machine_{backend}",
        {
            "backend": backend,
            "hypothesis_examples_run": figures.pop("examples", 0),
            "steps_run": figures.pop("steps", 0),
            "max_examples": MACHINE_SETTINGS.max_examples,
            "stateful_step_count": MACHINE_SETTINGS.stateful_step_count,
            "elapsed_s": round(time.monotonic() - started, 2),
            "counts": dict(sorted(figures.items())),
        },
    )


# -- R11: the reaper's precision --------------------------------------------------

REAPED = "r11_task"


@dataclass
class LeaseCase:
    offset: float  # seconds from the store's now() to lease_expires_at
    started: bool  # RUNNING (else PENDING)
    rescues: int  # against max_rescues = 2
    cancel: bool = False

    @property
    def expired(self) -> bool:
        return self.offset < 0

    @property
    def expected(self) -> str:
        if self.cancel:
            return "CANCELLED"
        return "CRASHED" if self.rescues >= 2 else "SCHEDULED"


@pytest.mark.anyio
@pytest.mark.timeout(120)
async def test_r11_one_reaper_pass_changes_exactly_the_expired_leases(db_url: str) -> None:
    """Leases an hour or a minute either side of the store's now, rescues at
    and below the budget, cancels requested: one reaper pass changes exactly
    the expired rows (spent -> CRASHED WorkerLost, cancel requested ->
    CANCELLED, others -> SCHEDULED with one more rescue), and two reapers
    racing take each run back once."""
    backend = backend_of(db_url)
    cases = [
        LeaseCase(offset, started, rescues)
        for offset in (-3600.0, -60.0, 60.0, 3600.0)
        for started in (False, True)
        for rescues in (1, 2)  # below and at max_rescues
    ]
    cases += [
        LeaseCase(-60.0, True, 0, cancel=True),
        LeaseCase(-3600.0, False, 2, cancel=True),  # exhausted, but cancelled wins
        LeaseCase(60.0, True, 0, cancel=True),
        LeaseCase(-60.0, True, 3),  # above max_rescues (hand-backs count too)
    ]
    store, other = await open_stores(db_url, 2)
    try:
        ids = [(await submit(store, REAPED, max_attempts=3, max_rescues=2))["id"] for _ in cases]
        claimed = {
            r["id"]: r
            for r in await store.claim(
                worker_id="w-old", tasks=[REAPED], slots=len(cases), lease_seconds=3600
            )
        }
        assert set(claimed) == set(ids)
        for run_id, case in zip(ids, cases, strict=True):
            token = claimed[run_id]["lease_token"]
            if case.started:
                report = Report(run_id=run_id, lease_token=token, state="RUNNING")
                assert await store.apply_reports([report], max_result_bytes=BIG) == [
                    ("accepted", {"id": run_id, "state": "RUNNING"})
                ]
            if case.cancel:
                await store.cancel_run(run_id)
            # The store's clock: now() on PostgreSQL, the app's on SQLite.
            await write(
                store,
                runs.update()
                .where(runs.c.id == run_id)
                .values(rescues=case.rescues, lease_expires_at=store_time(store, case.offset)),
            )
        # Waiting and finished runs with a lease in the past are not the reaper's.
        waiting = (await submit(store, REAPED, countdown=3600))["id"]
        finished = (await submit(store, "r11_other"))["id"]
        [done] = await store.claim(
            worker_id="w-other", tasks=["r11_other"], slots=1, lease_seconds=3600
        )
        completed = Report(run_id=finished, lease_token=done["lease_token"], state="COMPLETED")
        await store.apply_reports([completed], max_result_bytes=BIG)
        await write(
            store,
            runs.update()
            .where(runs.c.id.in_([waiting, finished]))
            .values(lease_expires_at=store_time(store, -3600)),
        )

        before = await all_rows(store)
        reaped = dict(await reap_expired(store))
        after = await all_rows(store)
        steps = await transitions(store)
        expected = {
            run_id: case.expected for run_id, case in zip(ids, cases, strict=True) if case.expired
        }
        assert reaped == expected
        for run_id in set(after) - set(expected):
            assert after[run_id] == before[run_id], "an unexpired or idle row changed"
        for run_id, case in zip(ids, cases, strict=True):
            if not case.expired:
                continue
            row, old = after[run_id], before[run_id]
            assert row["state"] == case.expected
            assert row["attempt"] == old["attempt"] == 1  # the reaper leaves it alone
            assert row["lease_token"] is None and row["lease_expires_at"] is None
            assert steps[run_id][-1] == (
                old["state"],
                case.expected,
                "cancelled" if case.cancel else "worker_lost",
            )
            if case.expected == "SCHEDULED":
                assert row["rescues"] == case.rescues + 1
                assert row["worker_id"] is None and row["finished_at"] is None
                assert row["error"] is None
            else:
                assert row["rescues"] == case.rescues
                assert row["finished_at"] is not None
                error_type = (row["error"] or {}).get("type")
                assert error_type == ("WorkerLost" if case.expected == "CRASHED" else None)
        # A second pass (another app process's reaper) finds nothing left.
        assert await reap_expired(other) == []
        assert await all_rows(store) == after

        # Two reapers racing over fresh expiries take each run back exactly once.
        rescheduled = [run_id for run_id, state in expected.items() if state == "SCHEDULED"]
        again = await store.claim(
            worker_id="w-new", tasks=[REAPED], slots=len(rescheduled), lease_seconds=3600
        )
        assert {r["id"] for r in again} == set(rescheduled)
        await write(
            store,
            runs.update()
            .where(runs.c.id.in_(rescheduled))
            .values(lease_expires_at=store_time(store, -1)),
        )
        results: dict[str, list[tuple[uuid.UUID, str]]] = {}

        async def reap(name: str, reaper: Store) -> None:
            results[name] = await reap_expired(reaper)

        async with anyio.create_task_group() as tg:
            tg.start_soon(reap, "a", store)
            tg.start_soon(reap, "b", other)
        first, second = {i for i, _ in results["a"]}, {i for i, _ in results["b"]}
        assert not first & second, "two reapers both took one run back"
        assert first | second == set(rescheduled)
        final = await all_rows(store)
        steps = await transitions(store)
        for run_id in rescheduled:
            # Rescued once already (rescues 1 -> 2 = max_rescues): this loss ends it.
            assert (final[run_id]["state"], final[run_id]["rescues"]) == ("CRASHED", 2)
            # Two executions, both lost: no retry spent (attempt - rescues = 0).
            assert final[run_id]["attempt"] == 2
            losses = [s for s in steps[run_id] if s[2] == "worker_lost"]
            assert len(losses) == 2, steps[run_id]  # one per reap, not one per reaper
    finally:
        await close_stores([store, other])
    write_figures(
        f"R11_reaper_fixtures_{backend}",
        {
            "backend": backend,
            "leased_rows": len(cases),
            "idle_rows_with_past_lease": 2,
            "expired": len(expected),
            "reaped": len(reaped),
            "reaped_as": dict(Counter(reaped.values())),
            "untouched": len(after) - len(reaped),
            "second_pass_reaped": 0,
            "race": {"rows": len(rescheduled), "by_a": len(first), "by_b": len(second)},
            "reaped_twice": 0,
        },
    )


# PostgreSQL only: each replica's lease clock is anchored at the database's
# clock when its lifespan starts, so the replicas' own clocks cannot matter.
# On SQLite it is anchored at the app's clock: replicas share one machine.
@pytest.mark.anyio
@pytest.mark.timeout(180)
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
async def test_r11_a_heartbeating_run_outlives_five_leases_and_two_reapers(
    db_url: str, tmp_path: Path
) -> None:
    """A run lasting five leases, heartbeating normally through app A while
    apps A and B both reap every 0.2 s: never reaped, attempt stays 1."""
    lease, heartbeat, duration = 1.0, 0.2, 5.0
    knobs = {"BGTASKS_TEST_LEASE": str(lease), "BGTASKS_TEST_HEARTBEAT": str(heartbeat)}
    procs: list[Proc] = []
    store = Store(db_url, pool_size=2)
    renewals: set[datetime] = set()
    try:
        app_a, base_a = await anyio.to_thread.run_sync(
            functools.partial(start_app, db_url, tmp_path, name="r11-app-a", **knobs)
        )
        procs.append(app_a)
        app_b, base_b = await anyio.to_thread.run_sync(
            functools.partial(start_app, db_url, tmp_path, name="r11-app-b", **knobs)
        )
        procs.append(app_b)
        worker = await anyio.to_thread.run_sync(
            functools.partial(
                start_worker, f"{base_a}/tasks", db_url, tmp_path, concurrency=1, **knobs
            )
        )
        procs.append(worker)
        await store.open()
        async with httpx.AsyncClient(timeout=30) as http:
            submitted = await http.post(
                f"{base_b}/tasks/runs", json={"task": "sleep_async", "args": [duration]}
            )
            assert submitted.status_code == 202, submitted.text
            run_id = submitted.json()["id"]
            started = time.monotonic()
            deadline = started + duration + timing.DEADLINE
            while True:
                row = await store.get_run(uuid.UUID(run_id))
                assert row is not None
                if row["state"] == "RUNNING" and row["lease_expires_at"] is not None:
                    renewals.add(row["lease_expires_at"])
                if row["state"] in TERMINAL:
                    break
                assert time.monotonic() < deadline, f"the run did not finish: {row}"
                await anyio.sleep(0.1)
            elapsed = time.monotonic() - started
            document = (await http.get(f"{base_a}/tasks/runs/{run_id}")).json()
            steps = (await http.get(f"{base_a}/tasks/runs/{run_id}/history")).json()
    finally:
        with anyio.CancelScope(shield=True):
            await store.close()
        for proc in reversed(procs):
            await anyio.to_thread.run_sync(proc.stop)
    to_states = [t["to_state"] for t in steps["transitions"]]
    reaper_logs = sum(
        proc.output().count(f"Run {run_id} lost its worker") for proc in (app_a, app_b)
    )
    write_figures(
        "R11_reaper_live_postgres",
        {
            "backend": "postgres",
            "lease_seconds": lease,
            "heartbeat_seconds": heartbeat,
            "run_seconds": duration,
            "leases_outlived": round(elapsed / lease, 1),
            "app_replicas_reaping": 2,
            "lease_renewals_observed": len(renewals),
            "final_state": document["state"],
            "attempt": document["attempt"],
            "transitions": to_states,
            "reaped": reaper_logs,
        },
    )
    assert document["state"] == "COMPLETED", document
    assert document["attempt"] == 1
    assert document["result"] == duration
    assert to_states == ["SCHEDULED", "PENDING", "RUNNING", "COMPLETED"]
    assert reaper_logs == 0
    assert len(renewals) >= 3, "the lease was not renewed while the run lasted"
