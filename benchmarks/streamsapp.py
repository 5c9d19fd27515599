"""The app of the idle-streams benchmark (`python -m benchmarks.idle_streams`):
default timings, its caps on feeds and run event streams read from the
environment."""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI

from fastapi_bgtasks import BgTasks

_caps: dict[str, Any] = {
    name: int(os.environ[f"BENCH_{name.upper()}"])
    for name in ("max_streams", "max_feeds", "max_streams_per_client", "max_streams_per_run")
    if f"BENCH_{name.upper()}" in os.environ
}
bg = BgTasks(os.environ.get("BGTASKS_DATABASE_URL"), **_caps)


@bg.task
async def noop() -> None:
    """Served by the idle feeds; nothing submits it."""


@bg.task
async def watched() -> None:
    """Submitted and watched by the streams; nothing serves it."""


app = FastAPI(lifespan=bg.lifespan)
app.mount("/tasks", bg.app)
