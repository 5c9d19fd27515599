"""Cross-process wake-ups: how an app process learns that another one (or
a submitter without a lifespan) wrote runs, so its feeds claim at once
instead of at their next poll. PostgreSQL: NOTIFY and LISTEN; SQLite:
PRAGMA data_version. An app process NOTIFYs on the connection it LISTENs
on and ignores its own notifications: its feeds were woken in-process.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import sqlalchemy as sa

from ..backoff import Backoff
from .dialect import Database
from .submits import NOTIFY_CHANNEL

__all__ = ["Channel", "notify", "watch"]

log = logging.getLogger("fastapi_bgtasks.store")

# Within NOTIFY's 8,000-byte limit; a payload cut there names some task.
_PAYLOAD_LIMIT = 7000


def _names(payload: str) -> str | None:
    """The task names a payload carries, or None if it may have been cut."""
    return payload if len(payload) < _PAYLOAD_LIMIT else None


@dataclass
class Channel:
    """The LISTEN connection of one app process (PostgreSQL), shared with its
    NOTIFY sender under a lock: a notification whose sender is this very
    connection is this process's own, and wakes nothing here."""

    conn: Any = None  # asyncpg.Connection while listening
    lock: anyio.Lock = field(default_factory=anyio.Lock)


async def notify(db: Database, tasks: Sequence[str], channel: Channel | None = None) -> None:
    """Tell other app processes that runs of these tasks are waiting.
    Sent after the submit's commit, outside its transaction; on the
    listening connection when there is one (its echo is then ignored)."""
    if not db.is_pg or not tasks:
        return
    # Listeners re-claim for every task they serve whatever the payload:
    # one NOTIFY carries the whole coalesced set, within NOTIFY's size limit.
    payload = ",".join(tasks)[:_PAYLOAD_LIMIT]
    if channel is not None and channel.conn is not None:
        async with channel.lock:
            conn = channel.conn
            if conn is not None and not conn.is_closed():
                await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, payload, timeout=10)
                return
    statement = sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, sa.bindparam("payload", payload)))
    async with db.one() as conn:
        await conn.execute(statement)


async def watch(
    db: Database, on_change: Callable[[str | None], None], channel: Channel | None = None
) -> None:
    """Call `on_change(tasks or None)` whenever another process writes runs
    (`tasks`: a NOTIFY's comma-joined task names, `*` for any).

    PostgreSQL: LISTEN on a dedicated connection, re-opened with back-off;
    every (re)connect is followed by `on_change(None)` (a full claim pass).
    SQLite: PRAGMA data_version on a dedicated connection; on a change, again
    on the writer connection, where it moves only for other connections'
    commits (this process's own writes wake nothing).
    Runs until cancelled.
    """
    if db.is_pg:
        await _watch_pg(db, on_change, channel or Channel())
    else:
        await _watch_sqlite(db, on_change)


async def _watch_pg(
    db: Database, on_change: Callable[[str | None], None], channel: Channel
) -> None:
    # Imported here: a process on SQLite never loads PostgreSQL's driver (3 MB).
    import asyncpg

    backoff = Backoff(0.1, 5.0, jitter=False)
    dsn = db.url.set(drivername="postgresql").render_as_string(hide_password=False)
    while True:
        conn = None
        try:
            conn = await asyncpg.connect(
                dsn, timeout=10, server_settings={"application_name": "fastapi_bgtasks"}
            )
            lost = anyio.Event()
            conn.add_termination_listener(lambda _c, lost=lost: lost.set())
            own = conn.get_server_pid()

            def heard(_c: object, pid: int, _channel: str, payload: str, own: int = own) -> None:
                if pid != own:
                    on_change(_names(payload))

            await conn.add_listener(NOTIFY_CHANNEL, heard)
            channel.conn = conn
            on_change(None)
            backoff.reset()
            while not lost.is_set():
                with anyio.move_on_after(5):
                    await lost.wait()
                if not lost.is_set():
                    async with channel.lock:  # the sender shares this connection
                        await conn.execute("SELECT 1", timeout=5)  # notice a half-open link
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            log.warning("Wake-up listener lost the database (%s); reconnecting", exc)
        finally:
            channel.conn = None
            if conn is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                    await conn.close(timeout=2)
        await backoff.sleep()


# SQLite: how often the poller thread reads data_version (a few
# microseconds in C, off the event loop), and at most how often a change
# costs a read on the writer connection while writes keep coming.
_POLL_SECONDS = 0.004
_CHECK_SECONDS = 0.02


async def _watch_sqlite(db: Database, on_change: Callable[[str | None], None]) -> None:
    """A thread of its own reads data_version every 4 ms with the stdlib
    driver and wakes the loop on a change; the loop then asks the writer
    connection whether the change was another connection's. A submit from
    a script is seen within milliseconds, and an idle app costs a fraction
    of a percent of a core."""
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()
    stop = threading.Event()
    failures: list[BaseException] = []

    def signal(failure: BaseException | None = None) -> None:
        if failure is not None:
            failures.append(failure)
        changed.set()

    poller = threading.Thread(
        target=_poll_data_version,
        args=(db.url.database or "", stop, lambda f=None: loop.call_soon_threadsafe(signal, f)),
        name="fastapi_bgtasks data_version",
        daemon=True,
    )
    poller.start()
    try:
        ours = await _writer_version(db)
        while True:
            await changed.wait()
            changed.clear()
            if failures:
                log.warning("Wake-up watcher lost the SQLite file (%s); retrying", failures[-1])
                failures.clear()
                on_change(None)  # what it may have missed
                continue
            # Someone committed. On the writer, the connection this process
            # writes with, data_version moves only for other connections'
            # commits: this process's own writes are announced in-process,
            # by run id, and wake nothing here.
            theirs = await _writer_version(db)
            if theirs is None or theirs != ours:
                on_change(None)
            ours = theirs
            await anyio.sleep(_CHECK_SECONDS)
    finally:
        stop.set()


def _poll_data_version(path: str, stop: threading.Event, wake: Callable[..., object]) -> None:
    """The poller thread: wake(None) on every change of data_version,
    wake(error) when the file cannot be read (then again a second later)."""
    import sqlite3  # here: a process on PostgreSQL never loads SQLite's driver

    while not stop.is_set():
        conn = None
        try:
            conn = sqlite3.connect(path, timeout=30, check_same_thread=False)
            last = conn.execute("PRAGMA data_version").fetchone()[0]
            while not stop.wait(_POLL_SECONDS):
                version = conn.execute("PRAGMA data_version").fetchone()[0]
                if version != last:
                    last = version
                    wake()
        except (OSError, sqlite3.Error) as exc:
            try:
                wake(exc)
            except RuntimeError:  # the loop is closed: the app has ended
                return
            stop.wait(1.0)
        except RuntimeError:  # the loop is closed: the app has ended
            return
        finally:
            if conn is not None:
                conn.close()


async def _writer_version(db: Database) -> object:
    """PRAGMA data_version on the writer connection (None if unreadable)."""
    try:
        # Shielded and bounded: a statement cancelled mid-way strands
        # aiosqlite's connection thread.
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            async with db.one() as conn:
                return (await conn.exec_driver_sql("PRAGMA data_version")).scalar()
    except Exception as exc:
        log.warning("Wake-up watcher cannot read the writer's data_version (%s)", exc)
    return None
