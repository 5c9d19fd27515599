"""Version skew across real processes: an app and workers of the new task
module (tests/skew/tasks_v2.py) beside workers of the old one (tasks_v1.py),
as during a rolling deploy. A run a worker cannot accept is handed back to
a worker that can, without spending a retry, and says so on its document; a
task no connected worker serves is named on the document and in the log."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import timing
from tests.harness.procs import Proc, start_app, start_worker

pytestmark = pytest.mark.slow

OLD = ("tests.skew.tasks_v1",)
NEW = ("tests.skew.tasks_v2",)
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}


@pytest.fixture
def app(db_url: str, tmp_path: Path) -> Iterator[tuple[Proc, str]]:
    proc, base = start_app(db_url, tmp_path, module="tests.skew.app:app")
    try:
        yield proc, base
    finally:
        proc.stop()


def submit(base: str, task: str, *args: Any, **kwargs: Any) -> str:
    body = {"task": task, "args": list(args), "kwargs": kwargs}
    response = httpx.post(f"{base}/tasks/runs", json=body, timeout=5)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def document(base: str, run_id: str) -> dict[str, Any]:
    doc: dict[str, Any] = httpx.get(f"{base}/tasks/runs/{run_id}", timeout=5).json()
    return doc


def history(base: str, run_id: str) -> list[dict[str, Any]]:
    body = httpx.get(f"{base}/tasks/runs/{run_id}/history", timeout=5).json()
    return list(body["transitions"])


def until(check: Callable[[], Any], what: str, timeout: float = timing.DEADLINE) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def rejections(base: str, run_id: str) -> int:
    return sum(1 for t in history(base, run_id) if (t["reason"] or "").startswith("rejected"))


def test_runs_an_old_worker_cannot_accept_wait_for_a_new_one_without_spending_a_retry(
    db_url: str, tmp_path: Path, app: tuple[Proc, str], workers: list[Proc]
) -> None:
    proc, base = app
    workers.append(start_worker(f"{base}/tasks", db_url, tmp_path, modules=OLD, name="old"))
    ids = [submit(base, "resize", width=4242, height=i) for i in range(8)]

    def all_handed_back() -> list[dict[str, Any]] | None:
        docs = [document(base, run_id) for run_id in ids]
        done = all(d["reason"] == "rejected: IncompatibleArguments" for d in docs)
        return docs if done else None

    for doc in until(all_handed_back, "every run handed back by the old worker"):
        assert doc["state"] == "SCHEDULED"
        assert doc["attempt"] == 0  # retries=0, and not one spent
        assert doc["error"]["type"] == "IncompatibleArguments"
        assert "size" in doc["error"]["message"]  # the parameter it missed
        assert "4242" not in doc["error"]["message"]  # never the arguments
    workers[0].wait_for(r"cannot accept it \(IncompatibleArguments")
    proc.wait_for(r"rejected by worker \S+ \(IncompatibleArguments")
    # The worker that rejected them is not offered them again.
    time.sleep(1.0)
    assert [rejections(base, run_id) for run_id in ids] == [1] * len(ids)

    workers.append(start_worker(f"{base}/tasks", db_url, tmp_path, modules=NEW, name="new"))

    def all_done() -> list[dict[str, Any]] | None:
        docs = [document(base, run_id) for run_id in ids]
        return docs if all(d["state"] in TERMINAL for d in docs) else None

    docs = until(all_done, "every run finished on the new worker")
    assert [d["state"] for d in docs] == ["COMPLETED"] * len(ids)
    assert [d["result"] for d in docs] == [f"new:4242x{i}" for i in range(len(ids))]
    assert {d["attempt"] for d in docs} == {1}
    assert all(d["reason"] is None and d["waiting_for"] is None for d in docs)


def test_a_mixed_fleet_completes_every_run_of_a_changed_task(
    db_url: str, tmp_path: Path, app: tuple[Proc, str], workers: list[Proc]
) -> None:
    """Old and new workers on one queue, as in a rolling deploy: none fails,
    no run is rejected twice by workers of one signature, and the app names
    the old signature once, however many workers have it."""
    proc, base = app
    for name, modules in (("old", OLD), ("new", NEW), ("old2", OLD)):
        workers.append(start_worker(f"{base}/tasks", db_url, tmp_path, modules=modules, name=name))
    ids = [submit(base, "resize", width=i, height=2) for i in range(40)]

    def all_done() -> list[dict[str, Any]] | None:
        docs = [document(base, run_id) for run_id in ids]
        return docs if all(d["state"] in TERMINAL for d in docs) else None

    docs = until(all_done, "every run finished", timeout=3 * timing.DEADLINE)
    assert [d["state"] for d in docs] == ["COMPLETED"] * len(ids)
    assert all(d["result"].startswith("new:") for d in docs)
    old_logs = workers[0].output() + workers[2].output()
    assert "Finished in state" not in old_logs  # no old worker ran one
    # Rejected once by the old signature, the run is offered to neither old worker again.
    assert max(rejections(base, run_id) for run_id in ids) <= 1
    other = r"serves task 'resize' with a signature other than this app's"
    assert len(re.findall(other, proc.output())) == 1


def test_a_task_no_connected_worker_serves_is_named_on_its_runs_and_in_the_log(
    db_url: str, tmp_path: Path, app: tuple[Proc, str], workers: list[Proc]
) -> None:
    proc, base = app
    args = ("--task", "resize", "--task", "check_card")
    workers.append(start_worker(f"{base}/tasks", db_url, tmp_path, *args, modules=NEW))
    waiting = submit(base, "unserved", 1)
    doc = document(base, waiting)
    assert doc["state"] == "SCHEDULED"
    assert "unserved" in doc["waiting_for"] and "No worker" in doc["waiting_for"]
    served = submit(base, "resize", 1, 2)
    until(lambda: document(base, served)["state"] == "COMPLETED", "the served run")
    assert document(base, served)["waiting_for"] is None
    # One warning per task name, once its runs have waited over a lease.
    proc.wait_for(r"Runs of task 'unserved' have been due for over")
    time.sleep(4 * timing.LEASE_SECONDS)
    assert len(re.findall(r"Runs of task 'unserved'", proc.output())) == 1
    assert "Runs of task 'resize'" not in proc.output()


def test_a_validation_error_a_task_raises_is_stored_without_its_input(
    db_url: str, tmp_path: Path, app: tuple[Proc, str], workers: list[Proc]
) -> None:
    _, base = app
    workers.append(start_worker(f"{base}/tasks", db_url, tmp_path, modules=NEW))
    run_id = submit(base, "check_card", "4242-1234-secret")
    doc = until(lambda: (d := document(base, run_id))["state"] in TERMINAL and d, "the run to fail")
    assert doc["state"] == "FAILED"
    assert doc["error"]["type"] == "ValidationError"
    message = doc["error"]["message"]
    assert "number: int_parsing" in message
    assert "4242" not in message and "secret" not in message
