"""Example 2's other half: a script that defers three runs and waits for them.

    python -m example_app.submit

With BGTASKS_URL set (e.g. http://127.0.0.1:8000/tasks) it submits over
HTTP; otherwise straight to the store (./bgtasks.db), which the app's
lifespan must have created.
"""

from __future__ import annotations

import anyio

from .tasks import my_background_task


async def main() -> None:
    runs = [await my_background_task.delay(name) for name in ("Ford", "Arthur", "Trillian")]
    for run in runs:
        print(f"{run.id}: {await run.result(timeout=60)}")


if __name__ == "__main__":
    anyio.run(main)
