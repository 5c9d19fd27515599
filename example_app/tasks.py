"""Tasks of the example app. Workers import this module:

python -m fastapi_bgtasks.worker example_app.tasks --url http://127.0.0.1:8000/tasks
"""

from __future__ import annotations

import asyncio
import time

from fastapi_bgtasks import BgTasks

# SQLite ./bgtasks.db unless BGTASKS_DATABASE_URL says otherwise.
bg = BgTasks()


@bg.task
def my_background_task(name: str) -> str:
    """Prefect's example background task: greet someone, out of the request."""
    greeting = f"Hello, {name}!"
    print(greeting, flush=True)
    return greeting


@bg.task(retries=3, retry_delay_seconds=[0.1, 0.5, 1], timeout_seconds=30)
async def send_welcome_email(email: str) -> str:
    """The signup flow's slow part: pretend to talk to a mail service."""
    await asyncio.sleep(0.05)
    return f"sent welcome email to {email}"


@bg.task(timeout_seconds=60)
def resize_image(width: int, height: int, *, scale: float = 0.5) -> dict[str, int]:
    """A CPU-bound sync task: runs in a worker thread."""
    time.sleep(0.01)
    return {"width": int(width * scale), "height": int(height * scale)}
