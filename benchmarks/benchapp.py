"""The app the benchmarks serve: the tasks of `benchtasks` mounted in a
FastAPI app, plus the two routes of W5.

- `POST /submit` and `POST /baseline`: one route that submits a run and its
  twin that does not, so W5's difference is the cost of `delay` in a route.
"""

from __future__ import annotations

import uuid

from fastapi import Depends, FastAPI

from benchmarks.benchtasks import bg, item, noop, stamp
from fastapi_bgtasks import Submitter

__all__ = ["app", "bg", "item", "noop", "stamp"]

# What /baseline answers: shaped like a run id, so both routes send the same bytes.
BASELINE_ID = str(uuid.UUID(int=0))

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
