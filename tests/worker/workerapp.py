"""The host app of tests/worker/: results may be at most 1000 bytes as
stored; one task returns `n` CJK characters (3 UTF-8 bytes each, 6 as JSON
escapes), another raises an exception whose message is not valid Unicode."""

from __future__ import annotations

import os

from fastapi import FastAPI

from fastapi_bgtasks import BgTasks

LIMIT = 1000

bg = BgTasks(os.environ.get("BGTASKS_DATABASE_URL"), max_result_bytes=LIMIT)


@bg.task
async def cjk(n: int) -> str:
    return "語" * n


@bg.task
async def unspeakable() -> None:
    raise ValueError("lone surrogate: \udcff end")


app = FastAPI(lifespan=bg.lifespan)
app.mount("/tasks", bg.app)
