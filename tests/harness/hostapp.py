"""The host app the end-to-end tests run under uvicorn, and whose tasks their
workers serve. Knobs come from the environment so each test can set them.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime
from uuid import UUID

import anyio
from fastapi import Depends, FastAPI
from pydantic import BaseModel

from fastapi_bgtasks import BgTasks, Submitter, cancelled, current_run
from tests import timing

bg = BgTasks(
    os.environ.get("BGTASKS_DATABASE_URL"),
    lease_seconds=float(os.environ.get("BGTASKS_TEST_LEASE", timing.LEASE_SECONDS)),
    heartbeat_seconds=float(os.environ.get("BGTASKS_TEST_HEARTBEAT", timing.HEARTBEAT_SECONDS)),
    reaper_seconds=timing.REAPER_SECONDS,
    poll_seconds=timing.POLL_SECONDS,
    max_rescues=int(os.environ.get("BGTASKS_TEST_MAX_RESCUES", "3")),
    report_interval=float(os.environ.get("BGTASKS_TEST_REPORT_INTERVAL", "0.02")),
)


def _stepped_wall() -> float:
    """The app's wall clock stepped by the seconds written in
    BGTASKS_TEST_CLOCK_FILE: a test rewrites the file to step the clock of
    this running process, as NTP or an operator would step the host's."""
    try:
        with open(os.environ["BGTASKS_TEST_CLOCK_FILE"]) as file:
            offset = float(file.read() or 0)
    except (OSError, ValueError):
        offset = 0.0
    return time.time() + offset


if os.environ.get("BGTASKS_TEST_CLOCK_FILE"):
    bg._wall_clock = _stepped_wall


def _ledger(event: str, **extra: object) -> None:
    """Append one line per task event: survives a SIGKILL (one O_APPEND write).
    `t` is the wall clock, `t_mono` the machine's monotonic clock (the same
    in every process, and not moved by clock steps)."""
    path = os.environ.get("BGTASKS_TEST_LEDGER")
    run = current_run()
    if not path or run is None:
        return
    line = json.dumps(
        {
            "run_id": run.run_id,
            "attempt": run.attempt,
            "pid": os.getpid(),
            "event": event,
            "t": time.time(),
            "t_mono": time.monotonic(),
            **extra,
        }
    )
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


class Point(BaseModel):
    x: int
    y: int


@bg.task
async def add(a: int, b: int) -> int:
    return a + b


@bg.task
def greet(name: str) -> str:
    return f"Hello, {name}!"


@bg.task
def typed(when: datetime, ident: UUID, point: Point) -> dict[str, str]:
    """Arguments arrive typed in the worker, not as JSON strings."""
    return {
        "when": type(when).__name__,
        "ident": type(ident).__name__,
        "point": type(point).__name__,
        "sum": str(point.x + point.y),
    }


@bg.task
async def fail(message: str) -> None:
    raise ValueError(message)


@bg.task(retries=3, retry_delay_seconds=[0.05, 0.1])
async def flaky(key: str, fail_times: int) -> str:
    """Fails `fail_times` times (counted in a file), then succeeds."""
    path = os.path.join(os.environ["BGTASKS_TEST_DIR"], f"flaky-{key}")
    count = int(open(path).read()) if os.path.exists(path) else 0
    with open(path, "w") as f:
        f.write(str(count + 1))
    if count < fail_times:
        raise RuntimeError(f"failure {count + 1}")
    return f"ok after {count} failures"


@bg.task(timeout_seconds=0.3)
async def too_slow() -> None:
    await anyio.sleep(30)


@bg.task(timeout_seconds=0.3)
def too_slow_sync() -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not cancelled():
        time.sleep(0.01)
    return "stopped early" if cancelled() else "ran to the end"


@bg.task
async def sleep_async(seconds: float) -> float:
    _ledger("start", seconds=seconds)
    try:
        await anyio.sleep(seconds)
    except BaseException:
        _ledger("cancelled")
        raise
    _ledger("end")
    return seconds


@bg.task
def sleep_sync(seconds: float) -> float:
    _ledger("start", seconds=seconds)
    time.sleep(seconds)
    _ledger("end")
    return seconds


@bg.task
def ticking_sync(seconds: float) -> float:
    """A side effect every 50 ms (start, ticks, end), ignoring `cancelled()`:
    only a process that can be stopped stops it."""
    _ledger("start")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
        _ledger("tick")
    _ledger("end")
    return seconds


@bg.task
async def ticking_async(seconds: float) -> float:
    """`ticking_sync`'s async twin: a side effect after every await."""
    _ledger("start")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await anyio.sleep(0.05)
        _ledger("tick")
    _ledger("end")
    return seconds


@bg.task
def where_am_i(fail: bool = False) -> dict[str, object]:
    """What a sync run sees of itself: its process, its run, its prints."""
    run = current_run()
    print(f"where_am_i printed in {os.getpid()}", flush=True)
    if fail:
        raise LookupError(f"failed in {os.getpid()}")
    return {"pid": os.getpid(), "run_id": run.run_id if run else None}


@bg.task
def hog_the_gil(n: int) -> bool:
    """A regular expression that backtracks for ages inside C, holding the
    GIL: no other thread of the process runs meanwhile."""
    import re

    _ledger("start")
    return re.match(r"(a+)+$", "a" * n + "b") is not None


@bg.task
def chain_sync(a: int, b: int) -> str:
    """Submits from a sync task: back over the worker's URL and token."""
    return str(add.delay_sync(a, b).id)


@bg.task
async def wait_for_file(path: str) -> str:
    """Gated: starts, then waits until the test creates `path`."""
    _ledger("start")
    while not os.path.exists(path):
        await anyio.sleep(0.02)
    _ledger("end")
    return "released"


@bg.task
def big(size: int) -> str:
    return "x" * size


@bg.task
def unserializable() -> object:
    return object()


@bg.task
async def chain(a: int, b: int) -> int:
    """Submits from inside a worker: goes back over the worker's URL."""
    run = await add.delay(a, b)
    return int(await run.result(timeout=10))


app = FastAPI(lifespan=bg.lifespan)
app.mount("/tasks", bg.app)


@app.post("/add", status_code=202)
async def add_route(a: int, b: int, submit: Submitter = Depends(bg.submitter)) -> dict[str, str]:
    run = await submit.delay(add, a, b)
    return {"task_run_id": str(run.id)}


@app.post("/greet-sync", status_code=202)
def greet_sync_route(name: str) -> dict[str, str]:
    """A sync route: delay_sync submits on the lifespan's loop."""
    run = greet.delay_sync(name)
    return {"task_run_id": str(run.id)}


# -- poison tasks: each kills the worker process that runs it -------------


@bg.task(max_rescues=2)
def exit_hard() -> None:
    _ledger("start")
    os._exit(137)


@bg.task(max_rescues=2)
def segv() -> None:
    import ctypes

    _ledger("start")
    ctypes.string_at(0)


@bg.task(max_rescues=2)
def oom() -> None:
    """Allocates until the worker dies (run the worker under RLIMIT_AS)."""
    _ledger("start")
    hog = []
    while True:
        hog.append(bytearray(64 * 1024 * 1024))


@bg.task(on_worker_lost="fail")
async def sleep_async_fail_on_loss(seconds: float) -> float:
    _ledger("start")
    await anyio.sleep(seconds)
    _ledger("end")
    return seconds


@bg.task
async def gated(path: str) -> str:
    """Starts, then waits for `path`; records `cancelled` if stopped first."""
    _ledger("start")
    try:
        while not os.path.exists(path):
            await anyio.sleep(0.02)
    except BaseException:
        _ledger("cancelled")
        raise
    _ledger("end")
    return "released"
