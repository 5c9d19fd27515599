"""A task module as an older deploy had it: `resize` took one `size`. A
worker serving this module stands for a worker not yet upgraded."""

from __future__ import annotations

from fastapi_bgtasks import BgTasks

bg = BgTasks()  # a worker's hub: never opens the store


@bg.task
def resize(size: int) -> str:
    return f"old:{size}"
