"""What running a sync task costs the worker per run, the call alone (no
app, no HTTP, no database): N calls of `item_sync` one after another, in a
daemon thread each (`--sync-isolation thread`) and in a reused child process
(`process`, the default), plus the time to start one child. Wall time and
the worker process's own CPU time (the child's is not counted), medians of
--repeat rounds interleaved, on shared cores; and the child's resident
memory after its runs (Linux).

    python -m benchmarks.sync_call [--runs 2000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from typing import Any

import anyio

from benchmarks.benchtasks import bg, item_sync
from fastapi_bgtasks.wire import Delivery
from fastapi_bgtasks.worker.config import FeedTerms, WorkerConfig
from fastapi_bgtasks.worker.context import RunContext
from fastapi_bgtasks.worker.execution import _in_daemon_thread
from fastapi_bgtasks.worker.held import HeldRun
from fastapi_bgtasks.worker.isolation import ChildPool

TERMS = FeedTerms(lease_seconds=30.0, heartbeat_seconds=7.5)


def _held(i: int) -> HeldRun:
    d = Delivery(id=uuid.uuid4(), task="item_sync", attempt=1, lease_token="x", args=[i], kwargs={})
    return HeldRun(
        delivery=d, context=RunContext(str(d.id), d.task, 1), last_renewed=time.monotonic()
    )


async def _threads(runs: int) -> None:
    for i in range(runs):
        held = _held(i)
        args, kwargs = item_sync.load_arguments(held.delivery.args, held.delivery.kwargs)
        await _in_daemon_thread(lambda a=args, k=kwargs: item_sync.fn(*a, **k), held.delivery)


async def _children(pool: ChildPool, runs: int) -> None:
    for i in range(runs):
        held = _held(i)
        item_sync.load_arguments(held.delivery.args, held.delivery.kwargs)  # as the worker does
        reply = await pool.call(held, lambda: TERMS)
        assert reply is not None and reply[0] == "COMPLETED", reply


async def _measure(runs: int, repeat: int) -> dict[str, Any]:
    config = WorkerConfig(url="http://127.0.0.1:9/tasks", imports=("benchmarks.benchtasks",))
    pool = ChildPool(config, {"item_sync": bg.registry.tasks["item_sync"]})
    started = time.perf_counter()
    await pool.start()
    spawn = time.perf_counter() - started
    child_pid = pool._idle[0].pid  # the one child, kept ready
    samples: dict[str, list[tuple[float, float]]] = {"thread": [], "process": []}
    try:
        for _ in range(repeat):
            for mode in ("thread", "process"):
                wall, cpu = time.perf_counter(), time.process_time()
                if mode == "thread":
                    await _threads(runs)
                else:
                    await _children(pool, runs)
                samples[mode].append((time.perf_counter() - wall, time.process_time() - cpu))
        rss = _rss_mb(child_pid)
    finally:
        await pool.aclose()
    out: dict[str, Any] = {"runs": runs, "repeat": repeat, "child_start_ms": spawn * 1000}
    out["child_rss_mb"] = rss
    for mode, values in samples.items():
        out[f"{mode}_wall_us_per_run"] = statistics.median(w for w, _ in values) / runs * 1e6
        out[f"{mode}_cpu_us_per_run"] = statistics.median(c for _, c in values) / runs * 1e6
    return out


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sync_call")
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(anyio.run(_measure, args.runs, args.repeat), indent=2))


if __name__ == "__main__":
    main()
