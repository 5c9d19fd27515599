"""Feeds whose workers vanish mid-claim, against real uvicorn: the app's
store must stay writable (server/feed.py, store/dialect.py)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import anyio
import httpx
import pytest

from tests.harness.procs import start_app
from tests.server.test_streams import RawStream

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ROUNDS = 80
FEEDS = 10


async def test_feeds_closed_mid_claim_leave_the_store_writable(db_url: str, tmp_path: Path) -> None:
    """Ten feeds open, each claiming due runs, and their sockets closed
    after a random few milliseconds, eighty times: after every round
    `/health` (which waits at most 1 s for the write lock) answers 200
    and a submit is stored within 5 s. Before, on SQLite, a claim cut
    short could leave its connection open holding the write lock until
    garbage collection: `/health` answered 503 within a few dozen rounds."""
    proc, base = start_app(db_url, tmp_path)
    port = int(base.rsplit(":", 1)[1])
    pick = random.Random(20261205)
    try:
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            for _ in range(100):
                response = await http.post("/tasks/runs", json={"task": "add", "args": [1, 2]})
                assert response.status_code == 202
            for round_ in range(ROUNDS):
                feeds = [
                    await RawStream.open(
                        port, "/tasks/feed?task=add&slots=2", X_Worker_Id=f"w{round_}-{i}"
                    )
                    for i in range(FEEDS)
                ]
                await anyio.sleep(pick.uniform(0, 0.003))
                for feed in feeds:
                    await feed.sock.aclose()
                health = await http.get("/tasks/health")
                assert health.status_code == 200, (round_, health.text)
                started = time.monotonic()
                submitted = await http.post("/tasks/runs", json={"task": "add", "args": [1, 2]})
                assert submitted.status_code == 202, (round_, submitted.text)
                assert time.monotonic() - started < 5, round_
    finally:
        proc.stop()
