"""What idle connections cost the app: N worker feeds that get no runs and M
run event streams on runs that do not change.

    python -m benchmarks.idle_streams [--backend sqlite|postgres] [--feeds 256]
                                      [--streams 1000] [--runs 100] [--seconds 10]

Starts uvicorn serving `benchmarks.streamsapp`, submits `--runs` runs nothing
serves, opens the feeds and streams over raw sockets, lets them settle, then
measures the app process's CPU time and the SQL statements its store sends
(the SQLite wake-up watcher's `PRAGMA data_version` left out) over
`--seconds`, then the latency of
`GET /runs/{id}` (p50, p95 of 100 sequential reads). Prints one JSON line.
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
from pathlib import Path

import httpx

from tests.harness.procs import start_app

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
        latencies = []
        for i in range(100):
            t0 = time.perf_counter()
            (await http.get(f"/runs/{ids[i % len(ids)]}")).raise_for_status()
            latencies.append(1000 * (time.perf_counter() - t0))
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
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="sqlite", choices=["sqlite", "postgres"])
    parser.add_argument("--feeds", type=int, default=256)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            "BENCH_MAX_STREAMS": str(args.streams + 10),
            "BENCH_MAX_FEEDS": str(args.feeds + 10),
        }
        if os.environ.get("BENCH_CAPS") == "1":
            env["BENCH_MAX_STREAMS_PER_CLIENT"] = str(args.streams + 10)
            env["BENCH_MAX_STREAMS_PER_RUN"] = str(args.streams + 10)
        app, base = start_app(
            _database(args.backend, Path(tmp)),
            Path(tmp),
            module="benchmarks.streamsapp:app",
            **env,
        )
        try:
            port = int(base.rsplit(":", 1)[1])
            result = asyncio.run(_measure(app.pid, port, args))
        finally:
            app.stop()
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
