"""The tasks the benchmarks run, on their own hub: no-ops, so the figures
measure the library, not the tasks. Workers import this module only, as an
app's workers import its tasks module and not its web app.

- `noop`: the unit of throughput (W1, W2, W1c, W5's route, W7).
- `stamp`: returns when its body started, so pickup latency (W3) is read
  from the stored results without any other channel.
- `item`: one element of a bulk `map` (W6).
- `item_sync`: `item` as a plain `def` (W8: where sync runs execute).
"""

from __future__ import annotations

import os
import time

from fastapi_bgtasks import BgTasks

bg = BgTasks(os.environ.get("BGTASKS_DATABASE_URL"), poll_seconds=1.0)


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


@bg.task
def item_sync(i: int) -> None:
    return None
