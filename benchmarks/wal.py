"""One database's share of the server's WAL over a window, for cost.py:
`pg_current_wal_lsn()` moves with every database's writes, so on a server
others use too, the bench database's own records are read back with
`pg_waldump` and summed (their full length, full-page images included).

A record is the bench database's if it names one of its relations
(`rel T/<db oid>/R`) or the database itself (`db <oid>`), or if it belongs
to a transaction that wrote such a record (its commit). Page headers
between records are left out, so the sum is a few percent under what the
LSN moved by for the same writes. The sum without full-page images is
given too: a checkpoint (another database's CREATE or DROP DATABASE forces
one) makes the next change to every page write the page whole, which
moves the total by more than any change of ours would. A temporary physical replication slot,
made at the window's start, keeps the segments from being recycled until
they are read; it goes with the session that made it.

Needs `pg_waldump` of the server's major version and read access to its
`pg_wal` directory (a local server, run as its owner or root); without
them the figure is absent.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_RECORD = re.compile(r"len \(rec/tot\):\s*(\d+)/\s*(\d+), tx:\s*(\d+),")


@dataclass(frozen=True)
class WalSource:
    """Where this server's WAL can be read from."""

    waldump: str
    directory: str
    db_oid: int


async def reserve(admin: Any, db_name: str) -> WalSource | None:
    """Find pg_waldump and pg_wal and keep the WAL from now on (on `admin`,
    a superuser's session on the same server); None if either is missing."""
    version = int(await admin.fetchval("SHOW server_version_num")) // 10000
    found = _locate(version, str(await admin.fetchval("SHOW data_directory")))
    if found is None:
        return None
    await admin.execute("SELECT pg_create_physical_replication_slot($1, true, true)", db_name)
    oid = await admin.fetchval("SELECT oid FROM pg_database WHERE datname = $1", db_name)
    return WalSource(*found, int(oid))


def _locate(version: int, data_directory: str) -> tuple[str, str] | None:
    """pg_waldump of this major version and a readable pg_wal, if both are here."""
    candidates = [
        f"/usr/lib/postgresql/{version}/bin/pg_waldump",
        f"/usr/pgsql-{version}/bin/pg_waldump",
        shutil.which("pg_waldump") or "",
    ]
    waldump = next((c for c in candidates if c and Path(c).is_file()), None)
    directory = Path(data_directory) / "pg_wal"
    try:
        readable = any(directory.iterdir())
    except OSError:
        return None
    return (waldump, str(directory)) if waldump and readable else None


@dataclass(frozen=True)
class OwnWal:
    total: int  # the records' full length
    records: int  # without the full-page images a checkpoint makes the next change write


def own_bytes(source: WalSource, start: str, end: str) -> OwnWal | None:
    """The bench database's WAL bytes between two LSNs, None if unreadable."""
    if start == end:
        return OwnWal(0, 0)
    mine = re.compile(rf"\brel \d+/{source.db_oid}/|\bdb {source.db_oid}\b")
    command = [source.waldump, "-p", source.directory, "-s", start, "-e", end]
    own_transactions: set[int] = set()
    total = records = 0
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    ) as dump:
        assert dump.stdout is not None
        for line in dump.stdout:
            found = _RECORD.search(line)
            if found is None:
                continue
            record, length, xid = int(found[1]), int(found[2]), int(found[3])
            if mine.search(line):
                if xid:
                    own_transactions.add(xid)
            elif xid not in own_transactions:
                continue
            total += length
            records += record
    return OwnWal(total, records) if dump.returncode == 0 else None
