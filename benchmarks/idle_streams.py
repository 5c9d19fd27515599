"""What idle connections cost the app: N worker feeds that get no runs and M
run event streams on runs that do not change.

    python -m benchmarks.idle_streams [--backend sqlite|postgres] [--feeds 256]
                                      [--streams 1000] [--runs 100] [--seconds 10]
                                      [--gets 100] [--batch 0]

Starts uvicorn serving `benchmarks.streamsapp`, submits `--runs` runs nothing
serves, opens the feeds and streams over raw sockets, lets them settle, then
measures the app process's CPU time and the SQL statements its store sends
(the SQLite wake-up watcher's `PRAGMA data_version` left out) over
`--seconds`, then the latency of
`GET /runs/{id}` (p50, p95 of `--gets` sequential reads), then, with
`--batch N`, how long one worker (concurrency 8) takes to run N no-op runs
submitted at once (first `created_at` to last `finished_at`) while those
connections stay open. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

import httpx

from tests.harness.procs import start_app, start_worker

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def _database(backend: str, tmp: Path) -> str:
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{tmp / 'bench.db'}"
    import asyncpg

    name = f"bench_streams_{uuid.uuid4().hex[:8]}"

    async def create() -> None:
        conn = await asyncpg.connect(PG_ADMIN)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    return f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"


def _drop(database: str) -> None:
    if not database.startswith("postgresql"):
        return
    import asyncpg

    name = database.rsplit("/", 1)[1]

    async def drop() -> None:
        conn = await asyncpg.connect(PG_ADMIN)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(drop())


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _open(port: int, target: str, headers: str = "") -> asyncio.Task[None] | None:
    """One SSE request over a raw socket; its bytes are drained in a task."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n"
        f"{headers}\r\n".encode()
    )
    status = await reader.readline()
    if b" 200 " not in status:
        writer.close()
        return None

    async def drain() -> None:
        try:
            while await reader.read(65536):
                pass
        finally:
            writer.close()

    return asyncio.create_task(drain())


async def _measure(pid: int, port: int, args: argparse.Namespace) -> dict[str, object]:
    root = f"http://127.0.0.1:{port}"
    base = f"{root}/tasks"
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        ids = []
        for _ in range(args.runs):
            response = await http.post("/runs", json={"task": "watched", "args": []})
            response.raise_for_status()
            ids.append(response.json()["id"])
        requests = [
            ("/tasks/feed?task=noop&slots=1", f"X-Worker-Id: bench-{i}\r\n")
            for i in range(args.feeds)
        ]
        requests += [(f"/tasks/runs/{ids[i % len(ids)]}/events", "") for i in range(args.streams)]
        drains: list[asyncio.Task[None] | None] = []
        for start in range(0, len(requests), 50):  # 50 at a time: uvicorn's backlog
            batch = requests[start : start + 50]
            drains += await asyncio.gather(*(_open(port, t, h) for t, h in batch))
        opened = sum(d is not None for d in drains)
        await asyncio.sleep(3)
        counted = (await http.get(f"{root}/__bench__/statements")).json()["all"]
        before, started = _cpu_seconds(pid), time.monotonic()
        await asyncio.sleep(args.seconds)
        elapsed = time.monotonic() - started
        cpu = (_cpu_seconds(pid) - before) / elapsed
        counted = (await http.get(f"{root}/__bench__/statements")).json()["all"] - counted
        latencies = [0.0]
        for i in range(args.gets):
            t0 = time.perf_counter()
            (await http.get(f"/runs/{ids[i % len(ids)]}")).raise_for_status()
            latencies.append(1000 * (time.perf_counter() - t0))
        batch = await _batch(http, args.batch) if args.batch else None
        for d in drains:
            if d is not None:
                d.cancel()
    latencies.sort()
    return {
        "backend": args.backend,
        "feeds": args.feeds,
        "streams": args.streams,
        "opened": opened,
        "idle_cpu_percent": round(100 * cpu, 1),
        "idle_statements_per_second": round(counted / elapsed, 1),
        "get_run_p50_ms": round(statistics.median(latencies), 1),
        "get_run_p95_ms": round(latencies[int(0.95 * len(latencies)) - 1], 1),
        "batch": args.batch,
        "batch_seconds": batch,
    }


async def _batch(http: httpx.AsyncClient, count: int) -> float:
    """Submit `count` runs of `work` at once; seconds from the first one's
    `created_at` to the last one's `finished_at` (the store's times)."""
    calls = [{"args": []} for _ in range(count)]
    response = await http.post("/runs/batch", json={"task": "work", "calls": calls})
    response.raise_for_status()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        page = await http.get("/runs", params={"task": "work", "limit": count})
        runs = page.json()["runs"]
        if len(runs) == count and all(r["state"] == "COMPLETED" for r in runs):
            first = min(datetime.fromisoformat(r["created_at"]) for r in runs)
            last = max(datetime.fromisoformat(r["finished_at"]) for r in runs)
            return round((last - first).total_seconds(), 2)
        await asyncio.sleep(0.2)
    raise TimeoutError(f"the batch of {count} runs did not finish in 600 s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="sqlite", choices=["sqlite", "postgres"])
    parser.add_argument("--feeds", type=int, default=256)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--gets", type=int, default=100)
    parser.add_argument("--batch", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            "BENCH_MAX_STREAMS": str(args.streams + 10),
            "BENCH_MAX_FEEDS": str(args.feeds + 10),
        }
        if os.environ.get("BENCH_CAPS") == "1":
            env["BENCH_MAX_STREAMS_PER_CLIENT"] = str(args.streams + 10)
            env["BENCH_MAX_STREAMS_PER_RUN"] = str(args.streams + 10)
        database = _database(args.backend, Path(tmp))
        app, base = start_app(
            database,
            Path(tmp),
            module="benchmarks.streamsapp:app",
            **env,
        )
        worker = None
        try:
            if args.batch:
                worker = start_worker(
                    f"{base}/tasks",
                    database,
                    Path(tmp),
                    "--task",
                    "work",
                    modules=("benchmarks.streamsapp",),
                    concurrency=8,
                )
            port = int(base.rsplit(":", 1)[1])
            result = asyncio.run(_measure(app.pid, port, args))
        finally:
            if worker is not None:
                worker.stop()
            app.stop()
            _drop(database)
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
