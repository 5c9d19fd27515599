"""The app after the deploy, serving tasks_v2."""

from __future__ import annotations

from fastapi import FastAPI

from tests.skew.tasks_v2 import bg

app = FastAPI(lifespan=bg.lifespan)
app.mount("/tasks", bg.app)
