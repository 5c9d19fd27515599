"""Throughput of the whole path, on SQLite and PostgreSQL.

    python -m benchmarks [--quick] [--runs N] [--repeat K] [--backends sqlite,postgres]

W1: N no-op runs submitted one by one by a separate process (straight to the
store, as a script would) while one worker waits; reports the submit rate and
the drain rate (first submit to last COMPLETED, from the stored times).
Prints a table and writes benchmarks/results/latest.json. Asserts nothing
about speed: the quick mode only proves the harness still runs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import httpx

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN = os.environ.get("BGTASKS_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")

SUBMITTER = """
import json, sys, time, anyio
from benchmarks.benchapp import noop

async def main(n):
    started = time.perf_counter()
    for _ in range(n):
        await noop.delay()
    print(json.dumps({"submit_seconds": time.perf_counter() - started}))

anyio.run(main, int(sys.argv[1]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _pg_admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


class Database:
    def __init__(self, backend: str, directory: Path) -> None:
        self.backend = backend
        if backend == "sqlite":
            self.url = f"sqlite+aiosqlite:///{directory}/bench.db"
            self.name = None
        else:
            self.name = f"bgt_bench_{uuid.uuid4().hex[:12]}"
            anyio.run(_pg_admin, f'CREATE DATABASE "{self.name}"')
            base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
            self.url = f"{base}/{self.name}"

    def drop(self) -> None:
        if self.name:
            anyio.run(_pg_admin, f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


async def _drain_window(url: str, n: int, timeout: float) -> float:
    """Seconds from the first run created to the last finished, once all are done."""
    import sqlalchemy as sa

    from fastapi_bgtasks.store import Store, runs

    store = Store(url)
    await store.open()
    try:
        deadline = time.monotonic() + timeout
        while True:
            async with store._read() as conn:
                done = await conn.scalar(
                    sa.select(sa.func.count()).where(runs.c.state == "COMPLETED")
                )
                if done == n:
                    row = (
                        await conn.execute(
                            sa.select(
                                sa.func.min(runs.c.created_at), sa.func.max(runs.c.finished_at)
                            )
                        )
                    ).first()
                    assert row is not None
                    first, last = row
                    if isinstance(first, str):
                        from datetime import datetime

                        first, last = datetime.fromisoformat(first), datetime.fromisoformat(last)
                    return float((last - first).total_seconds())
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {done} of {n} runs completed within {timeout}s")
            await anyio.sleep(0.05)
    finally:
        await store.close()


_PY_SPY = str(Path(sys.executable).parent / "py-spy")


def _spy(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy on a running process until it exits (collapsed stacks, idle frames dropped)."""
    return subprocess.Popen(
        [_PY_SPY, "record", "--pid", str(pid), "-r", "200", "-f", "raw", "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def w1(backend: str, n: int, profile: Path | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        db = Database(backend, directory)
        env = dict(os.environ, BGTASKS_DATABASE_URL=db.url, PYTHONPATH=str(ROOT))
        env.pop("BGTASKS_URL", None)
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        logs = open(directory / "procs.log", "wb")
        app = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "benchmarks.benchapp:app",
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            env=env,
            cwd=ROOT,
            stdout=logs,
            stderr=subprocess.STDOUT,
        )
        worker = None
        spies: list[subprocess.Popen[bytes]] = []
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(f"{base}/tasks/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or app.poll() is not None:
                    raise RuntimeError("benchmark app did not start")
                time.sleep(0.05)
            worker = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "fastapi_bgtasks.worker",
                    "benchmarks.benchapp",
                    "--url",
                    f"{base}/tasks",
                    "--concurrency",
                    "10",
                    "--log-level",
                    "WARNING",
                ],
                env={k: v for k, v in env.items() if k != "BGTASKS_DATABASE_URL"},
                cwd=ROOT,
                stdout=logs,
                stderr=subprocess.STDOUT,
            )
            time.sleep(1.0)  # let the worker connect and wait
            submit_cmd = [sys.executable, "-c", SUBMITTER, str(n)]
            if profile is not None:
                profile.mkdir(parents=True, exist_ok=True)
                spies = [
                    _spy(app.pid, profile / f"w1-{backend}-app.txt"),
                    _spy(worker.pid, profile / f"w1-{backend}-worker.txt"),
                ]
                time.sleep(1.0)
                submit_cmd = [
                    _PY_SPY, "record", "-r", "200", "-f", "raw",
                    "-o", str(profile / f"w1-{backend}-submitter.txt"), "--", *submit_cmd,
                ]  # fmt: skip
            out = subprocess.run(
                submit_cmd,
                env=env,
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=600,
                check=True,
            )
            submit_seconds = next(
                json.loads(line)["submit_seconds"]
                for line in out.stdout.splitlines()
                if line.startswith('{"submit_seconds"')
            )
            drain = anyio.run(_drain_window, db.url, n, 600.0)
            return {
                "workload": "W1",
                "backend": backend,
                "runs": n,
                "submit_per_s": n / submit_seconds,
                "drain_per_s": n / drain,
            }
        finally:
            for proc in (worker, app):
                if proc is not None and proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(20)
                    except subprocess.TimeoutExpired:
                        proc.kill()
            for spy in spies:
                spy.wait(30)
            logs.close()
            db.drop()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--quick", action="store_true", help="100 runs, once: proves it runs")
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument(
        "--profile", type=Path, help="record py-spy profiles of each process into this folder"
    )
    args = parser.parse_args()
    n, repeat = (100, 1) if args.quick else (args.runs, args.repeat)
    rows = []
    for backend in args.backends.split(","):
        samples = [w1(backend, n, args.profile) for _ in range(repeat)]
        rows.append(
            {
                "workload": "W1",
                "backend": backend,
                "runs": n,
                "repeat": repeat,
                "submit_per_s_median": statistics.median(s["submit_per_s"] for s in samples),
                "drain_per_s_median": statistics.median(s["drain_per_s"] for s in samples),
                "samples": samples,
            }
        )
    header = f"{'workload':<9}{'backend':<10}{'runs':>6}{'submit/s':>12}{'drain/s':>12}"
    print(f"{header}  (median of {repeat})")
    for row in rows:
        print(
            f"{row['workload']:<9}{row['backend']:<10}{row['runs']:>6}"
            f"{row['submit_per_s_median']:>12.0f}{row['drain_per_s_median']:>12.0f}"
        )
    results = ROOT / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    (results / ("quick.json" if args.quick else "latest.json")).write_text(
        json.dumps(rows, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
