"""The app and task the benchmarks run: a no-op, so the figures measure the
library, not the task."""

from __future__ import annotations

import os

from fastapi import FastAPI

from fastapi_bgtasks import BgTasks

bg = BgTasks(os.environ.get("BGTASKS_DATABASE_URL"), poll_seconds=1.0)


@bg.task
async def noop() -> None:
    return None


app = FastAPI(lifespan=bg.lifespan)
app.mount("/tasks", bg.app)
