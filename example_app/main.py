"""The example web app: the FastAPI examples among Prefect's background-task
examples (a basic app, then user signups), on fastapi_bgtasks.

uvicorn example_app.main:app
"""

from __future__ import annotations

import uuid

from fastapi import Depends, FastAPI
from pydantic import BaseModel

from fastapi_bgtasks import Submitter

from .tasks import bg, my_background_task, send_welcome_email

app = FastAPI(title="fastapi_bgtasks example", lifespan=bg.lifespan)
app.mount("/tasks", bg.app)
bg.install(app)  # library errors in these routes answer as under /tasks (404, 503, ...)


@app.get("/")
async def root() -> dict[str, str]:
    return {"message": "Hello World; POST /task?name=... or POST /users?email=..."}


@app.post("/task", status_code=202)
async def run_task(
    name: str = "Marvin", submit: Submitter = Depends(bg.submitter)
) -> dict[str, str]:
    """Defer the greeting; poll /tasks/runs/{task_run_id} for its result."""
    run = await submit.delay(my_background_task, name)
    return {"task_run_id": str(run.id)}


class Signup(BaseModel):
    email: str


@app.post("/users", status_code=202)
async def signup(body: Signup, submit: Submitter = Depends(bg.submitter)) -> dict[str, str]:
    """The user-signup flow: store the user (elided), defer the welcome email."""
    run = await submit.delay(send_welcome_email, body.email)
    return {"task_run_id": str(run.id)}


@app.get("/users/signup-status/{task_run_id}")
async def signup_status(task_run_id: uuid.UUID) -> dict[str, object]:
    """What a frontend polls (it could also poll /tasks/runs/{id} directly).
    An unknown id is a 404 `run_not_found`, a database that cannot answer a
    503 `store_unavailable`: `bg.install(app)` answers them."""
    run = await bg.read_run(task_run_id)
    return {"state": run.state.value, "result": run.result}
