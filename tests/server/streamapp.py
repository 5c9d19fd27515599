"""The host app of the event-stream and idle-feed tests (test_streams.py),
served by uvicorn: caps and `poll_seconds` from the environment, and a
test-only route with the streams' counts and the SQL statements the store
has sent (the wake-up watcher's `PRAGMA data_version` left out).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from sqlalchemy import event

from fastapi_bgtasks import BgTasks

_OPTIONS = ("max_streams", "max_streams_per_client", "max_streams_per_run", "max_feeds")
bg = BgTasks(
    os.environ.get("BGTASKS_DATABASE_URL"),
    poll_seconds=float(os.environ.get("BGTASKS_TEST_POLL", "1.0")),
    **{
        name: int(os.environ[f"BGTASKS_TEST_{name.upper()}"])
        for name in _OPTIONS
        if f"BGTASKS_TEST_{name.upper()}" in os.environ
    },
)
statements: dict[str, int] = {"all": 0}


@bg.task
async def idle() -> None:
    """Served by the tests' feeds; nothing submits it."""


@bg.task
async def watched() -> None:
    """Submitted and watched by the tests' streams; nothing serves it."""


def _count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
    if "data_version" not in statement:
        statements["all"] += 1


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with bg.lifespan(app):
        assert bg.running is not None
        db = bg.running.store.db
        db.open()
        for engine in {id(e): e for e in (db._writer, db._reader) if e is not None}.values():
            event.listen(engine.sync_engine, "before_cursor_execute", _count)
        yield


app = FastAPI(lifespan=lifespan)
app.mount("/tasks", bg.app)


@app.get("/__test__/streams")
def streams_state() -> dict[str, int]:
    running = bg.running
    assert running is not None
    watchers = running.wakeups.watched
    return {
        "open": watchers.open,
        "reads": watchers.reads,
        "reader_statements": watchers.statements,
        "statements": statements["all"],
    }
