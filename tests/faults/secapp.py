"""The host app the security scenarios (tests/faults/test_security.py) run
under uvicorn: a worker token from BGTASKS_TOKEN, small caps on feeds, event
streams and the database pool read from the environment, and a test-only
route that reports what the hub holds open.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI

from fastapi_bgtasks import BgTasks

bg = BgTasks(
    os.environ.get("BGTASKS_DATABASE_URL"),
    lease_seconds=30.0,
    # Streams and feeds wake on events; a slow poll keeps the pool quiet, so a
    # checked-out connection seen while streams are open is one they hold.
    poll_seconds=float(os.environ.get("BGTASKS_SEC_POLL", "5")),
    reaper_seconds=5.0,
    max_feeds=int(os.environ.get("BGTASKS_SEC_MAX_FEEDS", "3")),
    max_streams=int(os.environ.get("BGTASKS_SEC_MAX_STREAMS", "10")),
    pool_size=int(os.environ.get("BGTASKS_SEC_POOL_SIZE", "2")),
    # With a token, the probes' loopback addresses stand in for clients of a
    # reverse proxy on the same host: no client is trusted for its address.
    # Without one (the open app), loopback trust is what is under test.
    trust_loopback=not os.environ.get("BGTASKS_TOKEN"),
)


@bg.task
def echo(value: Any = None) -> Any:
    return value


@bg.task
async def add(a: int, b: int) -> int:
    return a + b


app = FastAPI(lifespan=bg.lifespan)
app.mount("/tasks", bg.app)


def _checked_out(engine: Any) -> int | None:
    pool = getattr(engine, "pool", None)
    checkedout = getattr(pool, "checkedout", None)
    return int(checkedout()) if callable(checkedout) else None


@app.get("/__test__/state")
def hub_state() -> dict[str, Any]:
    """Open feeds and event streams, and connections checked out of the pool
    (None where the store's engines cannot be read)."""
    running = bg.running
    if running is None:
        return {"running": False}
    db = running.store.db
    engines = {id(e): e for e in (getattr(db, n, None) for n in ("_writer", "_reader"))}
    counts = [_checked_out(e) for e in engines.values() if e is not None]
    return {
        "running": True,
        "open_feeds": sum(running.open_feeds.values()),
        "open_streams": running.wakeups.watched.open,
        "checked_out": sum(counts) if counts and None not in counts else None,
        "pool_size": bg.settings.pool_size,
        # PostgreSQL connections of the submit fast path (store/fastpath.py).
        "direct_connections": running.store.direct_connections,
        "max_feeds": bg.settings.max_feeds,
        "max_streams": bg.settings.max_streams,
    }
