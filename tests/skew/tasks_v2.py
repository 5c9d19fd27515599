"""The same task module after the deploy: `resize` takes `width` and
`height`, which the old signature cannot bind. Also a task no worker of the
tests serves, and one that fails with a validation error of its own."""

from __future__ import annotations

import os

from pydantic import BaseModel

from fastapi_bgtasks import BgTasks
from tests import timing

bg = BgTasks(
    os.environ.get("BGTASKS_DATABASE_URL"),
    lease_seconds=timing.LEASE_SECONDS,
    heartbeat_seconds=timing.HEARTBEAT_SECONDS,
    reaper_seconds=timing.REAPER_SECONDS,
    poll_seconds=timing.POLL_SECONDS,
)


class Card(BaseModel):
    number: int


@bg.task
def resize(width: int, height: int) -> str:
    return f"new:{width}x{height}"


@bg.task
def unserved(n: int) -> int:
    return n


@bg.task
def check_card(raw: str) -> int:
    # Fails with pydantic's own error, whose text would hold `raw`.
    return Card.model_validate({"number": raw}).number
