"""End to end over real processes: uvicorn serving the host app, worker CLIs
connected over HTTP, on SQLite and PostgreSQL. One behaviour per test."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import timing
from tests.harness.procs import ROOT, Proc, child_env, start_app, start_worker


def wait_terminal(base: str, run_id: str, timeout: float = timing.DEADLINE) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        doc = httpx.get(f"{base}/tasks/runs/{run_id}", timeout=5).json()
        if doc["state"] in ("COMPLETED", "FAILED", "CANCELLED", "CRASHED"):
            return doc
        if time.monotonic() > deadline:
            raise AssertionError(f"run {run_id} still {doc['state']}: {doc}")
        time.sleep(0.02)


def wait_state(
    base: str, run_id: str, state: str, timeout: float = timing.DEADLINE
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        doc = httpx.get(f"{base}/tasks/runs/{run_id}", timeout=5).json()
        if doc["state"] == state:
            return doc
        if time.monotonic() > deadline:
            raise AssertionError(f"run {run_id} is {doc['state']}, not {state}: {doc}")
        time.sleep(0.02)


def submit(base: str, task: str, *args: Any, **kwargs: Any) -> str:
    response = httpx.post(
        f"{base}/tasks/runs", json={"task": task, "args": list(args), "kwargs": kwargs}
    )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def ledger(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "ledger.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@pytest.fixture
def served(shared_server: str) -> str:
    """An app with one worker of concurrency 4, shared by this module."""
    return shared_server


def test_a_route_submit_completes_with_its_result(served: str) -> None:
    response = httpx.post(f"{served}/add", params={"a": 2, "b": 3})
    assert response.status_code == 202
    doc = wait_terminal(served, response.json()["task_run_id"])
    assert doc["state"] == "COMPLETED"
    assert doc["result"] == 5
    assert doc["attempt"] == 1
    assert doc["worker_id"]
    assert doc["started_at"] and doc["finished_at"] and doc["finished_at"].endswith("Z")


def test_a_sync_route_submits_with_delay_sync(served: str) -> None:
    response = httpx.post(f"{served}/greet-sync", params={"name": "Agrajag"})
    assert response.status_code == 202, response.text
    doc = wait_terminal(served, response.json()["task_run_id"])
    assert doc["result"] == "Hello, Agrajag!"


def test_raw_http_submit_completes(served: str) -> None:
    run_id = submit(served, "greet", "Joaquim")
    assert wait_terminal(served, run_id)["result"] == "Hello, Joaquim!"


def test_arguments_arrive_typed_in_the_worker(served: str) -> None:
    run_id = submit(
        served,
        "typed",
        "2026-01-02T03:04:05Z",
        "12345678-1234-5678-1234-567812345678",
        {"x": 1, "y": "2"},
    )
    doc = wait_terminal(served, run_id)
    assert doc["result"] == {"when": "datetime", "ident": "UUID", "point": "Point", "sum": "3"}


def test_a_retried_run_completes_on_attempt_three(served: str) -> None:
    run_id = submit(served, "flaky", "k1", 2)
    doc = wait_terminal(served, run_id)
    assert doc["state"] == "COMPLETED"
    assert doc["attempt"] == 3
    assert doc["result"] == "ok after 2 failures"


def test_a_failure_is_recorded_as_a_document(served: str) -> None:
    run_id = submit(served, "fail", "boom")
    doc = wait_terminal(served, run_id)
    assert doc["state"] == "FAILED"
    assert doc["error"]["type"] == "ValueError"
    assert doc["error"]["message"] == "boom"
    assert "Traceback" in doc["error"]["traceback"]  # loopback client: operator view
    assert doc["result"] is None


def test_retries_spent_end_failed_after_max_attempts(served: str) -> None:
    run_id = submit(served, "flaky", "k2", 10)
    doc = wait_terminal(served, run_id)
    assert doc["state"] == "FAILED"
    assert doc["attempt"] == doc["max_attempts"] == 4
    assert doc["error"]["message"] == "failure 4"


def test_an_async_task_over_its_timeout_fails_with_timeout_error(served: str) -> None:
    doc = wait_terminal(served, submit(served, "too_slow"))
    assert doc["state"] == "FAILED"
    assert doc["error"]["type"] == "TimeoutError"


def test_a_sync_task_over_its_timeout_sees_cancelled_and_fails(served: str) -> None:
    doc = wait_terminal(served, submit(served, "too_slow_sync"))
    assert doc["state"] == "FAILED"
    assert doc["error"]["type"] == "TimeoutError"


def test_an_unserializable_result_fails_naming_the_type(served: str) -> None:
    doc = wait_terminal(served, submit(served, "unserializable"))
    assert doc["state"] == "FAILED"
    assert doc["error"]["type"] == "NotSerializable"
    assert "object" in doc["error"]["message"]


def test_a_task_can_submit_and_await_another(served: str) -> None:
    doc = wait_terminal(served, submit(served, "chain", 20, 22))
    assert doc["state"] == "COMPLETED", doc
    assert doc["result"] == 42


def test_a_scheduled_run_is_cancelled_at_once(served: str) -> None:
    response = httpx.post(
        f"{served}/tasks/runs", json={"task": "greet", "args": ["later"], "countdown": 60}
    )
    run_id = response.json()["id"]
    cancelled = httpx.post(f"{served}/tasks/runs/{run_id}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["state"] == "CANCELLED"
    again = httpx.post(f"{served}/tasks/runs/{run_id}/cancel")
    assert again.status_code == 409
    assert again.json()["error"] == "run_finished"


def test_a_running_run_is_cancelled_in_its_worker(served: str, tmp_path: Path) -> None:
    gate = tmp_path / "never"
    run_id = submit(served, "wait_for_file", str(gate))
    wait_state(served, run_id, "RUNNING")
    response = httpx.post(f"{served}/tasks/runs/{run_id}/cancel")
    assert response.status_code == 200
    doc = wait_terminal(served, run_id)
    assert doc["state"] == "CANCELLED"


def test_a_countdown_run_waits_until_due(served: str) -> None:
    started = time.monotonic()
    response = httpx.post(
        f"{served}/tasks/runs", json={"task": "greet", "args": ["soon"], "countdown": 0.5}
    )
    doc = wait_terminal(served, response.json()["id"])
    assert doc["state"] == "COMPLETED"
    assert time.monotonic() - started >= 0.5
    assert doc["started_at"] >= doc["scheduled_at"]


def test_two_workers_share_twelve_runs(
    app_server: tuple[Proc, str], workers: list[Proc], db_url: str, tmp_path: Path
) -> None:
    _, base = app_server
    for _ in range(2):
        workers.append(
            start_worker(f"{base}/tasks", db_url, tmp_path, "--prefetch", "0", concurrency=3)
        )
    ids = [submit(base, "sleep_sync", 0.3) for _ in range(12)]
    docs = [wait_terminal(base, run_id) for run_id in ids]
    assert all(d["state"] == "COMPLETED" for d in docs)
    assert len({d["worker_id"] for d in docs}) == 2


def test_two_default_workers_share_a_small_batch(
    app_server: tuple[Proc, str], workers: list[Proc], db_url: str, tmp_path: Path
) -> None:
    """With default flags (a deep prefetch), three runs stored at once still
    go to both workers: the app shares a small batch among the feeds."""
    _, base = app_server
    for _ in range(2):
        workers.append(start_worker(f"{base}/tasks", db_url, tmp_path, concurrency=10))
    for _ in range(3):  # each batch on its own, as a route would submit it
        body = {"task": "sleep_async", "calls": [{"args": [0.2]}] * 3}
        response = httpx.post(f"{base}/tasks/runs/batch", json=body)
        assert response.status_code == 202, response.text
        docs = [wait_terminal(base, str(run["id"])) for run in response.json()["runs"]]
        assert all(d["state"] == "COMPLETED" for d in docs)
        assert len({d["worker_id"] for d in docs}) == 2


def test_a_script_submits_straight_to_the_store(
    served: str, shared_db: tuple[str, Path], tmp_path: Path
) -> None:
    db_url = shared_db[0]
    script = (
        "import anyio\n"
        "from tests.harness.hostapp import greet\n"
        "async def main():\n"
        "    runs = [await greet.delay(n) for n in ('Ann', 'Bob', 'Cy')]\n"
        "    for run in runs:\n"
        "        print(await run.result(timeout=20))\n"
        "anyio.run(main)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=child_env(db_url, tmp_path),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["Hello,", "Ann!", "Hello,", "Bob!", "Hello,", "Cy!"]


def test_a_sync_script_uses_delay_sync_and_exits(
    served: str, shared_db: tuple[str, Path], tmp_path: Path
) -> None:
    db_url = shared_db[0]
    script = (
        "from tests.harness.hostapp import greet\n"
        "run = greet.delay_sync('Dee')\n"
        "print(run.state.value)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=child_env(db_url, tmp_path),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "SCHEDULED"


@pytest.mark.slow
def test_a_worker_killed_mid_run_loses_nothing(
    app_server: tuple[Proc, str], workers: list[Proc], db_url: str, tmp_path: Path
) -> None:
    _, base = app_server
    doomed = start_worker(f"{base}/tasks", db_url, tmp_path, "--prefetch", "0", concurrency=2)
    workers.append(doomed)
    ids = [submit(base, "sleep_async", 1.5) for _ in range(2)]
    for run_id in ids:
        wait_state(base, run_id, "RUNNING")
    doomed.signal(signal.SIGKILL)
    survivor = start_worker(f"{base}/tasks", db_url, tmp_path, concurrency=2)
    workers.append(survivor)
    docs = [wait_terminal(base, run_id, timeout=30) for run_id in ids]
    assert [d["state"] for d in docs] == ["COMPLETED", "COMPLETED"]
    # A lost worker does not spend a retry: attempt 2 of max 1 completes.
    assert all(d["attempt"] == 2 and d["max_attempts"] == 1 for d in docs)
    starts = [e for e in ledger(tmp_path) if e["event"] == "start"]
    assert {e["pid"] for e in starts} == {doomed.pid, survivor.pid}


@pytest.mark.slow
def test_stored_runs_survive_an_app_restart(
    db_url: str, tmp_path: Path, workers: list[Proc]
) -> None:
    proc, base = start_app(db_url, tmp_path)
    try:
        done = submit(base, "greet", "before")
        queued = [submit(base, "add", i, i) for i in range(5)]
        assert proc.stop() in (0, -signal.SIGTERM)  # uvicorn re-raises the signal
        proc, base = start_app(db_url, tmp_path)
        assert httpx.get(f"{base}/tasks/runs/{done}").json()["state"] == "SCHEDULED"
        workers.append(start_worker(f"{base}/tasks", db_url, tmp_path))
        results = [wait_terminal(base, run_id)["result"] for run_id in queued]
        assert results == [0, 2, 4, 6, 8]
    finally:
        proc.stop()


@pytest.mark.slow
def test_the_app_exits_promptly_on_sigterm_with_a_worker_connected(
    app_server: tuple[Proc, str], workers: list[Proc], db_url: str, tmp_path: Path
) -> None:
    proc, base = app_server
    workers.append(start_worker(f"{base}/tasks", db_url, tmp_path))
    with httpx.stream("GET", f"{base}/tasks/runs/{submit(base, 'greet', 'x')}/events"):
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        proc.popen.wait(15)
    assert time.monotonic() - started < 8
    assert proc.popen.returncode in (0, -signal.SIGTERM)


@pytest.mark.slow
def test_a_worker_drains_on_sigterm(
    app_server: tuple[Proc, str], workers: list[Proc], db_url: str, tmp_path: Path
) -> None:
    _, base = app_server
    worker = start_worker(f"{base}/tasks", db_url, tmp_path, "--prefetch", "2", concurrency=1)
    running = submit(base, "sleep_async", 1.0)
    wait_state(base, running, "RUNNING")
    waiting = [submit(base, "sleep_async", 0.01) for _ in range(2)]
    for run_id in waiting:
        wait_state(base, run_id, "PENDING")
    worker.signal(signal.SIGTERM)
    assert worker.popen.wait(15) == 0
    assert wait_terminal(base, running)["state"] == "COMPLETED"
    # Runs it held but had not started were handed back, their attempt unspent.
    for run_id in waiting:
        doc = httpx.get(f"{base}/tasks/runs/{run_id}").json()
        assert doc["state"] == "SCHEDULED" and doc["attempt"] == 0
    workers.append(start_worker(f"{base}/tasks", db_url, tmp_path))
    assert all(wait_terminal(base, r)["state"] == "COMPLETED" for r in waiting)


def test_run_events_stream_state_changes_until_the_end(served: str) -> None:
    run_id = submit(served, "sleep_async", 0.3)
    events: list[tuple[str, dict[str, Any]]] = []
    with httpx.Client(timeout=httpx.Timeout(10.0)) as client:
        with client.stream("GET", f"{served}/tasks/runs/{run_id}/events") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            event = None
            for line in response.iter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and event:
                    events.append((event, json.loads(line.split(":", 1)[1])))
                    if event == "end":
                        break
    states = [data["state"] for kind, data in events if kind == "state"]
    assert states[-1] == "COMPLETED"
    assert "RUNNING" in states or "PENDING" in states or states[0] == "SCHEDULED"
    assert events[-1] == ("end", {"state": "COMPLETED"})


def test_events_of_an_unknown_run_are_a_404(served: str) -> None:
    response = httpx.get(f"{served}/tasks/runs/00000000-0000-4000-8000-000000000000/events")
    assert response.status_code == 404
    assert response.json()["error"] == "run_not_found"


def test_a_script_without_a_schema_fails_naming_the_database(tmp_path: Path) -> None:
    db = tmp_path / "empty.db"
    script = "import anyio\nfrom tests.harness.hostapp import greet\nanyio.run(greet.delay, 'x')\n"
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=child_env(f"sqlite+aiosqlite:///{db}", tmp_path),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "SchemaError" in out.stderr
    assert str(db) in out.stderr


@pytest.mark.slow
def test_a_worker_rides_out_an_app_restart(
    db_url: str, tmp_path: Path, workers: list[Proc]
) -> None:
    proc, base = start_app(db_url, tmp_path)
    port = int(base.rsplit(":", 1)[1])
    try:
        worker = start_worker(f"{base}/tasks", db_url, tmp_path)
        workers.append(worker)
        assert wait_terminal(base, submit(base, "add", 1, 1))["result"] == 2
        proc.stop()
        proc, base = start_app(db_url, tmp_path, port=port)
        worker.wait_for(r"reconnected to")
        assert wait_terminal(base, submit(base, "add", 2, 2))["result"] == 4
    finally:
        proc.stop()


def test_bg_serve_runs_the_same_worker_in_process(
    served: str, shared_db: tuple[str, Path], tmp_path: Path
) -> None:
    script = (
        "import sys\n"
        "from tests.harness.hostapp import bg, greet\n"
        "bg.serve(greet, url=sys.argv[1])\n"
    )
    env = {
        k: v for k, v in child_env(shared_db[0], tmp_path).items() if k != "BGTASKS_DATABASE_URL"
    }
    proc = Proc([sys.executable, "-c", script, f"{served}/tasks"], tmp_path / "serve.log", env)
    try:
        proc.wait_for(r"Worker \S+ connected to \S+ \(1 tasks\)")
        doc = wait_terminal(served, submit(served, "greet", "served"))
        assert doc["result"] == "Hello, served!"
    finally:
        assert proc.stop() == 0


def test_a_result_just_under_the_limit_is_stored(served: str) -> None:
    doc = wait_terminal(served, submit(served, "big", 1024 * 1024 - 100))
    assert doc["state"] == "COMPLETED"
    assert len(doc["result"]) == 1024 * 1024 - 100


def test_a_result_over_the_limit_fails_as_result_too_large(served: str) -> None:
    doc = wait_terminal(served, submit(served, "big", 1024 * 1024 + 100))
    assert doc["state"] == "FAILED"
    assert doc["error"]["type"] == "ResultTooLarge"


@pytest.mark.slow
def test_a_sync_task_past_the_grace_period_does_not_hold_the_worker(
    app_server: tuple[Proc, str], workers: list[Proc], db_url: str, tmp_path: Path
) -> None:
    _, base = app_server
    worker = start_worker(
        f"{base}/tasks", db_url, tmp_path, "--grace-seconds", "0.5", "--prefetch", "0"
    )
    run_id = submit(base, "sleep_sync", 30)
    wait_state(base, run_id, "RUNNING")
    started = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.popen.wait(20) == 0
    assert time.monotonic() - started < 10
    # Its lease runs out and the run goes to the next worker, not lost.
    doc = httpx.get(f"{base}/tasks/runs/{run_id}").json()
    assert doc["state"] in ("RUNNING", "SCHEDULED", "PENDING")


def test_the_example_app_demo_runs_and_every_run_completes(tmp_path: Path) -> None:
    """README's quick start: the example app with two workers on SQLite."""
    env = child_env(f"sqlite+aiosqlite:///{tmp_path}/unused.db", tmp_path)
    env.pop("BGTASKS_DATABASE_URL")  # the demo runs on the embedded default
    out = subprocess.run(
        [sys.executable, "-m", "example_app.demo"],
        env=env,
        cwd=tmp_path,  # ./bgtasks.db lands here
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "6 of 6 runs COMPLETED" in out.stdout
    assert "result='Hello, Joaquim!'" in out.stdout
    assert (tmp_path / "bgtasks.db").exists()
