"""Side by side with PgQueuer: its W1 and DRAIN, measured like ours, and the
two workloads that run both sides round by round, so that a round of ours
and a round of PgQueuer always share the machine's state of the moment.

- W1P: per round, the raw single-row INSERT+commit loop (the floor), our
  W1, PgQueuer's W1 (one `Queries.enqueue` per job from a script, one worker
  idle before).
- DRAIN: per round, ours at defaults, PgQueuer at defaults, ours with
  `--prefetch 90`, PgQueuer with `batch_size=100`; each drains a backlog of
  `drain_runs` runs queued before its one worker starts.

PgQueuer runs as its documentation runs it: the schema from `Queries.install`
(durable: every table logged), jobs from `Queries.enqueue`, the worker as
`pgq run` starts it (benchmarks/peerapp.py: `pgqueuer.run` on uvloop, its
default `batch_size=10`, no concurrency limit). Both sides commit with the
server's `synchronous_commit` (on). On SQLite the rounds run ours alone.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio

from benchmarks import raw, workloads
from benchmarks.harness import Bench, Context
from benchmarks.peerapp import NOOP
from benchmarks.probes import PeerProbe, backlog, submitted

BEST_PREFETCH = 90  # our worker's --prefetch at its best settings
PEER_BATCH = 100  # PgQueuer's dequeue batch size at its best settings


# -- PgQueuer's side ------------------------------------------------------------


async def _install(dsn: str) -> None:
    """PgQueuer's schema, as `pgq install` creates it."""
    import asyncpg
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.queries import Queries

    conn = await asyncpg.connect(dsn)
    try:
        await Queries(AsyncpgDriver(conn)).install()
    finally:
        await conn.close()


def _start_worker(bench: Bench, batch_size: int | None = None) -> subprocess.Popen[bytes]:
    """PgQueuer's worker (benchmarks/peerapp.py), returning as soon as it is started."""
    args = ["-m", "benchmarks.peerapp"]
    if batch_size is not None:
        args += ["--batch-size", str(batch_size)]
    return bench.spawn(args, bench.env)


async def _warm_up(bench: Bench, timeout: float = 30.0) -> int:
    """One job through the new worker, so W1 starts with it listening; the
    log's last id, after which W1's own rows come."""
    import asyncpg
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.queries import Queries

    conn = await asyncpg.connect(bench.db.dsn)
    try:
        await Queries(AsyncpgDriver(conn)).enqueue(NOOP, None)
        deadline = time.monotonic() + timeout
        done = "SELECT count(*) FROM pgqueuer_log WHERE status = 'successful'"
        while not await conn.fetchval(done):
            bench.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"PgQueuer's worker ran no job within {timeout}s")
            await anyio.sleep(0.02)
        return int(await conn.fetchval("SELECT max(id) FROM pgqueuer_log"))
    finally:
        await conn.close()


def peer_w1(backend: str, ctx: Context) -> dict[str, Any]:
    """W1 for PgQueuer: N jobs enqueued one by one by a script, one worker."""
    n = ctx.sizes.runs
    with Bench(backend) as bench:
        anyio.run(_install, bench.db.dsn)
        worker = _start_worker(bench)
        after = anyio.run(_warm_up, bench)
        client = ["peer-sequential", "--runs", str(n)]
        return anyio.run(
            submitted, bench, PeerProbe(bench.db, after), {worker.pid: "worker"}, client, n
        )


def peer_drain(backend: str, ctx: Context, batch_size: int | None = None) -> dict[str, Any]:
    """DRAIN for PgQueuer: N jobs from one batched enqueue, then one worker."""
    n = ctx.sizes.drain_runs
    with Bench(backend) as bench:
        anyio.run(_install, bench.db.dsn)
        queued = bench.client("peer-backlog", "--runs", str(n))
        figures = anyio.run(
            backlog, bench, PeerProbe(bench.db), {}, partial(_start_worker, bench, batch_size), n
        )
        return {"queue_per_s": n / queued["submit_seconds"], **figures}


# -- rounds ------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    key: str  # its figures are "{key}.{figure}"
    workload: str
    side: str
    setting: str
    run: Callable[[str, Context], dict[str, Any]]
    peer: bool = False  # PgQueuer's: PostgreSQL only


W1_CASES = (
    Case("raw", "W1", "raw", "INSERT+commit", raw.floor),
    Case("ours", "W1", "ours", "defaults", workloads.w1),
    Case("pgq", "W1", "PgQueuer", "defaults", peer_w1, peer=True),
)
DRAIN_CASES = (
    Case("ours", "DRAIN", "ours", "defaults", workloads.drain),
    Case("pgq", "DRAIN", "PgQueuer", "defaults", peer_drain, peer=True),
    Case(
        "ours_best", "DRAIN", "ours", f"--prefetch {BEST_PREFETCH}",
        partial(workloads.drain, prefetch=BEST_PREFETCH),
    ),
    Case(
        "pgq_best", "DRAIN", "PgQueuer", f"batch_size={PEER_BATCH}",
        partial(peer_drain, batch_size=PEER_BATCH), peer=True,
    ),
)  # fmt: skip
# (ours, PgQueuer) compared in each round, and the figures compared.
PAIRS = (("ours", "pgq"), ("ours_best", "pgq_best"))
RATIOS = (
    "submit_per_s", "drain_per_s", "cpu_ms_per_run", "commits_per_run",
    "wal_bytes_per_run", "wal_records_bytes_per_run",
)  # fmt: skip


def _round(cases: Sequence[Case], backend: str, ctx: Context) -> dict[str, Any]:
    """Every case once, in order (ours, then PgQueuer), and this round's ratios."""
    by_case: dict[str, dict[str, Any]] = {}
    for case in cases:
        if case.peer and backend != "postgres":
            continue
        print(f"    {case.workload} {case.side} {case.setting}", file=sys.stderr, flush=True)
        by_case[case.key] = case.run(backend, ctx)
    figures = {
        f"{key}.{name}": value for key, got in by_case.items() for name, value in got.items()
    }
    for ours, peer in PAIRS:
        if ours in by_case and peer in by_case:
            for name in RATIOS:
                mine, theirs = by_case[ours].get(name), by_case[peer].get(name)
                if mine is not None and theirs:
                    figures[f"{ours}/{peer}.{name}"] = mine / theirs
    if "raw" in by_case and "ours" in by_case:
        for name in ("submit_per_s", "drain_per_s"):
            figures[f"ours/raw.{name}"] = by_case["ours"][name] / by_case["raw"]["submit_per_s"]
    return figures


def w1p(backend: str, ctx: Context) -> dict[str, Any]:
    """One round of W1 side by side: the raw floor, ours, PgQueuer."""
    return _round(W1_CASES, backend, ctx)


def drain(backend: str, ctx: Context) -> dict[str, Any]:
    """One round of DRAIN side by side: each side at defaults, then at its best."""
    return _round(DRAIN_CASES, backend, ctx)


# -- the table ------------------------------------------------------------------------

_COST = (
    ("cpu_ms_per_run", "CPU ms/run", ".3f"),
    ("cpu_app_ms_per_run", "app", ".3f"),
    ("cpu_worker_ms_per_run", "worker", ".3f"),
    ("cpu_pg_ms_per_run", "PG", ".3f"),
)
_DB = (
    ("commits_per_run", "commits/run", ".2f"),
    ("wal_bytes_per_run", "WAL B/run", ".0f"),
    ("wal_records_bytes_per_run", "w/o FPI", ".0f"),
    ("wal_server_bytes_per_run", "server WAL", ".0f"),
)
W1_COLUMNS = (
    ("submit_per_s", "submit/s", ".0f"),
    ("drain_per_s", "drain/s", ".0f"),
    *_COST,
    ("cpu_submitter_ms_per_run", "submitter", ".3f"),
    *_DB,
)
DRAIN_COLUMNS = (
    ("queue_per_s", "queue/s", ".0f"),
    ("drain_per_s", "drain/s", ".0f"),
    ("startup_s", "startup s", ".2f"),
    *_COST,
    *_DB,
)
_RATIO_HEADERS = {
    "submit_per_s": "submit/s", "drain_per_s": "drain/s", "cpu_ms_per_run": "CPU/run",
    "commits_per_run": "commits/run", "wal_bytes_per_run": "WAL/run",
    "wal_records_bytes_per_run": "WAL w/o FPI",
}  # fmt: skip


Columns = Sequence[tuple[str, str, str]]  # figure, header, format


def render(
    cases: Sequence[Case], columns: Columns, title: str, rows: Sequence[dict[str, Any]]
) -> str:
    """One line per case and backend (its medians over the rounds), then the
    medians of the rounds' ratios."""
    head = f"{'backend':<9} {'workload':<8} {'side':<9} {'setting':<15}"
    lines = [title, head + "".join(f" {h:>11}" for _, h, _ in columns)]
    ratios: list[str] = []
    for row in rows:
        start = f"{row['backend']:<9}"
        if row.get("error") or "median" not in row:
            lines.append(f"{start} error: {str(row.get('error', 'no samples')).splitlines()[0]}")
            continue
        median = row["median"]
        for case in cases:
            if not any(k.startswith(case.key + ".") for k in median):
                continue
            values = [(median.get(f"{case.key}.{key}"), fmt) for key, _, fmt in columns]
            cells = "".join(f" {'-' if v is None else format(v, fmt):>11}" for v, fmt in values)
            lines.append(f"{start} {case.workload:<8} {case.side:<9} {case.setting:<15}{cells}")
        for key in sorted({k.rsplit(".", 1)[0] for k in median if "/" in k}):
            ours, other = key.split("/")
            what = "ours ÷ raw floor" if other == "raw" else "ours ÷ PgQueuer"
            if other != "raw":
                what += f" ({_setting(cases, ours)} ÷ {_setting(cases, other)})"
            parts = [
                f"{_RATIO_HEADERS[n]} {median[f'{key}.{n}']:.2f}"
                for n in RATIOS
                if f"{key}.{n}" in median
            ]
            ratios.append(f"{start} {what}: " + ", ".join(parts))
    if ratios:
        lines += ["ratios, median of the rounds' own ratios:", *ratios]
    return "\n".join(lines)


def _setting(cases: Sequence[Case], key: str) -> str:
    return next(c.setting for c in cases if c.key == key)


def render_w1p(title: str, rows: Sequence[dict[str, Any]]) -> str:
    return render(W1_CASES, W1_COLUMNS, title, rows)


def render_drain(title: str, rows: Sequence[dict[str, Any]]) -> str:
    return render(DRAIN_CASES, DRAIN_COLUMNS, title, rows)
