"""The app of the idle-streams benchmark (`python -m benchmarks.idle_streams`):
default timings, its caps on feeds and run event streams read from the
environment."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from sqlalchemy import event

from fastapi_bgtasks import BgTasks

_caps: dict[str, Any] = {
    name: int(os.environ[f"BENCH_{name.upper()}"])
    for name in ("max_streams", "max_feeds", "max_streams_per_client", "max_streams_per_run")
    if f"BENCH_{name.upper()}" in os.environ
}
bg = BgTasks(os.environ.get("BGTASKS_DATABASE_URL"), **_caps)
statements = {"all": 0}


@bg.task
async def noop() -> None:
    """Served by the idle feeds; nothing submits it."""


@bg.task
async def watched() -> None:
    """Submitted and watched by the streams; nothing serves it."""


@bg.task
async def work() -> None:
    """The batch (`--batch`), served by one real worker."""


def _count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
    if "data_version" not in statement:  # the SQLite wake-up watcher's
        statements["all"] += 1


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The hub's lifespan, with every SQL statement the store sends counted."""
    async with bg.lifespan(app):
        assert bg.running is not None
        db = bg.running.store.db
        for engine in {id(e): e for e in (db._writer, db._reader) if e is not None}.values():
            event.listen(engine.sync_engine, "before_cursor_execute", _count)
        yield


app = FastAPI(lifespan=lifespan)
app.mount("/tasks", bg.app)


@app.get("/__bench__/statements")
def counted() -> dict[str, int]:
    return statements
