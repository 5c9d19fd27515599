"""The load the workloads apply, each in a process of its own (as a script or
another service would be), printing its figures as one `RESULT {json}` line:

    python -m benchmarks.clients sequential --runs N
    python -m benchmarks.clients concurrent --runs N --submitters 50
    python -m benchmarks.clients paced --rate 10 --seconds 20
    python -m benchmarks.clients http --base URL --paths /baseline,/submit \
        --requests N --concurrency 10 --warmup W [--client raw|httpx]
    python -m benchmarks.clients map --runs N
    python -m benchmarks.clients peer-sequential --runs N
    python -m benchmarks.clients peer-backlog --runs N

Submitting clients go straight to the store named by BGTASKS_DATABASE_URL;
the `peer-` ones submit PgQueuer jobs with its `Queries.enqueue` into the
database named by PGDSN. Each reports the CPU its submits took
(`submit_cpu_s`, the process's clock over the same span as `submit_seconds`).
With --hold a client keeps running, its connections open, until its stdin
closes: the harness reads the database's side of them first.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import anyio
from anyio.abc import SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from benchmarks.harness import emit, latency_summary

# -- submitting ---------------------------------------------------------------


async def _ready() -> None:
    """The script's store opened (its imports done) before the clock starts,
    as PgQueuer's side opens its connection before its loop: the figures
    are of submitting, not of starting a process."""
    from benchmarks.benchtasks import bg

    await bg.dispatch.destination()


async def sequential(runs: int) -> dict[str, Any]:
    """W1/W2: one `await noop.delay()` after another."""
    from benchmarks.benchtasks import noop

    await _ready()
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(runs):
        await noop.delay()
    return _spent(started, cpu)


def _shares(total: int, parts: int) -> list[int]:
    """`total` split into `parts` counts that differ by at most one."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


async def concurrent(runs: int, submitters: int) -> dict[str, Any]:
    """W1c: `submitters` coroutines on one loop, each submitting its share in turn."""
    from benchmarks.benchtasks import noop

    async def submitter(count: int) -> None:
        for _ in range(count):
            await noop.delay()

    await _ready()
    started, cpu = time.perf_counter(), time.process_time()
    async with anyio.create_task_group() as tg:
        for count in _shares(runs, submitters):
            tg.start_soon(submitter, count)
    return _spent(started, cpu)


async def paced(rate: float, seconds: float) -> dict[str, Any]:
    """W3: `stamp` runs at a steady rate, each stamped with the wall clock
    just before its submit; the harness subtracts that from the body's stamp."""
    from benchmarks.benchtasks import noop, stamp

    await noop.delay()  # opens this loop's store: the first sample pays no connect
    total = max(1, round(rate * seconds))
    sent: dict[str, float] = {}
    behind = 0.0
    started = time.perf_counter()
    for i in range(total):
        # An absolute schedule: a slow submit does not shift the ones after it.
        wait = started + i / rate - time.perf_counter()
        if wait > 0:
            await anyio.sleep(wait)
        behind = max(behind, -wait)
        at = time.time()
        run = await stamp.delay()
        sent[str(run.id)] = at
    return {
        "sent": sent,
        "rate": total / (time.perf_counter() - started),
        "behind_max_ms": behind * 1000,
    }


async def bulk_map(runs: int, sync: bool = False) -> dict[str, Any]:
    """W6: one `item.map(range(runs))`, skipped while the library has no `map`;
    W8: the same of `item_sync`."""
    from benchmarks.benchtasks import item, item_sync, noop
    from fastapi_bgtasks import Task

    if not hasattr(Task, "map"):
        return {"skipped": "no Task.map"}
    await noop.delay()  # opens this loop's store: one statement should not pay a connect
    started, cpu = time.perf_counter(), time.process_time()
    handles = await (item_sync if sync else item).map(range(runs))
    spent = _spent(started, cpu)
    if len(handles) != runs:
        raise RuntimeError(f"map returned {len(handles)} runs for {runs} inputs")
    return spent


# -- submitting PgQueuer jobs -------------------------------------------------


@asynccontextmanager
async def peer_queries() -> AsyncIterator[Any]:
    """PgQueuer's `Queries` over one asyncpg connection, as its documentation submits."""
    import asyncpg
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.queries import Queries

    connection = await asyncpg.connect(os.environ["PGDSN"])
    try:
        yield Queries(AsyncpgDriver(connection))
    finally:
        await connection.close()


async def peer_sequential(queries: Any, runs: int) -> dict[str, Any]:
    """W1 for PgQueuer: one `Queries.enqueue` call per job."""
    from benchmarks.peerapp import NOOP

    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(runs):
        await queries.enqueue(NOOP, None)
    return _spent(started, cpu)


async def peer_backlog(queries: Any, runs: int) -> dict[str, Any]:
    """DRAIN's backlog for PgQueuer: one batched `Queries.enqueue` of every
    job, each with its index as payload (as `item.map(range(N))` stores it)."""
    from benchmarks.peerapp import ITEM

    payloads = [str(i).encode() for i in range(runs)]
    started, cpu = time.perf_counter(), time.process_time()
    ids = await queries.enqueue([ITEM] * runs, payloads, [0] * runs)
    spent = _spent(started, cpu)
    if len(ids) != runs:
        raise RuntimeError(f"enqueue returned {len(ids)} ids for {runs} jobs")
    return spent


def _spent(started: float, cpu: float) -> dict[str, Any]:
    return {
        "submit_seconds": time.perf_counter() - started,
        "submit_cpu_s": time.process_time() - cpu,
    }


# -- HTTP load ------------------------------------------------------------------

Caller = Callable[[str], Awaitable[int]]


class RawConnection:
    """HTTP/1.1 on one kept-alive TCP connection, just enough for the
    benchmark's routes (POST without a body, a Content-Length response).
    Cheaper per request than a general client, so the server is what is measured."""

    def __init__(self, stream: SocketStream, host: str) -> None:
        self._stream = stream
        self._reader = BufferedByteReceiveStream(stream)
        self._host = host.encode()

    async def post(self, path: str) -> int:
        await self._stream.send(
            b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Length: 0\r\n\r\n"
            % (path.encode(), self._host)
        )
        head = await self._reader.receive_until(b"\r\n\r\n", 65536)
        status_line, *header_lines = head.split(b"\r\n")
        length = None
        for line in header_lines:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length is None:
            raise RuntimeError(f"no Content-Length in the response to {path}: {head!r}")
        await self._reader.receive_exactly(length)
        return int(status_line.split()[1])


@asynccontextmanager
async def raw_callers(base: str, concurrency: int) -> AsyncIterator[list[Caller]]:
    """One raw keep-alive connection per concurrent caller."""
    parts = urlsplit(base)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    async with AsyncExitStack() as stack:
        callers: list[Caller] = []
        for _ in range(concurrency):
            stream = await anyio.connect_tcp(host, port)
            await stack.enter_async_context(stream)
            callers.append(RawConnection(stream, f"{host}:{port}").post)
        yield callers


@asynccontextmanager
async def httpx_callers(base: str, concurrency: int) -> AsyncIterator[list[Caller]]:
    """Callers sharing one httpx.AsyncClient whose keep-alive pool has a
    connection per caller."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:

        async def call(path: str) -> int:
            return (await client.post(path)).status_code

        yield [call] * concurrency


async def hammer(callers: Sequence[Caller], path: str, requests: int) -> dict[str, float]:
    """`requests` POSTs to `path`, each caller sending its next as soon as
    its last one answered: client-side latency of each, and the rate."""
    latencies: list[float] = []
    remaining = requests

    async def loop(call: Caller) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            sent = time.perf_counter()
            status = await call(path)
            latencies.append(time.perf_counter() - sent)
            if status >= 400:
                raise RuntimeError(f"POST {path} answered {status}")

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for call in callers:
            tg.start_soon(loop, call)
    elapsed = time.perf_counter() - started
    summary = latency_summary(latencies)
    return {
        "p50_ms": summary["p50_ms"],
        "p99_ms": summary["p99_ms"],
        "requests_per_s": len(latencies) / elapsed,
    }


async def http_load(
    base: str, paths: Sequence[str], requests: int, concurrency: int, warmup: int, client: str
) -> dict[str, Any]:
    """W5: each path in turn, after `warmup` requests to every path."""
    opener = raw_callers if client == "raw" else httpx_callers
    async with opener(base, concurrency) as callers:
        for path in paths:
            await hammer(callers, path, warmup)
        return {path: await hammer(callers, path, requests) for path in paths}


# -- the command line -------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.clients")
    parser.add_argument(
        "--hold", action="store_true", help="after the result, wait for stdin to close"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("sequential")
    command.add_argument("--runs", type=int, required=True)
    command = commands.add_parser("concurrent")
    command.add_argument("--runs", type=int, required=True)
    command.add_argument("--submitters", type=int, default=50)
    command = commands.add_parser("paced")
    command.add_argument("--rate", type=float, default=10.0)
    command.add_argument("--seconds", type=float, required=True)
    command = commands.add_parser("http")
    command.add_argument("--base", required=True)
    command.add_argument("--paths", default="/baseline,/submit")
    command.add_argument("--requests", type=int, required=True)
    command.add_argument("--concurrency", type=int, default=10)
    command.add_argument("--warmup", type=int, default=100)
    command.add_argument("--client", choices=["raw", "httpx"], default="raw")
    command = commands.add_parser("map")
    command.add_argument("--runs", type=int, required=True)
    command.add_argument("--sync", action="store_true")
    for name in ("peer-sequential", "peer-backlog"):
        command = commands.add_parser(name)
        command.add_argument("--runs", type=int, required=True)
    return parser


async def _dispatch(args: argparse.Namespace) -> dict[str, Any]:
    if args.command == "sequential":
        return await sequential(args.runs)
    if args.command == "concurrent":
        return await concurrent(args.runs, args.submitters)
    if args.command == "paced":
        return await paced(args.rate, args.seconds)
    if args.command == "http":
        paths = [p for p in args.paths.split(",") if p]
        return await http_load(
            args.base, paths, args.requests, args.concurrency, args.warmup, args.client
        )
    return await bulk_map(args.runs, args.sync)


async def _report(figures: dict[str, Any], hold: bool) -> None:
    """Print the figures; under --hold, then wait (connections open) for stdin to close."""
    emit(figures)
    if hold:
        await anyio.to_thread.run_sync(sys.stdin.read)


async def _main(args: argparse.Namespace) -> None:
    if args.command in ("peer-sequential", "peer-backlog"):
        submit = peer_sequential if args.command == "peer-sequential" else peer_backlog
        async with peer_queries() as queries:
            await _report(await submit(queries, args.runs), args.hold)
        return
    await _report(await _dispatch(args), args.hold)


def main() -> None:
    anyio.run(_main, _parser().parse_args())


if __name__ == "__main__":
    main()
