"""Measuring a drain from outside, the same way for both queues, in the two
shapes the workloads share: `submitted` (W1: a script submits while the
workers wait) and `backlog` (DRAIN: the runs are queued, then one worker
starts). A probe says how many runs have finished and whether the first
claim has happened, and afterwards reads the times each queue stored in
its own tables:

    time              ours                               PgQueuer (pgqueuer_log)
    first submitted   min(bgtasks_runs.created_at)       min(created), status queued
    first claimed     min(bgtasks_run_history.at),       min(created), status picked
                      to_state PENDING
    last finished     max(bgtasks_runs.finished_at)      max(created), status successful

Each is the database's `now()` of the statement that made the change (ours
on SQLite: the app's clock). A probe polls on one connection of its own,
every statement one transaction, and counts them (`statements`), so the
commits it adds to the bench database are subtracted.
"""

from __future__ import annotations

import sqlite3
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any

import anyio

from benchmarks.cost import SAMPLE_SECONDS, Meter, cpu_seconds
from benchmarks.harness import Bench, Database, as_datetime, drain_timeout

# How often the first claim is looked for: its time is read from the store,
# this only decides when the worker's CPU starts to count.
FIRST_CLAIM_POLL_SECONDS = 0.005


@dataclass(frozen=True)
class Window:
    submitted: datetime
    claimed: datetime
    finished: datetime
    count: int  # runs finished


class Probe:
    """One connection, one transaction per statement, each counted; the
    queue's reads are its subclasses'."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.statements = 0
        self.backend_pid: int | None = None
        self._pg: Any = None
        self._sqlite: sqlite3.Connection | None = None

    async def __aenter__(self) -> Probe:
        if self.db.backend == "postgres":
            import asyncpg

            self._pg = await asyncpg.connect(self.db.dsn)
            self.backend_pid = int(await self._scalar("SELECT pg_backend_pid()"))
        else:
            assert self.db.path is not None
            self._sqlite = sqlite3.connect(self.db.path, isolation_level=None, timeout=30)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._pg is not None:
            await self._pg.close()  # an exiting backend flushes its counters
        if self._sqlite is not None:
            self._sqlite.close()

    async def _scalar(self, sql: str, *args: Any) -> Any:
        """`sql` with at most one parameter, written `?` (`$1` on asyncpg)."""
        self.statements += 1
        if self._pg is not None:
            return await self._pg.fetchval(sql.replace("?", "$1"), *args)
        assert self._sqlite is not None
        return self._sqlite.execute(sql, args).fetchone()[0]

    async def transitions(self) -> int:
        """The last id of the queue's history: it grows at the first claim."""
        raise NotImplementedError

    async def finished(self) -> int:
        """How many runs have finished."""
        raise NotImplementedError

    async def window(self) -> Window:
        """The stored times, read on a connection of its own (after the counting)."""
        raise NotImplementedError


class OursProbe(Probe):
    """Runs of one task in our store."""

    def __init__(self, db: Database, task: str) -> None:
        super().__init__(db)
        self.task = task

    async def transitions(self) -> int:
        return int(await self._scalar("SELECT coalesce(max(id), 0) FROM bgtasks_run_history"))

    async def finished(self) -> int:
        sql = "SELECT count(*) FROM bgtasks_runs WHERE task = ? AND state = 'COMPLETED'"
        return int(await self._scalar(sql, self.task))

    async def window(self) -> Window:
        import sqlalchemy as sa

        from fastapi_bgtasks.store import Store, history, runs

        ours = runs.c.task == self.task
        claims = (
            sa.select(sa.func.min(history.c.at))
            .where(
                history.c.to_state == "PENDING",
                history.c.run_id.in_(sa.select(runs.c.id).where(ours)),
            )
            .scalar_subquery()
        )
        store = Store(self.db.url)
        await store.open()
        try:
            async with store.db.read() as conn:
                row = (
                    await conn.execute(
                        sa.select(
                            sa.func.min(runs.c.created_at),
                            claims,
                            sa.func.max(runs.c.finished_at),
                            sa.func.count().filter(runs.c.state == "COMPLETED"),
                        ).where(ours)
                    )
                ).one()
        finally:
            await store.close()
        return Window(as_datetime(row[0]), as_datetime(row[1]), as_datetime(row[2]), row[3])


class PeerProbe(Probe):
    """PgQueuer's jobs, through its queue table and its log (default names),
    counting only log rows after `after` (W1's warm-up job is before it)."""

    def __init__(self, db: Database, after: int = 0) -> None:
        super().__init__(db)
        self.after = after

    async def transitions(self) -> int:
        return int(await self._scalar("SELECT coalesce(max(id), 0) FROM pgqueuer_log"))

    async def finished(self) -> int:
        # The queue table holds only unfinished jobs: cheap to count, and
        # empty whenever a drain may be over; only then count the log.
        if await self._scalar("SELECT count(*) FROM pgqueuer"):
            return 0
        sql = "SELECT count(*) FROM pgqueuer_log WHERE status = 'successful' AND id > ?"
        return int(await self._scalar(sql, self.after))

    async def window(self) -> Window:
        import asyncpg

        conn = await asyncpg.connect(self.db.dsn)
        try:
            row = await conn.fetchrow(
                """SELECT min(created) FILTER (WHERE status = 'queued'),
                          min(created) FILTER (WHERE status = 'picked'),
                          max(created) FILTER (WHERE status = 'successful'),
                          count(*) FILTER (WHERE status = 'successful')
                   FROM pgqueuer_log WHERE id > $1""",
                self.after,
            )
        finally:
            await conn.close()
        return Window(row[0], row[1], row[2], row[3])


async def first_claim(probe: Probe, before: int, timeout: float, check: Callable[[], None]) -> None:
    """Return once the queue's history/log has grown past `before`: the
    worker claimed its first runs."""
    deadline = time.monotonic() + timeout
    while await probe.transitions() <= before:
        check()
        if time.monotonic() > deadline:
            raise RuntimeError(f"the worker claimed nothing within {timeout}s")
        await anyio.sleep(FIRST_CLAIM_POLL_SECONDS)


async def watch(
    meter: Meter, probe: Probe, runs: int, timeout: float, check: Callable[[], None]
) -> None:
    """Sample the meter until `runs` runs have finished."""
    deadline = time.monotonic() + timeout
    while True:
        await meter.sample()
        done = await probe.finished()
        if done >= runs:
            return
        check()
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {done} of {runs} runs finished within {timeout}s")
        await anyio.sleep(SAMPLE_SECONDS)


def _seconds(later: datetime, earlier: datetime) -> float:
    return (later - earlier).total_seconds()


async def submitted(
    bench: Bench,
    probe: Probe,
    roots: dict[int, str],
    client: Sequence[str],
    runs: int,
    *,
    profile_as: str | None = None,
) -> dict[str, Any]:
    """W1's shape: with the workers idle, a held client submits `runs` runs;
    submit/s from the client's loop, drain/s from the first submitted to the
    last finished, the cost from the client's start to the last finished
    (the client's own CPU from its loop)."""
    timeout = drain_timeout(runs)
    async with Meter(bench.db) as meter:
        for pid, role in roots.items():
            meter.track(role, pid)
        async with probe:
            if probe.backend_pid is not None:
                meter.exclude(probe.backend_pid)
            await meter.start()
            async with bench.held_client(*client, profile_as=profile_as) as held:

                def check() -> None:
                    bench.check_alive()
                    held.check()

                await watch(meter, probe, runs, timeout, check)
                out = await held.result()
                await meter.stop()
        cost = await meter.figures(
            runs, own_commits=probe.statements, submitter_cpu_s=out["submit_cpu_s"]
        )
    window = await probe.window()
    return {
        "runs": runs,
        "submit_per_s": runs / out["submit_seconds"],
        "drain_per_s": runs / _seconds(window.finished, window.submitted),
        **cost,
    }


async def backlog(
    bench: Bench,
    probe: Probe,
    roots: dict[int, str],
    start_worker: Callable[[], subprocess.Popen[bytes]],
    runs: int,
) -> dict[str, Any]:
    """DRAIN's shape: `runs` runs already queued, one worker started; drain/s
    from its first claim to the last finished, the cost over the same span
    (the worker's CPU from when its first claim is seen, so its imports and
    connect are left out: `startup_s` and `worker_start_cpu_s` say what they
    took)."""
    timeout = drain_timeout(runs)
    async with Meter(bench.db) as meter:
        for pid, role in roots.items():
            meter.track(role, pid)
        async with probe:
            if probe.backend_pid is not None:
                meter.exclude(probe.backend_pid)
            before = await probe.transitions()
            await meter.start()
            spawned = time.time()
            worker = start_worker()
            await first_claim(probe, before, timeout, bench.check_alive)
            meter.track("worker", worker.pid, from_now=True)
            start_cpu = cpu_seconds(worker.pid) or 0.0
            await watch(meter, probe, runs, timeout, bench.check_alive)
            await meter.stop()
        cost = await meter.figures(runs, own_commits=probe.statements)
    window = await probe.window()
    if window.count != runs:
        raise RuntimeError(f"{window.count} of {runs} runs finished")
    return {
        "runs": runs,
        "drain_per_s": runs / _seconds(window.finished, window.claimed),
        "startup_s": window.claimed.timestamp() - spawned,
        "worker_start_cpu_s": start_cpu,
        **cost,
    }
