"""Sync runs execute in child processes the worker can stop
(`--sync-isolation process`, the default): the run sees itself, its prints
reach the worker's output, failures keep their traceback, a cancel stops a
run that ignores `cancelled()`, and a child whose worker can no longer renew
its deadline (frozen, gone) stops itself. Real app, worker and child
processes serve tests/harness/hostapp.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fastapi_bgtasks.worker.isolation import BACKSTOP_SECONDS, WATCHDOG_EXIT
from tests import timing
from tests.harness.procs import ROOT, Proc, child_env, start_app, start_worker

TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in reversed(started):
        proc.stop()


def _serve(db_url: str, tmp: Path, procs: list[Proc], *args: str) -> tuple[str, Proc]:
    app, base = start_app(db_url, tmp)
    procs.append(app)
    worker = start_worker(f"{base}/tasks", db_url, tmp, *args)
    procs.append(worker)
    return base, worker


def _submit(base: str, task: str, *args: object) -> str:
    response = httpx.post(f"{base}/tasks/runs", json={"task": task, "args": list(args)}, timeout=5)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def _doc(base: str, run_id: str, states: tuple[str, ...] = TERMINAL) -> dict[str, Any]:
    deadline = time.monotonic() + timing.DEADLINE
    while True:
        doc: dict[str, Any] = httpx.get(f"{base}/tasks/runs/{run_id}", timeout=5).json()
        if doc["state"] in states:
            return doc
        assert time.monotonic() < deadline, f"run {run_id} still {doc['state']}"
        time.sleep(0.02)


def test_a_sync_run_executes_in_a_child_process_and_sees_itself(
    db_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    base, worker = _serve(db_url, tmp_path, procs)
    run_id = _submit(base, "where_am_i")
    doc = _doc(base, run_id)
    assert doc["state"] == "COMPLETED", doc
    pid = doc["result"]["pid"]
    assert pid != worker.pid
    assert doc["result"]["run_id"] == run_id
    worker.wait_for(rf"where_am_i printed in {pid}")
    # The child is reused: the next run goes to the same process.
    again = _doc(base, _submit(base, "where_am_i"))
    assert again["result"]["pid"] == pid


def test_a_sync_failure_in_a_child_keeps_its_type_message_and_traceback(
    db_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    base, _ = _serve(db_url, tmp_path, procs)
    doc = _doc(base, _submit(base, "where_am_i", True))
    assert doc["state"] == "FAILED"
    error = httpx.get(f"{base}/tasks/runs/{doc['id']}", timeout=5).json()["error"]
    assert error["type"] == "LookupError"
    assert error["message"].startswith("failed in ")
    assert "in where_am_i" in error["traceback"]


def test_a_sync_task_in_a_child_submits_through_the_workers_app(
    db_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    base, _ = _serve(db_url, tmp_path, procs)
    doc = _doc(base, _submit(base, "chain_sync", 2, 3))
    assert doc["state"] == "COMPLETED", doc
    assert _doc(base, doc["result"])["result"] == 5


def test_thread_isolation_runs_sync_tasks_in_the_worker_process(
    db_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    base, worker = _serve(db_url, tmp_path, procs, "--sync-isolation", "thread")
    doc = _doc(base, _submit(base, "where_am_i"))
    assert doc["result"]["pid"] == worker.pid


def test_a_cancel_stops_a_sync_run_that_ignores_cancelled(
    db_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    base, _ = _serve(db_url, tmp_path, procs)
    ledger = tmp_path / "ledger.jsonl"
    run_id = _submit(base, "ticking_sync", 60)
    _doc(base, run_id, ("RUNNING",))
    response = httpx.post(f"{base}/tasks/runs/{run_id}/cancel", timeout=5)
    assert response.status_code < 300, response.text
    cancelled_at = time.time()
    doc = _doc(base, run_id)
    assert doc["state"] == "CANCELLED"
    # Stopped within the grace after `cancelled()` turned true, then killed.
    last = max(json.loads(line)["t"] for line in ledger.read_text().splitlines())
    time.sleep(0.5)
    assert max(json.loads(line)["t"] for line in ledger.read_text().splitlines()) == last
    assert last < cancelled_at + 5


def _child(tmp_path: Path) -> subprocess.Popen[bytes]:
    """The child process as a worker starts it, with our stdout as its own."""
    out = os.dup(1)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "fastapi_bgtasks.worker.child", str(out)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=child_env("sqlite+aiosqlite:///unused.db", tmp_path),
            cwd=ROOT,
            pass_fds=(out,),
        )
    finally:
        os.close(out)


def _send(child: subprocess.Popen[bytes], message: dict[str, Any]) -> None:
    assert child.stdin is not None
    child.stdin.write((json.dumps(message) + "\n").encode())
    child.stdin.flush()


def _ready(child: subprocess.Popen[bytes]) -> dict[str, Any]:
    _send(
        child,
        {
            "path": sys.path,
            "imports": ["tests.harness.hostapp"],
            "tasks": [
                {"name": name, "module": "tests.harness.hostapp", "qualname": name}
                for name in ("ticking_sync", "hog_the_gil")
            ],
            "url": "http://127.0.0.1:9/tasks",
            "token": None,
            "log_level": 20,
        },
    )
    assert child.stdout is not None
    ready: dict[str, Any] = json.loads(child.stdout.readline())
    return ready


def _run(seconds: float, deadline: float, task: str = "ticking_sync") -> dict[str, Any]:
    return {
        "op": "run",
        "run_id": "r1",
        "task": task,
        "attempt": 1,
        "args": [seconds],
        "kwargs": {},
        "deadline": deadline,
        "max_result_bytes": 1000,
    }


def test_a_child_whose_deadline_is_not_renewed_stops_itself(tmp_path: Path) -> None:
    """As when its worker is frozen: nobody renews, nobody kills; the child
    ends itself at the deadline, mid-task."""
    child = _child(tmp_path)
    try:
        assert _ready(child) == {
            "op": "ready",
            "tasks": ["hog_the_gil", "ticking_sync"],
            "missing": {},
        }
        deadline = time.monotonic() + 1.0
        _send(child, _run(30, deadline))
        assert child.wait(timing.DEADLINE) == WATCHDOG_EXIT
        assert time.monotonic() - deadline < 0.5
    finally:
        child.kill()
        child.wait()


def test_a_task_holding_the_gil_past_the_deadline_is_ended_by_the_kernel(
    tmp_path: Path,
) -> None:
    """The watchdog thread cannot run while the task holds the GIL; the
    interval timer armed with the deadline ends the process anyway."""
    child = _child(tmp_path)
    try:
        _ready(child)
        deadline = time.monotonic() + 1.0
        _send(child, _run(40, deadline, task="hog_the_gil"))
        assert child.wait(timing.DEADLINE) == -signal.SIGALRM
        assert time.monotonic() - deadline < 0.5 + BACKSTOP_SECONDS
    finally:
        child.kill()
        child.wait()


def test_renewals_move_a_childs_deadline(tmp_path: Path) -> None:
    child = _child(tmp_path)
    try:
        _ready(child)
        _send(child, _run(1.5, time.monotonic() + 0.5))
        for _ in range(6):
            time.sleep(0.25)
            _send(child, {"op": "renew", "deadline": time.monotonic() + 0.5})
        assert child.stdout is not None
        done = json.loads(child.stdout.readline())
        assert done == {"op": "done", "kind": "COMPLETED", "result": 1.5, "error": None}
    finally:
        child.kill()
        child.wait()


def test_a_child_whose_worker_is_gone_exits_at_once(tmp_path: Path) -> None:
    child = _child(tmp_path)
    _ready(child)
    _send(child, _run(30, time.monotonic() + 30))
    assert child.stdin is not None
    child.stdin.close()  # the pipe closes as when the worker dies
    assert child.wait(5) == 0
