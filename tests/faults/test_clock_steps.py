"""Steps of the app host's wall clock (NTP correcting a drifted clock, an
operator setting the time) while workers hold leases: leases are judged by
the app's steady clock, so a step neither takes a running run from its live
worker nor leaves a dead worker's runs stranded.

The app runs under uvicorn with its wall clock read through
BGTASKS_TEST_CLOCK_FILE (tests/harness/hostapp.py): the test rewrites the
file to step the clock of the running process, as a real step would.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests import timing
from tests.faults.checker import TERMINAL
from tests.harness.procs import Proc, start_app, start_worker

RUNS = 4


class SteppedApp:
    """One app whose wall clock the test steps, and its workers."""

    def __init__(self, db_url: str, tmp: Path) -> None:
        self.db_url = db_url
        self.tmp = tmp
        self.clock = tmp / "clock-offset"
        self.step(0)
        self.proc, base = start_app(db_url, tmp, BGTASKS_TEST_CLOCK_FILE=str(self.clock))
        self.url = f"{base}/tasks"
        self.http = httpx.Client(base_url=self.url, timeout=30)
        self.workers: list[Proc] = []

    def step(self, seconds: float) -> None:
        """Set the app's clock `seconds` away from the real one (atomically)."""
        staged = self.clock.with_suffix(".new")
        staged.write_text(str(seconds))
        os.replace(staged, self.clock)

    def worker(self, name: str) -> Proc:
        proc = start_worker(self.url, self.db_url, self.tmp, name=name, concurrency=RUNS)
        self.workers.append(proc)
        return proc

    def submit(self, task: str, *args: object) -> str:
        response = self.http.post("/runs", json={"task": task, "args": list(args)})
        assert response.status_code == 202, response.text
        return str(response.json()["id"])

    def doc(self, run_id: str) -> dict[str, object]:
        response = self.http.get(f"/runs/{run_id}")
        assert response.status_code == 200, response.text
        return dict(response.json())

    def reasons(self, run_id: str) -> list[str | None]:
        response = self.http.get(f"/runs/{run_id}/history")
        assert response.status_code == 200, response.text
        return [t["reason"] for t in response.json()["transitions"]]

    def wait(
        self, ids: list[str], states: set[str], timeout: float
    ) -> dict[str, dict[str, object]]:
        deadline = time.monotonic() + timeout
        while True:
            docs = {i: self.doc(i) for i in ids}
            if all(d["state"] in states for d in docs.values()):
                return docs
            assert time.monotonic() < deadline, docs
            time.sleep(0.05)

    def close(self) -> None:
        self.http.close()
        for proc in [*reversed(self.workers), self.proc]:
            proc.stop(timeout=10)


@pytest.fixture
def stepped(db_url: str, tmp_path: Path) -> Iterator[SteppedApp]:
    app = SteppedApp(db_url, tmp_path)
    try:
        yield app
    finally:
        app.close()


@pytest.mark.timeout(90)
def test_a_forward_step_takes_no_running_run_from_its_worker(stepped: SteppedApp) -> None:
    """+60 s while runs are running: every run completes as attempt 1."""
    stepped.worker("w1")
    gate = stepped.tmp / "gate"
    ids = [stepped.submit("wait_for_file", str(gate)) for _ in range(RUNS)]
    stepped.wait(ids, {"RUNNING"}, timing.DEADLINE)
    stepped.step(60)
    # Several lease lengths of heartbeats and reaper passes on the stepped clock.
    time.sleep(3 * timing.LEASE_SECONDS)
    gate.touch()
    docs = stepped.wait(ids, TERMINAL, timing.DEADLINE)
    assert {d["state"] for d in docs.values()} == {"COMPLETED"}, docs
    assert {d["attempt"] for d in docs.values()} == {1}, docs
    for run_id in ids:
        assert "worker_lost" not in stepped.reasons(run_id)


@pytest.mark.timeout(90)
def test_a_backward_step_leaves_no_dead_workers_runs_stranded(stepped: SteppedApp) -> None:
    """The worker dies, then -120 s: its runs are rescued within the lease."""
    worker = stepped.worker("w1")
    gate = stepped.tmp / "gate"
    ids = [stepped.submit("wait_for_file", str(gate)) for _ in range(RUNS)]
    stepped.wait(ids, {"RUNNING"}, timing.DEADLINE)
    killed_at = time.monotonic()
    worker.signal(signal.SIGKILL)
    worker.popen.wait(10)
    # Its leases were last renewed before the step.
    stepped.step(-120)
    # Rescued within lease + reaper interval, with slack for a busy machine
    # (before, a lease on the wall clock held them for 120 s more).
    bound = timing.LEASE_SECONDS + timing.REAPER_SECONDS + 5
    docs = stepped.wait(ids, {"SCHEDULED"}, bound)
    assert time.monotonic() - killed_at < bound
    for run_id, doc in docs.items():
        assert doc["attempt"] == 1, doc
        assert "worker_lost" in stepped.reasons(run_id)
    # A new worker takes them at once (due times are on the stepped clock too).
    stepped.worker("w2")
    gate.touch()
    docs = stepped.wait(ids, TERMINAL, timing.DEADLINE)
    assert {d["state"] for d in docs.values()} == {"COMPLETED"}, docs
    assert {d["attempt"] for d in docs.values()} == {2}, docs
