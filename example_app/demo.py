"""The quick start: the example app, two workers, a few runs, their results.

    python -m example_app.demo

Starts `uvicorn example_app.main:app` and two workers (`python -m
fastapi_bgtasks.worker example_app.tasks`) on the embedded SQLite default
(./bgtasks.db), submits runs through the app's own routes as a browser
would, polls their status until COMPLETED, prints it, and shuts down.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(base: str, app: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if app.poll() is not None:
            raise SystemExit("the example app exited during start-up")
        try:
            if httpx.get(f"{base}/tasks/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit("the example app did not become healthy within 30 s")


def _poll(base: str, run_id: str) -> dict[str, object]:
    deadline = time.monotonic() + 30
    while True:
        doc: dict[str, object] = httpx.get(f"{base}/tasks/runs/{run_id}", timeout=5).json()
        if doc["state"] in ("COMPLETED", "FAILED", "CANCELLED", "CRASHED"):
            return doc
        if time.monotonic() > deadline:
            raise SystemExit(f"run {run_id} did not finish: {doc}")
        time.sleep(0.05)


def _start_worker(base: str, env: dict[str, str]) -> tuple[subprocess.Popen[str], threading.Event]:
    """A worker whose log lines are echoed here; the event is set once it connects."""
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fastapi_bgtasks.worker",
            "example_app.tasks",
            "--url",
            f"{base}/tasks",
            "--concurrency",
            "2",
            "--prefetch",
            "0",
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    connected = threading.Event()

    def echo() -> None:
        assert worker.stderr is not None
        for line in worker.stderr:
            sys.stderr.write(line)
            if " connected to " in line:
                connected.set()

    threading.Thread(target=echo, daemon=True).start()
    return worker, connected


def main() -> int:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    print(f"Starting the example app on {base} (SQLite ./bgtasks.db) and two workers\n", flush=True)
    app = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "example_app.main:app",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
    )
    workers: list[subprocess.Popen[str]] = []
    try:
        _wait_healthy(base, app)
        started = [_start_worker(base, env) for _ in range(2)]
        workers.extend(worker for worker, _ in started)
        for _, connected in started:
            if not connected.wait(30):
                raise SystemExit("a worker did not connect within 30 s")
        runs = []
        for name in ("Joaquim", "Agrajag", "Marvin", "Trillian", "Zaphod"):
            response = httpx.post(f"{base}/task", params={"name": name})
            runs.append(("my_background_task", name, response.json()["task_run_id"]))
        response = httpx.post(f"{base}/users", json={"email": "arthur@example.com"})
        runs.append(("send_welcome_email", "arthur@example.com", response.json()["task_run_id"]))
        failed = 0
        for task, argument, run_id in runs:
            doc = _poll(base, run_id)
            failed += doc["state"] != "COMPLETED"
            print(
                f"  {run_id}  {task}({argument!r}) -> {doc['state']}  result={doc['result']!r}"
                f"  worker={doc['worker_id']}",
                flush=True,
            )
        print(f"\n{len(runs) - failed} of {len(runs)} runs COMPLETED. Shutting down.", flush=True)
        return 1 if failed else 0
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.wait(30)
        app.send_signal(signal.SIGTERM)
        app.wait(30)


if __name__ == "__main__":
    sys.exit(main())
