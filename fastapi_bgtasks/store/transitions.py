"""③ and the app's own steps: the claim that leases due runs to a worker,
the release of runs never sent, an operator's cancel, heartbeats that renew
leases, and the reaper that takes expired ones back. Each is one
compare-and-set statement whose source states come from states.EDGES.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from ..errors import RunFinished, RunNotFound
from ..states import Event, RunState
from .dialect import Database
from .reads import DELIVERY
from .rows import DeliveryRow, RunRow, delivery_row, run_row
from .schema import ACTIVE, moves, runs

__all__ = ["Claimed", "Transitions"]

S = RunState
_MAX_CACHED_CLAIMS = 100  # SQLite claims are built per task set, which clients choose

_WORKER_LOST = {
    "type": "WorkerLost",
    "message": "The worker running this run stopped renewing its lease "
    "(it crashed, hung or lost its connection) and the run's rescues are spent.",
    "traceback": None,
}


class Claimed(list[DeliveryRow]):
    """A claim's runs, and whether they were all it could take: `exhausted`
    when it took fewer than its limit (its credit, or its share), so no
    run this worker could take was left due."""

    exhausted: bool = False


class Transitions:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._claims: dict[tuple[str, ...], Any] = {}
        self._counts: dict[tuple[str, ...], Any] = {}
        self._held = (
            sa.select(sa.func.count())
            .select_from(runs)
            .where(runs.c.worker_id == sa.bindparam("worker"), ACTIVE)
        )
        self._pg_claim = sa.select(
            *sa.func.bgtasks_claim_share(
                sa.bindparam("worker", type_=sa.String),
                sa.bindparam("tasks", type_=postgresql.ARRAY(sa.String)),
                sa.bindparam("keys", type_=postgresql.ARRAY(sa.String)),
                sa.bindparam("slots", type_=sa.Integer),
                sa.bindparam("expires", type_=sa.DateTime(timezone=True)),
                sa.bindparam("token", type_=sa.String),
                sa.bindparam("feeds", type_=sa.Integer),
            )
            .table_valued(
                *(sa.column(c.name, c.type) for c in DELIVERY), sa.column("credit", sa.Integer)
            )
            .c
        )

    async def claim(
        self,
        *,
        worker_id: str,
        tasks: Sequence[str],
        slots: int,
        lease_seconds: float,
        keys: Mapping[str, str] | None = None,
        feeds: int = 1,
    ) -> Claimed:
        """Lease up to this worker's free credit of due runs, in one statement.

        Credit is slots minus the runs already leased to the worker, counted
        in the same statement, so it holds across app processes. The attempt
        is counted here; the lease token fences every later report. A run
        whose `rejected_by` is this worker's key for its task (`keys`: the
        fingerprint of its signature; else its id) is left to others.

        `feeds`: how many feeds (this one included) serve these tasks. When
        several do, the claim takes at most its share of the due runs, so a
        small batch is spread over the workers instead of going all to the
        first feed that wakes; a backlog beyond every feed's credit is
        taken credit by credit.
        """
        tasks = sorted(set(tasks))
        rejecters = [(keys or {}).get(task) or worker_id for task in tasks]
        token = uuid.uuid4().hex
        expires = self._db.lease_clock.after(lease_seconds)
        if self._db.is_pg:
            # Two claims for one worker (a reconnect overlapping its old
            # stream, perhaps on another app process) would each count the
            # other's rows as free: bgtasks_claim serialises them on a
            # per-worker lock taken before the claim's snapshot.
            statement = self._pg_claim
            params: dict[str, Any] = {
                "worker": worker_id, "tasks": tasks, "keys": rejecters, "slots": slots,
                "expires": expires, "token": token, "feeds": max(1, feeds),
            }  # fmt: skip
        else:
            statement = self._sqlite_claim(tuple(tasks))
            now = self._db.wall_now()
            params = {"worker": worker_id, "slots": slots, "now": now, "token": token,
                      "expires": expires}  # fmt: skip
            params.update({f"key{i}": key for i, key in enumerate(rejecters)})
            limit = await self._sqlite_limit(tuple(tasks), params, slots, feeds)
            params["share"] = limit
        async with self._db.one() as conn:
            returned = list(await conn.execute(statement, params))
        if self._db.is_pg and returned:
            limit = returned[0].credit
        rows = Claimed(delivery_row(r) for r in returned)
        rows.sort(key=lambda r: (-r["priority"], r["scheduled_at"]))
        rows.exhausted = bool(rows) and len(rows) < limit
        return rows

    async def _sqlite_limit(
        self, tasks: tuple[str, ...], params: dict[str, Any], slots: int, feeds: int
    ) -> int:
        """The most this claim takes: the worker's free credit, and when
        `feeds` feeds serve the tasks, at most its share of the due runs
        (counted up to slots x feeds). Read before the claim, which stays
        one statement and counts the credit again: a limit a little off
        only shifts a run to the next claim."""
        async with self._db.read() as conn:
            held = await conn.scalar(self._held, {"worker": params["worker"]}) or 0
        free = max(0, slots - held)
        if feeds <= 1 or free == 0:
            return free
        statement = self._counts.get(tasks)
        if statement is None:
            statement = _due_count(tasks)
            if len(self._counts) < _MAX_CACHED_CLAIMS:
                self._counts[tasks] = statement
        async with self._db.read() as conn:
            due = await conn.scalar(statement, {**params, "cap": slots * feeds}) or 0
        return min(free, max(1, -(-due // feeds)))

    def _sqlite_claim(self, tasks: tuple[str, ...]) -> Any:
        """SQLite's claim for these tasks, built once: credit counted in the
        statement, one index scan per task in claim order (task IN (...)
        would sort every waiting run of those tasks on each claim)."""
        cached = self._claims.get(tasks)
        if cached is not None:
            return cached
        held = self._held.scalar_subquery()
        free = sa.func.max(0, sa.bindparam("slots", type_=sa.Integer) - held)
        # At most `share` (the slots when one feed serves the tasks).
        credit = sa.func.min(free, sa.bindparam("share", type_=sa.Integer))
        branches = [
            sa.select(runs.c.id, runs.c.priority, runs.c.scheduled_at)
            .where(*_claimable(i, task))
            .order_by(runs.c.priority.desc(), runs.c.scheduled_at)
            .limit(credit)
            for i, task in enumerate(tasks)
        ]
        if len(branches) == 1:
            due = branches[0].with_only_columns(runs.c.id)
        else:
            merged = sa.union_all(*(sa.select(*b.subquery().c) for b in branches)).subquery()
            due = (
                sa.select(merged.c.id)
                .order_by(merged.c.priority.desc(), merged.c.scheduled_at)
                .limit(credit)
            )
        statement = (
            runs.update()
            .where(runs.c.id.in_(due.scalar_subquery()))
            .values(
                state=S.PENDING.value,
                attempt=runs.c.attempt + 1,
                worker_id=sa.bindparam("worker"),
                lease_token=sa.bindparam("token"),
                lease_expires_at=sa.bindparam("expires", type_=sa.DateTime(timezone=True)),
                updated_at=sa.bindparam("now", type_=sa.DateTime(timezone=True)),
                reason=None,
            )
            .returning(*DELIVERY)
        )
        if len(self._claims) < _MAX_CACHED_CLAIMS:
            self._claims[tasks] = statement
        return statement

    async def release_unsent(self, leases: Sequence[tuple[uuid.UUID, str]]) -> int:
        """Claimed but never written to the stream: back to SCHEDULED, the
        attempt not spent."""
        if not leases:
            return 0
        released = 0
        async with self._db.write() as conn:
            for run_id, token in leases:
                result = await conn.execute(
                    runs.update()
                    .where(
                        runs.c.id == run_id,
                        runs.c.lease_token == token,
                        moves(Event.RELEASE_UNSENT),
                    )
                    .values(
                        state=S.SCHEDULED.value,
                        attempt=runs.c.attempt - 1,
                        worker_id=None,
                        lease_token=None,
                        lease_expires_at=None,
                        updated_at=self._db.now(),
                        reason="released_unsent",
                    )
                )
                released += result.rowcount
        return released

    async def cancel_run(self, run_id: uuid.UUID) -> RunRow:
        """SCHEDULED → CANCELLED at once; a leased run is flagged for its
        worker, which stops it and reports CANCELLED."""
        now = self._db.now()
        cancel = (
            runs.update()
            .where(runs.c.id == run_id, moves(Event.CANCEL))
            .values(state=S.CANCELLED.value, finished_at=now, updated_at=now,
                    reason="cancelled", cancel_requested=True)
            .returning(*runs.c)
        )  # fmt: skip
        flag = (
            runs.update()
            .where(runs.c.id == run_id, ACTIVE)
            .values(cancel_requested=True)
            .returning(*runs.c)
        )
        async with self._db.write() as conn:
            row = (await conn.execute(cancel)).first() or (await conn.execute(flag)).first()
            if row is None:
                row = (await conn.execute(sa.select(runs).where(runs.c.id == run_id))).first()
                if row is None:
                    raise RunNotFound()
                raise RunFinished(f"Run {run_id} already ended {row.state}; nothing to cancel.")
        return run_row(row)

    async def heartbeat(
        self, *, worker_id: str, held: Sequence[tuple[uuid.UUID, str]], lease_seconds: float
    ) -> tuple[list[uuid.UUID], list[uuid.UUID], list[uuid.UUID]]:
        """Renew this worker's leases in one statement.

        Returns (renewed, stop, cancel): `stop` lists runs the worker no longer
        holds (drop them), `cancel` runs a user asked to cancel.
        """
        if not held:
            return [], [], []
        tokens = {run_id: token for run_id, token in held}
        mine = sa.and_(
            runs.c.worker_id == worker_id,
            ACTIVE,
            # (id, token) pairs: a stale token renews nothing.
            sa.tuple_(runs.c.id, runs.c.lease_token).in_(list(tokens.items())),
        )
        if self._db.is_pg:
            # Lock in id order, as report batches do: the two never deadlock.
            locked = sa.select(runs.c.id).where(mine).order_by(runs.c.id).with_for_update()
            mine = runs.c.id.in_(locked.scalar_subquery())
        statement = (
            runs.update()
            .where(mine)
            .values(lease_expires_at=self._db.lease_clock.after(lease_seconds))
            .returning(runs.c.id, runs.c.lease_token, runs.c.cancel_requested)
        )
        async with self._db.one() as conn:
            rows = list(await conn.execute(statement))
        renewed = [r.id for r in rows if tokens.get(r.id) == r.lease_token]
        cancel = [r.id for r in rows if r.cancel_requested and tokens.get(r.id) == r.lease_token]
        kept = set(renewed)
        stop = [run_id for run_id in tokens if run_id not in kept]
        return renewed, stop, cancel

    async def reap_expired_runs(
        self, on_lost: Callable[[set[str]], None] | None = None
    ) -> list[tuple[uuid.UUID, str, str | None]]:
        """Runs whose lease expired go back to SCHEDULED without spending a
        retry, or end CRASHED once their rescues are spent. A conditional
        update: harmless when several app processes run it at once. Returns
        (run id, new state, the worker that lost it)."""
        now = self._db.now()
        # Expiry on the lease clock; the run's own times on the store's.
        lease_now = sa.literal(self._db.lease_clock.now(), sa.DateTime(timezone=True))
        expired = sa.and_(moves(Event.REAP), runs.c.lease_expires_at < lease_now)
        # The worker that lost each run, read before the update clears it.
        lost_by = sa.select(runs.c.id, runs.c.worker_id).where(expired)
        async with self._db.write() as conn:
            workers = {r.id: r.worker_id for r in await conn.execute(lost_by)}
            if not workers:
                return []
            if on_lost is not None:
                # Before the runs become claimable again: a feed of a lost
                # worker checks this mark after each claim.
                on_lost({w for w in workers.values() if w is not None})
            reaped = await conn.execute(_reap(expired, now))
            return [(r.id, r.state, workers.get(r.id)) for r in reaped]


def _claimable(i: int, task: str) -> tuple[Any, ...]:
    """SQLite: what makes a run of `task` claimable now by this worker. A
    run rejected by a worker with this one's key for the task (`:key<i>`:
    the same signature, or the same worker) would be rejected again."""
    now = sa.bindparam("now", type_=sa.DateTime(timezone=True))
    return (
        moves(Event.CLAIM),
        runs.c.task == task,
        runs.c.scheduled_at <= now,
        runs.c.rejected_by.is_distinct_from(sa.bindparam(f"key{i}", type_=sa.String)),
    )


def _due_count(tasks: tuple[str, ...]) -> Any:
    """SQLite: the runs of `tasks` a claim could take now, counted up to
    `cap` per task (the keys as in the claim)."""
    branches = [
        sa.select(sa.literal(1).label("one"))
        .select_from(runs)
        .where(*_claimable(i, task))
        .limit(sa.bindparam("cap", type_=sa.Integer))
        .subquery()
        for i, task in enumerate(tasks)
    ]
    # Each branch as a subquery: SQLite takes no LIMIT inside a compound select.
    counted = sa.union_all(*(sa.select(*b.c) for b in branches)).subquery()
    return sa.select(sa.func.count()).select_from(counted)


def _reap(expired: Any, now: Any) -> Any:
    """The reaper's update: the REAP edges of states.EDGES, picked by their guards."""
    cancelled = runs.c.cancel_requested
    exhausted = runs.c.rescues >= runs.c.max_rescues
    ends = sa.or_(cancelled, exhausted)
    return (
        runs.update()
        .where(expired)
        .values(
            state=sa.case(
                (cancelled, S.CANCELLED.value),
                (exhausted, S.CRASHED.value),
                else_=S.SCHEDULED.value,
            ),
            rescues=sa.case((ends, runs.c.rescues), else_=runs.c.rescues + 1),
            error=sa.case(
                (sa.and_(exhausted, sa.not_(cancelled)), sa.literal(_WORKER_LOST, sa.JSON)),
                else_=runs.c.error,
            ),
            finished_at=sa.case((ends, now), else_=None),
            scheduled_at=sa.case((ends, runs.c.scheduled_at), else_=now),
            worker_id=sa.case((ends, runs.c.worker_id), else_=None),
            # The lease is gone: any later report under it is stale.
            lease_token=None,
            lease_expires_at=None,
            updated_at=now,
            reason=sa.case((cancelled, "cancelled"), else_="worker_lost"),
        )
        .returning(runs.c.id, runs.c.state)
    )
