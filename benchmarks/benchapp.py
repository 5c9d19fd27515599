"""The app and tasks the benchmarks run: no-ops, so the figures measure the
library, not the tasks.

- `noop`: the unit of throughput (W1, W2, W1c, W5's route, W7).
- `stamp`: returns when its body started, so pickup latency (W3) is read
  from the stored results without any other channel.
- `item`: one element of a bulk `map` (W6).
- `POST /submit` and `POST /baseline`: one route that submits a run and its
  twin that does not, so W5's difference is the cost of `delay` in a route.
"""

from __future__ import annotations

import os
import time
import uuid

from fastapi import Depends, FastAPI

from fastapi_bgtasks import BgTasks, Submitter

bg = BgTasks(os.environ.get("BGTASKS_DATABASE_URL"), poll_seconds=1.0)

# What /baseline answers: shaped like a run id, so both routes send the same bytes.
BASELINE_ID = str(uuid.UUID(int=0))


@bg.task
async def noop() -> None:
    return None


@bg.task
async def stamp() -> float:
    """The wall clock when the body starts (the submitter stamps its side)."""
    return time.time()


@bg.task
async def item(i: int) -> None:
    return None


app = FastAPI(lifespan=bg.lifespan)
app.mount("/tasks", bg.app)


@app.post("/submit")
async def submit_noop(submit: Submitter = Depends(bg.submitter)) -> dict[str, str]:
    run = await submit.delay(noop)
    return {"id": str(run.id)}


@app.post("/baseline")
async def baseline(submit: Submitter = Depends(bg.submitter)) -> dict[str, str]:
    """/submit without the delay call: the same dependency, the same response."""
    return {"id": BASELINE_ID}
