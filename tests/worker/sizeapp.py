"""A host app whose results may be at most 1000 bytes as stored, and a task
returning `n` CJK characters (3 UTF-8 bytes each, 6 as JSON escapes)."""

from __future__ import annotations

import os

from fastapi import FastAPI

from fastapi_bgtasks import BgTasks

LIMIT = 1000

bg = BgTasks(os.environ.get("BGTASKS_DATABASE_URL"), max_result_bytes=LIMIT)


@bg.task
async def cjk(n: int) -> str:
    return "語" * n


app = FastAPI(lifespan=bg.lifespan)
app.mount("/tasks", bg.app)
