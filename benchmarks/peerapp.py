"""PgQueuer's side of the side-by-side benchmarks: its worker, with the same
no-op tasks as `benchtasks`, written as its documentation writes one (a
factory yielding a `PgQueuer` over one asyncpg connection), and started as
`pgq run benchmarks.peerapp:create [--batch-size N]` would start it:

    python -m benchmarks.peerapp [--batch-size N]

runs `pgqueuer.run(create, batch_size=N)` on uvloop when it is installed,
as the CLI does. (The CLI itself cannot start a worker with typer 0.29: its
`--log-level` arrives as a string where an enum is expected.) Its
submitters are in `clients.py` (`peer-sequential`, `peer-backlog`).

The database is named by PGDSN, the variable PgQueuer's CLI reads.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pgqueuer
from pgqueuer import PgQueuer
from pgqueuer.db import AsyncpgDriver
from pgqueuer.models import Job

# The entrypoints, named as our tasks are: W1's `noop`, DRAIN's `item`.
NOOP = "noop"
ITEM = "item"


@asynccontextmanager
async def create() -> AsyncIterator[PgQueuer]:
    connection = await asyncpg.connect(os.environ["PGDSN"])
    try:
        pgq = PgQueuer(AsyncpgDriver(connection))

        @pgq.entrypoint(NOOP)
        async def noop(job: Job) -> None:
            return None

        @pgq.entrypoint(ITEM)
        async def item(job: Job) -> None:
            return None

        yield pgq
    finally:
        await connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peerapp")
    parser.add_argument("--batch-size", type=int, default=10, help="as `pgq run` (default 10)")
    args = parser.parse_args()
    worker = pgqueuer.run(create, batch_size=args.batch_size)
    try:
        import uvloop
    except ImportError:
        asyncio.run(worker)
    else:
        uvloop.run(worker)


if __name__ == "__main__":
    main()
